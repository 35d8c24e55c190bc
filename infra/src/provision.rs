//! Creates the stack's tables, queues and bucket in the local AWS emulator from `template.yaml`,
//! through the same SDK calls a deployment's resources would answer, so local names, keys,
//! indexes and queue settings cannot drift from what deploys.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use aws_config::SdkConfig;
use aws_sdk_dynamodb::types as ddb;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::types as s3t;
use aws_sdk_sqs::types::QueueAttributeName;

use crate::template::{self, Template, LOCAL_ACCOUNT_ID};

/// Resource names of one stack, as the functions see them in their environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackNames {
    pub stack: String,
    pub meta_table: String,
    pub orders_table: String,
    pub customers_table: String,
    pub bucket: String,
    pub queue_name: String,
    pub dlq_name: String,
    pub source_table_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub names: StackNames,
    pub queue_url: String,
    pub dlq_url: String,
    /// Every queue the template declares (the two above among them), for the teardown.
    pub all_queue_urls: Vec<String>,
}

const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_REGION: &str = "us-east-1";

/// The repository's `template.yaml`.
pub fn template_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("template.yaml")
}

/// The template's metadata table; every other table of the template is a source table (the
/// catalog's demo data), which may be provisioned elsewhere.
pub const META_TABLE_ID: &str = "MetaTable";

/// Creates every table, queue and the bucket of the template for `stack`. Resources that already
/// exist are kept, so running it twice is harmless.
pub async fn provision(sdk: &SdkConfig, template_path: &Path, stack: &str) -> Result<Provisioned> {
    provision_with_source(sdk, sdk, template_path, stack).await
}

/// [`provision`], with the source tables created through `source` instead: another endpoint
/// (locally a faster emulator for them) or another region, as the functions' `SOURCE_*`
/// settings point their source reads.
pub async fn provision_with_source(
    sdk: &SdkConfig,
    source: &SdkConfig,
    template_path: &Path,
    stack: &str,
) -> Result<Provisioned> {
    let region = sdk
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| DEFAULT_REGION.to_owned());
    let specs = Template::load(template_path)?
        .stack_specs(stack, LOCAL_ACCOUNT_ID, &region)
        .with_context(|| format!("resolving {} for stack {stack}", template_path.display()))?;

    let names = StackNames {
        stack: stack.to_owned(),
        meta_table: specs.table("MetaTable")?.name.clone(),
        orders_table: specs.table("OrdersTable")?.name.clone(),
        customers_table: specs.table("CustomersTable")?.name.clone(),
        bucket: specs.bucket.name.clone(),
        queue_name: specs.queue("JobQueue")?.name.clone(),
        dlq_name: specs.queue("JobDlq")?.name.clone(),
        source_table_prefix: specs.source_table_prefix.clone(),
    };

    let dynamo = aws_sdk_dynamodb::Client::new(sdk);
    let source_dynamo = aws_sdk_dynamodb::Client::new(source);
    futures::future::try_join_all(specs.tables.iter().map(|t| {
        let client = if t.logical_id == META_TABLE_ID {
            &dynamo
        } else {
            &source_dynamo
        };
        ensure_table(client, t)
    }))
    .await?;

    let sqs = aws_sdk_sqs::Client::new(sdk);
    let queues = ensure_queues(&sqs, &specs.queues).await?;
    let url_of = |id: &str| {
        queues
            .get(id)
            .map(|q| q.url.clone())
            .ok_or_else(|| anyhow!("queue {id} was not created"))
    };

    ensure_bucket(&s3_client(sdk), &specs.bucket, &region).await?;

    Ok(Provisioned {
        queue_url: url_of("JobQueue")?,
        dlq_url: url_of("JobDlq")?,
        all_queue_urls: {
            let mut urls: Vec<String> = queues.values().map(|q| q.url.clone()).collect();
            urls.sort();
            urls
        },
        names,
    })
}

