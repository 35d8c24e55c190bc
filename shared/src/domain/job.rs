//! Export jobs and cache entries: the records the API, the worker and the warmer share.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::key::{CacheKey, Owner};
use super::request::ExportSpec;

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// How a request was answered: from a fresh file, from a stale one, or by a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitKind {
    Hit,
    Stale,
    Miss,
}

impl HitKind {
    /// As in the `X-Export-Cache` header and the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Stale => "stale",
            Self::Miss => "miss",
        }
    }
}

/// Why a job was created: a caller's miss, or a refresh (stale hit or warmer).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// The streaming XLSX encoder's resume point (written and read by `encode::xlsx`): what the ZIP
/// container needs to go on and to write its central directory at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XlsxState {
    /// Bytes of the file in the parts so far: the offset the next part starts at.
    pub written: u64,
    /// Sheets whose ZIP entries are complete, in order.
    pub sheets: Vec<SheetEntry>,
    /// The sheet being written, its entry so far.
    pub open: SheetEntry,
    pub truncated_cells: u64,
}

/// One sheet's ZIP entry: where its local header starts, the CRC-32 and the compressed and
/// uncompressed sizes of its XML (so far, for the open sheet), and its rows including the header.
/// Stored as a five-number array to keep checkpoints small (a sheet holds up to a million rows,
/// so a long export has a few dozen of these).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SheetEntryTuple", into = "SheetEntryTuple")]
pub struct SheetEntry {
    pub offset: u64,
    pub crc32: u32,
    pub compressed: u64,
    pub size: u64,
    pub rows: u32,
}

type SheetEntryTuple = (u64, u32, u64, u64, u32);

impl From<SheetEntryTuple> for SheetEntry {
    fn from((offset, crc32, compressed, size, rows): SheetEntryTuple) -> Self {
        Self {
            offset,
            crc32,
            compressed,
            size,
            rows,
        }
    }
}

impl From<SheetEntry> for SheetEntryTuple {
    fn from(e: SheetEntry) -> Self {
        (e.offset, e.crc32, e.compressed, e.size, e.rows)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: String,
    pub until: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: String,
    /// Bumped on every write; writes are compare-and-set on it (see `JobStore::put_job`).
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
    /// Set when the file is read as several key ranges (see `plan`): their checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<super::plan::Plan>,
    pub object_key: Option<String>,
    pub sha256: Option<String>,
    /// Until when the finished file may be downloaded through this job.
    pub download_until: Option<DateTime<Utc>>,
    /// Generations current when the job was created; a file is only served while they still are.
    pub generation: Generation,
    pub expires_at: DateTime<Utc>,
    /// The completion event went out (see `JobEvent`). Written after the terminal state, so a
    /// worker that dies between the two leaves it unset and a redelivered message sends it.
    #[serde(default)]
    pub notified: bool,
    /// How an append-only dataset's file is read: up to a key fixed when the job starts, and,
    /// for an incremental refresh, only past the previous file's last key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<AppendRead>,
}

/// The key bounds of a read of an append-only dataset ([`crate::domain::catalog::Dataset::append_only`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendRead {
    /// The greatest sort key when the job started: the file holds the rows up to it, so rows
    /// appended while it runs go to the next refresh rather than being half seen.
    pub until: String,
    /// An incremental refresh: the previous file, whose rows are the ones up to its last key.
    pub base: Option<BaseFile>,
}

/// The previous file an incremental refresh extends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFile {
    pub object_key: String,
    pub bytes: u64,
    pub rows: u64,
    /// The sort key its rows end at; the refresh reads only the rows past it.
    pub last_key: String,
    pub job_id: String,
    /// When the full read behind it ran (see [`CacheEntry::append_since`]).
    pub since: DateTime<Utc>,
}

