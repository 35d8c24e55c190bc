//! The worker's use case: stream one job's rows from the source into a multipart upload.
//!
//! A run reads as: lease the job, open the file (new, or resumed from the checkpoint), then page
//! by page read, encode, and once a part's worth is buffered cut a part, upload it and checkpoint;
//! right after a checkpoint, hand over to a continuation if the deadline is near; at the end
//! upload the tail, complete the upload, record the entry.
//!
//! Invariants (docs/contract.md, "Worker invariants"):
//! - one file and one cache entry per job, however often its message is delivered: the job record
//!   is written compare-and-set, and only the lease holder may write it;
//! - memory stays bounded: one source page plus one part;
//! - every part boundary is a checkpoint (source cursor + the encoder's own resume state), and a
//!   continuation or a retry after a crash resumes from it and writes the same bytes, in every
//!   format;
//! - the entry appears only after the upload completed with rows and checksum recorded; a failed
//!   job aborts its upload and records why, in words safe to show to the caller.

use chrono::{DateTime, Duration, Utc};
use sha2::{Digest, Sha256};

use super::jobs::{manifest_key, object_key};
use super::tenant_slots::{self, Slot};
use super::Deps;
use crate::config::MIN_PART_SIZE;
use crate::domain::job::file_name;
use crate::domain::{
    BaseFile, CacheEntry, Checkpoint, Column, EncoderState, Job, JobEvent, JobKind, JobMessage,
    MessageKind, ResolvedExport, UploadedPart,
};
use crate::encode::{encoder_for, EncodeError, Encoder, FileInfo, ENCODER_VERSION};
use crate::ports::{Page, PortError, RangeQuery, SourceQuery};

/// How handling one message ended; [`Outcome::fate`] says what the queue does with it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded {
        rows: u64,
        bytes: u64,
    },
    /// Checkpointed before the deadline; a continuation message is queued.
    Continued {
        rows: u64,
    },
    Failed {
        code: String,
    },
    /// Failed for good after the retry budget: the message should go on to the dead-letter queue
    /// as evidence (the job record says why).
    Exhausted {
        code: String,
    },
    /// Nothing to do: the job already finished (duplicate or late delivery).
    AlreadyFinished,
    /// The message names no job we know.
    UnknownJob,
    /// This message's key ranges are done; other ranges of the job are still being read.
    RangesDone {
        rows: u64,
    },
    /// Another worker took over the job while this one ran; it stops without touching it.
    LostLease,
    /// The tenant already runs as many jobs as it may: the job waits its turn (a new message,
    /// visible after `retry_in` seconds), while other tenants' jobs start.
    Deferred {
        retry_in: u32,
    },
    /// Another worker holds the job's lease until `until`: deliver the message again after it.
    Busy {
        until: DateTime<Utc>,
    },
    /// A transient error on the job's `attempt`: deliver the message again after a backoff.
    Transient {
        attempt: u32,
        message: String,
    },
}

/// What the queue does with a handled message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Done with: delete it.
    Done,
    /// Deliver it again after this many seconds.
    RetryIn(i32),
    /// Deliver it again at once, past the queue's maxReceiveCount: SQS moves it to the DLQ.
    DeadLetter,
}

impl Outcome {
    pub fn fate(&self, now: DateTime<Utc>) -> Fate {
        match self {
            Self::Busy { until } => {
                Fate::RetryIn(((*until - now).num_seconds() + 5).clamp(5, 43_200) as i32)
            }
            Self::Transient { attempt, .. } => Fate::RetryIn((10i32 << (*attempt).min(8)).min(900)),
            Self::Exhausted { .. } => Fate::DeadLetter,
            _ => Fate::Done,
        }
    }
}

/// A job that cannot succeed. `message` is what callers see in the job status; `detail` (the
/// underlying error, which may name AWS resources or hold row values) goes to the logs only.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) code: &'static str,
    message: String,
    detail: String,
}

impl Failure {
    pub(super) fn new(
        code: &'static str,
        message: impl Into<String>,
        detail: impl ToString,
    ) -> Self {
        Self {
            code,
            message: message.into(),
            detail: detail.to_string(),
        }
    }
}

/// Why a run stopped before the file was done.
pub(super) enum Stop {
    /// Checkpointed before the deadline: a continuation goes on from there.
    Handover,
    Fatal(Failure),
    Transient(String),
    LostLease,
}

impl From<PortError> for Stop {
    fn from(e: PortError) -> Self {
        match e {
            PortError::Conflict(_) => Stop::LostLease,
            PortError::Data(_) => Stop::Fatal(Failure::new(
                "source_data_invalid",
                "the source holds a value that does not fit the dataset's columns; the operators have the details",
                e,
            )),
            PortError::Failed {
                retryable: true, ..
            } => Stop::Transient(e.to_string()),
            PortError::Failed { .. } => Stop::Fatal(Failure::new(
                "storage_failed",
                "storing or reading the export failed; request it again later",
                e,
            )),
        }
    }
}

