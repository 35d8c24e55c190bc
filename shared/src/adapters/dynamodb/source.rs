//! The source tables: rows read by Query on the tenant partition (or its range index), never Scan.

use std::borrow::Cow;
use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::operation::query::QueryOutput;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnConsumedCapacity};
use aws_sdk_dynamodb::Client;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};

use super::page_decoder::{decode_page, StashBody};
use super::{n, s, Item};
use crate::adapters::IamResource::{SourceTableIndexes, SourceTables};
use crate::adapters::{sdk_error, IamNeed};
use crate::config::SourceDecoder;
use crate::domain::catalog::ColumnType;
use crate::domain::value::is_decimal_text;
use crate::domain::{Row, Value};
use crate::ports::{Page, PortError, PortResult, RowSource, SourceQuery};

/// IAM needs of the source reader: a Query of the table, or of its range index.
#[rustfmt::skip]
pub const SOURCE_IAM: &[IamNeed] = &[
    IamNeed::new("source", "read_page", &["query"], &["dynamodb:Query"], SourceTables),
    IamNeed::new("source", "read_page", &["query"], &["dynamodb:Query"], SourceTableIndexes),
    IamNeed::new("source", "key_bounds", &["query"], &["dynamodb:Query"], SourceTables),
    IamNeed::new("source", "key_bounds", &["query"], &["dynamodb:Query"], SourceTableIndexes),
];

/// Reads source rows with Query on the tenant partition (or the range index), never Scan.
#[derive(Clone)]
pub struct DynamoSource {
    client: Client,
    decoder: SourceDecoder,
}

/// One Query's answer, before it becomes a [`Page`]: what [`DynamoSource::send`] got back.
pub enum QueryAnswer {
    /// The page's JSON as DynamoDB sent it (the fast decoder's input).
    Body(bytes::Bytes),
    /// The page as the SDK parsed it.
    Parsed(Box<QueryOutput>),
}

impl QueryAnswer {
    /// The answer's rows of the query's columns and the cursor after them.
    pub fn into_page(self, q: &SourceQuery) -> PortResult<Page> {
        match self {
            QueryAnswer::Body(body) => decode_page(q, &body),
            QueryAnswer::Parsed(output) => page_of(q, *output),
        }
    }
}

impl DynamoSource {
    pub fn new(client: Client, decoder: SourceDecoder) -> Self {
        Self { client, decoder }
    }

    /// One Query, sent through the SDK (signing, retries, timeouts and error parsing are the
    /// SDK's either way). With the fast decoder the SDK parses nothing of a 200 answer: its body
    /// comes back as it was sent. [`RowSource::read_page`] is this, then
    /// [`QueryAnswer::into_page`]; the worker bench times the two apart.
    pub async fn send(&self, q: &SourceQuery, cursor: Option<&str>) -> PortResult<QueryAnswer> {
        let request = self.request(q, cursor)?;
        match self.decoder {
            SourceDecoder::Sdk => Ok(QueryAnswer::Parsed(Box::new(
                request
                    .send()
                    .await
                    .map_err(|e| sdk_error("source query", e))?,
            ))),
            SourceDecoder::Fast => {
                let stash = StashBody::default();
                let output = request
                    .customize()
                    .interceptor(stash.clone())
                    .send()
                    .await
                    .map_err(|e| sdk_error("source query", e))?;
                // A success other than 200 was left to the SDK, which parsed it as usual.
                Ok(match stash.take() {
                    Some(body) => QueryAnswer::Body(body),
                    None => QueryAnswer::Parsed(Box::new(output)),
                })
            }
        }
    }