impl Job {
    /// Who the job's file is built for.
    pub fn owner(&self) -> Owner<'_> {
        Owner {
            tenant: &self.tenant,
            user: &self.user,
        }
    }

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
            plan: None,
            object_key: None,
            sha256: None,
            download_until: None,
            generation,
            expires_at: now + keep_for,
            notified: false,
            append: None,
        }
    }

    /// Failed attempts so far (continuations are planned hand-overs, not failures).
    pub fn failed_attempts(&self) -> u32 {
        self.attempts.saturating_sub(self.continuations + 1)
    }

    /// Until when another worker holds the job, if one does.
    pub fn leased_by_other(&self, owner: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.lease
            .as_ref()
            .filter(|l| l.until > now && l.owner != owner)
            .map(|l| l.until)
    }

    /// Takes the job for a run. A planned hand-over (a continuation message for a job that let
    /// go of its lease at a checkpoint) does not spend the retry budget.
    pub fn lease(
        &mut self,
        owner: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        continuing: bool,
    ) {
        if continuing && self.lease.is_none() && self.checkpoint.is_some() {
            self.continuations += 1;
        }
        self.attempts += 1;
        self.status = JobStatus::Running;
        self.started_at.get_or_insert(now);
        self.lease = Some(Lease {
            owner: owner.to_string(),
            until,
        });
    }

    /// Counts a page read from the source. Rows written never go back, even when a run resumes
    /// from a checkpoint behind the last progress written: those rows were read once already.
    pub fn record_page(&mut self, rows: u64, pages: u64, read_capacity: f64) {
        self.rows_written = self.rows_written.max(rows);
        self.pages_read = pages;
        self.read_capacity = read_capacity;
    }

    pub fn checkpoint(&mut self, cp: Checkpoint) {
        self.bytes_written = cp.parts.iter().map(|p| p.size).sum();
        self.object_key = Some(cp.object_key.clone());
        self.checkpoint = Some(cp);
    }

    /// Lets go at a checkpoint so a continuation (another invocation) takes over from there.
    pub fn hand_over(&mut self) {
        self.lease = None;
    }

    /// Lets go after a transient error; the checkpoint and upload stay for the retry.
    pub fn release_for_retry(&mut self) {
        self.lease = None;
        self.error = Some(JobError {
            code: "transient".into(),
            message: "a transient error interrupted the job; it will be retried".into(),
        });
    }

    /// Ends the job as failed. `message` is shown to callers: it must hold no internals.
    pub fn fail(&mut self, code: &str, message: &str, now: DateTime<Utc>) {
        self.status = JobStatus::Failed;
        self.error = Some(JobError {
            code: code.to_string(),
            message: message.to_string(),
        });
        self.finished_at = Some(now);
        self.lease = None;
        self.checkpoint = None;
        self.plan = None;
        self.object_key = None;
    }

    /// Ends the job with the file its entry describes.
    pub fn succeed(&mut self, entry: &CacheEntry, now: DateTime<Utc>) {
        self.status = JobStatus::Succeeded;
        self.finished_at = Some(now);
        self.rows_written = entry.rows;
        self.rows_total = Some(entry.rows);
        self.bytes_written = entry.bytes;
        self.sha256 = Some(entry.sha256.clone());
        self.object_key = Some(entry.object_key.clone());
        self.download_until = Some(entry.stale_until);
        self.error = None;
        self.lease = None;
        self.checkpoint = None;
        self.plan = None;
    }

    /// 0..1, `None` while the total is unknown. Exact when finished; while running, measured
    /// against the total learnt from an earlier file of the same rows and never shown as done
    /// before it is. Rows written never go back, so neither does this.
    pub fn progress(&self) -> Option<f64> {
        if self.status == JobStatus::Succeeded {
            return Some(1.0);
        }
        match self.rows_total? {
            0 => Some(0.0),
            total => Some((self.rows_written as f64 / total as f64).min(0.99)),
        }
    }

    /// Rows per second since the job first started, as of its last progress write; `None` before
    /// there is anything to measure.
    pub fn rows_per_second(&self) -> Option<f64> {
        let start = self.started_at?;
        let end = self.finished_at.unwrap_or(self.updated_at);
        let secs = (end - start).num_milliseconds() as f64 / 1000.0;
        (secs > 0.0 && self.rows_written > 0).then(|| self.rows_written as f64 / secs)
    }

    /// Seconds left at the current rate, when the total and the rate are known.
    pub fn eta_seconds(&self) -> Option<u64> {
        match self.status {
            JobStatus::Succeeded | JobStatus::Failed => None,
            JobStatus::Queued | JobStatus::Running => {
                let left = self.rows_total?.saturating_sub(self.rows_written);
                let rate = self.rows_per_second()?;
                Some((left as f64 / rate).ceil() as u64)
            }
        }
    }
}

/// Invalidation counters: bumping one hides every entry built under the old value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub tenant: u64,
    pub user: u64,
    /// The tenant+dataset generation, bumped by source writes (effective at the time it was
    /// read, see `DatasetGeneration::effective`); absent in records written before it existed.
    #[serde(default)]
    pub dataset: u64,
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
    /// Append-only datasets: the sort key the file's rows end at (see [`AppendRead`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_key: Option<String>,
    /// When the full read that this file extends (or is) ran: extensions stop a day after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_since: Option<DateTime<Utc>>,
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

    /// Whether nothing invalidated the entry since it was built: an entry is judged by the
    /// current generations of the user who built it (`builder_now`), not by the caller's.
    pub fn is_current(&self, builder_now: Generation) -> bool {
        self.generation == builder_now
    }
}

/// Where an entry is tallied for the cache statistics: its dataset, the tenant and dataset
/// generations it was built under and the hour its stale deadline falls in. Totals kept per bucket let statistics
/// read a few counters instead of every entry, skip invalidated generations, and stop counting a
/// bucket once its hour is over.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LiveBucket {
    pub dataset: String,
    pub tenant_generation: u64,
    pub dataset_generation: u64,
    /// Start of the hour the entries' stale deadlines fall in.
    pub hour: DateTime<Utc>,
}

impl LiveBucket {
    pub fn of(entry: &CacheEntry) -> Self {
        let secs = entry.stale_until.timestamp();
        Self {
            dataset: entry.spec.dataset.clone(),
            tenant_generation: entry.generation.tenant,
            dataset_generation: entry.generation.dataset,
            hour: DateTime::from_timestamp(secs - secs.rem_euclid(3600), 0)
                .unwrap_or(entry.stale_until),
        }
    }

    /// When the bucket's hour is over.
    pub fn ends(&self) -> DateTime<Utc> {
        self.hour + Duration::hours(1)
    }

    /// Whether the bucket's entries still count as live: built under the tenant's current
    /// and dataset generations, and inside their stale window (to the hour).
    pub fn is_live(
        &self,
        tenant_generation: u64,
        dataset_generation: u64,
        now: DateTime<Utc>,
    ) -> bool {
        self.tenant_generation == tenant_generation
            && self.dataset_generation == dataset_generation
            && self.ends() > now
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
    /// For a job read as key ranges across invocations: the segment this message works on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<u32>,
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
    use crate::domain::catalog::Catalog;
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
            append_key: None,
            append_since: None,
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
            segment: None,
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"job_id":"abc","kind":"continue"}"#
        );
    }
}
