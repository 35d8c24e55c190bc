//! Reads `template.yaml` so the local stack is built from the same definitions that deploy to AWS.
//!
//! Only what local provisioning needs is interpreted: DynamoDB tables, SQS queues and the bucket,
//! with `!Sub`/`!Ref`/`!GetAtt` (short or `Fn::` long form) resolved for a given stack name,
//! account and region. Everything else stays reachable as raw YAML for tests.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::{Mapping, Value};

/// The account id moto reports; local resource names and ARNs use it.
pub const LOCAL_ACCOUNT_ID: &str = "123456789012";

const TABLE_TYPE: &str = "AWS::DynamoDB::Table";
const QUEUE_TYPE: &str = "AWS::SQS::Queue";
const BUCKET_TYPE: &str = "AWS::S3::Bucket";

/// A parsed SAM/CloudFormation template.
#[derive(Debug, Clone)]
pub struct Template {
    root: Value,
    resources: Mapping,
}

/// Everything local provisioning creates, with names resolved for one stack.
#[derive(Debug, Clone, PartialEq)]
pub struct StackSpecs {
    pub tables: Vec<TableSpec>,
    pub queues: Vec<QueueSpec>,
    pub bucket: BucketSpec,
    /// `SOURCE_TABLE_PREFIX` of the functions' global environment ("" when not set).
    pub source_table_prefix: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TableSpec {
    pub logical_id: String,
    pub name: String,
    pub billing_mode: BillingMode,
    pub key_schema: Vec<KeyElement>,
    pub attributes: Vec<AttributeDef>,
    pub gsis: Vec<GsiSpec>,
    /// Set only when TTL is declared and enabled.
    pub ttl_attribute: Option<String>,
    pub sse_enabled: bool,
    /// `StreamSpecification.StreamViewType`, when the table has a stream.
    pub stream_view_type: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingMode {
    PayPerRequest,
    Provisioned,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyElement {
    pub attribute: String,
    pub key_type: KeyType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Hash,
    Range,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeDef {
    pub name: String,
    pub attribute_type: AttributeType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttributeType {
    S,
    N,
    B,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GsiSpec {
    pub name: String,
    pub key_schema: Vec<KeyElement>,
    pub projection: Projection,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Projection {
    All,
    KeysOnly,
    Include(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub logical_id: String,
    pub name: String,
    pub visibility_timeout: Option<u32>,
    pub message_retention_period: Option<u32>,
    pub sqs_managed_sse: bool,
    pub redrive: Option<RedriveSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedriveSpec {
    /// Logical id of the dead-letter queue in the template.
    pub target_logical_id: String,
    pub max_receive_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSpec {
    pub logical_id: String,
    pub name: String,
    pub lifecycle_rules: Vec<LifecycleRuleSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleRuleSpec {
    pub id: Option<String>,
    pub enabled: bool,
    pub prefix: Option<String>,
    pub expiration_days: Option<i32>,
    pub abort_incomplete_multipart_days: Option<i32>,
}

impl StackSpecs {
    pub fn table(&self, logical_id: &str) -> Result<&TableSpec> {
        self.tables
            .iter()
            .find(|t| t.logical_id == logical_id)
            .ok_or_else(|| anyhow!("template declares no table {logical_id}"))
    }

    pub fn queue(&self, logical_id: &str) -> Result<&QueueSpec> {
        self.queues
            .iter()
            .find(|q| q.logical_id == logical_id)
            .ok_or_else(|| anyhow!("template declares no queue {logical_id}"))
    }
}

impl Template {
    pub fn load(path: &Path) -> Result<Self> {
        let yaml = std::fs::read_to_string(path)
            .with_context(|| format!("reading template {}", path.display()))?;
        Self::parse(&yaml).with_context(|| format!("parsing template {}", path.display()))
    }

    pub fn parse(yaml: &str) -> Result<Self> {
        let root: Value = serde_yaml::from_str(yaml).context("template is not valid YAML")?;
        let resources = root
            .get("Resources")
            .and_then(Value::as_mapping)
            .cloned()
            .ok_or_else(|| anyhow!("template has no Resources mapping"))?;
        Ok(Self { root, resources })
    }

    /// The whole document, for assertions on sections this module does not interpret.
    pub fn root(&self) -> &Value {
        &self.root
    }

    pub fn resources(&self) -> &Mapping {
        &self.resources
    }

    pub fn resource(&self, logical_id: &str) -> Option<&Value> {
        self.resources.get(logical_id)
    }

    pub fn resource_type(&self, logical_id: &str) -> Option<&str> {
        self.resource(logical_id)?.get("Type")?.as_str()
    }

    /// Logical ids of the resources of one type, in document order.
    pub fn logical_ids_of_type(&self, resource_type: &str) -> Vec<&str> {
        self.resources
            .iter()
            .filter(|(_, r)| r.get("Type").and_then(Value::as_str) == Some(resource_type))
            .filter_map(|(id, _)| id.as_str())
            .collect()
    }

    pub fn properties(&self, logical_id: &str) -> Option<&Mapping> {
        self.resource(logical_id)?.get("Properties")?.as_mapping()
    }

    /// A property of a serverless function as SAM sees it: the function's own value, else the one
    /// from `Globals.Function`.
    pub fn function_property(&self, logical_id: &str, key: &str) -> Option<&Value> {
        self.properties(logical_id)
            .and_then(|p| p.get(key))
            .or_else(|| self.root.get("Globals")?.get("Function")?.get(key))
    }

    /// A function's environment variables as SAM merges them: globals overlaid by its own.
    pub fn function_environment(&self, logical_id: &str) -> Mapping {
        let variables = |env: Option<&Value>| {
            env.and_then(|e| e.get("Variables"))
                .and_then(Value::as_mapping)
                .cloned()
                .unwrap_or_default()
        };
        let mut merged = variables(
            self.root
                .get("Globals")
                .and_then(|g| g.get("Function"))
                .and_then(|f| f.get("Environment")),
        );
        let own = variables(
            self.properties(logical_id)
                .and_then(|p| p.get("Environment")),
        );
        for (k, v) in own {
            merged.insert(k, v);
        }
        merged
    }

    /// Resolves tables, queues and the bucket for `stack` in `account`/`region`.
    pub fn stack_specs(&self, stack: &str, account: &str, region: &str) -> Result<StackSpecs> {
        let ctx = Resolver {
            stack,
            account,
            region,
            parameters: self.parameter_defaults(),
        };

        let tables = self
            .logical_ids_of_type(TABLE_TYPE)
            .into_iter()
            .map(|id| {
                self.table_spec(id, &ctx)
                    .with_context(|| format!("table {id}"))
            })
            .collect::<Result<Vec<_>>>()?;

        let queues = self
            .logical_ids_of_type(QUEUE_TYPE)
            .into_iter()
            .map(|id| {
                self.queue_spec(id, &ctx)
                    .with_context(|| format!("queue {id}"))
            })
            .collect::<Result<Vec<_>>>()?;
        for q in &queues {
            if let Some(r) = &q.redrive {
                if !queues.iter().any(|t| t.logical_id == r.target_logical_id) {
                    bail!(
                        "queue {} redrives to {}, which is not a queue of the template",
                        q.logical_id,
                        r.target_logical_id
                    );
                }
            }
        }

        let bucket = match self.logical_ids_of_type(BUCKET_TYPE).as_slice() {
            [id] => self
                .bucket_spec(id, &ctx)
                .with_context(|| format!("bucket {id}"))?,
            ids => bail!("expected exactly one {BUCKET_TYPE}, found {}", ids.len()),
        };

        let source_table_prefix = match self
            .root
            .get("Globals")
            .and_then(|g| g.get("Function"))
            .and_then(|f| f.get("Environment"))
            .and_then(|e| e.get("Variables"))
            .and_then(|v| v.get("SOURCE_TABLE_PREFIX"))
        {
            Some(v) => ctx.string(v).context("Globals SOURCE_TABLE_PREFIX")?,
            None => String::new(),
        };

        Ok(StackSpecs {
            tables,
            queues,
            bucket,
            source_table_prefix,
        })
    }

    fn parameter_defaults(&self) -> HashMap<String, String> {
        let Some(params) = self.root.get("Parameters").and_then(Value::as_mapping) else {
            return HashMap::new();
        };
        params
            .iter()
            .filter_map(|(name, p)| {
                let default = scalar_string(p.get("Default")?)?;
                Some((name.as_str()?.to_owned(), default))
            })
            .collect()
    }

    fn required_properties(&self, logical_id: &str) -> Result<&Mapping> {
        self.properties(logical_id)
            .ok_or_else(|| anyhow!("{logical_id} has no Properties"))
    }

    fn table_spec(&self, logical_id: &str, ctx: &Resolver<'_>) -> Result<TableSpec> {
        let props = self.required_properties(logical_id)?;
        let name = ctx.string(required(props, "TableName")?)?;
        let billing_mode = match props.get("BillingMode").map(plain_str).transpose()? {
            Some("PAY_PER_REQUEST") => BillingMode::PayPerRequest,
            Some("PROVISIONED") | None => BillingMode::Provisioned,
            Some(other) => bail!("unknown BillingMode {other}"),
        };
        let key_schema = key_schema(required(props, "KeySchema")?)?;
        let attributes = sequence(required(props, "AttributeDefinitions")?)?
            .iter()
            .map(|a| {
                Ok(AttributeDef {
                    name: plain_str(required_in(a, "AttributeName")?)?.to_owned(),
                    attribute_type: match plain_str(required_in(a, "AttributeType")?)? {
                        "S" => AttributeType::S,
                        "N" => AttributeType::N,
                        "B" => AttributeType::B,
                        other => bail!("unknown AttributeType {other}"),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()
            .context("AttributeDefinitions")?;
        let gsis = match props.get("GlobalSecondaryIndexes") {
            None => Vec::new(),
            Some(v) => sequence(v)?
                .iter()
                .map(gsi_spec)
                .collect::<Result<Vec<_>>>()
                .context("GlobalSecondaryIndexes")?,
        };
        let ttl_attribute = match props.get("TimeToLiveSpecification") {
            None => None,
            Some(ttl) => {
                let enabled = flag(required_in(ttl, "Enabled")?)?;
                let attribute = plain_str(required_in(ttl, "AttributeName")?)?;
                enabled.then(|| attribute.to_owned())
            }
        };
        let sse_enabled = match props.get("SSESpecification") {
            None => false,
            Some(sse) => flag(required_in(sse, "SSEEnabled")?)?,
        };
        let stream_view_type = match props.get("StreamSpecification") {
            None => None,
            Some(stream) => Some(plain_str(required_in(stream, "StreamViewType")?)?.to_owned()),
        };
        Ok(TableSpec {
            logical_id: logical_id.to_owned(),
            name,
            billing_mode,
            key_schema,
            attributes,
            gsis,
            ttl_attribute,
            sse_enabled,
            stream_view_type,
        })
    }

    fn queue_spec(&self, logical_id: &str, ctx: &Resolver<'_>) -> Result<QueueSpec> {
        let props = self.required_properties(logical_id)?;
        let name = ctx.string(required(props, "QueueName")?)?;
        let seconds = |key: &str| -> Result<Option<u32>> {
            props
                .get(key)
                .map(|v| number(v).with_context(|| key.to_owned()))
                .transpose()
        };
        let redrive = match props.get("RedrivePolicy") {
            None => None,
            Some(policy) => Some(RedriveSpec {
                target_logical_id: referenced_logical_id(required_in(
                    policy,
                    "deadLetterTargetArn",
                )?)
                .context("RedrivePolicy deadLetterTargetArn")?,
                max_receive_count: number(required_in(policy, "maxReceiveCount")?)
                    .context("RedrivePolicy maxReceiveCount")?,
            }),
        };
        Ok(QueueSpec {
            logical_id: logical_id.to_owned(),
            name,
            visibility_timeout: seconds("VisibilityTimeout")?,
            message_retention_period: seconds("MessageRetentionPeriod")?,
            sqs_managed_sse: props
                .get("SqsManagedSseEnabled")
                .map(flag)
                .transpose()?
                .unwrap_or(false),
            redrive,
        })
    }

    fn bucket_spec(&self, logical_id: &str, ctx: &Resolver<'_>) -> Result<BucketSpec> {
        let props = self.required_properties(logical_id)?;
        let name = ctx.string(required(props, "BucketName")?)?;
        let rules = match props
            .get("LifecycleConfiguration")
            .and_then(|l| l.get("Rules"))
        {
            None => Vec::new(),
            Some(rules) => sequence(rules)?
                .iter()
                .map(lifecycle_rule)
                .collect::<Result<Vec<_>>>()
                .context("LifecycleConfiguration")?,
        };
        Ok(BucketSpec {
            logical_id: logical_id.to_owned(),
            name,
            lifecycle_rules: rules,
        })
    }
}

fn gsi_spec(v: &Value) -> Result<GsiSpec> {
    let name = plain_str(required_in(v, "IndexName")?)?.to_owned();
    let projection = required_in(v, "Projection")?;
    let projection = match plain_str(required_in(projection, "ProjectionType")?)? {
        "ALL" => Projection::All,
        "KEYS_ONLY" => Projection::KeysOnly,
        "INCLUDE" => Projection::Include(
            sequence(required_in(projection, "NonKeyAttributes")?)?
                .iter()
                .map(|a| plain_str(a).map(str::to_owned))
                .collect::<Result<Vec<_>>>()?,
        ),
        other => bail!("index {name}: unknown ProjectionType {other}"),
    };
    Ok(GsiSpec {
        key_schema: key_schema(required_in(v, "KeySchema")?)
            .with_context(|| format!("index {name}"))?,
        name,
        projection,
    })
}

fn key_schema(v: &Value) -> Result<Vec<KeyElement>> {
    sequence(v)?
        .iter()
        .map(|k| {
            Ok(KeyElement {
                attribute: plain_str(required_in(k, "AttributeName")?)?.to_owned(),
                key_type: match plain_str(required_in(k, "KeyType")?)? {
                    "HASH" => KeyType::Hash,
                    "RANGE" => KeyType::Range,
                    other => bail!("unknown KeyType {other}"),
                },
            })
        })
        .collect::<Result<Vec<_>>>()
        .context("KeySchema")
}

fn lifecycle_rule(v: &Value) -> Result<LifecycleRuleSpec> {
    let enabled = match plain_str(required_in(v, "Status")?)? {
        "Enabled" => true,
        "Disabled" => false,
        other => bail!("unknown lifecycle Status {other}"),
    };
    let days = |v: Option<&Value>| v.map(number::<i32>).transpose();
    Ok(LifecycleRuleSpec {
        id: v.get("Id").map(plain_str).transpose()?.map(str::to_owned),
        enabled,
        prefix: v
            .get("Prefix")
            .map(plain_str)
            .transpose()?
            .map(str::to_owned),
        expiration_days: days(v.get("ExpirationInDays")).context("ExpirationInDays")?,
        abort_incomplete_multipart_days: days(
            v.get("AbortIncompleteMultipartUpload")
                .and_then(|a| a.get("DaysAfterInitiation")),
        )
        .context("AbortIncompleteMultipartUpload")?,
    })
}

/// Values for `${...}` and `Ref` of pseudo parameters and template parameters with defaults.
struct Resolver<'a> {
    stack: &'a str,
    account: &'a str,
    region: &'a str,
    parameters: HashMap<String, String>,
}

impl Resolver<'_> {
    fn lookup(&self, name: &str, vars: &HashMap<String, String>) -> Option<String> {
        let pseudo = match name {
            "AWS::StackName" => Some(self.stack),
            "AWS::AccountId" => Some(self.account),
            "AWS::Region" => Some(self.region),
            "AWS::Partition" => Some("aws"),
            "AWS::URLSuffix" => Some("amazonaws.com"),
            _ => None,
        };
        vars.get(name)
            .cloned()
            .or_else(|| pseudo.map(str::to_owned))
            .or_else(|| self.parameters.get(name).cloned())
    }

    /// Resolves a scalar or an intrinsic that yields a string.
    fn string(&self, v: &Value) -> Result<String> {
        if let Some(s) = scalar_string(v) {
            return Ok(s);
        }
        match intrinsic(v) {
            Some(("Sub", Value::String(s))) => self.substitute(s, &HashMap::new()),
            Some(("Sub", Value::Sequence(parts))) => match parts.as_slice() {
                [Value::String(s), Value::Mapping(vars)] => {
                    let vars = vars
                        .iter()
                        .map(|(k, v)| {
                            let k = k
                                .as_str()
                                .ok_or_else(|| anyhow!("Sub variable names must be strings"))?;
                            Ok((k.to_owned(), self.string(v)?))
                        })
                        .collect::<Result<HashMap<_, _>>>()?;
                    self.substitute(s, &vars)
                }
                _ => bail!("Sub takes a string or [string, {{variables}}]"),
            },
            Some(("Ref", Value::String(name))) => self
                .lookup(name, &HashMap::new())
                .ok_or_else(|| anyhow!("cannot resolve Ref {name} to a string locally")),
            Some((function, _)) => bail!("cannot resolve {function} to a string locally"),
            None => bail!("expected a string, found {}", Shown(v)),
        }
    }

    fn substitute(&self, template: &str, vars: &HashMap<String, String>) -> Result<String> {
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| anyhow!("unterminated ${{ in {template:?}"))?;
            let name = &after[..end];
            if let Some(literal) = name.strip_prefix('!') {
                out.push_str("${");
                out.push_str(literal);
                out.push('}');
            } else {
                let value = self
                    .lookup(name, vars)
                    .ok_or_else(|| anyhow!("cannot resolve ${{{name}}} in {template:?} locally"))?;
                out.push_str(&value);
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// `!Name arg` or `{Ref: arg}` / `{"Fn::Name": arg}` as (Name, arg).
fn intrinsic(v: &Value) -> Option<(&str, &Value)> {
    match v {
        Value::Tagged(tagged) => {
            let name = match tagged.tag.to_string().trim_start_matches('!') {
                "Sub" => "Sub",
                "Ref" => "Ref",
                "GetAtt" => "GetAtt",
                "Join" => "Join",
                "If" => "If",
                "Select" => "Select",
                "ImportValue" => "ImportValue",
                "FindInMap" => "FindInMap",
                "GetAZs" => "GetAZs",
                _ => "unknown tag",
            };
            Some((name, &tagged.value))
        }
        Value::Mapping(m) if m.len() == 1 => {
            let (k, arg) = m.iter().next()?;
            let k = k.as_str()?;
            let name = if k == "Ref" {
                k
            } else {
                k.strip_prefix("Fn::")?
            };
            Some((name, arg))
        }
        _ => None,
    }
}

/// The logical id behind `!GetAtt Id.Attr`, `!GetAtt [Id, Attr]` or `!Ref Id`.
pub fn referenced_logical_id(v: &Value) -> Result<String> {
    match intrinsic(v) {
        Some(("GetAtt", Value::String(s))) => s
            .split_once('.')
            .map(|(id, _)| id.to_owned())
            .ok_or_else(|| anyhow!("GetAtt {s:?} is not Id.Attribute")),
        Some(("GetAtt", Value::Sequence(parts))) => parts
            .first()
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("GetAtt list must start with a logical id")),
        Some(("Ref", Value::String(id))) => Ok(id.clone()),
        _ => bail!("expected !GetAtt or !Ref of a resource, found {}", Shown(v)),
    }
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn plain_str(v: &Value) -> Result<&str> {
    v.as_str()
        .ok_or_else(|| anyhow!("expected a plain string, found {}", Shown(v)))
}

fn flag(v: &Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" => Ok(false),
        _ => bail!("expected a boolean, found {}", Shown(v)),
    }
}

/// A number that CloudFormation accepts either as a YAML number or as a numeric string.
fn number<T>(v: &Value) -> Result<T>
where
    T: TryFrom<i64> + std::str::FromStr,
{
    let parsed = match v {
        Value::Number(n) => n.as_i64().and_then(|n| T::try_from(n).ok()),
        Value::String(s) => s.parse::<T>().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| anyhow!("expected a number in range, found {}", Shown(v)))
}

fn sequence(v: &Value) -> Result<&Vec<Value>> {
    v.as_sequence()
        .ok_or_else(|| anyhow!("expected a list, found {}", Shown(v)))
}

fn required<'a>(m: &'a Mapping, key: &str) -> Result<&'a Value> {
    m.get(key).ok_or_else(|| anyhow!("missing {key}"))
}

fn required_in<'a>(v: &'a Value, key: &str) -> Result<&'a Value> {
    v.get(key).ok_or_else(|| anyhow!("missing {key}"))
}

/// Short YAML rendering of a value for error messages.
struct Shown<'a>(&'a Value);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_yaml::to_string(self.0) {
            Ok(s) => f.write_str(s.trim_end()),
            Err(_) => write!(f, "{:?}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
Parameters:
  Env:
    Type: String
    Default: dev
Globals:
  Function:
    Environment:
      Variables:
        SOURCE_TABLE_PREFIX: !Sub "${AWS::StackName}-"
Resources:
  Table:
    Type: AWS::DynamoDB::Table
    Properties:
      TableName:
        Fn::Sub: "${AWS::StackName}-${Env}-t"
      BillingMode: PAY_PER_REQUEST
      AttributeDefinitions:
        - {AttributeName: pk, AttributeType: S}
        - {AttributeName: n, AttributeType: N}
      KeySchema:
        - {AttributeName: pk, KeyType: HASH}
      GlobalSecondaryIndexes:
        - IndexName: by_n
          KeySchema:
            - {AttributeName: pk, KeyType: HASH}
            - {AttributeName: n, KeyType: RANGE}
          Projection: {ProjectionType: INCLUDE, NonKeyAttributes: [a, b]}
      TimeToLiveSpecification: {AttributeName: ttl, Enabled: "false"}
  Dlq:
    Type: AWS::SQS::Queue
    Properties:
      QueueName: !Sub ["${Name}-dlq", {Name: !Ref AWS::StackName}]
  Queue:
    Type: AWS::SQS::Queue
    Properties:
      QueueName: !Sub "${AWS::StackName}-q-${AWS::Region}-${!Literal}"
      VisibilityTimeout: "60"
      RedrivePolicy:
        deadLetterTargetArn: !GetAtt [Dlq, Arn]
        maxReceiveCount: 3
  Bucket:
    Type: AWS::S3::Bucket
    Properties:
      BucketName: !Sub "${AWS::StackName}-b-${AWS::AccountId}"
"#;

    #[test]
    fn resolves_short_and_long_intrinsics() -> Result<()> {
        let specs = Template::parse(YAML)?.stack_specs("s", "111", "eu-west-1")?;
        let table = specs.table("Table")?;
        assert_eq!(table.name, "s-dev-t");
        assert_eq!(table.billing_mode, BillingMode::PayPerRequest);
        assert_eq!(table.ttl_attribute, None);
        assert_eq!(
            table.gsis[0].projection,
            Projection::Include(vec!["a".into(), "b".into()])
        );
        assert_eq!(specs.queue("Dlq")?.name, "s-dlq");
        let queue = specs.queue("Queue")?;
        assert_eq!(queue.name, "s-q-eu-west-1-${Literal}");
        assert_eq!(queue.visibility_timeout, Some(60));
        assert_eq!(
            queue.redrive,
            Some(RedriveSpec {
                target_logical_id: "Dlq".into(),
                max_receive_count: 3
            })
        );
        assert_eq!(specs.bucket.name, "s-b-111");
        assert_eq!(specs.source_table_prefix, "s-");
        Ok(())
    }

    #[test]
    fn unknown_substitution_is_an_error_naming_the_variable() -> Result<()> {
        let yaml = YAML.replace("${AWS::AccountId}", "${Nope}");
        let err = Template::parse(&yaml)?
            .stack_specs("s", "111", "eu-west-1")
            .err()
            .ok_or_else(|| anyhow!("expected an error"))?;
        assert!(format!("{err:#}").contains("${Nope}"), "{err:#}");
        Ok(())
    }

    #[test]
    fn redrive_to_a_missing_queue_is_an_error() -> Result<()> {
        let yaml = YAML.replace("[Dlq, Arn]", "[Missing, Arn]");
        let result = Template::parse(&yaml)?.stack_specs("s", "111", "eu-west-1");
        assert!(result.is_err());
        Ok(())
    }
}
