//! In-memory fakes of the ports, for fast unit tests of the use cases (feature `test-util`).
//! They keep the same conditional-write rules as the DynamoDB adapter, so races behave alike.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::domain::catalog::Catalog;
use crate::domain::invalidation::DatasetGeneration;
use crate::domain::job::LiveBucket;
use crate::domain::request::normalise;
use crate::domain::Value;
use crate::domain::{
    CacheEntry, CacheKey, Generation, Job, JobEvent, JobKind, JobMessage, Owner, RawExportRequest,
    Row, UploadedPart,
};
use crate::ports::{
    Clock, Counters, Created, EntryStore, EntryTotals, Generations, HitCounts, HitKind, JobEvents,
    JobQueue, JobStore, Lookup, NewJob, ObjectStore, Page, PortError, PortResult, RowSource,
    SourceQuery, Tallies, TenantSlots,
};
use crate::services::process::{Fate, Outcome};
use crate::services::Deps;
use crate::telemetry::{Metrics, MetricsBuffer};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// (tenant, key) -> (job id holding the marker, until)
type Markers = HashMap<(String, CacheKey), (String, DateTime<Utc>)>;
/// tenant -> slot index -> (job id, held until)
type SlotHolds = HashMap<String, BTreeMap<u32, (String, DateTime<Utc>)>>;
/// upload id -> (object key, parts by number)
type Uploads = HashMap<String, (String, BTreeMap<i32, Vec<u8>>)>;

#[derive(Default)]
pub struct MemoryMeta {
    pub jobs: Mutex<HashMap<String, Job>>,
    pub entries: Mutex<HashMap<(String, CacheKey), CacheEntry>>,
    pub markers: Mutex<Markers>,
    pub generations: Mutex<HashMap<(String, String), u64>>,
    /// (tenant, dataset) -> its dataset generation record.
    pub dataset_generations: Mutex<HashMap<(String, String), DatasetGeneration>>,
    pub counters: Mutex<HashMap<(String, String), HitCounts>>,
    pub miss_slots: Mutex<HashMap<(String, i64), u32>>,
    pub row_counts: Mutex<HashMap<(String, String), u64>>,
    pub tenant_slots: Mutex<SlotHolds>,
    /// When set, the next `find` says so on the first channel and returns only once the second
    /// fires: a test can finish a job between a request's look at the cache and its write.
    pub pause_after_find: Mutex<Option<Pause>>,
}

pub type Pause = (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::oneshot::Receiver<()>,
);

impl MemoryMeta {
    fn gen(&self, tenant: &str, user: &str, dataset: &str, now: DateTime<Utc>) -> Generation {
        let g = lock(&self.generations);
        Generation {
            tenant: g.get(&(tenant.into(), String::new())).copied().unwrap_or(0),
            user: g.get(&(tenant.into(), user.into())).copied().unwrap_or(0),
            dataset: lock(&self.dataset_generations)
                .get(&(tenant.into(), dataset.into()))
                .map_or(0, |d| d.effective(now)),
        }
    }
}

#[async_trait]
impl JobStore for MemoryMeta {
    async fn create_job(&self, new: NewJob<'_>) -> PortResult<Created> {
        let job = new.job;
        let k = (job.tenant.clone(), job.cache_key.clone());
        // Same order of checks as the adapter's transaction outcome.
        let entry_now = lock(&self.entries).get(&k).map(|e| e.job_id.clone());
        if entry_now.as_deref() != new.entry_seen {
            return Ok(Created::EntryChanged);
        }
        let mut markers = lock(&self.markers);
        if let Some((holder, until)) = markers.get(&k) {
            let free = match new.replacing {
                None => *until < job.created_at,
                Some(old) => holder == old,
            };
            if !free {
                return Ok(Created::Held(holder.clone()));
            }
        } else if new.replacing.is_some() {
            return Err(PortError::Conflict("marker gone".into()));
        }
        let mut jobs = lock(&self.jobs);
        if jobs.contains_key(&job.job_id) {
            return Err(PortError::Conflict("job exists".into()));
        }
        if let Some(limit) = new.miss_limit {
            let mut slots = lock(&self.miss_slots);
            let taken = slots
                .entry((
                    job.tenant.clone(),
                    job.created_at.timestamp().div_euclid(60),
                ))
                .or_default();
            if *taken >= limit {
                return Ok(Created::RateLimited);
            }
            *taken += 1;
        }
        markers.insert(k, (job.job_id.clone(), new.marker_until));
        jobs.insert(job.job_id.clone(), job.clone());
        Ok(Created::Created)
    }

    async fn get_job(&self, job_id: &str) -> PortResult<Option<Job>> {
        Ok(lock(&self.jobs).get(job_id).cloned())
    }

