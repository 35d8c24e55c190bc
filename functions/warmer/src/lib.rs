//! The warmer function: on its schedule, refresh what is in demand and about to expire.

use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use shared::services::warm::{warm, WarmReport};
use shared::services::{Deps, ServiceError};
use shared::telemetry::WarmRun;

/// Runs one warm-up. The event's own time is used when present, so a delayed delivery still
/// looks at the window it was scheduled for.
pub async fn handle(deps: &Deps, event: EventBridgeEvent) -> Result<WarmReport, ServiceError> {
    let now = event.time.unwrap_or_else(|| deps.clock.now());
    let report = warm(deps, now).await?;
    tracing::info!(
        candidates = report.candidates,
        enqueued = report.enqueued,
        joined = report.joined,
        skipped_cold = report.skipped_cold,
        skipped_invalidated = report.skipped_invalidated,
        pinned_enqueued = report.pinned_enqueued,
        pinned_fresh = report.pinned_fresh,
        skipped_budget = report.skipped_budget,
        failed = report.failed,
        "warm-up done"
    );
    let run = WarmRun {
        candidates: report.candidates,
        queued: report.enqueued,
        pinned: report.pinned_enqueued,
        joined: report.joined,
        failed: report.failed,
        over_budget: report.skipped_budget,
    };
    deps.metrics.warm_run(deps.clock.now(), run);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shared::domain::catalog::{Catalog, BUILTIN_CATALOG};
    use shared::testing::{emf_documents, fakes, test_config};

    use super::*;

    #[tokio::test]
    async fn a_run_emits_the_refreshes_it_queued_as_emf() {
        let mut f = fakes(test_config(), 10);
        // A pin on the last dataset of the catalog (customers): queued on the first run.
        let pinned = format!(
            "{BUILTIN_CATALOG}\n[[datasets.pins]]\ntenants = [\"acme\"]\nquery = \"format=csv\"\n"
        );
        f.deps.catalog = Arc::new(Catalog::from_toml(&pinned).unwrap());
        let event: EventBridgeEvent =
            serde_json::from_str(include_str!("../events/schedule.json")).unwrap();
        let report = handle(&f.deps, event).await.unwrap();
        assert_eq!(report.pinned_enqueued, 1, "{report:?}");

        let docs = emf_documents(&f.metrics, &["acme"]);
        assert_eq!(docs.len(), 1, "{docs:?}");
        assert_eq!(docs[0]["PinnedRefreshes"], 1.0);
        assert_eq!(docs[0]["RefreshesQueued"], 0.0);
        assert_eq!(docs[0]["RefreshesFailed"], 0.0);
        // Timestamped with the run's clock, in milliseconds.
        assert_eq!(
            docs[0]["_aws"]["Timestamp"],
            f.deps.clock.now().timestamp_millis()
        );
    }
}
