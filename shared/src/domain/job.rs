//! Export jobs and cache entries: the records the API, the worker and the warmer share.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::request::{CacheKey, ExportSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Why a job was created: a caller's miss, or a refresh (stale hit or warmer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Export,
    Refresh,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Export => "export",
            Self::Refresh => "refresh",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedPart {
    pub number: i32,
    pub etag: String,
    pub size: u64,
}

/// Where a job can resume: taken only at a part boundary, which is also a page boundary, so the
/// source cursor and the uploaded bytes agree exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub object_key: String,
    pub upload_id: String,
    pub parts: Vec<UploadedPart>,
    /// Source cursor after the last row in the uploaded parts; `None` with parts = source exhausted.
    pub cursor: Option<String>,
    pub rows: u64,
    pub pages: u64,
    pub read_capacity: f64,
    /// What the encoder needs to continue the file exactly where the uploaded parts end.
    /// `None` in checkpoints written before encoders could resume: such a job starts over.
    #[serde(default)]
    pub encoder: Option<EncoderState>,
    /// Set once every part is uploaded and the upload is being completed, so a run that dies
    /// between completing the upload and recording the entry finishes that step instead of
    /// redoing the file.
    #[serde(default)]
    pub completing: bool,
}

/// What an encoder carries across a part boundary (see `encode::Encoder::cut`). A fresh encoder
/// built from it writes exactly the bytes the original would have written next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EncoderState {
    /// Plain text: the bytes so far are a prefix of the file; only the header is not written again.
    Plain,
    /// One gzip member made of raw deflate segments: CRC-32 and length of the text so far.
    Gzip { crc32: u32, length: u64 },
    /// A workbook written as a streaming ZIP.
    Xlsx(XlsxState),
}

/// The streaming XLSX encoder's resume point (owned by `encode::xlsx`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XlsxState {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: String,
    pub until: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: String,
    /// Bumped on every write; writes are compare-and-set on it (see `MetadataStore::put_job`).
    pub version: u64,
    pub tenant: String,
    pub user: String,
    pub cache_key: CacheKey,
    pub spec: ExportSpec,
    pub kind: JobKind,
    pub status: JobStatus,
    pub attempts: u32,
    /// Hand-overs to a continuation before the Lambda deadline; they do not spend the retry budget.
    pub continuations: u32,
    pub rows_written: u64,
    /// Estimate while running (the previous file of the same key), exact once succeeded.
    pub rows_total: Option<u64>,
    pub bytes_written: u64,
    /// What the source cost: pages read and consumed read capacity units.
    pub pages_read: u64,
    pub read_capacity: f64,
    /// Latest timestamp seen in the exported rows: how current the file's data is. Re-reading
    /// pages after a resume cannot change a maximum, so it needs no checkpoint of its own.
    #[serde(default)]
    pub watermark: Option<DateTime<Utc>>,
    pub truncated_cells: u64,
    pub sheets: u32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub error: Option<JobError>,
    pub lease: Option<Lease>,
    pub checkpoint: Option<Checkpoint>,
    pub object_key: Option<String>,
    pub sha256: Option<String>,
    /// Until when the finished file may be downloaded through this job.
    pub download_until: Option<DateTime<Utc>>,
    /// Generations current when the job was created; a file is only served while they still are.
    pub generation: Generation,
    pub expires_at: DateTime<Utc>,
}

impl Job {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        job_id: String,
        tenant: &str,
        user: &str,
        cache_key: CacheKey,
        spec: ExportSpec,
        kind: JobKind,
        generation: Generation,
        rows_estimate: Option<u64>,
        now: DateTime<Utc>,
        keep_for: Duration,
    ) -> Self {
        Self {
            job_id,
            version: 1,
            tenant: tenant.to_string(),
            user: user.to_string(),
            cache_key,
            spec,
            kind,
            status: JobStatus::Queued,
            attempts: 0,
            continuations: 0,
            rows_written: 0,
            rows_total: rows_estimate,
            bytes_written: 0,
            pages_read: 0,
            read_capacity: 0.0,
            watermark: None,
            truncated_cells: 0,
            sheets: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
            updated_at: now,
            error: None,
            lease: None,
            checkpoint: None,
            object_key: None,
            sha256: None,
            download_until: None,
            generation,
            expires_at: now + keep_for,
        }
    }

    /// Failed attempts so far (continuations are planned hand-overs, not failures).
    pub fn failed_attempts(&self) -> u32 {
        self.attempts.saturating_sub(self.continuations + 1)
    }

    /// 0..1. Exact when finished; while running, measured against the estimate and never shown as
    /// done before it is.
    pub fn progress(&self) -> f64 {
        match self.status {
            JobStatus::Succeeded => 1.0,
            JobStatus::Queued => 0.0,
            JobStatus::Running | JobStatus::Failed => match self.rows_total {
                Some(t) if t > 0 => (self.rows_written as f64 / t as f64).min(0.99),
                _ => 0.0,
            },
        }
    }
}