    async fn put_job(&self, job: &Job) -> PortResult<()> {
        let mut jobs = lock(&self.jobs);
        match jobs.get(&job.job_id) {
            Some(old) if old.version + 1 == job.version => {
                jobs.insert(job.job_id.clone(), job.clone());
                Ok(())
            }
            _ => Err(PortError::Conflict(format!("job {} changed", job.job_id))),
        }
    }

    async fn complete_job(&self, job: &Job, entry: &CacheEntry) -> PortResult<()> {
        self.put_job(job).await?;
        let mut entries = lock(&self.entries);
        let k = (entry.tenant.clone(), entry.cache_key.clone());
        // As the adapter: the key's hits are counted in place and survive the new entry.
        let (hits, last_hit_at) = entries
            .get(&k)
            .map_or((0, None), |old| (old.hits, old.last_hit_at));
        entries.insert(
            k,
            CacheEntry {
                hits,
                last_hit_at,
                ..entry.clone()
            },
        );
        Ok(())
    }

    async fn release_marker(&self, tenant: &str, key: &CacheKey, job_id: &str) -> PortResult<()> {
        let mut m = lock(&self.markers);
        let k = (tenant.to_string(), key.clone());
        if m.get(&k).is_some_and(|(holder, _)| holder == job_id) {
            m.remove(&k);
        }
        Ok(())
    }
}

#[async_trait]
impl EntryStore for MemoryMeta {
    async fn find(
        &self,
        tenant: &str,
        user: &str,
        dataset: &str,
        key: &CacheKey,
        now: DateTime<Utc>,
    ) -> PortResult<Lookup> {
        let entry = lock(&self.entries)
            .get(&(tenant.into(), key.clone()))
            .cloned();
        let pause = lock(&self.pause_after_find).take();
        if let Some((reached, resume)) = pause {
            let _ = reached.send(());
            let _ = resume.await;
        }
        let generation = self.gen(tenant, user, dataset, now);
        Ok(Lookup {
            builder_generation: entry
                .as_ref()
                .map_or(generation, |e| self.gen(tenant, &e.user, dataset, now)),
            entry,
            generation,
        })
    }

    async fn touch_entry(&self, entry: &CacheEntry, now: DateTime<Utc>) -> PortResult<()> {
        if let Some(e) =
            lock(&self.entries).get_mut(&(entry.tenant.clone(), entry.cache_key.clone()))
        {
            e.hits += 1;
            e.last_hit_at = Some(now);
        }
        Ok(())
    }

    async fn expiring_entries(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> PortResult<Vec<CacheEntry>> {
        Ok(lock(&self.entries)
            .values()
            .filter(|e| e.fresh_until >= from && e.fresh_until < to)
            .cloned()
            .collect())
    }

    async fn delete_entry(&self, tenant: &str, key: &CacheKey) -> PortResult<()> {
        lock(&self.entries).remove(&(tenant.to_string(), key.clone()));
        Ok(())
    }
}

#[async_trait]
impl Generations for MemoryMeta {
    async fn bump_generation(&self, tenant: &str, user: Option<&str>) -> PortResult<()> {
        *lock(&self.generations)
            .entry((tenant.into(), user.unwrap_or("").into()))
            .or_default() += 1;
        Ok(())
    }

    async fn current_generation(
        &self,
        tenant: &str,
        user: &str,
        dataset: &str,
        now: DateTime<Utc>,
    ) -> PortResult<Generation> {
        Ok(self.gen(tenant, user, dataset, now))
    }

    async fn dataset_generations(
        &self,
        tenant: &str,
    ) -> PortResult<BTreeMap<String, DatasetGeneration>> {
        Ok(lock(&self.dataset_generations)
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|((_, d), g)| (d.clone(), *g))
            .collect())
    }

    async fn dataset_generation(
        &self,
        tenant: &str,
        dataset: &str,
    ) -> PortResult<DatasetGeneration> {
        Ok(lock(&self.dataset_generations)
            .get(&(tenant.into(), dataset.into()))
            .copied()
            .unwrap_or_default())
    }

    async fn put_dataset_generation(
        &self,
        tenant: &str,
        dataset: &str,
        record: &DatasetGeneration,
    ) -> PortResult<()> {
        let mut all = lock(&self.dataset_generations);
        let k = (tenant.to_string(), dataset.to_string());
        // The same condition as the adapter's: the stored version must be the one before.
        let stored = all.get(&k).map_or(0, |g| g.version);
        if stored + 1 != record.version {
            return Err(PortError::Conflict(format!(
                "dataset generation {tenant}/{dataset}"
            )));
        }
        all.insert(k, *record);
        Ok(())
    }
}

