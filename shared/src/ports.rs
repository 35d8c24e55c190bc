//! What the domain needs from the world. Adapters for AWS live in `adapters`, in-memory fakes in
//! `testing` (feature `test-util`).

use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::catalog::ColumnType;
use crate::domain::invalidation::DatasetGeneration;
use crate::domain::job::LiveBucket;
use crate::domain::{
    CacheEntry, CacheKey, Generation, Job, JobEvent, JobMessage, Row, UploadedPart,
};

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
    /// Part `number` of the upload is bytes `first..=last` of the stored object `source`, copied
    /// inside the store (nothing passes through the function). Returns the part's ETag.
    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &str,
        range: (u64, u64),
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
    /// A whole (small) object: the held-back pieces of a file read as key ranges.
    async fn get_object(&self, key: &str) -> PortResult<Vec<u8>>;
    async fn delete_object(&self, key: &str) -> PortResult<()>;
    /// A GET URL that downloads the object under `file_name`.
    async fn presign_get(&self, key: &str, file_name: &str, ttl: StdDuration)
        -> PortResult<String>;
}

pub use crate::domain::HitKind;

/// How often a dataset's requests were served from the cache, or missed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HitCounts {
    pub hits: u64,
    pub misses: u64,
    pub stale_hits: u64,
}

/// Entries, bytes and rows of the entries of one [`LiveBucket`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryTotals {
    pub entries: u64,
    pub bytes: u64,
    pub rows: u64,
}

/// A tenant's counters as stored: hit counts per dataset, and entry totals per bucket, every
/// bucket, live or not (which ones still count is the caller's to decide: `LiveBucket::is_live`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tallies {
    pub served: BTreeMap<String, HitCounts>,
    pub buckets: Vec<(LiveBucket, EntryTotals)>,
}

/// What a request needs to decide, read together.
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    /// The key's entry, current or not: its job id guards the creation of a new job.
    pub entry: Option<CacheEntry>,
    /// The current generations of the user who built `entry` (the caller's when there is no
    /// entry or the caller built it): what tells whether it was invalidated.
    pub builder_generation: Generation,
    /// The caller's current generations: what a job started now records, so the file it builds
    /// is current for the user it is recorded for.
    pub generation: Generation,
}

impl Lookup {
    /// The entry, unless something invalidated it since it was built.
    pub fn current_entry(&self) -> Option<&CacheEntry> {
        self.entry
            .as_ref()
            .filter(|e| e.is_current(self.builder_generation))
    }
}

/// A job to create, and the conditions it is created under.
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    pub job: &'a Job,
    pub marker_until: DateTime<Utc>,
    /// Take the key's in-flight marker over only from this (finished or dead) job.
    pub replacing: Option<&'a str>,
    /// Job id of the key's entry when the caller decided to start a job (`None`: no entry). If
    /// the entry changed since, nothing is created: a file finished meanwhile is served rather
    /// than built again.
    pub entry_seen: Option<&'a str>,
    /// Spend one of the tenant's `limit` new-export slots of the job's minute, only when the job
    /// is created (joining a running job costs nothing).
    pub miss_limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    Created,
    /// Another job holds the key's marker.
    Held(String),
    /// The key's entry is no longer the one the caller saw: look again.
    EntryChanged,
    /// The tenant started its `miss_limit` new exports this minute already.
    RateLimited,
}

/// Job records, and the per-key in-flight markers that make concurrent misses share one job.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Writes the job and the key's in-flight marker together, under the conditions of `new`.
    async fn create_job(&self, new: NewJob<'_>) -> PortResult<Created>;
    async fn get_job(&self, job_id: &str) -> PortResult<Option<Job>>;
    /// Compare-and-set on `job.version - 1`: `Conflict` when someone else wrote in between.
    async fn put_job(&self, job: &Job) -> PortResult<()>;
    /// Marks the job (compare-and-set as `put_job`) and writes its cache entry in one
    /// transaction, keeping the tenant's live entry totals in step. The key's hit count and
    /// last-hit time are left as they are, whatever `entry` says: popularity survives a refresh
    /// (the warmer looks at it), hits counted while the job ran included.
    async fn complete_job(&self, job: &Job, entry: &CacheEntry) -> PortResult<()>;
    /// Removes the key's marker if `job_id` still holds it.
    async fn release_marker(&self, tenant: &str, key: &CacheKey, job_id: &str) -> PortResult<()>;
}