impl From<EncodeError> for Stop {
    fn from(e: EncodeError) -> Self {
        Stop::Fatal(Failure::new("encode_failed", "writing the file failed", e))
    }
}

/// Runs the job named by `msg` until it succeeds, fails, or hands over before `deadline`.
/// `last_delivery`: the queue will not deliver this message again (its receive count reached the
/// queue's maxReceiveCount), so a transient failure now is final.
pub async fn process_job(
    deps: &Deps,
    msg: &JobMessage,
    owner: &str,
    deadline: DateTime<Utc>,
    last_delivery: bool,
) -> Outcome {
    let transient = |attempt: u32, e: &dyn std::fmt::Display| Outcome::Transient {
        attempt,
        message: e.to_string(),
    };
    if let Some(segment) = msg.segment {
        return super::runs::run_segment(
            deps,
            &msg.job_id,
            segment,
            owner,
            deadline,
            last_delivery,
        )
        .await;
    }
    let mut job = match deps.jobs.get_job(&msg.job_id).await {
        Ok(Some(j)) => j,
        Ok(None) => return Outcome::UnknownJob,
        Err(e) => return transient(0, &e),
    };
    if job.status.is_terminal() {
        return finished(deps, job, owner).await;
    }
    let now = deps.clock.now();
    let lease_until = now + to_chrono(deps.config.worker.lease);
    if let Some(until) = job.leased_by_other(owner, now) {
        return Outcome::Busy { until };
    }
    match tenant_slots::acquire(deps, &job, now).await {
        Ok(Slot::Granted) => {}
        Ok(Slot::Full { retry_in }) => {
            // A new delayed message: waiting spends neither the receive count nor an attempt.
            return match tenant_slots::defer(deps, msg, retry_in).await {
                Ok(()) => Outcome::Deferred { retry_in },
                Err(e) => transient(0, &e),
            };
        }
        Err(e) => return transient(0, &e),
    }
    job.lease(owner, now, lease_until, msg.kind == MessageKind::Continue);
    if job.rows_total.is_none() {
        job.rows_total = known_rows(deps, &job).await;
    }
    if let Err(e) = save(deps, &mut job).await {
        return match e {
            // Another worker owns the job, and with it the slot.
            PortError::Conflict(_) => Outcome::Busy { until: lease_until },
            other => {
                tenant_slots::release(deps, &job).await;
                transient(job.attempts, &other)
            }
        };
    }
    tracing::info!(job_id = %job.job_id, tenant = %job.tenant, dataset = %job.spec.dataset,
        attempt = job.attempts, resumed = job.checkpoint.is_some(), "job leased");

    if job.checkpoint.is_none() && job.plan.is_none() && job.append.is_none() {
        if let Err(stop) = super::append::prepare(deps, &mut job).await {
            return settle(deps, job, Err(stop), last_delivery).await;
        }
    }
    if super::runs::wanted(deps, &job) {
        match super::runs::plan(deps, &job).await {
            Ok(Some(plan)) => {
                job.object_key = Some(plan.object_key.clone());
                job.plan = Some(plan);
            }
            Ok(None) => {}
            Err(stop) => return settle(deps, job, Err(stop), last_delivery).await,
        }
    }
    if job.plan.is_some() {
        return super::runs::start(deps, job, owner, deadline, last_delivery).await;
    }

    let end = run(deps, &mut job, deadline).await;
    settle(deps, job, end, last_delivery).await
}