#[async_trait]
impl Counters for MemoryMeta {
    async fn count(&self, tenant: &str, dataset: &str, kind: HitKind) -> PortResult<()> {
        let mut c = lock(&self.counters);
        let s = c.entry((tenant.into(), dataset.into())).or_default();
        match kind {
            HitKind::Hit => s.hits += 1,
            HitKind::Stale => s.stale_hits += 1,
            HitKind::Miss => s.misses += 1,
        }
        Ok(())
    }

    async fn tallies(&self, tenant: &str) -> PortResult<Tallies> {
        let served = lock(&self.counters)
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|((_, d), c)| (d.clone(), *c))
            .collect();
        // Totals per bucket, as the adapter keeps them in its transactions.
        let mut buckets: BTreeMap<LiveBucket, EntryTotals> = BTreeMap::new();
        for e in lock(&self.entries).values().filter(|e| e.tenant == tenant) {
            let totals = buckets.entry(LiveBucket::of(e)).or_default();
            totals.entries += 1;
            totals.bytes += e.bytes;
            totals.rows += e.rows;
        }
        Ok(Tallies {
            served,
            buckets: buckets.into_iter().collect(),
        })
    }

    async fn row_count(&self, tenant: &str, rows_key: &str) -> PortResult<Option<u64>> {
        Ok(lock(&self.row_counts)
            .get(&(tenant.to_string(), rows_key.to_string()))
            .copied())
    }

    async fn record_row_count(
        &self,
        tenant: &str,
        rows_key: &str,
        rows: u64,
        _now: DateTime<Utc>,
    ) -> PortResult<()> {
        lock(&self.row_counts).insert((tenant.to_string(), rows_key.to_string()), rows);
        Ok(())
    }
}

