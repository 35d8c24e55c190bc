//! `GET /exports/{dataset}` and `POST /exports`: serve a fresh file, or start (or join) a job,
//! and wait for it a while when the caller asks to (`Prefer: wait=N`). `POST /exports/refresh`:
//! build the entry's file again even when it is fresh.

use chrono::Duration;

use super::jobs::{start_or_join, Start, StartOptions};
use super::{require_scope, Deps, ServiceError};
use crate::domain::identity::SCOPE_READ;
use crate::domain::request::normalise;
use crate::domain::JobStatus;
use crate::domain::{
    CacheEntry, CacheKey, ExportSpec, Freshness, HitKind, Identity, Job, JobKind, RawExportRequest,
    ResolvedExport,
};
use crate::encode::ENCODER_VERSION;
use crate::ports::Lookup;
use crate::telemetry::ExportMetric;

#[derive(Debug)]
pub enum ExportAnswer {
    /// A file to redirect to. `stale` when served past its fresh deadline (a refresh is queued).
    File {
        entry: Box<CacheEntry>,
        url: String,
        age: Duration,
        stale: bool,
        /// Made by this request's own job while the caller waited (`Prefer: wait`): still a miss.
        waited: bool,
    },
    /// No servable file: the job to poll (`joined` when it was already running).
    Job { job: Box<Job>, joined: bool },
}

impl ExportAnswer {
    pub fn cache_result(&self) -> HitKind {
        match self {
            Self::File { waited: true, .. } => HitKind::Miss,
            Self::File { stale: false, .. } => HitKind::Hit,
            Self::File { stale: true, .. } => HitKind::Stale,
            Self::Job { .. } => HitKind::Miss,
        }
    }

    /// The answer as a metric: what was asked for, how it was answered, the job behind it.
    pub fn metric<'a>(&'a self, tenant: &'a str, latency: std::time::Duration) -> ExportMetric<'a> {
        let (spec, export_id) = match self {
            Self::File { entry, .. } => (&entry.spec, &entry.job_id),
            Self::Job { job, .. } => (&job.spec, &job.job_id),
        };
        ExportMetric {
            dataset: &spec.dataset,
            format: spec.format.as_str(),
            result: self.cache_result(),
            latency,
            tenant,
            export_id,
        }
    }
}

/// The caller's request checked against the catalog, and the cache key it names for them.
fn keyed(
    deps: &Deps,
    who: &Identity,
    raw: &RawExportRequest,
) -> Result<(ResolvedExport, CacheKey), ServiceError> {
    require_scope(who, SCOPE_READ)?;
    let req = normalise(&deps.catalog, raw)?;
    let key = req.cache_key(who.owner(), ENCODER_VERSION);
    Ok((req, key))
}

pub async fn request_export(
    deps: &Deps,
    who: &Identity,
    raw: &RawExportRequest,
) -> Result<ExportAnswer, ServiceError> {
    let (req, key) = keyed(deps, who, raw)?;
    let accepted_staleness = Duration::seconds(req.accepted_staleness() as i64);
    let spec = req.spec;

    // A second round only when a job finished between our look and our create: its file is then
    // served instead of being built again.
    for _ in 0..3 {
        let now = deps.clock.now();
        let found = deps
            .entries
            .find(&who.tenant, &who.user, &spec.dataset, &key, now)
            .await?;
        if let Some(entry) = found.current_entry() {
            let stale = match entry.freshness(now) {
                Freshness::Fresh => Some(false),
                Freshness::Stale { age_past_fresh } if age_past_fresh <= accepted_staleness => {
                    Some(true)
                }
                Freshness::Stale { .. } | Freshness::Expired => None,
            };
            if let Some(stale) = stale {
                return serve(deps, who, &key, &spec, &found, entry, stale).await;
            }
        }
        let Some((job, joined)) =
            start_for(deps, who, &key, &spec, &found, JobKind::Export).await?
        else {
            continue;
        };
        record(deps, &who.tenant, &spec.dataset, HitKind::Miss).await;
        return Ok(ExportAnswer::Job {
            job: Box::new(job),
            joined,
        });
    }
    Err(ServiceError::Unavailable(
        "this export is changing right now; retry shortly".into(),
    ))
}

/// Redirects to the entry's file; a stale one also gets a refresh behind the caller's back.
async fn serve(
    deps: &Deps,
    who: &Identity,
    key: &CacheKey,
    spec: &ExportSpec,
    found: &Lookup,
    entry: &CacheEntry,
    stale: bool,
) -> Result<ExportAnswer, ServiceError> {
    let now = deps.clock.now();
    if stale {
        let refresh = start_or_join(
            deps,
            &who.tenant,
            &who.user,
            key,
            spec,
            StartOptions {
                kind: JobKind::Refresh,
                generation: found.generation,
                rows_estimate: Some(entry.rows),
                entry_seen: Some(entry),
                miss_limit: None,
            },
        )
        .await;
        // EntryChanged: a newer file is already there, nothing to refresh.
        if let Err(e) = refresh {
            tracing::warn!(error = %e, "stale hit served but its refresh could not start");
        }
    }
    let url = presigned(deps, entry).await?;
    record(
        deps,
        &who.tenant,
        &spec.dataset,
        if stale { HitKind::Stale } else { HitKind::Hit },
    )
    .await;
    if let Err(e) = deps.entries.touch_entry(entry, now).await {
        tracing::warn!(error = %e, "could not record the hit on the entry");
    }
    Ok(ExportAnswer::File {
        age: entry.age(now),
        entry: Box::new(entry.clone()),
        url,
        stale,
        waited: false,
    })
}