/// Turns how the run ended into the job's next state and the message's fate.
pub(super) async fn settle(
    deps: &Deps,
    mut job: Job,
    end: Result<Box<CacheEntry>, Stop>,
    last_delivery: bool,
) -> Outcome {
    let transient = |job: &Job, message: String| Outcome::Transient {
        attempt: job.attempts,
        message,
    };
    match end {
        Ok(entry) => {
            let (rows, bytes) = (entry.rows, entry.bytes);
            match finish_success(deps, job.clone(), *entry).await {
                Ok(()) => Outcome::Succeeded { rows, bytes },
                // The file is complete and the checkpoint says so: a retry only records it.
                Err(Stop::Transient(m)) => transient(&job, m),
                // Nothing hands over once the file is complete.
                Err(Stop::LostLease | Stop::Handover) => Outcome::LostLease,
                Err(Stop::Fatal(failure)) => {
                    // The file exists but no entry points at it: record the failure so the key
                    // is free again (the orphan expires with the bucket's lifecycle rule).
                    if let Ok(Some(job)) = deps.jobs.get_job(&job.job_id).await {
                        fail_job(deps, job, &failure).await;
                    }
                    Outcome::Failed {
                        code: failure.code.into(),
                    }
                }
            }
        }
        Err(Stop::Handover) => {
            let rows = job.checkpoint.as_ref().map_or(0, |c| c.rows);
            job.hand_over();
            if let Err(e) = save(deps, &mut job).await {
                return match e {
                    PortError::Conflict(_) => Outcome::LostLease,
                    other => transient(&job, other.to_string()),
                };
            }
            tenant_slots::release(deps, &job).await;
            let cont = JobMessage {
                job_id: job.job_id.clone(),
                kind: MessageKind::Continue,
                segment: None,
            };
            match deps.queue.enqueue(&cont).await {
                Ok(()) => Outcome::Continued { rows },
                // The original message comes back instead; the checkpoint is saved either way.
                Err(e) => transient(&job, e.to_string()),
            }
        }
        Err(Stop::LostLease) => Outcome::LostLease,
        Err(Stop::Fatal(failure)) => {
            let code = failure.code;
            fail_job(deps, job, &failure).await;
            Outcome::Failed { code: code.into() }
        }
        Err(Stop::Transient(message)) => {
            let failures = job.failed_attempts() + 1;
            if failures >= deps.config.worker.max_attempts || last_delivery {
                let failure = Failure::new(
                    "retries_exhausted",
                    format!("the export failed {failures} times on temporary errors and was stopped; request it again later"),
                    &message,
                );
                fail_job(deps, job, &failure).await;
                return Outcome::Exhausted {
                    code: failure.code.into(),
                };
            }
            job.release_for_retry();
            match save(deps, &mut job).await {
                Ok(()) => tenant_slots::release(deps, &job).await,
                Err(e) => {
                    tracing::warn!(job_id = %job.job_id, error = %e, "could not release the lease")
                }
            }
            transient(&job, message)
        }
    }
}

/// The exact count of an earlier file of the same rows, so progress is known from the first row.
async fn known_rows(deps: &Deps, job: &Job) -> Option<u64> {
    let key = deps.catalog.resolve(&job.spec).ok()?.rows_key(job.owner());
    match deps.counters.row_count(&job.tenant, &key).await {
        Ok(rows) => rows,
        Err(e) => {
            // Progress is a nicety: the export goes on without a total.
            tracing::warn!(job_id = %job.job_id, error = %e, "could not read the row count");
            None
        }
    }
}

pub(super) fn to_chrono(d: std::time::Duration) -> Duration {
    Duration::from_std(d).unwrap_or(Duration::MAX)
}

pub(super) async fn save(deps: &Deps, job: &mut Job) -> Result<(), PortError> {
    job.version += 1;
    job.updated_at = deps.clock.now();
    deps.jobs.put_job(job).await
}

/// The catalog's view of the request as one Query on the tenant partition.
pub fn source_query(
    export: &ResolvedExport,
    tenant: &str,
    table_prefix: &str,
    page_size: Option<i32>,
) -> SourceQuery {
    let (ds, spec) = (&export.dataset, &export.spec);
    let range = ds.range.as_ref().and_then(|r| {
        if spec.from.is_none() && spec.to.is_none() {
            return None;
        }
        let iso = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        Some(RangeQuery {
            index: Some(r.index.clone()),
            attribute: ds.columns[r.column].source.clone(),
            from: spec.from.map(iso),
            to: spec.to.map(iso),
        })
    });
    let filters = spec
        .filters
        .iter()
        .filter_map(|(name, value)| {
            ds.column(name)
                .map(|(_, c)| (c.source.clone(), c.ty, value.clone()))
        })
        .collect();
    SourceQuery {
        table: format!("{table_prefix}{}", ds.table),
        tenant_attribute: ds.tenant_attribute.clone(),
        tenant: tenant.to_string(),
        range,
        filters,
        columns: export
            .columns
            .iter()
            .map(|c| (c.source.clone(), c.ty))
            .collect(),
        page_size,
    }
}

/// The job's source query: the export's, within the job's key bounds when the dataset is
/// append-only (see `append`). `None` when there is nothing to read: an extension with no rows
/// past the previous file.
pub(super) fn job_query(
    export: &ResolvedExport,
    job: &Job,
    table_prefix: &str,
    page_size: Option<i32>,
) -> Option<SourceQuery> {
    let query = source_query(export, &job.tenant, table_prefix, page_size);
    match &job.append {
        Some(append) => super::append::narrow(export, query, append),
        None => Some(query),
    }
}