/// Invalidation counters: bumping one hides every entry built under the old value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub tenant: u64,
    pub user: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Past fresh, inside the stale window: servable to callers who accept that much staleness.
    Stale {
        age_past_fresh: Duration,
    },
    Expired,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub tenant: String,
    pub user: String,
    pub cache_key: CacheKey,
    pub spec: ExportSpec,
    pub job_id: String,
    pub object_key: String,
    pub manifest_key: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    pub sheets: u32,
    pub created_at: DateTime<Utc>,
    pub fresh_until: DateTime<Utc>,
    pub stale_until: DateTime<Utc>,
    pub generation: Generation,
    pub hits: u64,
    pub last_hit_at: Option<DateTime<Utc>>,
}

impl CacheEntry {
    pub fn freshness(&self, now: DateTime<Utc>) -> Freshness {
        if now < self.fresh_until {
            Freshness::Fresh
        } else if now < self.stale_until {
            Freshness::Stale {
                age_past_fresh: now - self.fresh_until,
            }
        } else {
            Freshness::Expired
        }
    }

    pub fn age(&self, now: DateTime<Utc>) -> Duration {
        (now - self.created_at).max(Duration::zero())
    }

    /// `{dataset}-{yyyymmdd-hhmmss}.{ext}` from when the file was made.
    pub fn file_name(&self) -> String {
        file_name(&self.spec, self.created_at)
    }
}

pub fn file_name(spec: &ExportSpec, at: DateTime<Utc>) -> String {
    format!(
        "{}-{}.{}",
        spec.dataset,
        at.format("%Y%m%d-%H%M%S"),
        spec.format.extension()
    )
}

/// The message on the job queue: only an id and a kind; the job record holds the truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMessage {
    pub job_id: String,
    pub kind: MessageKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    Export,
    Refresh,
    /// A job that checkpointed before the Lambda deadline and asks to be resumed.
    Continue,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::domain::request::{normalise, RawExportRequest};

    fn entry(now: DateTime<Utc>) -> CacheEntry {
        let spec = normalise(
            &Catalog::builtin().unwrap(),
            &RawExportRequest::from_query("orders", vec![]),
        )
        .unwrap()
        .spec;
        CacheEntry {
            tenant: "t".into(),
            user: "u".into(),
            cache_key: CacheKey("k".into()),
            spec,
            job_id: "j".into(),
            object_key: "o".into(),
            manifest_key: "o.manifest.json".into(),
            rows: 1,
            bytes: 1,
            sha256: "x".into(),
            sheets: 1,
            created_at: now,
            fresh_until: now + Duration::seconds(60),
            stale_until: now + Duration::seconds(120),
            generation: Generation::default(),
            hits: 0,
            last_hit_at: None,
        }
    }

    #[test]
    fn freshness_moves_from_fresh_to_stale_to_expired() {
        let t0 = Utc::now();
        let e = entry(t0);
        assert_eq!(e.freshness(t0), Freshness::Fresh);
        assert_eq!(
            e.freshness(t0 + Duration::seconds(90)),
            Freshness::Stale {
                age_past_fresh: Duration::seconds(30)
            }
        );
        assert_eq!(e.freshness(t0 + Duration::seconds(120)), Freshness::Expired);
    }

    #[test]
    fn file_name_follows_the_contract() {
        let at = DateTime::parse_from_rfc3339("2024-05-06T07:08:09Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(entry(at).file_name(), "orders-20240506-070809.csv");
    }

    #[test]
    fn message_is_only_an_id_and_a_kind() {
        let m = JobMessage {
            job_id: "abc".into(),
            kind: MessageKind::Continue,
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"job_id":"abc","kind":"continue"}"#
        );
    }
}
