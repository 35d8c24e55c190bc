//! Starting jobs (coalesced per cache key), reading their status, and their download link.

use chrono::Duration;

use super::{require_scope, Deps, ServiceError, KEEP_RECORDS_FOR_DAYS, MARKER_HOURS};
use crate::domain::identity::SCOPE_READ;
use crate::domain::job::file_name;
use crate::domain::{
    CacheKey, ExportSpec, Generation, Identity, Job, JobKind, JobMessage, JobStatus, MessageKind,
};

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

pub struct Started {
    pub job: Job,
    /// True when the caller joined a job somebody else started.
    pub joined: bool,
}

/// Creates a job for `key` unless one is already in flight, in which case the caller joins it:
/// concurrent misses for one key all get the same job id.
#[allow(clippy::too_many_arguments)]
pub async fn start_or_join(
    deps: &Deps,
    tenant: &str,
    user: &str,
    key: &CacheKey,
    spec: &ExportSpec,
    kind: JobKind,
    generation: Generation,
    rows_estimate: Option<u64>,
) -> Result<Started, ServiceError> {
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
            kind,
            generation,
            rows_estimate,
            now,
            Duration::days(KEEP_RECORDS_FOR_DAYS),
        );
        let marker_until = now + Duration::hours(MARKER_HOURS);
        match deps
            .meta
            .create_job(&job, marker_until, replacing.as_deref())
            .await
        {
            Ok(None) => {
                enqueue_or_fail(deps, job.clone()).await?;
                return Ok(Started { job, joined: false });
            }
            Ok(Some(existing)) => match deps.meta.get_job(&existing).await? {
                Some(other) if !other.status.is_terminal() => {
                    return Ok(Started {
                        job: other,
                        joined: true,
                    })
                }
                // Finished (or vanished) but its marker is still there: take the marker over.
                _ => replacing = Some(existing),
            },
            // The marker changed hands between our read and our write: look again.
            Err(crate::ports::PortError::Conflict(_)) => replacing = None,
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
    job.error = Some(crate::domain::JobError {
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

/// The caller's job, or 404 for unknown ids and other tenants' jobs alike (no existence oracle).
pub async fn job_for(deps: &Deps, who: &Identity, job_id: &str) -> Result<Job, ServiceError> {
    require_scope(who, SCOPE_READ)?;
    let not_found = || ServiceError::NotFound(format!("no export job `{job_id}`"));
    if job_id.is_empty() || job_id.len() > 64 || !job_id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(not_found());
    }
    match deps.meta.get_job(job_id).await? {
        Some(job) if job.tenant == who.tenant => Ok(job),
        _ => Err(not_found()),
    }
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
                .map_or("unknown reason".to_string(), |e| e.message.clone());
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
    let current = deps.meta.current_generation(&job.tenant, &job.user).await?;
    if current != job.generation {
        return Err(ServiceError::Gone(
            "this job's file was invalidated; request the export again".into(),
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