/// Deletes what `provision` created: tables, the bucket with every object and unfinished
/// multipart upload in it, and both queues. Missing resources are not an error; every step is
/// attempted even when an earlier one fails.
pub async fn teardown(sdk: &SdkConfig, p: &Provisioned) -> Result<()> {
    teardown_with_source(sdk, sdk, p).await
}

/// [`teardown`] of a stack made by [`provision_with_source`] with the same `source`.
pub async fn teardown_with_source(
    sdk: &SdkConfig,
    source: &SdkConfig,
    p: &Provisioned,
) -> Result<()> {
    let dynamo = aws_sdk_dynamodb::Client::new(sdk);
    let source_dynamo = aws_sdk_dynamodb::Client::new(source);
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let s3 = s3_client(sdk);

    let mut failures = Vec::new();
    for (client, table) in [
        (&dynamo, &p.names.meta_table),
        (&source_dynamo, &p.names.orders_table),
        (&source_dynamo, &p.names.customers_table),
    ] {
        if let Err(e) = delete_table(client, table).await {
            failures.push(format!("{e:#}"));
        }
    }
    if let Err(e) = delete_bucket(&s3, &p.names.bucket).await {
        failures.push(format!("{e:#}"));
    }
    for url in &p.all_queue_urls {
        if let Err(e) = delete_queue(&sqs, url).await {
            failures.push(format!("{e:#}"));
        }
    }
    if !failures.is_empty() {
        bail!(
            "teardown of stack {} incomplete: {}",
            p.names.stack,
            failures.join("; ")
        );
    }
    Ok(())
}

/// Path-style addressing: the emulator has no per-bucket host names.
fn s3_client(sdk: &SdkConfig) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The SDK's plain `Display` of a failed call says only "service error"; this keeps the code and
/// message the service sent.
fn sdk_error<E>(e: E) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    anyhow!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))
}

async fn ensure_table(client: &aws_sdk_dynamodb::Client, spec: &template::TableSpec) -> Result<()> {
    let name = &spec.name;
    if spec.billing_mode != template::BillingMode::PayPerRequest {
        bail!("table {name}: only PAY_PER_REQUEST tables can be provisioned locally");
    }
    let mut request = client
        .create_table()
        .table_name(name)
        .billing_mode(ddb::BillingMode::PayPerRequest)
        .set_key_schema(Some(key_schema(&spec.key_schema)?))
        .set_attribute_definitions(Some(
            spec.attributes
                .iter()
                .map(|a| {
                    ddb::AttributeDefinition::builder()
                        .attribute_name(&a.name)
                        .attribute_type(match a.attribute_type {
                            template::AttributeType::S => ddb::ScalarAttributeType::S,
                            template::AttributeType::N => ddb::ScalarAttributeType::N,
                            template::AttributeType::B => ddb::ScalarAttributeType::B,
                        })
                        .build()
                        .context("attribute definition")
                })
                .collect::<Result<Vec<_>>>()?,
        ));
    for gsi in &spec.gsis {
        request = request.global_secondary_indexes(global_secondary_index(gsi)?);
    }
    if spec.sse_enabled {
        request = request.sse_specification(ddb::SseSpecification::builder().enabled(true).build());
    }
    // moto keeps the stream; dynalite accepts the specification and has none (the bridge says so).
    if let Some(view) = &spec.stream_view_type {
        request = request.stream_specification(
            ddb::StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(ddb::StreamViewType::from(view.as_str()))
                .build()
                .context("stream specification")?,
        );
    }
    match request.send().await {
        Ok(_) => {}
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) => {}
        Err(e) => return Err(sdk_error(e)).with_context(|| format!("creating table {name}")),
    }

    wait_until_active(client, name).await?;

    if let Some(attribute) = &spec.ttl_attribute {
        ensure_ttl(client, name, attribute).await?;
    }
    Ok(())
}

fn key_schema(elements: &[template::KeyElement]) -> Result<Vec<ddb::KeySchemaElement>> {
    elements
        .iter()
        .map(|k| {
            ddb::KeySchemaElement::builder()
                .attribute_name(&k.attribute)
                .key_type(match k.key_type {
                    template::KeyType::Hash => ddb::KeyType::Hash,
                    template::KeyType::Range => ddb::KeyType::Range,
                })
                .build()
                .context("key schema element")
        })
        .collect()
}

