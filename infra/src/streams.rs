//! Plays locally the DynamoDB event source mapping of the invalidator: reads the source tables'
//! streams through the DynamoDB Streams API (moto keeps them; dynalite, the default source
//! emulator, has none) from their latest position, as `StartingPosition: LATEST` does, and turns
//! each read into the event Lambda would hand the function. A batch the function reports as
//! failed is read again from its first failed record, as `ReportBatchItemFailures` asks.

use std::collections::HashMap;

use anyhow::{Context, Result};
use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::streams::DynamoDbEventResponse;
use aws_sdk_dynamodbstreams::types::{AttributeValue, Record, ShardIteratorType};
use aws_sdk_dynamodbstreams::Client;
use serde_json::{json, Value};

/// Records read per `GetRecords`, like the template's `BatchSize`.
pub const BATCH_SIZE: i32 = 500;

/// One shard of a source table's stream, and where reading goes on.
struct Shard {
    stream_arn: String,
    shard_id: String,
    iterator: Option<String>,
}

/// The streams of a stack's source tables, read from where they stood when it was opened.
pub struct StreamTap {
    client: Client,
    region: String,
    shards: Vec<Shard>,
}

impl StreamTap {
    /// Opens the streams of `tables` that have one (through `ddb`, which finds the stream of a
    /// table, and `client`, which reads it). `None` when none of them has a stream.
    pub async fn open(
        ddb: &aws_sdk_dynamodb::Client,
        client: Client,
        region: &str,
        tables: &[String],
    ) -> Result<Option<Self>> {
        let mut shards = Vec::new();
        for table in tables {
            let described = ddb
                .describe_table()
                .table_name(table)
                .send()
                .await
                .with_context(|| format!("DescribeTable {table}"))?;
            let Some(stream_arn) = described.table.and_then(|t| t.latest_stream_arn) else {
                continue;
            };
            let stream = client
                .describe_stream()
                .stream_arn(&stream_arn)
                .send()
                .await
                .with_context(|| format!("DescribeStream {stream_arn}"))?;
            for shard in stream
                .stream_description
                .and_then(|d| d.shards)
                .unwrap_or_default()
            {
                let Some(shard_id) = shard.shard_id else {
                    continue;
                };
                let iterator = client
                    .get_shard_iterator()
                    .stream_arn(&stream_arn)
                    .shard_id(&shard_id)
                    .shard_iterator_type(ShardIteratorType::Latest)
                    .send()
                    .await
                    .with_context(|| format!("GetShardIterator {shard_id}"))?
                    .shard_iterator;
                shards.push(Shard {
                    stream_arn: stream_arn.clone(),
                    shard_id,
                    iterator,
                });
            }
        }
        Ok((!shards.is_empty()).then(|| Self {
            client,
            region: region.to_owned(),
            shards,
        }))
    }

    /// The records written since the last read, as one event per shard that has any.
    pub async fn poll(&mut self) -> Result<Vec<(usize, Event)>> {
        let mut events = Vec::new();
        for (i, shard) in self.shards.iter_mut().enumerate() {
            let Some(iterator) = shard.iterator.clone() else {
                continue;
            };
            let read = self
                .client
                .get_records()
                .shard_iterator(iterator)
                .limit(BATCH_SIZE)
                .send()
                .await
                .with_context(|| format!("GetRecords {}", shard.shard_id))?;
            shard.iterator = read.next_shard_iterator;
            let records = read.records.unwrap_or_default();
            if records.is_empty() {
                continue;
            }
            let event = lambda_event(&records, &shard.stream_arn, &self.region)?;
            events.push((i, event));
        }
        Ok(events)
    }

    /// After the function answered for shard `i`'s event: read again from the first record it
    /// reported as failed, if any. Returns that sequence number.
    pub async fn settle(
        &mut self,
        i: usize,
        answer: &DynamoDbEventResponse,
    ) -> Result<Option<String>> {
        let Some(first) = answer
            .batch_item_failures
            .iter()
            .filter_map(|f| f.item_identifier.clone())
            .min_by(|a, b| sequence_order(a, b))
        else {
            return Ok(None);
        };
        let shard = &mut self.shards[i];
        shard.iterator = self
            .client
            .get_shard_iterator()
            .stream_arn(&shard.stream_arn)
            .shard_id(&shard.shard_id)
            .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
            .sequence_number(&first)
            .send()
            .await
            .with_context(|| format!("GetShardIterator {} at {first}", shard.shard_id))?
            .shard_iterator;
        Ok(Some(first))
    }
}

