//! Source writes seen on the source tables' DynamoDB streams: bump the generation of every
//! tenant+dataset they touch, debounced per dataset (`domain::invalidation`), so an entry built
//! before a change is no longer served fresh.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};

use super::Deps;
use crate::domain::invalidation::{table_of_stream_arn, touched, Touched};
use crate::ports::{PortError, PortResult};

/// Compare-and-set rounds on one dataset generation before the group is left to the stream's
/// retry: writers are the few invalidator instances of the tables' shards.
const MAX_ATTEMPTS: u32 = 5;

/// One stream record, as the use case needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceChange {
    /// Where the stream retries from when the change could not be recorded.
    pub sequence_number: String,
    /// `arn:...:table/NAME/stream/LABEL`: the table the write went to.
    pub stream_arn: String,
    /// String and number attributes of the record's keys and images (the tenant is among them).
    pub attributes: HashMap<String, String>,
    /// The write was not an insert (`MODIFY`, `REMOVE`): rows an earlier file holds changed, so
    /// an append-only dataset's next file cannot just extend it.
    pub rewrite: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvalidateReport {
    pub records: usize,
    /// Records of no dataset that invalidates on writes (other tables, opted-out datasets, no
    /// tenant attribute).
    pub ignored: usize,
    /// Tenant+dataset generations bumped at once (first change of a window).
    pub bumped: usize,
    /// Changes folded into a window's trailing bump (one write for the first of them).
    pub deferred: usize,
    /// Changes that needed no write: their window's trailing bump was already pending.
    pub coalesced: usize,
    /// Sequence numbers the stream must retry from: the earliest record of each group whose
    /// change could not be recorded.
    pub failed: Vec<String>,
}

/// Records the changes of one stream batch at `now`: one read and at most one write per
/// tenant+dataset, however many records of the batch touch it.
pub async fn invalidate(
    deps: &Deps,
    changes: &[SourceChange],
    now: DateTime<Utc>,
) -> InvalidateReport {
    let mut report = InvalidateReport {
        records: changes.len(),
        ..InvalidateReport::default()
    };
    let mut groups: Vec<Group> = Vec::new();
    for change in changes {
        let Some(table) = table_of_stream_arn(&change.stream_arn) else {
            tracing::warn!(stream_arn = %change.stream_arn, "stream record of no table; ignored");
            report.ignored += 1;
            continue;
        };
        let hit = touched(
            &deps.catalog,
            &deps.config.source_table_prefix,
            table,
            |attribute| change.attributes.get(attribute).map(String::as_str),
        );
        if hit.is_empty() {
            report.ignored += 1;
            continue;
        }
        for t in hit {
            match groups.iter_mut().find(|g| g.touched == t) {
                Some(g) => g.rewrite |= change.rewrite,
                None => groups.push(Group {
                    touched: t,
                    first: &change.sequence_number,
                    rewrite: change.rewrite,
                }),
            }
        }
    }
    for group in groups {
        let Touched {
            tenant,
            dataset,
            window_seconds: window,
        } = group.touched;
        let (first, rewrite) = (group.first, group.rewrite);
        let window = Duration::seconds(i64::try_from(window).unwrap_or(i64::MAX / 1000));
        match record_change(deps, &tenant, &dataset, now, window, rewrite).await {
            Ok(Recorded::Bumped(gen)) => {
                tracing::info!(tenant, dataset, gen, "source changed: generation bumped");
                report.bumped += 1;
            }
            Ok(Recorded::Deferred) => {
                tracing::info!(
                    tenant,
                    dataset,
                    "source changed: bump deferred to the window's end"
                );
                report.deferred += 1;
            }
            Ok(Recorded::AlreadyPending) => report.coalesced += 1,
            Err(e) => {
                tracing::error!(tenant, dataset, sequence_number = first, error = %e,
                    "source change could not be recorded; the stream retries from this record");
                if !report.failed.iter().any(|s| s == first) {
                    report.failed.push(first.to_string());
                }
            }
        }
    }
    report
}

/// The changes of a batch to one tenant+dataset, in batch order.
struct Group<'a> {
    touched: Touched,
    /// Earliest sequence number of the group: where the stream retries from if it fails.
    first: &'a str,
    /// Some change of the group was not an insert.
    rewrite: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    Bumped(u64),
    Deferred,
    AlreadyPending,
}