    fn request(&self, q: &SourceQuery, cursor: Option<&str>) -> PortResult<QueryFluentBuilder> {
        let mut names: HashMap<String, String> = HashMap::new();
        let mut values: HashMap<String, AttributeValue> = HashMap::new();
        names.insert("#t".into(), q.tenant_attribute.clone());
        values.insert(":t".into(), s(&q.tenant));
        let mut key_cond = "#t = :t".to_string();
        let mut req = self.client.query().table_name(&q.table);
        if let Some(r) = &q.range {
            req = req.set_index_name(r.index.clone());
            names.insert("#r".into(), r.attribute.clone());
            match (&r.from, &r.to) {
                (Some(f), Some(t)) => {
                    key_cond.push_str(" AND #r BETWEEN :from AND :to");
                    values.insert(":from".into(), s(f));
                    values.insert(":to".into(), s(t));
                }
                (Some(f), None) => {
                    key_cond.push_str(" AND #r >= :from");
                    values.insert(":from".into(), s(f));
                }
                (None, Some(t)) => {
                    key_cond.push_str(" AND #r <= :to");
                    values.insert(":to".into(), s(t));
                }
                (None, None) => {}
            }
        }
        let mut filter = Vec::new();
        for (i, (attr, ty, value)) in q.filters.iter().enumerate() {
            names.insert(format!("#f{i}"), attr.clone());
            values.insert(format!(":f{i}"), filter_value(*ty, value));
            filter.push(format!("#f{i} = :f{i}"));
        }
        let projection: Vec<String> = q
            .columns
            .iter()
            .enumerate()
            .map(|(i, (attr, _))| {
                names.insert(format!("#c{i}"), attr.clone());
                format!("#c{i}")
            })
            .collect();
        if !filter.is_empty() {
            req = req.filter_expression(filter.join(" AND "));
        }
        Ok(req
            .key_condition_expression(key_cond)
            .projection_expression(projection.join(", "))
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .set_exclusive_start_key(cursor.map(decode_cursor).transpose()?)
            .set_limit(q.page_size)
            .return_consumed_capacity(ReturnConsumedCapacity::Total))
    }
}

#[async_trait]
impl RowSource for DynamoSource {
    async fn read_page(&self, q: &SourceQuery, cursor: Option<&str>) -> PortResult<Page> {
        self.send(q, cursor).await?.into_page(q)
    }

    async fn key_bounds(
        &self,
        q: &SourceQuery,
        attribute: &str,
    ) -> PortResult<Option<(String, String)>> {
        // Filters are left out: they can only narrow the range, and the bounds are a split guess.
        let probe = SourceQuery {
            filters: Vec::new(),
            columns: vec![(attribute.to_string(), ColumnType::String)],
            page_size: Some(1),
            ..q.clone()
        };
        let mut ends = Vec::with_capacity(2);
        for forward in [true, false] {
            // One item each way: the SDK's own parse is cheap enough here.
            let resp = self
                .request(&probe, None)?
                .scan_index_forward(forward)
                .send()
                .await
                .map_err(|e| sdk_error("source key bounds", e))?;
            let first = resp.items.unwrap_or_default().into_iter().next();
            match first.and_then(|mut item| item.remove(attribute)) {
                Some(AttributeValue::S(v)) => ends.push(v),
                // Numbers or binary keys are not split; nothing found, nothing to split.
                _ => return Ok(None),
            }
        }
        Ok(ends.pop().zip(ends.pop()).map(|(max, min)| (min, max)))
    }
}

/// A Query's items as rows of the query's columns, in order, and the cursor after them.
pub fn page_of(q: &SourceQuery, resp: QueryOutput) -> PortResult<Page> {
    let read_capacity = resp
        .consumed_capacity
        .as_ref()
        .and_then(|c| c.capacity_units)
        .unwrap_or(0.0);
    let next = match resp.last_evaluated_key {
        Some(k) if !k.is_empty() => {
            let key = k.into_iter().map(|(name, v)| (name, Wire::from(v)));
            Some(encode_cursor(key)?)
        }
        _ => None,
    };
    let columns = Columns::new(&q.columns);
    let mut rows = Vec::with_capacity(resp.items.as_ref().map_or(0, Vec::len));
    for item in resp.items.unwrap_or_default() {
        // One pass over the item's attributes: cheaper than hashing every column's name into it.
        let mut cells = Cells::new(columns.len());
        for (name, value) in item {
            if let Some((_, column)) = columns.find(&name, 0) {
                cells.set(column, columns.convert(column, value.into()));
            }
        }
        rows.push(cells.finish()?);
    }
    Ok(Page {
        rows,
        next,
        read_capacity,
    })
}

