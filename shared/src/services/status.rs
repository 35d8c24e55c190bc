//! What a caller sees of a job: its status (`GET /exports/jobs/{id}`) and its download link.
//! The API's alone: the worker and the warmer never read jobs on a caller's behalf.

use super::{require_scope, Deps, ServiceError};
use crate::domain::identity::SCOPE_READ;
use crate::domain::job::file_name;
use crate::domain::request::quoted;
use crate::domain::{Identity, Job, JobError, JobStatus};

const GENERIC_FAILURE: &str = "the export failed; request it again or contact support";

/// The only sentence a caller sees for a job error code. The stored message may carry internals
/// (AWS error text with ARNs and account ids, raw row values): it is for the logs, never shown.
fn safe_sentence(code: &str) -> &'static str {
    match code {
        "row_limit_exceeded" => {
            "the export has more rows than this dataset allows; narrow it with filters or from/to"
        }
        "dataset_unknown" => "the dataset or one of the export's columns is no longer offered",
        "source_data_invalid" => "some source rows do not match the dataset's column types; the operators have the details",
        "storage_failed" => "storing or reading the export failed; request it again later",
        "encode_failed" => "writing the file failed; request it again or contact support",
        "cannot_resume" => "the export could not continue from its last checkpoint; request it again",
        "upload_mismatch" => "the stored file did not match what was written; request it again",
        "manifest_failed" => "describing the file failed; request it again or contact support",
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
    match deps.jobs.get_job(job_id).await? {
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
        .entries
        .find(
            &job.tenant,
            &job.user,
            &job.spec.dataset,
            &job.cache_key,
            now,
        )
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
