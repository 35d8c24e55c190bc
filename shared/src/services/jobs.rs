//! Starting jobs (coalesced per cache key), reading their status, and their download link.

use chrono::Duration;

use super::{require_scope, Deps, ServiceError, KEEP_RECORDS_FOR_DAYS, MARKER_HOURS};
use crate::domain::identity::SCOPE_READ;
use crate::domain::job::file_name;
use crate::domain::request::quoted;
use crate::domain::{
    CacheEntry, CacheKey, ExportSpec, Generation, Identity, Job, JobError, JobKind, JobMessage,
    JobStatus, MessageKind,
};
use crate::ports::{Created, NewJob, PortError};

/// Where a job's file goes: under the tenant, so a key can never reach another tenant's files.
pub fn object_key(job: &Job) -> String {
    format!(
        "exports/{}/{}/{}/{}.{}",
        job.tenant,
        job.spec.dataset,
        job.cache_key,
        job.job_id,
        job.spec.format.extension()
    )
}

pub fn manifest_key(object_key: &str) -> String {
    let stem = object_key
        .rsplit_once('/')
        .map(|(dir, file)| format!("{dir}/{}", file.split('.').next().unwrap_or(file)))
        .unwrap_or_else(|| object_key.to_string());
    format!("{stem}.manifest.json")
}

pub enum Start {
    /// A new job, queued.
    New(Job),
    /// Somebody else's job for the same key, still running.
    Joined(Job),
    /// The key's entry changed since the caller looked (a job finished meanwhile): look again
    /// rather than build the same file twice.
    EntryChanged,
}

/// What a new job is started under.
#[derive(Debug, Clone, Copy)]
pub struct StartOptions<'a> {
    pub kind: JobKind,
    /// The caller's current generations (see `Lookup::generation`).
    pub generation: Generation,
    pub rows_estimate: Option<u64>,
    /// The key's entry the caller looked at, if any.
    pub entry_seen: Option<&'a CacheEntry>,
    /// New exports the tenant may start per minute; `None` for refreshes, which are not limited.
    pub miss_limit: Option<u32>,
}

/// Creates a job for `key` unless one is already in flight, in which case the caller joins it:
/// concurrent misses for one key all get the same job id.
pub async fn start_or_join(
    deps: &Deps,
    tenant: &str,
    user: &str,
    key: &CacheKey,
    spec: &ExportSpec,
    opts: StartOptions<'_>,
) -> Result<Start, ServiceError> {
    let mut replacing: Option<String> = None;
    // A few rounds at most: each lost round means a finished job just released the marker.
    for _ in 0..4 {
        let now = deps.clock.now();
        let job = Job::new(
            uuid::Uuid::new_v4().simple().to_string(),
            tenant,
            user,
            key.clone(),
            spec.clone(),
            opts.kind,
            opts.generation,
            opts.rows_estimate,
            now,
            Duration::days(KEEP_RECORDS_FOR_DAYS),
        );
        let created = deps
            .meta
            .create_job(NewJob {
                job: &job,
                marker_until: now + Duration::hours(MARKER_HOURS),
                replacing: replacing.as_deref(),
                entry_seen: opts.entry_seen.map(|e| e.job_id.as_str()),
                miss_limit: opts.miss_limit.filter(|l| *l > 0),
            })
            .await;
        match created {
            Ok(Created::Created) => {
                enqueue_or_fail(deps, job.clone()).await?;
                return Ok(Start::New(job));
            }
            Ok(Created::EntryChanged) => return Ok(Start::EntryChanged),
            Ok(Created::RateLimited) => {
                return Err(ServiceError::RateLimited {
                    retry_after: 60 - now.timestamp().rem_euclid(60) as u32,
                })
            }
            Ok(Created::Held(existing)) => match deps.meta.get_job(&existing).await? {
                Some(other) if !other.status.is_terminal() => return Ok(Start::Joined(other)),
                // Finished (or vanished) but its marker is still there: take the marker over.
                _ => replacing = Some(existing),
            },
            // The marker changed hands between our read and our write: look again.
            Err(PortError::Conflict(_)) => replacing = None,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ServiceError::Unavailable(
        "too many concurrent changes to this export; retry shortly".into(),
    ))
}

/// A job nobody will ever pick up must not hold the key's marker: fail it and say so.
async fn enqueue_or_fail(deps: &Deps, mut job: Job) -> Result<(), ServiceError> {
    let msg = JobMessage {
        job_id: job.job_id.clone(),
        kind: match job.kind {
            JobKind::Export => MessageKind::Export,
            JobKind::Refresh => MessageKind::Refresh,
        },
    };
    let Err(e) = deps.queue.enqueue(&msg).await else {
        return Ok(());
    };
    tracing::error!(job_id = %job.job_id, error = %e, "enqueue failed; failing the job");
    let now = deps.clock.now();
    job.status = JobStatus::Failed;
    job.error = Some(JobError {
        code: "enqueue_failed".into(),
        message: "the job could not be queued".into(),
    });
    job.finished_at = Some(now);
    job.updated_at = now;
    job.version += 1;
    if let Err(e) = deps.meta.put_job(&job).await {
        tracing::error!(job_id = %job.job_id, error = %e, "could not record the enqueue failure");
    }
    if let Err(e) = deps
        .meta
        .release_marker(&job.tenant, &job.cache_key, &job.job_id)
        .await
    {
        tracing::error!(job_id = %job.job_id, error = %e, "could not release the marker");
    }
    Err(ServiceError::Unavailable(
        "the export could not be queued; retry shortly".into(),
    ))
}

const GENERIC_FAILURE: &str = "the export failed; request it again or contact support";

/// The only sentence a caller sees for a job error code. The stored message may carry internals
/// (AWS error text with ARNs and account ids, raw row values): it is for the logs, never shown.
fn safe_sentence(code: &str) -> &'static str {
    match code {
        "row_limit_exceeded" => {
            "the export has more rows than this dataset allows; narrow it with filters or from/to"
        }
        "too_large_for_one_run" => {
            "the export is too large for this format; narrow it with filters or from/to, or use csv"
        }
        "no_temp_space" => "the export needs more temporary space than a worker has; narrow it or use csv",
        "dataset_unknown" => "the dataset is no longer available",
        "source_data_invalid" => "some source rows do not match the dataset's column types; the operators have the details",
        "transient" => "a temporary problem interrupted the export; it will be retried",
        "retries_exhausted" => "the export kept hitting a temporary problem and was given up; request it again later",
        "enqueue_failed" => "the export could not be queued; request it again",
        _ => GENERIC_FAILURE,
    }
}

