//! The warmer's use case: refresh entries that are in demand and about to expire.

use chrono::{DateTime, Duration, Utc};

use std::collections::HashMap;

use super::jobs::{start_or_join, Start, StartOptions};
use super::{Deps, ServiceError};
use crate::domain::{CacheEntry, CacheKey, ExportSpec, Generation, JobKind, Owner};
use crate::encode::ENCODER_VERSION;

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
    /// Refreshes not started because their tenant spent its budget for this run.
    pub skipped_budget: usize,
    pub failed: usize,
}

/// New refresh jobs started per tenant in this run, against the per-tenant budget: one tenant
/// that keeps many keys warm cannot fill every worker with its refreshes.
struct Budget {
    limit: u32,
    spent: HashMap<String, u32>,
}

impl Budget {
    fn allows(&self, tenant: &str) -> bool {
        self.limit == 0 || self.spent.get(tenant).copied().unwrap_or(0) < self.limit
    }

    fn spend(&mut self, tenant: &str) {
        *self.spent.entry(tenant.to_string()).or_default() += 1;
    }
}

/// What one refresh attempt came to.
enum Refresh {
    Started,
    Joined,
    OverBudget,
    /// A newer file is there already, or the refresh could not start (logged).
    Nothing,
    Failed,
}

/// Starts (or joins) a refresh of `key` for `tenant`, within the tenant's budget.
#[allow(clippy::too_many_arguments)]
async fn refresh(
    deps: &Deps,
    budget: &mut Budget,
    tenant: &str,
    user: &str,
    key: &CacheKey,
    spec: &ExportSpec,
    generation: Generation,
    seen: Option<&CacheEntry>,
) -> Refresh {
    if !budget.allows(tenant) {
        return Refresh::OverBudget;
    }
    let started = start_or_join(
        deps,
        tenant,
        user,
        key,
        spec,
        StartOptions {
            kind: JobKind::Refresh,
            generation,
            rows_estimate: seen.filter(|e| e.generation == generation).map(|e| e.rows),
            entry_seen: seen,
            miss_limit: None,
        },
    )
    .await;
    match started {
        Ok(Start::New(job)) => {
            budget.spend(tenant);
            tracing::info!(job_id = %job.job_id, tenant, dataset = %spec.dataset, "refresh enqueued");
            Refresh::Started
        }
        Ok(Start::Joined(_)) => Refresh::Joined,
        Ok(Start::EntryChanged) => Refresh::Nothing,
        Err(e) => {
            tracing::error!(tenant, dataset = %spec.dataset, error = %e, "refresh could not start");
            Refresh::Failed
        }
    }
}

/// The user recorded on jobs and entries the warmer creates for pins.
pub const PIN_USER: &str = "warmer";

/// Looks at entries whose fresh deadline falls between the previous run and the next one (so one
/// missed run is caught up), and refreshes those hit within the hit window.
pub async fn warm(deps: &Deps, now: DateTime<Utc>) -> Result<WarmReport, ServiceError> {
    let interval = Duration::from_std(deps.config.warmer.interval).unwrap_or(Duration::minutes(15));
    let hit_window = Duration::from_std(deps.config.warmer.hit_window).unwrap_or(Duration::days(1));
    let mut budget = Budget {
        limit: deps.config.warmer.max_refreshes_per_tenant,
        spent: HashMap::new(),
    };
    let mut report = WarmReport::default();
    // Pins first: they are the operator's explicit promise; demand shares what is left.
    warm_pins(deps, now, interval, &mut budget, &mut report).await?;
    let mut entries = deps
        .entries
        .expiring_entries(now - interval, now + interval)
        .await?;
    report.candidates = entries.len();
    // The most popular first, so a tenant's budget goes where it saves the most misses.
    entries.sort_by_key(|e| std::cmp::Reverse(e.hits));
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
            .generations
            .current_generation(&entry.tenant, &entry.user, &entry.spec.dataset, now)
            .await?;
        if generation != entry.generation {
            report.skipped_invalidated += 1;
            continue;
        }
        let outcome = refresh(
            deps,
            &mut budget,
            &entry.tenant,
            &entry.user,
            &entry.cache_key,
            &entry.spec,
            generation,
            Some(&entry),
        )
        .await;
        match outcome {
            Refresh::Started => report.enqueued += 1,
            Refresh::Joined => report.joined += 1,
            Refresh::OverBudget => report.skipped_budget += 1,
            Refresh::Nothing => {}
            Refresh::Failed => report.failed += 1,
        }
    }
    Ok(report)
}

/// Pinned exports are kept fresh regardless of demand: built when missing, refreshed when they
/// would expire before the next run.
async fn warm_pins(
    deps: &Deps,
    now: DateTime<Utc>,
    interval: Duration,
    budget: &mut Budget,
    report: &mut WarmReport,
) -> Result<(), ServiceError> {
    for pin in deps.catalog.pins() {
        let spec = &pin.export.spec;
        for tenant in &pin.tenants {
            let owner = Owner {
                tenant,
                user: PIN_USER,
            };
            let key = pin.export.cache_key(owner, ENCODER_VERSION);
            let found = deps
                .entries
                .find(tenant, PIN_USER, &spec.dataset, &key, now)
                .await?;
            if found
                .current_entry()
                .is_some_and(|e| e.fresh_until >= now + interval)
            {
                report.pinned_fresh += 1;
                continue;
            }
            // The job records the warmer as its user, so it carries the warmer's
            // generations: the file it builds is current for the next pin check.
            let outcome = refresh(
                deps,
                budget,
                tenant,
                PIN_USER,
                &key,
                spec,
                found.generation,
                found.entry.as_ref(),
            )
            .await;
            match outcome {
                Refresh::Started | Refresh::Joined => report.pinned_enqueued += 1,
                Refresh::OverBudget => report.skipped_budget += 1,
                Refresh::Nothing => {}
                Refresh::Failed => report.failed += 1,
            }
        }
    }
    Ok(())
}