/// The file being written: its multipart upload, the parts so far, and where reading goes on.
pub(super) struct FileInProgress {
    key: String,
    upload_id: String,
    parts: Vec<UploadedPart>,
    /// `None` after a resume: the hash of the earlier parts is not carried between invocations, so
    /// the finished object is read back once to compute it.
    hasher: Option<Sha256>,
    cursor: Option<String>,
    /// Bytes that go before the next part's: a previous file too small to be a part of its own,
    /// which an incremental refresh extends.
    carry: Vec<u8>,
    /// The source has no more rows for this file.
    exhausted: bool,
    rows: u64,
    pages: u64,
    read_capacity: f64,
}

impl FileInProgress {
    /// A file whose every part is uploaded, its hash to be read back from the object.
    pub(super) fn completed(
        key: String,
        upload_id: String,
        parts: Vec<UploadedPart>,
        rows: u64,
        pages: u64,
        read_capacity: f64,
    ) -> Self {
        Self {
            key,
            upload_id,
            parts,
            hasher: None,
            cursor: None,
            carry: Vec::new(),
            exhausted: true,
            rows,
            pages,
            read_capacity,
        }
    }

    async fn push(&mut self, deps: &Deps, mut bytes: Vec<u8>) -> Result<(), Stop> {
        if !self.carry.is_empty() {
            let mut carried = std::mem::take(&mut self.carry);
            carried.append(&mut bytes);
            bytes = carried;
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(&bytes);
        }
        let number = self.parts.len() as i32 + 1;
        let size = bytes.len() as u64;
        let etag = deps
            .files
            .upload_part(&self.key, &self.upload_id, number, bytes)
            .await?;
        self.parts.push(UploadedPart { number, etag, size });
        Ok(())
    }

    fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }

    fn take(&mut self, page: &Page) {
        self.pages += 1;
        self.read_capacity += page.read_capacity;
        self.rows += page.rows.len() as u64;
        self.cursor.clone_from(&page.next);
        self.exhausted = page.next.is_none();
    }

    fn checkpoint(
        &self,
        encoder: Option<crate::domain::EncoderState>,
        completing: bool,
    ) -> Checkpoint {
        Checkpoint {
            object_key: self.key.clone(),
            upload_id: self.upload_id.clone(),
            parts: self.parts.clone(),
            cursor: self.cursor.clone(),
            rows: self.rows,
            pages: self.pages,
            read_capacity: self.read_capacity,
            encoder,
            completing,
        }
    }
}

/// Opens the job's file: resumed from its checkpoint when there is one to resume from, else a new
/// upload (reusing one that was started but has no parts yet).
async fn open(
    deps: &Deps,
    job: &mut Job,
    columns: Vec<Column>,
) -> Result<(FileInProgress, Option<Box<dyn Encoder>>), Stop> {
    let file = FileInfo {
        spec: &job.spec,
        created_at: job.created_at,
    };
    let settings = &deps.config.encode;
    match job.checkpoint.clone() {
        // Every part is uploaded: only completing the upload and recording the entry are left.
        Some(cp) if cp.completing => Ok((resumed(cp), None)),
        Some(cp) if !cp.parts.is_empty() => match &cp.encoder {
            Some(state) => {
                let encoder = encoder_for(file, columns, settings, Some(state)).map_err(|e| {
                    Stop::Fatal(Failure::new(
                        "cannot_resume",
                        "the export could not continue from its last checkpoint; request it again",
                        e,
                    ))
                })?;
                Ok((resumed(cp), Some(encoder)))
            }
            // Written before encoders could resume: start over cleanly.
            None => {
                abort_quietly(deps, &cp.object_key, &cp.upload_id).await;
                start(deps, job, file, columns).await
            }
        },
        Some(cp) => match job.append.as_ref().and_then(|a| a.base.as_ref()) {
            // An extension that died before its first part of new rows: copy again.
            Some(base) => extend(deps, base, cp.object_key, cp.upload_id, file, columns).await,
            None => {
                let encoder = encoder_for(file, columns, settings, None)?;
                Ok((fresh(cp.object_key, cp.upload_id), Some(encoder)))
            }
        },
        None => start(deps, job, file, columns).await,
    }
}

/// Largest part `UploadPartCopy` takes.
const MAX_COPY_PART: u64 = 5 * 1024 * 1024 * 1024;