#[async_trait]
impl TenantSlots for MemoryMeta {
    async fn take_tenant_slot(
        &self,
        tenant: &str,
        job_id: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> PortResult<bool> {
        let mut all = lock(&self.tenant_slots);
        let slots = all.entry(tenant.to_string()).or_default();
        let mine = slots
            .iter()
            .find(|(i, (holder, _))| holder == job_id && **i < limit)
            .map(|(i, _)| *i);
        let free = (0..limit).find(|i| slots.get(i).is_none_or(|(_, held)| *held <= now));
        match mine.or(free) {
            Some(i) => {
                slots.insert(i, (job_id.to_string(), until));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn release_tenant_slot(&self, tenant: &str, job_id: &str) -> PortResult<()> {
        if let Some(slots) = lock(&self.tenant_slots).get_mut(tenant) {
            slots.retain(|_, (holder, _)| holder != job_id);
        }
        Ok(())
    }
}

#[derive(Default)]
pub struct MemoryFiles {
    pub objects: Mutex<HashMap<String, Vec<u8>>>,
    pub uploads: Mutex<Uploads>,
    pub aborted: Mutex<Vec<String>>,
}

#[async_trait]
impl ObjectStore for MemoryFiles {
    async fn start_upload(&self, key: &str, _ct: &str, _name: &str) -> PortResult<String> {
        let id = uuid::Uuid::new_v4().to_string();
        lock(&self.uploads).insert(id.clone(), (key.to_string(), BTreeMap::new()));
        Ok(id)
    }

    async fn upload_part(
        &self,
        _key: &str,
        upload_id: &str,
        number: i32,
        body: Vec<u8>,
    ) -> PortResult<String> {
        let mut u = lock(&self.uploads);
        let (_, parts) = u
            .get_mut(upload_id)
            .ok_or_else(|| PortError::failed("upload part", "no such upload", false))?;
        let etag = hex::encode(Sha256::digest(&body));
        parts.insert(number, body);
        Ok(etag)
    }

    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &str,
        (first, last): (u64, u64),
    ) -> PortResult<String> {
        let body = {
            let objects = lock(&self.objects);
            let object = objects
                .get(source)
                .ok_or_else(|| PortError::failed("copy part", "NoSuchKey", false))?;
            let range = usize::try_from(first).unwrap_or(usize::MAX)
                ..usize::try_from(last).map_or(usize::MAX, |l| l.saturating_add(1));
            object
                .get(range)
                .ok_or_else(|| PortError::failed("copy part", "InvalidRange", false))?
                .to_vec()
        };
        self.upload_part(key, upload_id, number, body).await
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> PortResult<()> {
        let (_, stored) = lock(&self.uploads)
            .remove(upload_id)
            .ok_or_else(|| PortError::failed("complete upload", "no such upload", false))?;
        let mut body = Vec::new();
        for p in parts {
            let part = stored
                .get(&p.number)
                .ok_or_else(|| PortError::failed("complete upload", "missing part", false))?;
            body.extend_from_slice(part);
        }
        lock(&self.objects).insert(key.to_string(), body);
        Ok(())
    }

    async fn abort_upload(&self, _key: &str, upload_id: &str) -> PortResult<()> {
        lock(&self.uploads).remove(upload_id);
        lock(&self.aborted).push(upload_id.to_string());
        Ok(())
    }

    async fn put_object(&self, key: &str, body: Vec<u8>, _ct: &str) -> PortResult<()> {
        lock(&self.objects).insert(key.to_string(), body);
        Ok(())
    }

    async fn digest(&self, key: &str) -> PortResult<(u64, String)> {
        let o = lock(&self.objects);
        let body = o
            .get(key)
            .ok_or_else(|| PortError::failed("digest", "no such object", false))?;
        Ok((body.len() as u64, hex::encode(Sha256::digest(body))))
    }

    async fn get_object(&self, key: &str) -> PortResult<Vec<u8>> {
        lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| PortError::failed("read object", "no such object", false))
    }

    async fn delete_object(&self, key: &str) -> PortResult<()> {
        lock(&self.objects).remove(key);
        Ok(())
    }

    async fn presign_get(
        &self,
        key: &str,
        file_name: &str,
        ttl: StdDuration,
    ) -> PortResult<String> {
        Ok(format!(
            "memory://{key}?name={file_name}&ttl={}",
            ttl.as_secs()
        ))
    }
}

#[derive(Default)]
pub struct MemoryQueue {
    pub sent: Mutex<Vec<JobMessage>>,
    /// Messages sent with a delay, and the delay in seconds.
    pub delayed: Mutex<Vec<(JobMessage, u32)>>,
    pub fail: Mutex<bool>,
}

impl MemoryQueue {
    pub fn drain(&self) -> Vec<JobMessage> {
        std::mem::take(&mut *lock(&self.sent))
    }
}

#[async_trait]
impl JobQueue for MemoryQueue {
    async fn enqueue(&self, msg: &JobMessage) -> PortResult<()> {
        if *lock(&self.fail) {
            return Err(PortError::failed("enqueue", "queue down", true));
        }
        lock(&self.sent).push(msg.clone());
        Ok(())
    }

    async fn enqueue_delayed(&self, msg: &JobMessage, seconds: u32) -> PortResult<()> {
        if *lock(&self.fail) {
            return Err(PortError::failed("enqueue", "queue down", true));
        }
        lock(&self.delayed).push((msg.clone(), seconds));
        Ok(())
    }

    async fn retry_after(&self, _receipt: &str, _seconds: i32) -> PortResult<()> {
        Ok(())
    }
}

/// Records the completion events published; `refuse` makes the next that many calls fail, as a
/// bus that is down or throttling would.
#[derive(Default)]
pub struct MemoryEvents {
    pub sent: Mutex<Vec<JobEvent>>,
    pub refuse: Mutex<u32>,
}

impl MemoryEvents {
    pub fn sent(&self) -> Vec<JobEvent> {
        lock(&self.sent).clone()
    }
}

#[async_trait]
impl JobEvents for MemoryEvents {
    async fn job_finished(&self, event: &JobEvent) -> PortResult<()> {
        let mut refuse = lock(&self.refuse);
        if *refuse > 0 {
            *refuse -= 1;
            return Err(PortError::failed(
                "publish the completion event",
                "InternalFailure: bus down",
                true,
            ));
        }
        lock(&self.sent).push(event.clone());
        Ok(())
    }
}

/// Rows per `"{table}/{tenant}"` (or just per tenant, for any table), served in pages of
/// `page_rows`; counts pages read.
#[derive(Default)]
pub struct MemorySource {
    pub rows: Mutex<HashMap<String, Vec<Row>>>,
    pub page_rows: usize,
    pub pages_read: Mutex<u64>,
    /// The next this many reads fail with a retryable error (throttling, say).
    pub fail_next: Mutex<u32>,
    /// Every read fails with this error while it is set.
    pub broken: Mutex<Option<PortError>>,
}

#[async_trait]
impl RowSource for MemorySource {
    async fn read_page(&self, q: &SourceQuery, cursor: Option<&str>) -> PortResult<Page> {
        if let Some(e) = lock(&self.broken).clone() {
            return Err(e);
        }
        {
            let mut fail = lock(&self.fail_next);
            if *fail > 0 {
                *fail -= 1;
                return Err(PortError::failed(
                    "source query",
                    "ThrottlingException",
                    true,
                ));
            }
        }
        *lock(&self.pages_read) += 1;
        let rows = lock(&self.rows);
        let all = Self::tenant_rows(&rows, q);
        let (lo, hi) = Self::key_range(all, q)?;
        let start = lo + cursor.and_then(|c| c.parse::<usize>().ok()).unwrap_or(0);
        let end = (start + self.page_rows.max(1)).min(hi);
        Ok(Page {
            rows: all[start.min(end)..end].to_vec(),
            next: (end < hi).then(|| (end - lo).to_string()),
            read_capacity: 0.5,
        })
    }

    async fn key_bounds(
        &self,
        q: &SourceQuery,
        attribute: &str,
    ) -> PortResult<Option<(String, String)>> {
        let Some(i) = q.columns.iter().position(|(a, _)| a == attribute) else {
            return Ok(None);
        };
        let rows = lock(&self.rows);
        let all = Self::tenant_rows(&rows, q);
        let (lo, hi) = Self::key_range(all, q)?;
        Ok((lo < hi).then(|| (key_text(&all[lo][i]), key_text(&all[hi - 1][i]))))
    }
}

impl MemorySource {
    fn tenant_rows<'a>(rows: &'a HashMap<String, Vec<Row>>, q: &SourceQuery) -> &'a [Row] {
        rows.get(&format!("{}/{}", q.table, q.tenant))
            .or_else(|| rows.get(&q.tenant))
            .map_or(&[], Vec::as_slice)
    }

    /// Where the query's key range lies in rows stored in key order (as a Query returns them);
    /// the range's attribute must be one of the query's columns.
    fn key_range(all: &[Row], q: &SourceQuery) -> PortResult<(usize, usize)> {
        let Some(r) = &q.range else {
            return Ok((0, all.len()));
        };
        let i = q
            .columns
            .iter()
            .position(|(a, _)| *a == r.attribute)
            .ok_or_else(|| {
                PortError::failed("source query", "the range attribute is not a column", false)
            })?;
        let lo = r
            .from
            .as_ref()
            .map_or(0, |f| all.partition_point(|row| key_text(&row[i]) < *f));
        let hi = r.to.as_ref().map_or(all.len(), |t| {
            all.partition_point(|row| key_text(&row[i]) <= *t)
        });
        Ok((lo, hi.max(lo)))
    }
}

/// A key cell as the source stores it.
fn key_text(v: &Value) -> String {
    match v {
        Value::Str(s) | Value::Dec(s) => s.clone(),
        Value::Ts(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        other => format!("{other:?}"),
    }
}

pub struct ManualClock(pub Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(t: DateTime<Utc>) -> Self {
        Self(Mutex::new(t))
    }
    pub fn advance(&self, d: chrono::Duration) {
        *lock(&self.0) += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *lock(&self.0)
    }
}

/// A `Config` for tests: small parts are not allowed by S3, but the fakes take any size.
pub fn test_config() -> Config {
    let env: HashMap<String, String> = [
        ("META_TABLE", "meta"),
        ("EXPORT_BUCKET", "bucket"),
        ("JOB_QUEUE_URL", "queue"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    match Config::from_map(&env) {
        Ok(c) => c,
        Err(e) => panic!("test config: {e}"),
    }
}

pub struct Fakes {
    pub meta: Arc<MemoryMeta>,
    pub files: Arc<MemoryFiles>,
    pub queue: Arc<MemoryQueue>,
    pub events: Arc<MemoryEvents>,
    pub source: Arc<MemorySource>,
    pub clock: Arc<ManualClock>,
    /// The EMF lines the use cases wrote through `deps.metrics`.
    pub metrics: MetricsBuffer,
    pub deps: Deps,
}

impl Fakes {
    /// Runs queued jobs through the worker's use case until the queue is empty (continuations
    /// included), as one worker with a roomy deadline would.
    pub async fn run_jobs(&self) -> Vec<Outcome> {
        let mut out = Vec::new();
        loop {
            let msgs = self.queue.drain();
            if msgs.is_empty() {
                return out;
            }
            for m in msgs {
                let deadline = self.clock.now() + chrono::Duration::minutes(15);
                let outcome =
                    crate::services::process::process_job(&self.deps, &m, "w1", deadline, false)
                        .await;
                if let Fate::RetryIn(_) = outcome.fate(self.clock.now()) {
                    panic!("job {} asks to be retried: {outcome:?}", m.job_id);
                }
                out.push(outcome);
            }
        }
    }
}

pub fn fakes(config: Config, page_rows: usize) -> Fakes {
    let meta = Arc::new(MemoryMeta::default());
    let files = Arc::new(MemoryFiles::default());
    let queue = Arc::new(MemoryQueue::default());
    let events = Arc::new(MemoryEvents::default());
    let source = Arc::new(MemorySource {
        page_rows,
        ..MemorySource::default()
    });
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let catalog = match Catalog::builtin() {
        Ok(c) => c,
        Err(e) => panic!("builtin catalog: {e}"),
    };
    let (emitter, metrics) = Metrics::buffered();
    let deps = Deps {
        config: Arc::new(config),
        catalog: Arc::new(catalog),
        jobs: meta.clone(),
        entries: meta.clone(),
        generations: meta.clone(),
        counters: meta.clone(),
        slots: meta.clone(),
        files: files.clone(),
        queue: queue.clone(),
        events: events.clone(),
        source: source.clone(),
        clock: clock.clone(),
        metrics: emitter,
    };
    Fakes {
        meta,
        files,
        queue,
        events,
        source,
        clock,
        metrics,
        deps,
    }
}

/// Where a simulated crash stops a worker: the `nth` call (from 1) of `op`, before it reaches the
/// store or after it took effect. A crash never returns: the run's future is dropped there, as a
/// killed process would leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashAt {
    pub op: &'static str,
    pub nth: u32,
    pub after: bool,
}

/// Counts calls of the crashable operations and stops the one [`CrashAt`] names.
#[derive(Default)]
pub struct CrashPlan {
    at: Mutex<Option<CrashAt>>,
    calls: Mutex<HashMap<&'static str, u32>>,
    crashed: std::sync::atomic::AtomicBool,
}

impl CrashPlan {
    pub fn arm(&self, at: CrashAt) {
        lock(&self.calls).clear();
        *lock(&self.at) = Some(at);
        self.crashed
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn disarm(&self) {
        *lock(&self.at) = None;
    }

    pub fn crashed(&self) -> bool {
        self.crashed.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn point<T>(&self, op: &'static str, call: impl std::future::Future<Output = T>) -> T {
        let n = {
            let mut calls = lock(&self.calls);
            let n = calls.entry(op).or_default();
            *n += 1;
            *n
        };
        let hit = (*lock(&self.at)).filter(|a| a.op == op && a.nth == n);
        if hit.is_some_and(|a| !a.after) {
            self.crash().await;
        }
        let result = call.await;
        if hit.is_some() {
            self.crash().await;
        }
        result
    }

    async fn crash(&self) {
        self.disarm();
        self.crashed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        std::future::pending::<()>().await;
    }

    /// Runs `work` until it finishes (`Some`) or crashes (`None`, the work dropped mid-way).
    pub async fn run<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Some(out),
                _ = tokio::time::sleep(StdDuration::from_millis(5)) => {
                    if self.crashed() {
                        return None;
                    }
                }
            }
        }
    }
}

/// An object store that can crash around `upload_part` and `complete_upload`.
pub struct CrashingFiles {
    pub inner: Arc<dyn ObjectStore>,
    pub plan: Arc<CrashPlan>,
}

#[async_trait]
impl ObjectStore for CrashingFiles {
    async fn start_upload(&self, key: &str, ct: &str, name: &str) -> PortResult<String> {
        self.inner.start_upload(key, ct, name).await
    }
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Vec<u8>,
    ) -> PortResult<String> {
        let call = self.inner.upload_part(key, upload_id, number, body);
        self.plan.point("upload_part", call).await
    }
    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &str,
        range: (u64, u64),
    ) -> PortResult<String> {
        let call = self.inner.copy_part(key, upload_id, number, source, range);
        self.plan.point("upload_part", call).await
    }
    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> PortResult<()> {
        let call = self.inner.complete_upload(key, upload_id, parts);
        self.plan.point("complete_upload", call).await
    }
    async fn abort_upload(&self, key: &str, upload_id: &str) -> PortResult<()> {
        self.inner.abort_upload(key, upload_id).await
    }
    async fn put_object(&self, key: &str, body: Vec<u8>, ct: &str) -> PortResult<()> {
        self.inner.put_object(key, body, ct).await
    }
    async fn digest(&self, key: &str) -> PortResult<(u64, String)> {
        self.inner.digest(key).await
    }
    async fn get_object(&self, key: &str) -> PortResult<Vec<u8>> {
        self.inner.get_object(key).await
    }
    async fn delete_object(&self, key: &str) -> PortResult<()> {
        self.inner.delete_object(key).await
    }
    async fn presign_get(&self, key: &str, name: &str, ttl: StdDuration) -> PortResult<String> {
        self.inner.presign_get(key, name, ttl).await
    }
}