/// Read, debounce, compare-and-set; again when another writer got in between.
async fn record_change(
    deps: &Deps,
    tenant: &str,
    dataset: &str,
    now: DateTime<Utc>,
    window: Duration,
    rewrite: bool,
) -> PortResult<Recorded> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let stored = deps.generations.dataset_generation(tenant, dataset).await?;
        let Some(next) = stored.after_change(now, window, rewrite) else {
            return Ok(Recorded::AlreadyPending);
        };
        match deps
            .generations
            .put_dataset_generation(tenant, dataset, &next)
            .await
        {
            Ok(()) if next.gen != stored.gen => return Ok(Recorded::Bumped(next.gen)),
            Ok(()) => return Ok(Recorded::Deferred),
            Err(PortError::Conflict(_)) if attempt < MAX_ATTEMPTS => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalog::{Catalog, BUILTIN_CATALOG};
    use crate::ports::{Clock, Generations};
    use crate::services::export::{request_export, ExportAnswer};
    use crate::services::tests::{orders, setup, who};
    use crate::testing::{fakes, test_config};

    const ORDERS_STREAM: &str =
        "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2026-12-07T00:00:00.000";

    fn change(seq: &str, tenant: &str) -> SourceChange {
        SourceChange {
            sequence_number: seq.into(),
            stream_arn: ORDERS_STREAM.into(),
            attributes: HashMap::from([
                ("tenant_id".to_string(), tenant.to_string()),
                ("order_id".to_string(), format!("o-{seq}")),
            ]),
            rewrite: false,
        }
    }

    #[tokio::test]
    async fn a_batch_costs_one_write_per_tenant_and_dataset() {
        let f = fakes(test_config(), 0);
        let now = f.deps.clock.now();
        let batch = [
            change("1", "acme"),
            change("2", "acme"),
            change("3", "globex"),
        ];
        let report = invalidate(&f.deps, &batch, now).await;
        assert_eq!(
            (report.bumped, report.deferred, report.ignored),
            (2, 0, 0),
            "{report:?}"
        );
        let g = f.meta.dataset_generation("acme", "orders").await.unwrap();
        assert_eq!((g.gen, g.version), (1, 1));
    }

    #[tokio::test]
    async fn later_batches_in_the_window_defer_then_coalesce() {
        let f = fakes(test_config(), 0);
        let now = f.deps.clock.now();
        invalidate(&f.deps, &[change("1", "acme")], now).await;
        let second = invalidate(&f.deps, &[change("2", "acme")], now + Duration::seconds(5)).await;
        let third = invalidate(&f.deps, &[change("3", "acme")], now + Duration::seconds(9)).await;
        assert_eq!((second.deferred, third.coalesced), (1, 1));
        let g = f.meta.dataset_generation("acme", "orders").await.unwrap();
        assert_eq!(g.version, 2, "two writes for three batches");
        assert_eq!(g.effective(now + Duration::seconds(59)), 1);
        assert_eq!(g.effective(now + Duration::seconds(60)), 2);
    }

    #[tokio::test]
    async fn opted_out_datasets_and_other_tables_are_ignored() {
        let mut f = fakes(test_config(), 0);
        let text = BUILTIN_CATALOG.replace(
            "invalidate_after_seconds = 60\n",
            "invalidate_after_seconds = 0\n",
        );
        f.deps.catalog = std::sync::Arc::new(Catalog::from_toml(&text).unwrap());
        let mut other = change("2", "acme");
        other.stream_arn = ORDERS_STREAM.replace("table/orders", "table/elsewhere");
        let report = invalidate(&f.deps, &[change("1", "acme"), other], f.deps.clock.now()).await;
        assert_eq!((report.ignored, report.bumped), (2, 0), "{report:?}");
        assert!(f.meta.dataset_generations("acme").await.unwrap().is_empty());
    }

    fn is_hit(answer: &ExportAnswer) -> bool {
        matches!(answer, ExportAnswer::File { stale: false, .. })
    }

    #[tokio::test]
    async fn a_write_makes_the_next_request_miss_once_per_window() {
        let f = setup(12);
        let ask = || async {
            request_export(&f.deps, &who("acme"), &orders(&[]))
                .await
                .unwrap()
        };
        assert!(!is_hit(&ask().await));
        f.run_jobs().await;
        assert!(is_hit(&ask().await));

        invalidate(&f.deps, &[change("1", "acme")], f.clock.now()).await;
        assert!(
            !is_hit(&ask().await),
            "built before the write: no longer current"
        );
        f.run_jobs().await;
        assert!(is_hit(&ask().await), "the rebuilt file is current");

        // More writes inside the window: the file stays served until the window ends.
        f.clock.advance(Duration::seconds(10));
        invalidate(&f.deps, &[change("2", "acme")], f.clock.now()).await;
        assert!(is_hit(&ask().await));
        f.clock.advance(Duration::seconds(50));
        assert!(
            !is_hit(&ask().await),
            "the trailing bump takes effect at the window's end"
        );
        f.run_jobs().await;
        assert!(is_hit(&ask().await));

        // Another tenant's entries are untouched by acme's writes.
        let globex = request_export(&f.deps, &who("globex"), &orders(&[]))
            .await
            .unwrap();
        assert!(!is_hit(&globex));
        f.run_jobs().await;
        invalidate(&f.deps, &[change("3", "acme")], f.clock.now()).await;
        let globex = request_export(&f.deps, &who("globex"), &orders(&[]))
            .await
            .unwrap();
        assert!(is_hit(&globex));
    }
}