/// The query's columns, and which one an item's attribute fills.
pub(super) struct Columns<'q> {
    columns: &'q [(String, ColumnType)],
    /// The first column of each column's attribute: an attribute fills its first column only,
    /// so a repeated one leaves its later columns empty.
    first: Vec<usize>,
}

impl<'q> Columns<'q> {
    pub(super) fn new(columns: &'q [(String, ColumnType)]) -> Self {
        let first = columns
            .iter()
            .enumerate()
            .map(|(i, (attr, _))| {
                columns[..i]
                    .iter()
                    .position(|(a, _)| a == attr)
                    .unwrap_or(i)
            })
            .collect();
        Self { columns, first }
    }

    pub(super) fn len(&self) -> usize {
        self.columns.len()
    }

    /// The column `name` fills, as (where it was found, the column), looking from `from` on:
    /// the items of one page mostly list their attributes in the same order, so a caller that
    /// looks right after the last one found usually finds the next one there.
    pub(super) fn find(&self, name: &str, from: usize) -> Option<(usize, usize)> {
        let n = self.columns.len();
        let from = from.min(n);
        (from..n)
            .chain(0..from)
            .find(|&i| self.columns[i].0 == name)
            .map(|i| (i, self.first[i]))
    }

    pub(super) fn convert(&self, column: usize, value: Wire<'_>) -> PortResult<Value> {
        let (attr, ty) = &self.columns[column];
        convert(attr, *ty, value)
    }
}

/// One item's cells, filled as its attributes come: a repeated attribute keeps its last value
/// (as the SDK's map keeps it), and the item's error is that of its first column that did not
/// convert, as if read column by column.
pub(super) struct Cells {
    row: Row,
    errors: Vec<(usize, PortError)>,
}

impl Cells {
    pub(super) fn new(columns: usize) -> Self {
        Self {
            row: vec![Value::Null; columns],
            errors: Vec::new(),
        }
    }

    pub(super) fn set(&mut self, column: usize, cell: PortResult<Value>) {
        if !self.errors.is_empty() {
            self.errors.retain(|(c, _)| *c != column);
        }
        match cell {
            Ok(v) => self.row[column] = v,
            Err(e) => {
                self.row[column] = Value::Null;
                self.errors.push((column, e));
            }
        }
    }