/// A `put_job` or `complete_job` call on its way to the store, for a [`JobHook`] to run.
pub type JobWrite<'a> = Pin<Box<dyn Future<Output = PortResult<()>> + Send + 'a>>;

/// What a test does around the writes of a job store (see [`HookedJobs`]).
#[async_trait]
pub trait JobHook: Send + Sync {
    /// Runs `write` (`op` is `put_job` or `complete_job`; `completes` is the entry a completion
    /// writes), or never returns, as a crash.
    async fn around(
        &self,
        op: &'static str,
        completes: Option<&CacheEntry>,
        write: JobWrite<'_>,
    ) -> PortResult<()>;
}

/// A job store whose writes pass through a test's hook: a [`CrashPlan`], a
/// [`HitBeforeCompletion`].
pub struct HookedJobs {
    pub inner: Arc<dyn JobStore>,
    pub hook: Arc<dyn JobHook>,
}

#[async_trait]
impl JobStore for HookedJobs {
    async fn create_job(&self, new: NewJob<'_>) -> PortResult<Created> {
        self.inner.create_job(new).await
    }
    async fn get_job(&self, job_id: &str) -> PortResult<Option<Job>> {
        self.inner.get_job(job_id).await
    }
    async fn put_job(&self, job: &Job) -> PortResult<()> {
        let write = self.inner.put_job(job);
        self.hook.around("put_job", None, write).await
    }
    async fn complete_job(&self, job: &Job, entry: &CacheEntry) -> PortResult<()> {
        let write = self.inner.complete_job(job, entry);
        self.hook.around("complete_job", Some(entry), write).await
    }
    async fn release_marker(&self, tenant: &str, key: &CacheKey, job_id: &str) -> PortResult<()> {
        self.inner.release_marker(tenant, key, job_id).await
    }
}

