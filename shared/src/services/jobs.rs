//! Starting jobs (coalesced per cache key), and where their files go.

use chrono::Duration;

use super::{Deps, ServiceError, KEEP_RECORDS_FOR_DAYS, MARKER_HOURS};
use crate::domain::{
    CacheEntry, CacheKey, ExportSpec, Generation, Job, JobError, JobKind, JobMessage, JobStatus,
    MessageKind,
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
            .jobs
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
            Ok(Created::Held(existing)) => match deps.jobs.get_job(&existing).await? {
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
        segment: None,
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
    if let Err(e) = deps.jobs.put_job(&job).await {
        tracing::error!(job_id = %job.job_id, error = %e, "could not record the enqueue failure");
    }
    if let Err(e) = deps
        .jobs
        .release_marker(&job.tenant, &job.cache_key, &job.job_id)
        .await
    {
        tracing::error!(job_id = %job.job_id, error = %e, "could not release the marker");
    }
    Err(ServiceError::Unavailable(
        "the export could not be queued; retry shortly".into(),
    ))
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