/// An upload that begins with the previous file's bytes (see `append`): copied inside S3 as parts
/// when it is at least a part's size, else read and carried into the first part; then an
/// encoder that writes no header, since the previous file has it.
async fn extend(
    deps: &Deps,
    base: &BaseFile,
    key: String,
    upload_id: String,
    file: FileInfo<'_>,
    columns: Vec<Column>,
) -> Result<(FileInProgress, Option<Box<dyn Encoder>>), Stop> {
    let encoder = encoder_for(
        file,
        columns,
        &deps.config.encode,
        Some(&EncoderState::Plain),
    )?;
    let mut out = fresh(key, upload_id);
    // The copied bytes are not hashed here: the finished object is read back for its hash.
    out.hasher = None;
    out.rows = base.rows;
    let copy_from = deps.config.worker.part_size.min(MIN_PART_SIZE) as u64;
    if base.bytes >= copy_from {
        let count = base.bytes.div_ceil(MAX_COPY_PART);
        let each = base.bytes.div_ceil(count);
        let mut first = 0;
        while first < base.bytes {
            let last = (first + each).min(base.bytes) - 1;
            let number = out.parts.len() as i32 + 1;
            let etag = deps
                .files
                .copy_part(
                    &out.key,
                    &out.upload_id,
                    number,
                    &base.object_key,
                    (first, last),
                )
                .await?;
            out.parts.push(UploadedPart {
                number,
                etag,
                size: last - first + 1,
            });
            first = last + 1;
        }
    } else {
        out.carry = deps.files.get_object(&base.object_key).await?;
    }
    let copied = out.bytes() + out.carry.len() as u64;
    if copied != base.bytes {
        return Err(Stop::Fatal(Failure::new(
            "cannot_extend",
            "the previous file could not be reused; request the export again",
            format!(
                "the base file has {copied} bytes, its entry says {}",
                base.bytes
            ),
        )));
    }
    Ok((out, Some(encoder)))
}

fn resumed(cp: Checkpoint) -> FileInProgress {
    FileInProgress {
        exhausted: cp.cursor.is_none(),
        key: cp.object_key,
        upload_id: cp.upload_id,
        parts: cp.parts,
        hasher: None,
        cursor: cp.cursor,
        carry: Vec::new(),
        rows: cp.rows,
        pages: cp.pages,
        read_capacity: cp.read_capacity,
    }
}

fn fresh(key: String, upload_id: String) -> FileInProgress {
    FileInProgress {
        key,
        upload_id,
        parts: Vec::new(),
        hasher: Some(Sha256::new()),
        cursor: None,
        carry: Vec::new(),
        exhausted: false,
        rows: 0,
        pages: 0,
        read_capacity: 0.0,
    }
}

async fn start(
    deps: &Deps,
    job: &Job,
    file: FileInfo<'_>,
    columns: Vec<Column>,
) -> Result<(FileInProgress, Option<Box<dyn Encoder>>), Stop> {
    let base = job.append.as_ref().and_then(|a| a.base.as_ref());
    // Built before the upload exists, so a refusal leaves nothing to abort (an extension's
    // header-less encoder of plain text cannot fail).
    let encoder = match base {
        Some(_) => None,
        None => Some(encoder_for(
            file,
            columns.clone(),
            &deps.config.encode,
            None,
        )?),
    };
    let key = object_key(job);
    let upload_id = deps
        .files
        .start_upload(
            &key,
            job.spec.format.content_type(),
            &file_name(&job.spec, job.created_at),
        )
        .await?;
    match base {
        Some(base) => extend(deps, base, key, upload_id, file, columns).await,
        None => Ok((fresh(key, upload_id), encoder)),
    }
}