fn global_secondary_index(gsi: &template::GsiSpec) -> Result<ddb::GlobalSecondaryIndex> {
    let projection = match &gsi.projection {
        template::Projection::All => ddb::Projection::builder()
            .projection_type(ddb::ProjectionType::All)
            .build(),
        template::Projection::KeysOnly => ddb::Projection::builder()
            .projection_type(ddb::ProjectionType::KeysOnly)
            .build(),
        template::Projection::Include(attributes) => ddb::Projection::builder()
            .projection_type(ddb::ProjectionType::Include)
            .set_non_key_attributes(Some(attributes.clone()))
            .build(),
    };
    ddb::GlobalSecondaryIndex::builder()
        .index_name(&gsi.name)
        .set_key_schema(Some(key_schema(&gsi.key_schema)?))
        .projection(projection)
        .build()
        .with_context(|| format!("index {}", gsi.name))
}

/// A table accepts reads and writes only once it and every index are ACTIVE.
async fn wait_until_active(client: &aws_sdk_dynamodb::Client, name: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + TABLE_ACTIVE_TIMEOUT;
    loop {
        let described = client
            .describe_table()
            .table_name(name)
            .send()
            .await
            .map_err(sdk_error)
            .with_context(|| format!("describing table {name}"))?;
        let table = described
            .table()
            .ok_or_else(|| anyhow!("DescribeTable of {name} returned no table"))?;
        let active = table.table_status() == Some(&ddb::TableStatus::Active)
            && table
                .global_secondary_indexes()
                .iter()
                .all(|i| i.index_status() == Some(&ddb::IndexStatus::Active));
        if active {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("table {name} not ACTIVE after {TABLE_ACTIVE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// UpdateTimeToLive fails when TTL is already enabled, so look first.
async fn ensure_ttl(client: &aws_sdk_dynamodb::Client, table: &str, attribute: &str) -> Result<()> {
    let current = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(sdk_error)
        .with_context(|| format!("describing TTL of {table}"))?;
    let already = current.time_to_live_description().is_some_and(|d| {
        d.attribute_name() == Some(attribute)
            && matches!(
                d.time_to_live_status(),
                Some(ddb::TimeToLiveStatus::Enabled | ddb::TimeToLiveStatus::Enabling)
            )
    });
    if already {
        return Ok(());
    }
    let spec = ddb::TimeToLiveSpecification::builder()
        .attribute_name(attribute)
        .enabled(true)
        .build()
        .context("TTL specification")?;
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(spec)
        .send()
        .await
        .map_err(sdk_error)
        .with_context(|| format!("enabling TTL on {table}.{attribute}"))?;
    Ok(())
}

struct CreatedQueue {
    url: String,
    arn: String,
}

/// Creates queues in dependency order: a dead-letter queue before the queues that redrive to it,
/// whose RedrivePolicy needs its ARN.
async fn ensure_queues(
    client: &aws_sdk_sqs::Client,
    specs: &[template::QueueSpec],
) -> Result<HashMap<String, CreatedQueue>> {
    let mut created: HashMap<String, CreatedQueue> = HashMap::new();
    let mut pending: Vec<&template::QueueSpec> = specs.iter().collect();
    while !pending.is_empty() {
        let (ready, waiting): (Vec<_>, Vec<_>) = pending.into_iter().partition(|q| {
            q.redrive
                .as_ref()
                .is_none_or(|r| created.contains_key(&r.target_logical_id))
        });
        if ready.is_empty() {
            let ids: Vec<_> = waiting.iter().map(|q| q.logical_id.as_str()).collect();
            bail!("queues {ids:?} redrive in a cycle or to an unknown queue");
        }
        for spec in ready {
            let queue = ensure_queue(client, spec, &created).await?;
            created.insert(spec.logical_id.clone(), queue);
        }
        pending = waiting;
    }
    Ok(created)
}

async fn ensure_queue(
    client: &aws_sdk_sqs::Client,
    spec: &template::QueueSpec,
    created: &HashMap<String, CreatedQueue>,
) -> Result<CreatedQueue> {
    let name = &spec.name;
    let mut attributes = HashMap::new();
    if let Some(v) = spec.visibility_timeout {
        attributes.insert(QueueAttributeName::VisibilityTimeout, v.to_string());
    }
    if let Some(v) = spec.message_retention_period {
        attributes.insert(QueueAttributeName::MessageRetentionPeriod, v.to_string());
    }
    attributes.insert(
        QueueAttributeName::SqsManagedSseEnabled,
        spec.sqs_managed_sse.to_string(),
    );
    if let Some(redrive) = &spec.redrive {
        let target = created.get(&redrive.target_logical_id).ok_or_else(|| {
            anyhow!(
                "queue {name}: dead-letter queue {} not created yet",
                redrive.target_logical_id
            )
        })?;
        let policy = serde_json::json!({
            "deadLetterTargetArn": target.arn,
            "maxReceiveCount": redrive.max_receive_count,
        });
        attributes.insert(QueueAttributeName::RedrivePolicy, policy.to_string());
    }

    let url = match client
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attributes.clone()))
        .send()
        .await
    {
        Ok(out) => out
            .queue_url()
            .ok_or_else(|| anyhow!("CreateQueue {name} returned no URL"))?
            .to_owned(),
        // The queue exists with other attributes: bring them in line with the template.
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_queue_name_exists()) =>
        {
            let url = client
                .get_queue_url()
                .queue_name(name)
                .send()
                .await
                .map_err(sdk_error)
                .with_context(|| format!("looking up queue {name}"))?
                .queue_url()
                .ok_or_else(|| anyhow!("GetQueueUrl {name} returned no URL"))?
                .to_owned();
            client
                .set_queue_attributes()
                .queue_url(&url)
                .set_attributes(Some(attributes))
                .send()
                .await
                .map_err(sdk_error)
                .with_context(|| format!("updating attributes of queue {name}"))?;
            url
        }
        Err(e) => return Err(sdk_error(e)).with_context(|| format!("creating queue {name}")),
    };

    let arn = client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(sdk_error)
        .with_context(|| format!("reading the ARN of queue {name}"))?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .ok_or_else(|| anyhow!("queue {name} has no QueueArn attribute"))?;
    Ok(CreatedQueue { url, arn })
}

async fn ensure_bucket(
    client: &aws_sdk_s3::Client,
    spec: &template::BucketSpec,
    region: &str,
) -> Result<()> {
    let name = &spec.name;
    let mut request = client.create_bucket().bucket(name);
    // us-east-1 rejects an explicit location constraint.
    if region != DEFAULT_REGION {
        request = request.create_bucket_configuration(
            s3t::CreateBucketConfiguration::builder()
                .location_constraint(s3t::BucketLocationConstraint::from(region))
                .build(),
        );
    }
    match request.send().await {
        Ok(_) => {}
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_bucket_already_owned_by_you()) => {}
        Err(e) => return Err(sdk_error(e)).with_context(|| format!("creating bucket {name}")),
    }

    if spec.lifecycle_rules.is_empty() {
        return Ok(());
    }
    let rules = spec
        .lifecycle_rules
        .iter()
        .map(lifecycle_rule)
        .collect::<Result<Vec<_>>>()?;
    let configuration = s3t::BucketLifecycleConfiguration::builder()
        .set_rules(Some(rules))
        .build()
        .context("lifecycle configuration")?;
    client
        .put_bucket_lifecycle_configuration()
        .bucket(name)
        .lifecycle_configuration(configuration)
        .send()
        .await
        .map_err(sdk_error)
        .with_context(|| format!("setting the lifecycle of bucket {name}"))?;
    Ok(())
}

