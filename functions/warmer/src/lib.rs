//! The warmer function: on its schedule, refresh what is in demand and about to expire.

use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use shared::services::warm::{warm, WarmReport};
use shared::services::{Deps, ServiceError};

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
    Ok(report)
}