/// Writes the job's file until it is complete (its entry, to record) or the run stops early.
async fn run(deps: &Deps, job: &mut Job, deadline: DateTime<Utc>) -> Result<Box<CacheEntry>, Stop> {
    let export = deps
        .catalog
        .resolve(&job.spec)
        .map_err(|e| Stop::Fatal(Failure::new("dataset_unknown", e.to_string(), &e)))?;
    let ds = export.dataset.clone();
    let settings = deps.config.worker.clone();
    let query = job_query(
        &export,
        job,
        &deps.config.source_table_prefix,
        settings.page_size,
    );
    let (mut file, encoder) = open(deps, job, export.columns.clone()).await?;
    if query.is_none() {
        file.exhausted = true;
    }
    // A new upload is recorded before its first part, so a failure can abort it. A resumed one
    // keeps its checkpoint as it is: a run that dies before its next cut resumes there again.
    let resumed_here = job
        .checkpoint
        .as_ref()
        .is_some_and(|cp| cp.upload_id == file.upload_id && !cp.parts.is_empty());
    if !resumed_here {
        // Copied parts of a previous file are checkpointed with the first part of new rows,
        // encoder state and cursor together; a run that dies before that copies them again.
        let mut cp = file.checkpoint(None, false);
        cp.parts.clear();
        job.checkpoint(cp);
        save(deps, job).await?;
    }

    if let Some(mut encoder) = encoder {
        let mut last_progress = deps.clock.now();
        let interval = to_chrono(settings.progress_interval);
        let margin = to_chrono(settings.deadline_margin);
        let mut state = None;
        while !file.exhausted {
            let Some(query) = &query else { break };
            let page = deps.source.read_page(query, file.cursor.as_deref()).await?;
            file.take(&page);
            if file.rows > ds.row_limit {
                return Err(Stop::Fatal(Failure::new(
                    "row_limit_exceeded",
                    format!(
                        "the export has more than {} rows, the limit for `{}`; narrow it with filters or from/to",
                        ds.row_limit, ds.name
                    ),
                    file.rows,
                )));
            }
            encoder.write_rows(&page.rows)?;
            job.watermark = watermark(&page, job.watermark);
            job.record_page(file.rows, file.pages, file.read_capacity);

            let now = deps.clock.now();
            let mut checkpointed = false;
            if encoder.buffered() >= settings.part_size {
                let cut = encoder.cut()?;
                file.push(deps, cut.bytes).await?;
                state = Some(cut.state);
                job.checkpoint(file.checkpoint(state.clone(), false));
                save(deps, job).await?;
                checkpointed = true;
                last_progress = now;
            } else if now - last_progress >= interval {
                save(deps, job).await?;
                last_progress = now;
            }
            // Hand over only right at a fresh checkpoint: the continuation then starts exactly
            // where this run stopped, and every run moves the checkpoint forward by at least one
            // part. (A hand-over between checkpoints would re-read the same pages forever under a
            // short deadline.) Between checkpoints the run goes on; if the deadline kills it, the
            // retry resumes from the last checkpoint.
            if !file.exhausted && checkpointed && now + margin >= deadline {
                tracing::info!(job_id = %job.job_id, rows = file.rows, "deadline near: handing over to a continuation");
                return Err(Stop::Handover);
            }
        }
        let done = tokio::task::spawn_blocking(move || encoder.finish())
            .await
            .map_err(|e| {
                Stop::Fatal(Failure::new("encode_failed", "writing the file failed", e))
            })??;
        if !done.tail.is_empty() || file.parts.is_empty() {
            // S3 refuses to complete an upload without parts; an empty file is one empty part.
            file.push(deps, done.tail).await?;
        }
        job.sheets = done.sheets;
        job.truncated_cells = done.truncated_cells;
        job.checkpoint(file.checkpoint(state, true));
        save(deps, job).await?;
    }
    record(deps, job, &export, &mut file).await
}

/// Completes the upload of a file whose every part is uploaded, writes its manifest, and returns
/// the entry to record.
pub(super) async fn record(
    deps: &Deps,
    job: &mut Job,
    export: &ResolvedExport,
    file: &mut FileInProgress,
) -> Result<Box<CacheEntry>, Stop> {
    let ds = &export.dataset;
    let sha256 = complete(deps, file).await?;

    let now = deps.clock.now();
    let fresh_until = now + Duration::seconds(ds.ttl_seconds as i64);
    let entry = CacheEntry {
        tenant: job.tenant.clone(),
        user: job.user.clone(),
        cache_key: job.cache_key.clone(),
        spec: job.spec.clone(),
        job_id: job.job_id.clone(),
        object_key: file.key.clone(),
        manifest_key: manifest_key(&file.key),
        rows: file.rows,
        bytes: file.bytes(),
        sha256,
        sheets: job.sheets,
        created_at: now,
        fresh_until,
        stale_until: fresh_until + Duration::seconds(ds.stale_seconds as i64),
        generation: job.generation,
        hits: 0,
        last_hit_at: None,
        append_key: job.append.as_ref().map(|a| a.until.clone()),
        append_since: job
            .append
            .as_ref()
            .map(|a| a.base.as_ref().map_or(job.created_at, |b| b.since)),
    };
    write_manifest(deps, export, job, &entry).await?;
    Ok(Box::new(entry))
}

/// Completes the upload and returns the file's SHA-256. A run that died after completing it but
/// before recording the entry finds the upload gone: the object is then already there, which its
/// size confirms.
async fn complete(deps: &Deps, file: &mut FileInProgress) -> Result<String, Stop> {
    let completed = deps
        .files
        .complete_upload(&file.key, &file.upload_id, &file.parts)
        .await;
    if let (Ok(()), Some(h)) = (&completed, file.hasher.take()) {
        return Ok(hex::encode(h.finalize()));
    }
    // Resumed (the earlier parts' hash is not carried between runs) or completed before.
    let read_back = deps.files.digest(&file.key).await;
    match (completed, read_back) {
        (_, Ok((size, digest))) if size == file.bytes() => Ok(digest),
        (Err(e), _) => Err(e.into()),
        (Ok(()), Ok((size, _))) => Err(Stop::Fatal(Failure::new(
            "upload_mismatch",
            "the stored file does not match what was written; request it again",
            format!("uploaded {} bytes but the object has {size}", file.bytes()),
        ))),
        (Ok(()), Err(e)) => Err(e.into()),
    }
}