/// Sequence numbers are decimal strings of growing length.
fn sequence_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The event Lambda's DynamoDB event source mapping hands the function for these records.
pub fn lambda_event(records: &[Record], stream_arn: &str, region: &str) -> Result<Event> {
    let records: Vec<Value> = records
        .iter()
        .map(|r| {
            let change = r.dynamodb.as_ref();
            without_nulls(json!({
                "eventID": r.event_id,
                "eventName": r.event_name.as_ref().map(|n| n.as_str()),
                "eventVersion": r.event_version,
                "eventSource": "aws:dynamodb",
                "awsRegion": r.aws_region.clone().unwrap_or_else(|| region.to_owned()),
                "eventSourceARN": stream_arn,
                "dynamodb": {
                    "ApproximateCreationDateTime": change
                        .and_then(|c| c.approximate_creation_date_time)
                        .map(|t| t.secs()),
                    "Keys": change.and_then(|c| c.keys.as_ref()).map(item),
                    "NewImage": change.and_then(|c| c.new_image.as_ref()).map(item),
                    "OldImage": change.and_then(|c| c.old_image.as_ref()).map(item),
                    "SequenceNumber": change.and_then(|c| c.sequence_number.clone()),
                    "SizeBytes": change.and_then(|c| c.size_bytes).unwrap_or(0),
                    "StreamViewType": change
                        .and_then(|c| c.stream_view_type.as_ref())
                        .map(|v| v.as_str()),
                },
            }))
        })
        .collect();
    serde_json::from_value(json!({ "Records": records })).context("building the stream event")
}

/// Lambda leaves out what a record does not have (an image of a `KEYS_ONLY` stream, say).
fn without_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

/// An item in DynamoDB's JSON form, as stream events carry it.
fn item(attributes: &HashMap<String, AttributeValue>) -> Value {
    Value::Object(
        attributes
            .iter()
            .map(|(k, v)| (k.clone(), attribute(v)))
            .collect(),
    )
}

fn attribute(v: &AttributeValue) -> Value {
    use base64::Engine as _;
    let b64 = |b: &aws_sdk_dynamodbstreams::primitives::Blob| {
        base64::engine::general_purpose::STANDARD.encode(b.as_ref())
    };
    match v {
        AttributeValue::S(s) => json!({ "S": s }),
        AttributeValue::N(n) => json!({ "N": n }),
        AttributeValue::B(b) => json!({ "B": b64(b) }),
        AttributeValue::Bool(b) => json!({ "BOOL": b }),
        AttributeValue::Null(b) => json!({ "NULL": b }),
        AttributeValue::Ss(v) => json!({ "SS": v }),
        AttributeValue::Ns(v) => json!({ "NS": v }),
        AttributeValue::Bs(v) => json!({ "BS": v.iter().map(b64).collect::<Vec<_>>() }),
        AttributeValue::L(v) => json!({ "L": v.iter().map(attribute).collect::<Vec<_>>() }),
        AttributeValue::M(m) => json!({ "M": item(m) }),
        _ => json!({ "NULL": true }),
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodbstreams::types::{OperationType, StreamRecord};

    use super::*;

    #[test]
    fn records_become_the_event_lambda_hands_the_function() {
        let record = Record::builder()
            .event_id("e1")
            .event_name(OperationType::Modify)
            .event_version("1.1")
            .dynamodb(
                StreamRecord::builder()
                    .keys("tenant_id", AttributeValue::S("acme".into()))
                    .keys("order_id", AttributeValue::S("ORD-acme-00000001".into()))
                    .sequence_number("42")
                    .size_bytes(40)
                    .build(),
            )
            .build();
        let arn = "arn:aws:dynamodb:us-east-1:123456789012:table/s-orders/stream/2026";
        let event = lambda_event(&[record], arn, "us-east-1").unwrap();
        let r = &event.records[0];
        assert_eq!(r.event_name, "MODIFY");
        assert_eq!(r.event_source_arn.as_deref(), Some(arn));
        assert_eq!(r.change.sequence_number.as_deref(), Some("42"));
        assert_eq!(
            r.change.keys.get("tenant_id"),
            Some(&serde_dynamo::AttributeValue::S("acme".into()))
        );
    }

    #[test]
    fn sequence_numbers_order_by_value() {
        assert!(sequence_order("900", "1000").is_lt());
        assert!(sequence_order("1001", "1000").is_gt());
    }
}