/// Longest `Prefer: wait` honoured, in seconds: API Gateway gives up on an HTTP API after 30 s,
/// and the answer still has to be signed and sent.
pub const MAX_WAIT_SECONDS: u32 = 25;

/// Pause between two looks at a waited-for job: short at first (small exports finish in a second
/// or two), then one GetItem a second at most.
const FIRST_LOOK_AFTER: std::time::Duration = std::time::Duration::from_millis(200);
const LOOK_AT_MOST_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `request_export`, then, on a miss, up to `wait` for the job: its file when it finished in
/// time, else the job as it stands then (the usual `202`). Waiting reads only the job record and
/// the entry, never the source: the API keeps no access to the source tables.
pub async fn request_export_waiting(
    deps: &Deps,
    who: &Identity,
    raw: &RawExportRequest,
    wait: std::time::Duration,
) -> Result<ExportAnswer, ServiceError> {
    let answer = request_export(deps, who, raw).await?;
    let ExportAnswer::Job { mut job, joined } = answer else {
        return Ok(answer);
    };
    let until = tokio::time::Instant::now() + wait;
    let mut pause = FIRST_LOOK_AFTER;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(LOOK_AT_MOST_EVERY);
        match deps.jobs.get_job(&job.job_id).await? {
            Some(latest) => *job = latest,
            None => break,
        }
        match job.status {
            JobStatus::Queued | JobStatus::Running => continue,
            JobStatus::Failed => break,
            JobStatus::Succeeded => {
                if let Some(file) = waited_file(deps, who, &job).await? {
                    return Ok(file);
                }
                break;
            }
        }
    }
    Ok(ExportAnswer::Job { job, joined })
}

/// The file the caller's key now serves, once the waited-for job recorded it. `None` when the
/// entry was invalidated in the meantime: the caller gets the job, whose status says the rest.
async fn waited_file(
    deps: &Deps,
    who: &Identity,
    job: &Job,
) -> Result<Option<ExportAnswer>, ServiceError> {
    let found = deps
        .entries
        .find(
            &who.tenant,
            &who.user,
            &job.spec.dataset,
            &job.cache_key,
            deps.clock.now(),
        )
        .await?;
    let Some(entry) = found.current_entry() else {
        return Ok(None);
    };
    let url = presigned(deps, entry).await?;
    Ok(Some(ExportAnswer::File {
        age: entry.age(deps.clock.now()),
        entry: Box::new(entry.clone()),
        url,
        stale: false,
        waited: true,
    }))
}

/// `POST /exports/refresh`: starts building the entry's file again even when it is fresh, or
/// joins the job already doing so. The current file stays served until the new one is recorded
/// (the worker replaces the entry in one write), so nobody sees a gap. Costs one of the tenant's
/// new exports of the minute, like a miss: it reads the whole source again.
pub async fn request_refresh(
    deps: &Deps,
    who: &Identity,
    raw: &RawExportRequest,
) -> Result<ExportAnswer, ServiceError> {
    let (req, key) = keyed(deps, who, raw)?;
    let spec = req.spec;
    // Another round only when a job finished between our look and our create: it may have read
    // the source before the caller asked, so the refresh still goes ahead.
    for _ in 0..3 {
        let found = deps
            .entries
            .find(
                &who.tenant,
                &who.user,
                &spec.dataset,
                &key,
                deps.clock.now(),
            )
            .await?;
        let Some((job, joined)) =
            start_for(deps, who, &key, &spec, &found, JobKind::Refresh).await?
        else {
            continue;
        };
        return Ok(ExportAnswer::Job {
            job: Box::new(job),
            joined,
        });
    }
    Err(ServiceError::Unavailable(
        "this export is changing right now; retry shortly".into(),
    ))
}

/// Starts a job of `kind` for the key, or joins the one running; `None` when the entry changed
/// since `found` was read, and the caller looks again.
async fn start_for(
    deps: &Deps,
    who: &Identity,
    key: &CacheKey,
    spec: &ExportSpec,
    found: &Lookup,
    kind: JobKind,
) -> Result<Option<(Job, bool)>, ServiceError> {
    let started = start_or_join(
        deps,
        &who.tenant,
        &who.user,
        key,
        spec,
        StartOptions {
            kind,
            generation: found.generation,
            rows_estimate: found.current_entry().map(|e| e.rows),
            entry_seen: found.entry.as_ref(),
            miss_limit: Some(deps.config.miss_rate_per_minute),
        },
    )
    .await?;
    Ok(match started {
        Start::New(job) => Some((job, false)),
        Start::Joined(job) => Some((job, true)),
        Start::EntryChanged => None,
    })
}

/// A download URL of the entry's file, under its file name.
async fn presigned(deps: &Deps, entry: &CacheEntry) -> Result<String, ServiceError> {
    Ok(deps
        .files
        .presign_get(
            &entry.object_key,
            &entry.file_name(),
            deps.config.presign_ttl,
        )
        .await?)
}

/// Counters are statistics: losing one must not fail the caller's request.
async fn record(deps: &Deps, tenant: &str, dataset: &str, kind: HitKind) {
    if let Err(e) = deps.counters.count(tenant, dataset, kind).await {
        tracing::warn!(error = %e, "could not count a cache {:?}", kind);
    }
}