/// Latest timestamp seen in the exported rows. Re-reading pages after a resume cannot change a
/// maximum, so it needs no checkpoint of its own.
fn watermark(page: &Page, so_far: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    page.rows
        .iter()
        .flatten()
        .filter_map(|v| match v {
            crate::domain::Value::Ts(t) => Some(*t),
            _ => None,
        })
        .chain(so_far)
        .max()
}

/// The manifest describes the file so a reader can trust it without opening it.
#[derive(serde::Serialize)]
pub struct Manifest<'a> {
    pub dataset: &'a str,
    pub format: &'a str,
    pub file_name: String,
    pub columns: Vec<ManifestColumn<'a>>,
    pub filters: &'a std::collections::BTreeMap<String, String>,
    pub range: ManifestRange,
    pub tz: &'a str,
    pub rows: u64,
    pub sheets: u32,
    pub bytes: u64,
    pub sha256: &'a str,
    pub truncated_cells: u64,
    pub generated_at: DateTime<Utc>,
    pub encoder_version: &'a str,
    pub job_id: &'a str,
    pub source: ManifestSource,
}

#[derive(serde::Serialize)]
pub struct ManifestColumn<'a> {
    pub name: &'a str,
    pub label: &'a str,
    #[serde(rename = "type")]
    pub ty: &'a str,
}

