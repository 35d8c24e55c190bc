//! The invalidator function: DynamoDB stream records of the source tables, translated into
//! source changes for the `invalidate` use case, which bumps the generations they touch. Failed
//! groups go back to the stream as batch item failures, so it retries from their first record.

use std::collections::HashMap;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_dynamo::AttributeValue;
use shared::services::invalidate::{invalidate, SourceChange};
use shared::services::Deps;

pub async fn handle(deps: &Deps, event: Event) -> DynamoDbEventResponse {
    let total = event.records.len();
    let changes: Vec<SourceChange> = event.records.into_iter().filter_map(change_of).collect();
    if changes.len() < total {
        // Without a sequence number or a stream ARN a record can be neither placed nor retried.
        tracing::warn!(
            unreadable = total - changes.len(),
            "stream records without sequence number or source ARN skipped"
        );
    }
    let report = invalidate(deps, &changes, deps.clock.now()).await;
    tracing::info!(
        records = report.records,
        bumped = report.bumped,
        deferred = report.deferred,
        coalesced = report.coalesced,
        ignored = report.ignored,
        failed = report.failed.len(),
        "stream batch recorded"
    );
    let mut response = DynamoDbEventResponse::default();
    response.batch_item_failures = report
        .failed
        .into_iter()
        .map(|sequence_number| {
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = Some(sequence_number);
            failure
        })
        .collect();
    response
}

/// A stream record as the use case reads it: text and number attributes of its keys and images
/// (a tenant attribute outside the key is in the images when the stream carries them).
pub fn change_of(record: EventRecord) -> Option<SourceChange> {
    let sequence_number = record.change.sequence_number?;
    let stream_arn = record.event_source_arn?;
    let mut attributes = HashMap::new();
    for item in [
        &record.change.old_image,
        &record.change.new_image,
        &record.change.keys,
    ] {
        for (name, value) in item.iter() {
            if let AttributeValue::S(v) | AttributeValue::N(v) = value {
                attributes.insert(name.clone(), v.clone());
            }
        }
    }
    Some(SourceChange {
        sequence_number,
        stream_arn,
        attributes,
        rewrite: record.event_name != "INSERT",
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use shared::domain::invalidation::DatasetGeneration;
    use shared::domain::Generation;
    use shared::ports::{Generations, PortError, PortResult};
    use shared::testing::{fakes, test_config};

    use super::*;

    /// The local stack's prefix, which the fixture's stream ARN carries.
    fn deps_config() -> shared::config::Config {
        let mut config = test_config();
        config.source_table_prefix = "export-cache-".into();
        config
    }

    fn event() -> Event {
        serde_json::from_str(include_str!("../events/orders-stream.json")).unwrap()
    }

    #[test]
    fn records_translate_with_tenant_kind_and_position() {
        let changes: Vec<SourceChange> =
            event().records.into_iter().filter_map(change_of).collect();
        assert_eq!(changes.len(), 3);
        assert_eq!(changes[0].attributes["tenant_id"], "acme");
        assert_eq!(changes[0].sequence_number, "100");
        assert!(!changes[0].rewrite, "an INSERT");
        assert!(
            changes[1].rewrite && changes[2].rewrite,
            "MODIFY and REMOVE"
        );
        assert!(changes[2]
            .stream_arn
            .contains(":table/export-cache-orders/stream/"));
    }

    #[tokio::test]
    async fn a_batch_bumps_once_per_tenant_and_reports_no_failure() {
        let f = fakes(deps_config(), 10);
        let response = handle(&f.deps, event()).await;
        assert!(response.batch_item_failures.is_empty());
        let g = f.meta.dataset_generation("acme", "orders").await.unwrap();
        assert_eq!(g.gen, 1, "one bump for the burst");
        assert_eq!(
            g.rewritten, 1,
            "the batch's update and removal show from that bump on"
        );
    }

    /// Generations whose store is unreachable.
    struct Unreachable;

    #[async_trait::async_trait]
    impl Generations for Unreachable {
        async fn bump_generation(&self, _: &str, _: Option<&str>) -> PortResult<()> {
            Err(down())
        }
        async fn current_generation(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: chrono::DateTime<chrono::Utc>,
        ) -> PortResult<Generation> {
            Err(down())
        }
        async fn dataset_generations(
            &self,
            _: &str,
        ) -> PortResult<BTreeMap<String, DatasetGeneration>> {
            Err(down())
        }
        async fn dataset_generation(&self, _: &str, _: &str) -> PortResult<DatasetGeneration> {
            Err(down())
        }
        async fn put_dataset_generation(
            &self,
            _: &str,
            _: &str,
            _: &DatasetGeneration,
        ) -> PortResult<()> {
            Err(down())
        }
    }

    fn down() -> PortError {
        PortError::failed("metadata", "ServiceUnavailable", true)
    }

    #[tokio::test]
    async fn a_group_that_cannot_be_recorded_is_retried_from_its_first_record() {
        let mut f = fakes(deps_config(), 10);
        f.deps.generations = Arc::new(Unreachable);
        let response = handle(&f.deps, event()).await;
        let ids: Vec<_> = response
            .batch_item_failures
            .iter()
            .map(|b| b.item_identifier.clone().unwrap())
            .collect();
        assert_eq!(ids, ["100"]);
    }
}
