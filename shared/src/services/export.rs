//! `GET /exports/{dataset}` and `POST /exports`: serve a fresh file, or start (or join) a job.

use chrono::Duration;

use super::jobs::{start_or_join, Started};
use super::{require_scope, Deps, ServiceError};
use crate::domain::identity::SCOPE_READ;
use crate::domain::request::normalise;
use crate::domain::{CacheEntry, CacheKey, Freshness, Identity, Job, JobKind, RawExportRequest};
use crate::ports::HitKind;

#[derive(Debug)]
pub enum ExportAnswer {
    /// A file to redirect to. `stale` when served past its fresh deadline (a refresh is queued).
    File {
        entry: Box<CacheEntry>,
        url: String,
        age: Duration,
        stale: bool,
    },
    /// No servable file: the job to poll (`joined` when it was already running).
    Job { job: Box<Job>, joined: bool },
}

impl ExportAnswer {
    pub fn cache_result(&self) -> &'static str {
        match self {
            Self::File { stale: false, .. } => "hit",
            Self::File { stale: true, .. } => "stale",
            Self::Job { .. } => "miss",
        }
    }
}

pub async fn request_export(
    deps: &Deps,
    who: &Identity,
    raw: &RawExportRequest,
) -> Result<ExportAnswer, ServiceError> {
    require_scope(who, SCOPE_READ)?;
    let req = normalise(&deps.catalog, raw)?;
    let spec = req.spec;
    let Some(ds) = deps.catalog.get(&spec.dataset) else {
        return Err(ServiceError::NotFound(format!(
            "unknown dataset `{}`",
            spec.dataset
        )));
    };
    let user_part = ds.user_scoped.then_some(who.user.as_str());
    let key = CacheKey::derive(&who.tenant, user_part, &spec);
    let (entry, generation) = deps.meta.lookup(&who.tenant, &who.user, &key).await?;
    let now = deps.clock.now();

    // An entry built under an older generation was invalidated: as good as absent.
    let entry = entry.filter(|e| e.generation == generation);
    let estimate = entry.as_ref().map(|e| e.rows);
    if let Some(entry) = entry {
        let accepted_staleness = req
            .max_stale
            .map_or(ds.stale_seconds as i64, |s| s.min(i64::MAX as u64) as i64);
        let stale = match entry.freshness(now) {
            Freshness::Fresh => Some(false),
            Freshness::Stale { age_past_fresh }
                if age_past_fresh <= Duration::seconds(accepted_staleness) =>
            {
                Some(true)
            }
            Freshness::Stale { .. } | Freshness::Expired => None,
        };
        if let Some(stale) = stale {
            if stale {
                // Serve what we have and refresh behind the caller's back (coalesced).
                let refresh = start_or_join(
                    deps,
                    &who.tenant,
                    &who.user,
                    &key,
                    &spec,
                    JobKind::Refresh,
                    generation,
                    estimate,
                )
                .await;
                if let Err(e) = refresh {
                    tracing::warn!(error = %e, "stale hit served but its refresh could not start");
                }
            }
            let url = deps
                .files
                .presign_get(
                    &entry.object_key,
                    &entry.file_name(),
                    deps.config.presign_ttl,
                )
                .await?;
            record(
                deps,
                &who.tenant,
                &spec.dataset,
                if stale { HitKind::Stale } else { HitKind::Hit },
            )
            .await;
            if let Err(e) = deps.meta.touch_entry(&entry, now).await {
                tracing::warn!(error = %e, "could not record the hit on the entry");
            }
            return Ok(ExportAnswer::File {
                age: entry.age(now),
                entry: Box::new(entry),
                url,
                stale,
            });
        }
    }

    let limit = deps.config.miss_rate_per_minute;
    if limit > 0 && !deps.meta.take_miss_slot(&who.tenant, now, limit).await? {
        return Err(ServiceError::RateLimited {
            retry_after: 60 - now.timestamp().rem_euclid(60) as u32,
        });
    }
    let Started { job, joined } = start_or_join(
        deps,
        &who.tenant,
        &who.user,
        &key,
        &spec,
        JobKind::Export,
        generation,
        estimate,
    )
    .await?;
    record(deps, &who.tenant, &spec.dataset, HitKind::Miss).await;
    Ok(ExportAnswer::Job {
        job: Box::new(job),
        joined,
    })
}

/// Counters are statistics: losing one must not fail the caller's request.
async fn record(deps: &Deps, tenant: &str, dataset: &str, kind: HitKind) {
    if let Err(e) = deps.meta.count(tenant, dataset, kind).await {
        tracing::warn!(error = %e, "could not count a cache {:?}", kind);
    }
}