/// Crashes around `put_job` (checkpoints, progress) and `complete_job`.
#[async_trait]
impl JobHook for CrashPlan {
    async fn around(
        &self,
        op: &'static str,
        _completes: Option<&CacheEntry>,
        write: JobWrite<'_>,
    ) -> PortResult<()> {
        self.point(op, write).await
    }
}

/// Counts a hit on the key's entry right before each completion, as a request served while a
/// refresh finishes would: the hit must survive the new entry.
pub struct HitBeforeCompletion {
    pub entries: Arc<dyn EntryStore>,
    pub at: DateTime<Utc>,
}

impl HitBeforeCompletion {
    /// Routes `deps`' job store through a hit at `at` before each completion.
    pub fn before_every_completion(deps: &mut Deps, at: DateTime<Utc>) {
        let hook = Arc::new(Self {
            entries: deps.entries.clone(),
            at,
        });
        deps.jobs = Arc::new(HookedJobs {
            inner: deps.jobs.clone(),
            hook,
        });
    }
}

#[async_trait]
impl JobHook for HitBeforeCompletion {
    async fn around(
        &self,
        _op: &'static str,
        completes: Option<&CacheEntry>,
        write: JobWrite<'_>,
    ) -> PortResult<()> {
        if let Some(new) = completes {
            let found = self
                .entries
                .find(
                    &new.tenant,
                    &new.user,
                    &new.spec.dataset,
                    &new.cache_key,
                    self.at,
                )
                .await?;
            if let Some(served) = &found.entry {
                self.entries.touch_entry(served, self.at).await?;
            }
        }
        write.await
    }
}