#[derive(serde::Serialize)]
pub struct ManifestRange {
    pub column: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

#[derive(serde::Serialize)]
pub struct ManifestSource {
    /// Latest timestamp in the exported rows (`null` when no timestamp column was exported).
    pub watermark: Option<DateTime<Utc>>,
    pub pages_read: u64,
    pub read_capacity: f64,
}

async fn write_manifest(
    deps: &Deps,
    export: &ResolvedExport,
    job: &Job,
    entry: &CacheEntry,
) -> Result<(), Stop> {
    let (ds, columns) = (&export.dataset, &export.columns);
    let manifest = Manifest {
        dataset: &ds.name,
        format: job.spec.format.as_str(),
        file_name: entry.file_name(),
        columns: columns
            .iter()
            .map(|c| ManifestColumn {
                name: &c.name,
                label: &c.label,
                ty: c.ty.as_str(),
            })
            .collect(),
        filters: &job.spec.filters,
        range: ManifestRange {
            column: ds.range_column().map(|c| c.name.clone()),
            from: job.spec.from,
            to: job.spec.to,
        },
        tz: job.spec.tz.name(),
        rows: entry.rows,
        sheets: entry.sheets,
        bytes: entry.bytes,
        sha256: &entry.sha256,
        truncated_cells: job.truncated_cells,
        generated_at: entry.created_at,
        encoder_version: ENCODER_VERSION,
        job_id: &job.job_id,
        source: ManifestSource {
            watermark: job.watermark,
            pages_read: job.pages_read,
            read_capacity: job.read_capacity,
        },
    };
    let body = serde_json::to_vec_pretty(&manifest).map_err(|e| {
        Stop::Fatal(Failure::new(
            "manifest_failed",
            "describing the file failed",
            e,
        ))
    })?;
    deps.files
        .put_object(&entry.manifest_key, body, "application/json")
        .await?;
    Ok(())
}

async fn finish_success(deps: &Deps, mut job: Job, entry: CacheEntry) -> Result<(), Stop> {
    let now = deps.clock.now();
    let lease = job.lease.clone();
    job.succeed(&entry, now);
    // Held until the completion event is out, so a duplicate message leaves it to this run.
    job.lease = lease;
    job.updated_at = now;
    job.version += 1;
    deps.jobs.complete_job(&job, &entry).await?;
    release_marker(deps, &job).await;
    tenant_slots::release(deps, &job).await;
    record_rows(deps, &job, entry.rows).await;
    tracing::info!(job_id = %job.job_id, tenant = %job.tenant, dataset = %job.spec.dataset,
        rows = entry.rows, bytes = entry.bytes, pages = job.pages_read,
        read_capacity = job.read_capacity, "job succeeded");
    deps.metrics.job_finished(now, &job);
    announce_or_later(deps, job).await;
    Ok(())
}

/// Remembers the row count for the progress of the next file of the same rows.
async fn record_rows(deps: &Deps, job: &Job, rows: u64) {
    let Ok(export) = deps.catalog.resolve(&job.spec) else {
        return;
    };
    let key = export.rows_key(job.owner());
    if let Err(e) = deps
        .counters
        .record_row_count(&job.tenant, &key, rows, deps.clock.now())
        .await
    {
        tracing::warn!(job_id = %job.job_id, error = %e, "could not record the row count");
    }
}

pub(super) async fn fail_job(deps: &Deps, mut job: Job, failure: &Failure) {
    tracing::warn!(job_id = %job.job_id, tenant = %job.tenant, dataset = %job.spec.dataset,
        code = failure.code, detail = %failure.detail, "job failed");
    if let Some(cp) = job.checkpoint.take() {
        abort_quietly(deps, &cp.object_key, &cp.upload_id).await;
    }
    if let Some(plan) = job.plan.take() {
        abort_quietly(deps, &plan.object_key, &plan.upload_id).await;
    }
    let lease = job.lease.take();
    job.fail(failure.code, &failure.message, deps.clock.now());
    // Held until the completion event is out, as on success.
    job.lease = lease;
    deps.metrics.job_finished(deps.clock.now(), &job);
    let saved = save(deps, &mut job).await;
    if let Err(e) = &saved {
        tracing::error!(job_id = %job.job_id, error = %e, "could not record the failure");
    }
    release_marker(deps, &job).await;
    tenant_slots::release(deps, &job).await;
    if saved.is_ok() {
        announce_or_later(deps, job).await;
    }
}

/// How long a job whose completion event the bus refused waits before its message tries again.
const EVENT_RETRY_SECONDS: u32 = 60;

/// A message for a finished job (a duplicate, a late delivery, or the one queued when its event
/// could not be sent): sends the completion event if it never went out. While the run that
/// finished the job still holds its lease, that run sends it; the message comes back after.
pub(super) async fn finished(deps: &Deps, job: Job, owner: &str) -> Outcome {
    if job.notified {
        return Outcome::AlreadyFinished;
    }
    if let Some(until) = job.leased_by_other(owner, deps.clock.now()) {
        return Outcome::Busy { until };
    }
    let attempt = job.attempts;
    match announce(deps, job).await {
        Ok(()) => Outcome::AlreadyFinished,
        // Past the queue's retry budget the message goes to the dead-letter queue, as evidence.
        Err(e) => Outcome::Transient {
            attempt,
            message: e.to_string(),
        },
    }
}

/// Sends the finished job's event and marks it sent; when the bus refuses, a delayed message of
/// the job comes back to send it. Never fails the job: the file and its entry stay as they are.
async fn announce_or_later(deps: &Deps, job: Job) {
    let (job_id, kind) = (job.job_id.clone(), job.kind);
    if announce(deps, job).await.is_ok() {
        return;
    }
    let msg = JobMessage {
        job_id: job_id.clone(),
        kind: match kind {
            JobKind::Export => MessageKind::Export,
            JobKind::Refresh => MessageKind::Refresh,
        },
        segment: None,
    };
    if let Err(e) = deps.queue.enqueue_delayed(&msg, EVENT_RETRY_SECONDS).await {
        tracing::error!(%job_id, error = %e,
            "could not queue a retry of the completion event: it goes out only if the job's message comes again");
    }
}

/// Sends the event of a finished job once: the job is marked (compare-and-set) after the bus
/// took it, and its lease let go either way so a later message may try again.
async fn announce(deps: &Deps, mut job: Job) -> Result<(), PortError> {
    let Some(event) = JobEvent::of(&job) else {
        return Ok(());
    };
    if job.notified {
        return Ok(());
    }
    let sent = deps.events.job_finished(&event).await;
    match &sent {
        Ok(()) => tracing::info!(job_id = %job.job_id, detail_type = event.detail_type(),
            "completion event published"),
        Err(e) => tracing::warn!(job_id = %job.job_id, tenant = %job.tenant,
            dataset = %job.spec.dataset, detail_type = event.detail_type(), error = %e,
            "could not publish the completion event; the job stands, the event is retried"),
    }
    job.notified = sent.is_ok();
    job.lease = None;
    if let Err(e) = save(deps, &mut job).await {
        // A message handled meanwhile may send the event once more; consumers dedupe on job_id.
        tracing::warn!(job_id = %job.job_id, error = %e, "could not record the completion event");
    }
    sent
}

async fn release_marker(deps: &Deps, job: &Job) {
    if let Err(e) = deps
        .jobs
        .release_marker(&job.tenant, &job.cache_key, &job.job_id)
        .await
    {
        tracing::warn!(job_id = %job.job_id, error = %e, "could not release the in-flight marker");
    }
}

async fn abort_quietly(deps: &Deps, key: &str, upload_id: &str) {
    if let Err(e) = deps.files.abort_upload(key, upload_id).await {
        // The bucket's lifecycle rule aborts it after a day anyway.
        tracing::warn!(key, error = %e, "could not abort a multipart upload");
    }
}