/// Cache entries: read with what judges them, hit, listed by expiry, deleted.
#[async_trait]
pub trait EntryStore: Send + Sync {
    /// The key's entry with its builder's generations and the caller's, read together; the
    /// dataset's generation as it is effective at `now`.
    async fn find(
        &self,
        tenant: &str,
        user: &str,
        dataset: &str,
        key: &CacheKey,
        now: DateTime<Utc>,
    ) -> PortResult<Lookup>;
    /// Bumps the entry's hit count and last-hit time (what the warmer looks at); nothing when
    /// the entry is gone.
    async fn touch_entry(&self, entry: &CacheEntry, now: DateTime<Utc>) -> PortResult<()>;
    /// Entries whose fresh deadline falls in `[from, to)`.
    async fn expiring_entries(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> PortResult<Vec<CacheEntry>>;
    /// Removes the key's entry (and takes it off the live entry totals).
    async fn delete_entry(&self, tenant: &str, key: &CacheKey) -> PortResult<()>;
}

/// Invalidation: bumping a generation hides every entry built under the old one.
#[async_trait]
pub trait Generations: Send + Sync {
    /// Hides every entry of the tenant (`user: None`) or of one user.
    async fn bump_generation(&self, tenant: &str, user: Option<&str>) -> PortResult<()>;
    /// What an entry of `dataset` built for `user` is judged by at `now`.
    async fn current_generation(
        &self,
        tenant: &str,
        user: &str,
        dataset: &str,
        now: DateTime<Utc>,
    ) -> PortResult<Generation>;
    /// Every dataset generation record of the tenant, by dataset (none for datasets never
    /// changed).
    async fn dataset_generations(
        &self,
        tenant: &str,
    ) -> PortResult<BTreeMap<String, DatasetGeneration>>;
    /// The stored record (the default when there is none), read consistently.
    async fn dataset_generation(
        &self,
        tenant: &str,
        dataset: &str,
    ) -> PortResult<DatasetGeneration>;
    /// Compare-and-set on `record.version - 1`: `Conflict` when someone else wrote in between.
    async fn put_dataset_generation(
        &self,
        tenant: &str,
        dataset: &str,
        record: &DatasetGeneration,
    ) -> PortResult<()>;
}

/// Statistics nothing else depends on: hit counters, live entry totals, row counts.
#[async_trait]
pub trait Counters: Send + Sync {
    async fn count(&self, tenant: &str, dataset: &str, kind: HitKind) -> PortResult<()>;
    /// The tenant's hit counts and entry totals: a few counter reads, however many entries the
    /// tenant has.
    async fn tallies(&self, tenant: &str) -> PortResult<Tallies>;
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
}

/// The running-job slots of each tenant (see `services::tenant_slots`).
#[async_trait]
pub trait TenantSlots: Send + Sync {
    /// Takes (or renews) one of the tenant's `limit` running-job slots for `job_id` until
    /// `until`; `false` when every slot is held by another job whose hold has not expired.
    async fn take_tenant_slot(
        &self,
        tenant: &str,
        job_id: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> PortResult<bool>;
    /// Frees the slot `job_id` holds, if any.
    async fn release_tenant_slot(&self, tenant: &str, job_id: &str) -> PortResult<()>;
}

#[async_trait]
pub trait JobQueue: Send + Sync {
    async fn enqueue(&self, msg: &JobMessage) -> PortResult<()>;
    /// Enqueues a message that becomes visible after `seconds` (at most 900, SQS's limit).
    async fn enqueue_delayed(&self, msg: &JobMessage, seconds: u32) -> PortResult<()>;
    /// Make a received message visible again after `seconds` (retry with backoff).
    async fn retry_after(&self, receipt_handle: &str, seconds: i32) -> PortResult<()>;
}

/// Completion events, for owners who notify people with a rule of their own.
#[async_trait]
pub trait JobEvents: Send + Sync {
    /// Publishes one finished job's event; `Ok` only once the bus accepted it.
    async fn job_finished(&self, event: &JobEvent) -> PortResult<()>;
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
    /// `None`: the table's own sort key (a key range of the file read in parallel).
    pub index: Option<String>,
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
    /// The least and greatest value of `attribute`, the sort key the query reads in (the range
    /// attribute when it has a range, else the table's), within its key condition; `None` when
    /// the query matches nothing. Two one-item Queries, so a job can split its key space.
    async fn key_bounds(
        &self,
        query: &SourceQuery,
        attribute: &str,
    ) -> PortResult<Option<(String, String)>>;
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