/// The job the API makes for a plain `GET /exports/orders` of `tenant`'s user alice at `now`.
pub fn orders_job(tenant: &str, job_id: &str, now: DateTime<Utc>) -> Job {
    let catalog = match Catalog::builtin() {
        Ok(c) => c,
        Err(e) => panic!("builtin catalog: {e}"),
    };
    let export = match normalise(&catalog, &RawExportRequest::from_query("orders", vec![])) {
        Ok(req) => req,
        Err(e) => panic!("all orders: {e}"),
    };
    let owner = Owner {
        tenant,
        user: "alice",
    };
    Job::new(
        job_id.into(),
        tenant,
        "alice",
        export.cache_key(owner, crate::encode::ENCODER_VERSION),
        export.spec,
        JobKind::Export,
        Generation::default(),
        None,
        now,
        chrono::Duration::days(crate::services::KEEP_RECORDS_FOR_DAYS),
    )
}

/// The crash points a worker run passes through, in the order a run meets them: around a part
/// upload, around the checkpoint that records it, between completing the upload and recording
/// the entry.
pub fn crash_points() -> Vec<CrashAt> {
    let at = |op, nth, after| CrashAt { op, nth, after };
    vec![
        at("upload_part", 1, false),
        at("upload_part", 1, true),
        // put_job: 1 = lease, 2 = upload recorded, 3 = first part's checkpoint.
        at("put_job", 3, false),
        at("put_job", 3, true),
        at("upload_part", 2, true),
        at("complete_upload", 1, false),
        at("complete_upload", 1, true),
        at("complete_job", 1, false),
    ]
}

