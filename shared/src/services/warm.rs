//! The warmer's use case: refresh entries that are in demand and about to expire.

use chrono::{DateTime, Duration, Utc};

use super::jobs::start_or_join;
use super::{Deps, ServiceError};
use crate::domain::request::normalise;
use crate::domain::{CacheKey, JobKind, RawExportRequest};

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WarmReport {
    pub candidates: usize,
    pub enqueued: usize,
    pub joined: usize,
    pub skipped_cold: usize,
    pub skipped_invalidated: usize,
    pub skipped_unknown_dataset: usize,
    /// Pinned exports (catalog) that were missing or due, and were queued or joined.
    pub pinned_enqueued: usize,
    pub pinned_fresh: usize,
    pub failed: usize,
}

/// The user recorded on jobs and entries the warmer creates for pins.
pub const PIN_USER: &str = "warmer";

/// Looks at entries whose fresh deadline falls between the previous run and the next one (so one
/// missed run is caught up), and refreshes those hit within the hit window.
pub async fn warm(deps: &Deps, now: DateTime<Utc>) -> Result<WarmReport, ServiceError> {
    let interval = Duration::from_std(deps.config.warmer.interval).unwrap_or(Duration::minutes(15));
    let hit_window = Duration::from_std(deps.config.warmer.hit_window).unwrap_or(Duration::days(1));
    let entries = deps
        .meta
        .expiring_entries(now - interval, now + interval)
        .await?;
    let mut report = WarmReport {
        candidates: entries.len(),
        ..WarmReport::default()
    };
    for entry in entries {
        if entry.stale_until <= now - interval {
            continue;
        }
        if entry.last_hit_at.is_none_or(|t| t < now - hit_window) {
            report.skipped_cold += 1;
            continue;
        }
        if deps.catalog.get(&entry.spec.dataset).is_none() {
            report.skipped_unknown_dataset += 1;
            continue;
        }
        let generation = deps
            .meta
            .current_generation(&entry.tenant, &entry.user)
            .await?;
        if generation != entry.generation {
            report.skipped_invalidated += 1;
            continue;
        }
        match start_or_join(
            deps,
            &entry.tenant,
            &entry.user,
            &entry.cache_key,
            &entry.spec,
            JobKind::Refresh,
            generation,
            Some(entry.rows),
        )
        .await
        {
            Ok(s) if s.joined => report.joined += 1,
            Ok(s) => {
                tracing::info!(job_id = %s.job.job_id, tenant = %entry.tenant,
                    dataset = %entry.spec.dataset, "refresh enqueued");
                report.enqueued += 1;
            }
            Err(e) => {
                tracing::error!(tenant = %entry.tenant, dataset = %entry.spec.dataset, error = %e,
                    "refresh could not start");
                report.failed += 1;
            }
        }
    }
    warm_pins(deps, now, interval, &mut report).await?;
    Ok(report)
}

/// Pinned exports are kept fresh regardless of demand: built when missing, refreshed when they
/// would expire before the next run.
async fn warm_pins(
    deps: &Deps,
    now: DateTime<Utc>,
    interval: Duration,
    report: &mut WarmReport,
) -> Result<(), ServiceError> {
    for ds in deps.catalog.datasets() {
        for pin in &ds.pins {
            let raw = RawExportRequest::from_query(&ds.name, pin.query_pairs());
            let spec = normalise(&deps.catalog, &raw)?.spec;
            for tenant in &pin.tenants {
                let key = CacheKey::derive(tenant, None, &spec);
                let (entry, generation) = deps.meta.lookup(tenant, PIN_USER, &key).await?;
                let current = entry.filter(|e| e.generation == generation);
                if current
                    .as_ref()
                    .is_some_and(|e| e.fresh_until >= now + interval)
                {
                    report.pinned_fresh += 1;
                    continue;
                }
                let estimate = current.map(|e| e.rows);
                match start_or_join(
                    deps,
                    tenant,
                    PIN_USER,
                    &key,
                    &spec,
                    JobKind::Refresh,
                    generation,
                    estimate,
                )
                .await
                {
                    Ok(_) => report.pinned_enqueued += 1,
                    Err(e) => {
                        tracing::error!(tenant = %tenant, dataset = %ds.name, error = %e,
                            "pinned export could not start");
                        report.failed += 1;
                    }
                }
            }
        }
    }
    Ok(())
}