    pub(super) fn finish(self) -> PortResult<Row> {
        match self.errors.into_iter().min_by_key(|(c, _)| *c) {
            Some((_, e)) => Err(e),
            None => Ok(self.row),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`, the form most writers store (the seeder too), read without chrono's
/// general RFC 3339 parser, which costs several times more per cell. `None` for anything else
/// (offsets, fractions, lower-case `t`/`z`, a leap second), which that parser then reads.
fn plain_utc(t: &str) -> Option<DateTime<Utc>> {
    let b = t.as_bytes();
    if b.len() != 20 || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z' {
        return None;
    }
    let date = plain_date(&t[..10])?;
    date.and_hms_opt(
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    )
    .map(|t| t.and_utc())
}

/// `YYYY-MM-DD` read by hand; `None` for anything else.
fn plain_date(t: &str) -> Option<NaiveDate> {
    let b = t.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    NaiveDate::from_ymd_opt(
        digits(&b[..4])? as i32,
        digits(&b[5..7])?,
        digits(&b[8..10])?,
    )
}

fn digits(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
    })
}

fn filter_value(ty: ColumnType, value: &str) -> AttributeValue {
    match ty {
        ColumnType::Integer | ColumnType::Decimal => n(value),
        ColumnType::Boolean => AttributeValue::Bool(value == "true"),
        _ => s(value),
    }
}

fn data_error(attr: &str, ty: ColumnType, got: &Wire<'_>) -> PortError {
    PortError::Data(format!(
        "attribute `{attr}` should hold a {} but holds {got}",
        ty.as_str()
    ))
}

/// An attribute value as it arrives: from the SDK's map (owned text, moved) or straight from the
/// page's JSON (text borrowed from the page where it needs no unescaping). The kinds no column
/// type takes are known by their name only.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Wire<'a> {
    S(Cow<'a, str>),
    N(Cow<'a, str>),
    Bool(bool),
    Null(bool),
    /// `B`, `SS`, `NS`, `BS`, `M`, `L`, or a kind newer than this code.
    Other(&'static str),
}

/// The kind of a value no column takes, as errors name it.
pub(super) const UNKNOWN_KIND: &str = "a value of a type this reader does not know";

impl From<AttributeValue> for Wire<'static> {
    fn from(v: AttributeValue) -> Self {
        match v {
            AttributeValue::S(t) => Wire::S(Cow::Owned(t)),
            AttributeValue::N(t) => Wire::N(Cow::Owned(t)),
            AttributeValue::Bool(b) => Wire::Bool(b),
            AttributeValue::Null(b) => Wire::Null(b),
            AttributeValue::B(_) => Wire::Other("B"),
            AttributeValue::Ss(_) => Wire::Other("SS"),
            AttributeValue::Ns(_) => Wire::Other("NS"),
            AttributeValue::Bs(_) => Wire::Other("BS"),
            AttributeValue::M(_) => Wire::Other("M"),
            AttributeValue::L(_) => Wire::Other("L"),
            _ => Wire::Other(UNKNOWN_KIND),
        }
    }
}

/// What errors say a value is: the value itself for the scalar kinds (as the SDK's `Debug`
/// writes it), only the kind for sets, maps, lists and binaries, which can be large.
impl std::fmt::Display for Wire<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wire::S(t) => write!(f, "S({t:?})"),
            Wire::N(t) => write!(f, "N({t:?})"),
            Wire::Bool(b) => write!(f, "Bool({b})"),
            Wire::Null(b) => write!(f, "Null({b})"),
            Wire::Other(kind) => write!(f, "{kind}"),
        }
    }
}

/// One source attribute to a cell of the column's type; a mismatch is a data error, never a silent
/// blank.
pub fn to_value(attr: &str, ty: ColumnType, v: Option<AttributeValue>) -> PortResult<Value> {
    match v {
        None => Ok(Value::Null),
        Some(v) => convert(attr, ty, v.into()),
    }
}

/// [`to_value`] for a value however it arrived: both decoders convert through here, so a cell
/// reads the same whichever parsed the page.
pub(super) fn convert(attr: &str, ty: ColumnType, v: Wire<'_>) -> PortResult<Value> {
    let text = match &v {
        Wire::Null(_) => return Ok(Value::Null),
        Wire::S(t) | Wire::N(t) => Some(t.as_ref()),
        _ => None,
    };
    let out = match ty {
        // By value: text cells are the bulk of most exports, so move the string, don't copy it.
        ColumnType::String => {
            return match v {
                Wire::S(t) | Wire::N(t) => Ok(Value::Str(t.into_owned())),
                Wire::Bool(b) => Ok(Value::Str(b.to_string())),
                other => Err(data_error(attr, ty, &other)),
            }
        }
        ColumnType::Integer => text.and_then(|t| t.parse().ok()).map(Value::Int),
        // By value too: the validated text is the cell.
        ColumnType::Decimal => {
            return match v {
                Wire::S(t) | Wire::N(t) if is_decimal_text(&t) => Ok(Value::Dec(t.into_owned())),
                other => Err(data_error(attr, ty, &other)),
            }
        }
        ColumnType::Boolean => match &v {
            Wire::Bool(b) => Some(Value::Bool(*b)),
            _ => match text {
                Some("true") | Some("1") => Some(Value::Bool(true)),
                Some("false") | Some("0") => Some(Value::Bool(false)),
                _ => None,
            },
        },
        ColumnType::Timestamp => match &v {
            Wire::N(t) => t
                .parse::<f64>()
                .ok()
                .and_then(|secs| {
                    Utc.timestamp_opt(secs.trunc() as i64, (secs.fract() * 1e9) as u32)
                        .single()
                })
                .map(Value::Ts),
            _ => text
                .and_then(|t| {
                    plain_utc(t).or_else(|| {
                        DateTime::parse_from_rfc3339(t)
                            .ok()
                            .map(|t| t.with_timezone(&Utc))
                    })
                })
                .map(Value::Ts),
        },
        ColumnType::Date => text
            .and_then(|t| plain_date(t).or_else(|| NaiveDate::parse_from_str(t, "%Y-%m-%d").ok()))
            .map(Value::Date),
    };
    out.ok_or_else(|| data_error(attr, ty, &v))
}

/// LastEvaluatedKey as JSON text, so a checkpoint can carry it. Keys hold only S and N. The
/// attributes are written in name order, so a key reads as the same text whichever decoder read
/// it (serde_json keeps insertion order here, and the SDK's map has none).
pub(super) fn encode_cursor<'a>(
    key: impl IntoIterator<Item = (String, Wire<'a>)>,
) -> PortResult<String> {
    let mut key: Vec<(String, Wire<'a>)> = key.into_iter().collect();
    key.sort_by(|a, b| a.0.cmp(&b.0));
    let mut map = serde_json::Map::new();
    for (name, v) in key {
        let (t, val) = match v {
            Wire::S(x) => ("S", x),
            Wire::N(x) => ("N", x),
            other => {
                return Err(PortError::failed(
                    "source cursor",
                    format!("unsupported key attribute {name}: {other}"),
                    false,
                ))
            }
        };
        map.insert(name, serde_json::json!({ t: val }));
    }
    Ok(serde_json::Value::Object(map).to_string())
}

fn decode_cursor(text: &str) -> PortResult<Item> {
    let bad = |m: &str| PortError::failed("source cursor", m.to_string(), false);
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| bad("not an object"))?;
    let mut out = HashMap::new();
    for (name, typed) in obj {
        let av = if let Some(x) = typed.get("S").and_then(|x| x.as_str()) {
            s(x)
        } else if let Some(x) = typed.get("N").and_then(|x| x.as_str()) {
            AttributeValue::N(x.to_string())
        } else {
            return Err(bad("unsupported attribute type"));
        };
        out.insert(name.clone(), av);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::adapters::testkit::{answering, dynamodb, ok, only_call};
    use crate::ports::RangeQuery;

    fn orders_query(range: Option<RangeQuery>) -> SourceQuery {
        SourceQuery {
            table: "orders-test".into(),
            tenant_attribute: "tenant_id".into(),
            tenant: "acme".into(),
            range,
            filters: vec![
                ("status".into(), ColumnType::String, "paid".into()),
                ("paid".into(), ColumnType::Boolean, "true".into()),
                ("items".into(), ColumnType::Integer, "3".into()),
            ],
            columns: vec![
                ("order_id".into(), ColumnType::String),
                ("amount".into(), ColumnType::Decimal),
            ],
            page_size: Some(500),
        }
    }

    const DECODERS: [SourceDecoder; 2] = [SourceDecoder::Sdk, SourceDecoder::Fast];

    fn cursor_of(key: &Item) -> String {
        encode_cursor(key.clone().into_iter().map(|(k, v)| (k, v.into()))).unwrap()
    }

    #[tokio::test]
    async fn read_page_queries_the_range_index_with_filters_projection_and_cursor() {
        for decoder in DECODERS {
            read_page_builds_the_request_and_reads_the_page(decoder).await;
        }
    }

    async fn read_page_builds_the_request_and_reads_the_page(decoder: SourceDecoder) {
        let last = json!({
            "tenant_id": { "S": "acme" }, "order_id": { "S": "ORD-2" },
            "created_at": { "S": "2024-01-02T00:00:00Z" },
        });
        let http = answering(vec![ok(json!({
            "Items": [
                { "order_id": { "S": "ORD-1" }, "amount": { "N": "12.50" } },
                { "order_id": { "S": "ORD-2" } },
            ],
            "LastEvaluatedKey": last,
            "ConsumedCapacity": { "TableName": "orders-test", "CapacityUnits": 2.5 },
        }))]);
        let start: Item = HashMap::from([
            ("tenant_id".to_string(), s("acme")),
            ("order_id".to_string(), s("ORD-0")),
            ("created_at".to_string(), s("2024-01-01T00:00:00Z")),
        ]);
        let cursor = cursor_of(&start);
        let range = RangeQuery {
            index: Some("by_created_at".into()),
            attribute: "created_at".into(),
            from: Some("2024-01-01T00:00:00Z".into()),
            to: Some("2024-02-01T00:00:00Z".into()),
        };
        let page = DynamoSource::new(dynamodb(&http), decoder)
            .read_page(&orders_query(Some(range)), Some(&cursor))
            .await
            .unwrap();

        let q = only_call(&http, "Query");
        assert_eq!(q["TableName"], "orders-test");
        assert_eq!(q["IndexName"], "by_created_at");
        assert_eq!(
            q["KeyConditionExpression"],
            "#t = :t AND #r BETWEEN :from AND :to"
        );
        assert_eq!(
            q["FilterExpression"],
            "#f0 = :f0 AND #f1 = :f1 AND #f2 = :f2"
        );
        assert_eq!(q["ProjectionExpression"], "#c0, #c1");
        assert_eq!(
            q["ExpressionAttributeNames"],
            json!({
                "#t": "tenant_id", "#r": "created_at", "#f0": "status", "#f1": "paid",
                "#f2": "items", "#c0": "order_id", "#c1": "amount",
            })
        );
        assert_eq!(
            q["ExpressionAttributeValues"],
            json!({
                ":t": { "S": "acme" },
                ":from": { "S": "2024-01-01T00:00:00Z" }, ":to": { "S": "2024-02-01T00:00:00Z" },
                ":f0": { "S": "paid" }, ":f1": { "BOOL": true }, ":f2": { "N": "3" },
            })
        );
        assert_eq!(
            q["ExclusiveStartKey"],
            json!({
                "tenant_id": { "S": "acme" }, "order_id": { "S": "ORD-0" },
                "created_at": { "S": "2024-01-01T00:00:00Z" },
            })
        );
        assert_eq!(q["Limit"], 500);
        assert_eq!(q["ReturnConsumedCapacity"], "TOTAL");
        assert!(q.get("ConsistentRead").is_none(), "{q}");

        assert_eq!(
            page.rows,
            vec![
                vec![Value::Str("ORD-1".into()), Value::Dec("12.50".into())],
                vec![Value::Str("ORD-2".into()), Value::Null],
            ]
        );
        let next: serde_json::Value = serde_json::from_str(page.next.as_deref().unwrap()).unwrap();
        assert_eq!(next, last);
        assert_eq!(page.read_capacity, 2.5);
    }

    #[tokio::test]
    async fn read_page_without_a_range_queries_the_table_and_open_bounds_stay_open() {
        for decoder in DECODERS {
            read_page_without_a_range(decoder).await;
        }
    }

    async fn read_page_without_a_range(decoder: SourceDecoder) {
        let http = answering(vec![ok(json!({ "Items": [] }))]);
        let mut query = orders_query(None);
        query.filters.clear();
        let page = DynamoSource::new(dynamodb(&http), decoder)
            .read_page(&query, None)
            .await
            .unwrap();
        let q = only_call(&http, "Query");
        assert!(q.get("IndexName").is_none(), "{q}");
        assert!(q.get("FilterExpression").is_none(), "{q}");
        assert!(q.get("ExclusiveStartKey").is_none(), "{q}");
        assert_eq!(q["KeyConditionExpression"], "#t = :t");
        assert_eq!(page.next, None);

        for (from, to, condition) in [
            (Some("2024-01-01"), None, "#t = :t AND #r >= :from"),
            (None, Some("2024-02-01"), "#t = :t AND #r <= :to"),
        ] {
            let http = answering(vec![ok(json!({ "Items": [] }))]);
            let range = RangeQuery {
                index: Some("by_created_at".into()),
                attribute: "created_at".into(),
                from: from.map(str::to_string),
                to: to.map(str::to_string),
            };
            DynamoSource::new(dynamodb(&http), decoder)
                .read_page(&orders_query(Some(range)), None)
                .await
                .unwrap();
            assert_eq!(
                only_call(&http, "Query")["KeyConditionExpression"],
                condition
            );
        }
    }

    #[test]
    fn cursor_round_trips() {
        let k: Item = HashMap::from([
            ("tenant_id".to_string(), s("acme")),
            ("order_id".to_string(), s("ORD-1")),
            ("n".to_string(), n(5)),
        ]);
        assert_eq!(decode_cursor(&cursor_of(&k)).unwrap(), k);
    }

    #[test]
    fn values_convert_by_column_type_and_mismatches_are_errors() {
        assert_eq!(
            to_value("a", ColumnType::Integer, Some(n(7))).unwrap(),
            Value::Int(7)
        );
        assert_eq!(
            to_value("a", ColumnType::Decimal, Some(n("12.50"))).unwrap(),
            Value::Dec("12.50".into())
        );
        assert_eq!(
            to_value("a", ColumnType::String, None).unwrap(),
            Value::Null
        );
        assert_eq!(
            to_value("a", ColumnType::Boolean, Some(AttributeValue::Bool(true))).unwrap(),
            Value::Bool(true)
        );
        assert!(matches!(
            to_value("a", ColumnType::Timestamp, Some(s("2024-01-01T00:00:00Z"))).unwrap(),
            Value::Ts(_)
        ));
        assert!(matches!(
            to_value("amount", ColumnType::Integer, Some(s("x"))),
            Err(PortError::Data(m)) if m.contains("amount")
        ));
        assert!(to_value("d", ColumnType::Date, Some(s("2024-13-01"))).is_err());
        assert!(to_value("a", ColumnType::Decimal, Some(s("1e5"))).is_err());
        assert!(to_value("t", ColumnType::Timestamp, Some(s("2024-02-30T00:00:00Z"))).is_err());
    }

    proptest::proptest! {
        /// The hand-read forms give what chrono's parsers give, and leave the rest to them.
        #[test]
        fn plain_timestamps_and_dates_read_as_chrono_reads_them(
            y in 0i32..10_000, mo in 0u32..14, d in 0u32..33, h in 0u32..25, mi in 0u32..61,
            sec in 0u32..62, noise in "[0-9TZ:+.z-]{0,24}",
        ) {
            let ts = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{sec:02}Z");
            for t in [ts.as_str(), noise.as_str()] {
                let chrono = DateTime::parse_from_rfc3339(t).ok().map(|t| t.with_timezone(&Utc));
                let ours = to_value("t", ColumnType::Timestamp, Some(s(t))).ok();
                proptest::prop_assert_eq!(ours, chrono.map(Value::Ts), "{}", t);
            }
            let date = format!("{y:04}-{mo:02}-{d:02}");
            for t in [date.as_str(), &noise[..noise.len().min(10)]] {
                let chrono = NaiveDate::parse_from_str(t, "%Y-%m-%d").ok();
                let ours = to_value("d", ColumnType::Date, Some(s(t))).ok();
                proptest::prop_assert_eq!(ours, chrono.map(Value::Date), "{}", t);
            }
        }
    }
}