fn lifecycle_rule(rule: &template::LifecycleRuleSpec) -> Result<s3t::LifecycleRule> {
    let mut builder = s3t::LifecycleRule::builder()
        .set_id(rule.id.clone())
        .status(if rule.enabled {
            s3t::ExpirationStatus::Enabled
        } else {
            s3t::ExpirationStatus::Disabled
        })
        .filter(
            s3t::LifecycleRuleFilter::builder()
                .prefix(rule.prefix.clone().unwrap_or_default())
                .build(),
        );
    if let Some(days) = rule.expiration_days {
        builder = builder.expiration(s3t::LifecycleExpiration::builder().days(days).build());
    }
    if let Some(days) = rule.abort_incomplete_multipart_days {
        builder = builder.abort_incomplete_multipart_upload(
            s3t::AbortIncompleteMultipartUpload::builder()
                .days_after_initiation(days)
                .build(),
        );
    }
    builder
        .build()
        .with_context(|| format!("lifecycle rule {:?}", rule.id))
}

async fn delete_table(client: &aws_sdk_dynamodb::Client, name: &str) -> Result<()> {
    match client.delete_table().table_name(name).send().await {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            Ok(())
        }
        Err(e) => Err(sdk_error(e)).with_context(|| format!("deleting table {name}")),
    }
}