/// A job error as a caller may see it: its code (when it is one of ours) and a fixed sentence.
pub fn public_error(error: &JobError) -> JobError {
    let well_formed = !error.code.is_empty()
        && error.code.len() <= 40
        && error
            .code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_');
    JobError {
        code: if well_formed {
            error.code.clone()
        } else {
            "export_failed".into()
        },
        message: safe_sentence(&error.code).to_string(),
    }
}

/// The caller's job, or 404 for unknown ids, other tenants' jobs and other users' jobs of
/// user-scoped datasets alike (no existence oracle).
pub async fn job_for(deps: &Deps, who: &Identity, job_id: &str) -> Result<Job, ServiceError> {
    require_scope(who, SCOPE_READ)?;
    let not_found = || ServiceError::NotFound(format!("no export job {}", quoted(job_id)));
    if job_id.is_empty() || job_id.len() > 64 || !job_id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(not_found());
    }
    match deps.meta.get_job(job_id).await? {
        Some(job)
            if job.tenant == who.tenant && (job.user == who.user || !user_scoped(deps, &job)) =>
        {
            Ok(job)
        }
        _ => Err(not_found()),
    }
}

/// A user-scoped export belongs to its user alone; a dataset gone from the catalog is treated as
/// user-scoped, so a catalog change never widens access.
fn user_scoped(deps: &Deps, job: &Job) -> bool {
    deps.catalog
        .get(&job.spec.dataset)
        .is_none_or(|d| d.user_scoped)
}

/// A freshly signed URL for a finished job's file (the job's download link is stable; the
/// signature is not).
pub async fn download_url(
    deps: &Deps,
    who: &Identity,
    job_id: &str,
) -> Result<String, ServiceError> {
    let job = job_for(deps, who, job_id).await?;
    match job.status {
        JobStatus::Queued | JobStatus::Running => {
            return Err(ServiceError::NotReady(format!(
                "the job is {}; poll /exports/jobs/{job_id} until it has succeeded",
                job.status.as_str()
            )))
        }
        JobStatus::Failed => {
            let why = job
                .error
                .as_ref()
                .map_or(GENERIC_FAILURE, |e| safe_sentence(&e.code));
            return Err(ServiceError::NotReady(format!(
                "the job failed and has no file: {why}"
            )));
        }
        JobStatus::Succeeded => {}
    }
    let now = deps.clock.now();
    let (Some(object_key), Some(until), Some(finished)) =
        (&job.object_key, job.download_until, job.finished_at)
    else {
        return Err(ServiceError::Gone(
            "this job's file is no longer available".into(),
        ));
    };
    if now >= until {
        return Err(ServiceError::Gone(format!(
            "this job's file expired at {}; request the export again",
            until.to_rfc3339()
        )));
    }
    // The link lives only while the job's file is what the cache serves for its key: deleting
    // the entry, invalidating it, or replacing it with a newer file revokes it.
    let found = deps
        .meta
        .find(&job.tenant, &job.user, &job.cache_key)
        .await?;
    if found.current_entry().is_none_or(|e| e.job_id != job.job_id) {
        return Err(ServiceError::Gone(
            "this job's file was invalidated or replaced; request the export again".into(),
        ));
    }
    let url = deps
        .files
        .presign_get(
            object_key,
            &file_name(&job.spec, finished),
            deps.config.presign_ttl,
        )
        .await?;
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_sits_next_to_the_file() {
        assert_eq!(
            manifest_key("exports/t/orders/k/j1.csv.gz"),
            "exports/t/orders/k/j1.manifest.json"
        );
        assert_eq!(
            manifest_key("exports/t/orders/k/j1.xlsx"),
            "exports/t/orders/k/j1.manifest.json"
        );
    }
}
