//! The event a finished job announces, so owners can notify people with a rule on the bus
//! without this product sending mail itself.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::job::{Job, JobKind, JobStatus};

/// The `source` of every event: rules match on it. Not `aws.*`, which AWS reserves.
pub const EVENT_SOURCE: &str = "export-cache";

pub const SUCCEEDED: &str = "Export Succeeded";
pub const FAILED: &str = "Export Failed";

/// The `detail` of a completion event. Field names are a contract with the owners' rules: add
/// fields, never rename one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub tenant: String,
    pub dataset: String,
    pub job_id: String,
    pub format: String,
    pub kind: JobKind,
    /// `succeeded` or `failed`.
    pub status: JobStatus,
    pub rows: u64,
    pub bytes: u64,
    /// The job's error code when it failed, `null` when it succeeded.
    pub error_code: Option<String>,
    pub finished_at: DateTime<Utc>,
}

impl JobEvent {
    /// The event of a finished job; `None` while it is still queued or running.
    pub fn of(job: &Job) -> Option<Self> {
        if !job.status.is_terminal() {
            return None;
        }
        let failed = job.status == JobStatus::Failed;
        Some(Self {
            tenant: job.tenant.clone(),
            dataset: job.spec.dataset.clone(),
            job_id: job.job_id.clone(),
            format: job.spec.format.as_str().to_string(),
            kind: job.kind,
            status: job.status,
            // A failed job's counters describe a file that was thrown away: none was delivered.
            rows: if failed { 0 } else { job.rows_written },
            bytes: if failed { 0 } else { job.bytes_written },
            error_code: job
                .error
                .as_ref()
                .filter(|_| failed)
                .map(|e| e.code.clone()),
            finished_at: job.finished_at.unwrap_or(job.updated_at),
        })
    }

    /// The event's `detail-type`.
    pub fn detail_type(&self) -> &'static str {
        match self.status {
            JobStatus::Failed => FAILED,
            _ => SUCCEEDED,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::domain::catalog::Catalog;
    use crate::domain::job::{CacheEntry, Generation};
    use crate::domain::request::{normalise, RawExportRequest};
    use crate::domain::CacheKey;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap()
    }

    fn job() -> Job {
        let spec = normalise(
            &Catalog::builtin().unwrap(),
            &RawExportRequest::from_query("orders", vec![]),
        )
        .unwrap()
        .spec;
        Job::new(
            "j1".into(),
            "acme",
            "alice",
            CacheKey("k".into()),
            spec,
            JobKind::Refresh,
            Generation::default(),
            None,
            now() - Duration::minutes(1),
            Duration::days(7),
        )
    }

    #[test]
    fn a_job_still_under_way_has_no_event() {
        let mut j = job();
        assert_eq!(JobEvent::of(&j), None);
        j.status = JobStatus::Running;
        assert_eq!(JobEvent::of(&j), None);
    }

    #[test]
    fn a_failed_job_names_its_error_code_and_delivered_nothing() {
        let mut j = job();
        j.rows_written = 40;
        j.bytes_written = 4000;
        j.fail("row_limit_exceeded", "too many rows", now());
        let ev = JobEvent::of(&j).unwrap();
        assert_eq!(ev.detail_type(), "Export Failed");
        assert_eq!(ev.error_code.as_deref(), Some("row_limit_exceeded"));
        assert_eq!((ev.rows, ev.bytes), (0, 0));
        assert_eq!(ev.finished_at, now());
    }

    #[test]
    fn a_succeeded_job_reads_as_its_file_with_a_null_error_code() {
        let mut j = job();
        // A transient error before the success leaves no error code behind.
        j.release_for_retry();
        let entry = CacheEntry {
            tenant: "acme".into(),
            user: "alice".into(),
            cache_key: CacheKey("k".into()),
            spec: j.spec.clone(),
            job_id: "j1".into(),
            object_key: "exports/acme/k.csv".into(),
            manifest_key: "exports/acme/k.csv.manifest.json".into(),
            rows: 12,
            bytes: 345,
            sha256: "ab".into(),
            sheets: 0,
            created_at: now(),
            fresh_until: now(),
            stale_until: now(),
            generation: Generation::default(),
            hits: 0,
            last_hit_at: None,
            append_key: None,
            append_since: None,
        };
        j.succeed(&entry, now());
        let ev = JobEvent::of(&j).unwrap();
        assert_eq!(ev.detail_type(), "Export Succeeded");
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            serde_json::json!({
                "tenant": "acme", "dataset": "orders", "job_id": "j1", "format": "csv",
                "kind": "refresh", "status": "succeeded", "rows": 12, "bytes": 345,
                "error_code": null, "finished_at": "2026-11-22T10:00:00Z",
            })
        );
    }
}