async fn delete_queue(client: &aws_sdk_sqs::Client, url: &str) -> Result<()> {
    match client.delete_queue().queue_url(url).send().await {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_queue_does_not_exist()) =>
        {
            Ok(())
        }
        Err(e) => Err(sdk_error(e)).with_context(|| format!("deleting queue {url}")),
    }
}

/// Rounds of list-then-delete before giving up on emptying a bucket that keeps filling.
const MAX_EMPTYING_ROUNDS: usize = 1_000;

/// A bucket can only be deleted empty, and unfinished multipart uploads count.
async fn delete_bucket(client: &aws_sdk_s3::Client, bucket: &str) -> Result<()> {
    for _ in 0..MAX_EMPTYING_ROUNDS {
        let uploads = match client.list_multipart_uploads().bucket(bucket).send().await {
            Ok(out) => out.uploads().to_vec(),
            Err(e) if is_no_such_bucket(e.as_service_error()) => return Ok(()),
            Err(e) => {
                return Err(sdk_error(e))
                    .with_context(|| format!("listing multipart uploads of {bucket}"))
            }
        };
        if uploads.is_empty() {
            break;
        }
        for upload in uploads {
            let (Some(key), Some(upload_id)) = (upload.key(), upload.upload_id()) else {
                continue;
            };
            client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .await
                .map_err(sdk_error)
                .with_context(|| format!("aborting upload {upload_id} of s3://{bucket}/{key}"))?;
        }
    }

    for _ in 0..MAX_EMPTYING_ROUNDS {
        let listed = match client.list_objects_v2().bucket(bucket).send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_bucket()) => return Ok(()),
            Err(e) => return Err(sdk_error(e)).with_context(|| format!("listing {bucket}")),
        };
        let keys = listed
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .map(|k| s3t::ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .context("object identifier")?;
        if keys.is_empty() {
            break;
        }
        let delete = s3t::Delete::builder()
            .set_objects(Some(keys))
            .quiet(true)
            .build()
            .context("delete request")?;
        let out = client
            .delete_objects()
            .bucket(bucket)
            .delete(delete)
            .send()
            .await
            .map_err(sdk_error)
            .with_context(|| format!("deleting objects of {bucket}"))?;
        if let Some(err) = out.errors().first() {
            bail!(
                "deleting s3://{bucket}/{}: {}",
                err.key().unwrap_or_default(),
                err.message().unwrap_or_default()
            );
        }
    }

    match client.delete_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(()),
        Err(e) if is_no_such_bucket(e.as_service_error()) => Ok(()),
        Err(e) => Err(sdk_error(e)).with_context(|| format!("deleting bucket {bucket}")),
    }
}

fn is_no_such_bucket<E: ProvideErrorMetadata>(e: Option<&E>) -> bool {
    e.and_then(|e| e.code()) == Some("NoSuchBucket")
}
