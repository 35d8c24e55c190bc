//! What the domain needs from the world. Adapters for AWS live in `adapters`, in-memory fakes in
//! `testing` (feature `test-util`).

use std::time::Duration as StdDuration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::catalog::ColumnType;
use crate::domain::{CacheEntry, CacheKey, Generation, Job, JobMessage, Row, UploadedPart};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PortError {
    /// A conditional write lost a race; the caller decides what that means.
    #[error("conditional write lost: {0}")]
    Conflict(String),
    /// The source holds data that does not fit the catalog; retrying cannot help.
    #[error("source data does not match the catalog: {0}")]
    Data(String),
    #[error("{op} failed: {message}")]
    Failed {
        op: String,
        message: String,
        retryable: bool,
    },
}

impl PortError {
    pub fn failed(op: impl Into<String>, message: impl Into<String>, retryable: bool) -> Self {
        Self::Failed {
            op: op.into(),
            message: message.into(),
            retryable,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Failed {
                retryable: true,
                ..
            }
        )
    }
}

pub type PortResult<T> = Result<T, PortError>;

#[async_trait]
pub trait ObjectStore: Send + Sync {
    async fn start_upload(
        &self,
        key: &str,
        content_type: &str,
        file_name: &str,
    ) -> PortResult<String>;
    /// Returns the part's ETag.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Vec<u8>,
    ) -> PortResult<String>;
    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> PortResult<()>;
    async fn abort_upload(&self, key: &str, upload_id: &str) -> PortResult<()>;
    async fn put_object(&self, key: &str, body: Vec<u8>, content_type: &str) -> PortResult<()>;
    /// Size and hex SHA-256 of a stored object, read as a stream.
    async fn digest(&self, key: &str) -> PortResult<(u64, String)>;
    /// A GET URL that downloads the object under `file_name`.
    async fn presign_get(&self, key: &str, file_name: &str, ttl: StdDuration)
        -> PortResult<String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitKind {
    Hit,
    Stale,
    Miss,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DatasetStats {
    pub hits: u64,
    pub misses: u64,
    pub stale_hits: u64,
    pub entries: u64,
    pub bytes: u64,
    pub rows: u64,
}

#[async_trait]
pub trait MetadataStore: Send + Sync {
    /// The entry for `key` (if any) and the tenant's and user's current generations, together.
    async fn lookup(
        &self,
        tenant: &str,
        user: &str,
        key: &CacheKey,
    ) -> PortResult<(Option<CacheEntry>, Generation)>;
    async fn count(&self, tenant: &str, dataset: &str, kind: HitKind) -> PortResult<()>;
    /// Bumps the entry's hit counter and last-hit time (what the warmer looks at).
    async fn touch_entry(&self, entry: &CacheEntry, now: DateTime<Utc>) -> PortResult<()>;

    /// Writes the job and the key's in-flight marker together. `Ok(None)`: created. `Ok(Some(id))`:
    /// another job holds the marker. `replacing`: take over the marker only from that (finished or
    /// dead) job.
    async fn create_job(
        &self,
        job: &Job,
        marker_until: DateTime<Utc>,
        replacing: Option<&str>,
    ) -> PortResult<Option<String>>;
    async fn get_job(&self, job_id: &str) -> PortResult<Option<Job>>;
    /// Compare-and-set on `job.version - 1`: `Conflict` when someone else wrote in between.
    async fn put_job(&self, job: &Job) -> PortResult<()>;
    /// Marks the job (compare-and-set as `put_job`) and writes its cache entry in one transaction.
    async fn complete_job(&self, job: &Job, entry: &CacheEntry) -> PortResult<()>;
    /// Removes the key's marker if `job_id` still holds it.
    async fn release_marker(&self, tenant: &str, key: &CacheKey, job_id: &str) -> PortResult<()>;

    /// Entries whose fresh deadline falls in `[from, to)`.
    async fn expiring_entries(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> PortResult<Vec<CacheEntry>>;
    async fn delete_entry(&self, tenant: &str, key: &CacheKey) -> PortResult<()>;
    /// Hides every entry of the tenant (`user: None`) or of one user.
    async fn bump_generation(&self, tenant: &str, user: Option<&str>) -> PortResult<()>;
    async fn current_generation(&self, tenant: &str, user: &str) -> PortResult<Generation>;
    /// Takes one of the tenant's `limit` new-export slots for the minute of `now`; `false` when
    /// they are all taken.
    async fn take_miss_slot(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> PortResult<bool>;
    /// The exact row count of the last file built from the rows `rows_key` names
    /// (`domain::request::rows_key`), in any format or columns.
    async fn row_count(&self, tenant: &str, rows_key: &str) -> PortResult<Option<u64>>;
    async fn record_row_count(
        &self,
        tenant: &str,
        rows_key: &str,
        rows: u64,
        now: DateTime<Utc>,
    ) -> PortResult<()>;
    /// Counters per dataset, and live entries with their bytes.
    async fn stats(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
    ) -> PortResult<std::collections::BTreeMap<String, DatasetStats>>;
}

#[async_trait]
pub trait JobQueue: Send + Sync {
    async fn enqueue(&self, msg: &JobMessage) -> PortResult<()>;
    /// Make a received message visible again after `seconds` (retry with backoff).
    async fn retry_after(&self, receipt_handle: &str, seconds: i32) -> PortResult<()>;
}

/// One Query of a tenant partition, in the catalog's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceQuery {
    pub table: String,
    pub tenant_attribute: String,
    pub tenant: String,
    /// Range index and its sort attribute with inclusive bounds (ISO-8601 UTC text).
    pub range: Option<RangeQuery>,
    /// (source attribute, type, normalised value)
    pub filters: Vec<(String, ColumnType, String)>,
    /// (source attribute, type) of the selected columns, in output order.
    pub columns: Vec<(String, ColumnType)>,
    pub page_size: Option<i32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RangeQuery {
    pub index: String,
    pub attribute: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub rows: Vec<Row>,
    /// Opaque cursor to continue after this page; `None` when the partition is exhausted.
    pub next: Option<String>,
    pub read_capacity: f64,
}

#[async_trait]
pub trait RowSource: Send + Sync {
    async fn read_page(&self, query: &SourceQuery, cursor: Option<&str>) -> PortResult<Page>;
}

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}