/// Parses one line as a CloudWatch EMF document and checks it against the specification: a JSON
/// object whose `_aws.Timestamp` is integer milliseconds, whose directives name a namespace,
/// dimension sets of keys present at the top level as strings (at most 30 per set), and metrics
/// whose values are numbers (or arrays of numbers) at the top level, with a known unit. None of
/// `forbidden` (tenant ids, job ids) may be a dimension value, nor may a dimension key name a
/// tenant, user or job. Returns the document.
pub fn parse_emf(line: &str, forbidden: &[&str]) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    const UNITS: [&str; 27] = [
        "Seconds",
        "Microseconds",
        "Milliseconds",
        "Bytes",
        "Kilobytes",
        "Megabytes",
        "Gigabytes",
        "Terabytes",
        "Bits",
        "Kilobits",
        "Megabits",
        "Gigabits",
        "Terabits",
        "Percent",
        "Count",
        "Bytes/Second",
        "Kilobytes/Second",
        "Megabytes/Second",
        "Gigabytes/Second",
        "Terabytes/Second",
        "Bits/Second",
        "Kilobits/Second",
        "Megabits/Second",
        "Gigabits/Second",
        "Terabits/Second",
        "Count/Second",
        "None",
    ];
    let doc: J = serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line}"))?;
    let root = doc.as_object().ok_or("the root is not an object")?;
    let aws = root
        .get("_aws")
        .and_then(J::as_object)
        .ok_or("no `_aws` object")?;
    let ts = aws
        .get("Timestamp")
        .and_then(J::as_i64)
        .ok_or("`_aws.Timestamp` is not an integer")?;
    // Milliseconds since the epoch: after 2001 in ms, which seconds would never reach.
    if ts < 1_000_000_000_000 {
        return Err(format!("`_aws.Timestamp` {ts} is not in milliseconds"));
    }
    let directives = aws
        .get("CloudWatchMetrics")
        .and_then(J::as_array)
        .filter(|d| !d.is_empty())
        .ok_or("`_aws.CloudWatchMetrics` is not a non-empty array")?;
    for d in directives {
        if d.get("Namespace")
            .and_then(J::as_str)
            .is_none_or(str::is_empty)
        {
            return Err("a directive without a Namespace".into());
        }
        let sets = d
            .get("Dimensions")
            .and_then(J::as_array)
            .ok_or("a directive without Dimensions")?;
        for set in sets {
            let keys = set.as_array().ok_or("a dimension set is not an array")?;
            if keys.len() > 30 {
                return Err("a dimension set of more than 30 keys".into());
            }
            for key in keys {
                let key = key.as_str().ok_or("a dimension key is not a string")?;
                let value = root
                    .get(key)
                    .and_then(J::as_str)
                    .ok_or(format!("dimension `{key}` has no string value at the top"))?;
                let lower = key.to_ascii_lowercase();
                if ["tenant", "user", "job"].iter().any(|w| lower.contains(w)) {
                    return Err(format!("`{key}` is a high-cardinality dimension"));
                }
                if forbidden.contains(&value) {
                    return Err(format!("dimension `{key}` holds the id {value:?}"));
                }
            }
        }
        let metrics = d
            .get("Metrics")
            .and_then(J::as_array)
            .filter(|m| !m.is_empty())
            .ok_or("a directive without Metrics")?;
        for m in metrics {
            let name = m
                .get("Name")
                .and_then(J::as_str)
                .ok_or("a metric without a Name")?;
            if let Some(unit) = m.get("Unit") {
                if !unit.as_str().is_some_and(|u| UNITS.contains(&u)) {
                    return Err(format!("metric `{name}` has the unknown unit {unit}"));
                }
            }
            let numeric = match root.get(name) {
                Some(J::Number(_)) => true,
                Some(J::Array(values)) => values.iter().all(J::is_number),
                _ => false,
            };
            if !numeric {
                return Err(format!("metric `{name}` has no numeric value at the top"));
            }
        }
    }
    Ok(doc)
}

/// Every line of `buffer` parsed with [`parse_emf`]; panics naming the first invalid one.
pub fn emf_documents(buffer: &MetricsBuffer, forbidden: &[&str]) -> Vec<serde_json::Value> {
    buffer
        .lines()
        .iter()
        .map(|l| parse_emf(l, forbidden).unwrap_or_else(|e| panic!("not EMF: {e}\n{l}")))
        .collect()
}
