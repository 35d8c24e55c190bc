//! The worker's use case: stream one job's rows from the source into a multipart upload.
//!
//! Invariants (DESIGN.md, "Worker invariants"):
//! - one file and one cache entry per job, however often its message is delivered: the job record
//!   is written compare-and-set, and only the lease holder may write it;
//! - memory stays bounded: one source page plus one part;
//! - parts are cut at page boundaries, so each part boundary is also a checkpoint a continuation
//!   (or a retry after a crash) resumes from, producing the same bytes;
//! - the entry appears only after the upload completed with rows and checksum recorded; a failed
//!   job aborts its upload and records why.

use std::io::Read;

use chrono::{DateTime, Duration, Utc};
use sha2::{Digest, Sha256};

use super::jobs::{manifest_key, object_key};
use super::{Deps, ServiceError};
use crate::catalog::{Column, Dataset};
use crate::domain::job::file_name;
use crate::domain::{
    CacheEntry, Checkpoint, ExportSpec, Job, JobError, JobMessage, JobStatus, MessageKind,
    UploadedPart,
};
use crate::encode::{encoder_for, EncodeError, Encoder, ENCODER_VERSION};
use crate::ports::{PortError, RangeQuery, SourceQuery};

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
    /// Another worker took over the job while this one ran; it stops without touching it.
    LostLease,
}

/// Errors that should make the queue deliver the message again later.
#[derive(Debug, thiserror::Error)]
pub enum RetryLater {
    #[error("job {job_id} is leased by another worker until {until}")]
    Busy {
        job_id: String,
        until: DateTime<Utc>,
    },
    #[error("job {job_id} hit a transient error (attempt {attempt}): {message}")]
    Transient {
        job_id: String,
        attempt: u32,
        message: String,
    },
}

impl RetryLater {
    /// Seconds before the message should be seen again.
    pub fn delay_seconds(&self, now: DateTime<Utc>) -> i32 {
        match self {
            Self::Busy { until, .. } => ((*until - now).num_seconds() + 5).clamp(5, 43_200) as i32,
            Self::Transient { attempt, .. } => (10i32 << (*attempt).min(8)).min(900),
        }
    }
}

/// Ways a run ends early.
enum Stop {
    /// The job cannot succeed: fail it now.
    Fatal {
        code: &'static str,
        message: String,
    },
    Transient(String),
    LostLease,
}

impl From<PortError> for Stop {
    fn from(e: PortError) -> Self {
        match e {
            PortError::Conflict(_) => Stop::LostLease,
            PortError::Data(m) => Stop::Fatal {
                code: "source_data_invalid",
                message: m,
            },
            PortError::Failed {
                retryable: true, ..
            } => Stop::Transient(e.to_string()),
            PortError::Failed { .. } => Stop::Fatal {
                code: "storage_failed",
                message: e.to_string(),
            },
        }
    }
}

impl From<EncodeError> for Stop {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::NoSpace(m) => Stop::Fatal {
                code: "no_temp_space",
                message: m,
            },
            other => Stop::Fatal {
                code: "encode_failed",
                message: other.to_string(),
            },
        }
    }
}

/// A run that cannot resume gives up this close to the deadline, with a clear error rather than
/// being killed mid-write.
const LAST_MOMENT: Duration = Duration::seconds(5);

enum RunEnd {
    Done(Box<CacheEntry>),
    Handover,
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
) -> Result<Outcome, RetryLater> {
    let transient = |job_id: &str, attempt: u32, e: &dyn std::fmt::Display| RetryLater::Transient {
        job_id: job_id.to_string(),
        attempt,
        message: e.to_string(),
    };
    let job = match deps.meta.get_job(&msg.job_id).await {
        Ok(Some(j)) => j,
        Ok(None) => return Ok(Outcome::UnknownJob),
        Err(e) => return Err(transient(&msg.job_id, 0, &e)),
    };
    if job.status.is_terminal() {
        return Ok(Outcome::AlreadyFinished);
    }
    let now = deps.clock.now();
    if let Some(lease) = &job.lease {
        if lease.until > now && lease.owner != owner {
            return Err(RetryLater::Busy {
                job_id: job.job_id.clone(),
                until: lease.until,
            });
        }
    }

    let mut job = job;
    job.attempts += 1;
    if msg.kind == MessageKind::Continue && job.lease.is_none() && job.checkpoint.is_some() {
        // A planned hand-over, not a failure: keep it out of the retry budget.
        job.continuations += 1;
    }
    job.status = JobStatus::Running;
    job.started_at.get_or_insert(now);
    job.lease = Some(crate::domain::job::Lease {
        owner: owner.to_string(),
        until: now + to_chrono(deps.config.worker.lease),
    });
    if let Err(e) = save(deps, &mut job).await {
        return match e {
            PortError::Conflict(_) => Err(RetryLater::Busy {
                job_id: job.job_id.clone(),
                until: now + to_chrono(deps.config.worker.lease),
            }),
            other => Err(transient(&job.job_id, job.attempts, &other)),
        };
    }
    tracing::info!(job_id = %job.job_id, tenant = %job.tenant, dataset = %job.spec.dataset,
        attempt = job.attempts, "job leased");

    match run(deps, &mut job, deadline).await {
        Ok(RunEnd::Done(entry)) => {
            let rows = entry.rows;
            let bytes = entry.bytes;
            match finish_success(deps, job, *entry).await {
                Ok(()) => Ok(Outcome::Succeeded { rows, bytes }),
                Err(Stop::LostLease) => Ok(Outcome::LostLease),
                Err(Stop::Transient(m)) => Err(RetryLater::Transient {
                    job_id: msg.job_id.clone(),
                    attempt: 0,
                    message: m,
                }),
                Err(Stop::Fatal { code, message }) => {
                    // The file exists but no entry points at it: record the failure so the key
                    // is free again (the orphan expires with the bucket's lifecycle rule).
                    if let Ok(Some(job)) = deps.meta.get_job(&msg.job_id).await {
                        fail_job(deps, job, code, &message).await;
                    }
                    Ok(Outcome::Failed { code: code.into() })
                }
            }
        }
        Ok(RunEnd::Handover) => {
            let rows = job.checkpoint.as_ref().map_or(0, |c| c.rows);
            job.lease = None;
            if let Err(e) = save(deps, &mut job).await {
                return match e {
                    PortError::Conflict(_) => Ok(Outcome::LostLease),
                    other => Err(transient(&job.job_id, job.attempts, &other)),
                };
            }
            let cont = JobMessage {
                job_id: job.job_id.clone(),
                kind: MessageKind::Continue,
            };
            match deps.queue.enqueue(&cont).await {
                Ok(()) => Ok(Outcome::Continued { rows }),
                // The original message comes back instead; the checkpoint is saved either way.
                Err(e) => Err(transient(&job.job_id, job.attempts, &e)),
            }
        }
        Err(Stop::LostLease) => Ok(Outcome::LostLease),
        Err(Stop::Fatal { code, message }) => {
            fail_job(deps, job, code, &message).await;
            Ok(Outcome::Failed { code: code.into() })
        }
        Err(Stop::Transient(message)) => {
            if job.failed_attempts() + 1 >= deps.config.worker.max_attempts || last_delivery {
                let message = format!(
                    "gave up after {} attempts; last error: {message}",
                    job.failed_attempts() + 1
                );
                fail_job(deps, job, "retries_exhausted", &message).await;
                return Ok(Outcome::Exhausted {
                    code: "retries_exhausted".into(),
                });
            }
            let attempt = job.attempts;
            // Keep the checkpoint and upload for the retry; just let go of the lease.
            job.lease = None;
            job.error = Some(JobError {
                code: "transient".into(),
                message: "a transient error interrupted the job; it will be retried".into(),
            });
            if let Err(e) = save(deps, &mut job).await {
                tracing::warn!(job_id = %job.job_id, error = %e, "could not release the lease");
            }
            Err(RetryLater::Transient {
                job_id: job.job_id,
                attempt,
                message,
            })
        }
    }
}

fn to_chrono(d: std::time::Duration) -> Duration {
    Duration::from_std(d).unwrap_or(Duration::MAX)
}

async fn save(deps: &Deps, job: &mut Job) -> Result<(), PortError> {
    job.version += 1;
    job.updated_at = deps.clock.now();
    deps.meta.put_job(job).await
}

pub fn selected_columns(ds: &Dataset, spec: &ExportSpec) -> Vec<Column> {
    ds.columns
        .iter()
        .filter(|c| spec.columns.contains(&c.name))
        .cloned()
        .collect()
}

/// The catalog's view of the request as one Query on the tenant partition.
pub fn source_query(
    ds: &Dataset,
    spec: &ExportSpec,
    tenant: &str,
    table_prefix: &str,
    page_size: Option<i32>,
) -> SourceQuery {
    let range = ds.range.as_ref().and_then(|r| {
        if spec.from.is_none() && spec.to.is_none() {
            return None;
        }
        let iso = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        Some(RangeQuery {
            index: r.index.clone(),
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
        columns: selected_columns(ds, spec)
            .into_iter()
            .map(|c| (c.source, c.ty))
            .collect(),
        page_size,
    }
}

/// Bytes and checksum of what has been uploaded so far.
struct Upload {
    key: String,
    id: String,
    parts: Vec<UploadedPart>,
    /// `None` after a resume: the hash of the earlier parts is not carried between invocations, so
    /// the finished object is read back once to compute it.
    hasher: Option<Sha256>,
}

impl Upload {
    async fn push(&mut self, deps: &Deps, bytes: Vec<u8>) -> Result<(), Stop> {
        if let Some(h) = self.hasher.as_mut() {
            h.update(&bytes);
        }
        let number = self.parts.len() as i32 + 1;
        let size = bytes.len() as u64;
        let etag = deps
            .files
            .upload_part(&self.key, &self.id, number, bytes)
            .await?;
        self.parts.push(UploadedPart { number, etag, size });
        Ok(())
    }

    fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }
}

async fn run(deps: &Deps, job: &mut Job, deadline: DateTime<Utc>) -> Result<RunEnd, Stop> {
    let Some(ds) = deps.catalog.get(&job.spec.dataset).cloned() else {
        return Err(Stop::Fatal {
            code: "dataset_unknown",
            message: format!("dataset `{}` is no longer in the catalog", job.spec.dataset),
        });
    };
    let settings = deps.config.worker.clone();
    let query = source_query(
        &ds,
        &job.spec,
        &job.tenant,
        &deps.config.source_table_prefix,
        settings.page_size,
    );
    let columns = selected_columns(&ds, &job.spec);
    let resumable_format = true;

    // Resume from the checkpoint when the format allows it; otherwise start over cleanly.
    let resume = match job.checkpoint.take() {
        Some(cp) if resumable_format => Some(cp),
        Some(cp) => {
            abort_quietly(deps, &cp.object_key, &cp.upload_id).await;
            None
        }
        None => None,
    };
    let (mut upload, mut cursor, mut rows, mut pages, mut rcu) = match resume {
        Some(cp) => {
            let hasher = cp.parts.is_empty().then(Sha256::new);
            (
                Upload {
                    key: cp.object_key,
                    id: cp.upload_id,
                    parts: cp.parts,
                    hasher,
                },
                cp.cursor,
                cp.rows,
                cp.pages,
                cp.read_capacity,
            )
        }
        None => {
            let key = object_key(job);
            let id = deps
                .files
                .start_upload(
                    &key,
                    job.spec.format.content_type(),
                    &file_name(&job.spec, job.created_at),
                )
                .await?;
            (
                Upload {
                    key,
                    id,
                    parts: Vec::new(),
                    hasher: Some(Sha256::new()),
                },
                None,
                0,
                0,
                0.0,
            )
        }
    };
    let resumed_mid_file = !upload.parts.is_empty();
    // A done flag separate from the cursor: `None` means "from the start" before the first page.
    let mut exhausted = resumed_mid_file && cursor.is_none();
    let checkpoint = |upload: &Upload, cursor: &Option<String>, rows, pages, rcu| Checkpoint {
        object_key: upload.key.clone(),
        upload_id: upload.id.clone(),
        parts: upload.parts.clone(),
        cursor: cursor.clone(),
        rows,
        pages,
        read_capacity: rcu,
        encoder: None,
        completing: false,
    };
    job.checkpoint = Some(checkpoint(&upload, &cursor, rows, pages, rcu));
    job.object_key = Some(upload.key.clone());
    job.rows_written = rows;
    save(deps, job).await?;

    let mut encoder: Box<dyn Encoder> = encoder_for(
        crate::encode::FileInfo {
            spec: &job.spec,
            created_at: job.created_at,
        },
        columns,
        &deps.config.encode,
        resumed_mid_file.then_some(&crate::domain::EncoderState::Plain),
    )?;
    let mut last_progress = deps.clock.now();
    let interval = to_chrono(settings.progress_interval);
    let margin = to_chrono(settings.deadline_margin);

    while !exhausted {
        let page = deps.source.read_page(&query, cursor.as_deref()).await?;
        pages += 1;
        rcu += page.read_capacity;
        rows += page.rows.len() as u64;
        if rows > ds.row_limit {
            return Err(Stop::Fatal {
                code: "row_limit_exceeded",
                message: format!(
                    "the export has more than {} rows, the limit for `{}`; narrow it with filters or from/to",
                    ds.row_limit, ds.name
                ),
            });
        }
        encoder.write_rows(&page.rows)?;
        job.watermark = page
            .rows
            .iter()
            .flatten()
            .filter_map(|v| match v {
                crate::domain::Value::Ts(t) => Some(*t),
                _ => None,
            })
            .chain(job.watermark)
            .max();
        cursor = page.next;
        exhausted = cursor.is_none();
        job.rows_written = rows;
        job.pages_read = pages;
        job.read_capacity = rcu;

        let now = deps.clock.now();
        let mut checkpointed = false;
        if encoder.buffered() >= settings.part_size {
            upload.push(deps, encoder.cut()?.bytes).await?;
            job.bytes_written = upload.bytes();
            if true {
                job.checkpoint = Some(checkpoint(&upload, &cursor, rows, pages, rcu));
                checkpointed = true;
            } else if let Some(cp) = job.checkpoint.as_mut() {
                // Parts are recorded so a failure can abort them; there is no resume point.
                cp.parts = upload.parts.clone();
            }
            save(deps, job).await?;
            last_progress = now;
        } else if now - last_progress >= interval {
            save(deps, job).await?;
            last_progress = now;
        }

        if exhausted {
            break;
        }
        // Hand over only right at a fresh checkpoint: the continuation then starts exactly where
        // this run stopped, and every run moves the checkpoint forward by at least one part. (A
        // hand-over between checkpoints would re-read the same pages forever under a short
        // deadline.) Between checkpoints the run goes on; if the deadline kills it, the retry
        // resumes from the last checkpoint.
        if checkpointed && now + margin >= deadline {
            tracing::info!(job_id = %job.job_id, rows, "deadline near: handing over to a continuation");
            return Ok(RunEnd::Handover);
        }
        if false && now + LAST_MOMENT >= deadline {
            return Err(Stop::Fatal {
                code: "too_large_for_one_run",
                message: format!(
                    "a {} export must finish within one run and this one did not; narrow it with filters or from/to, or use csv",
                    job.spec.format.as_str()
                ),
            });
        }
    }

    let encoder_done = tokio::task::spawn_blocking(move || encoder.finish())
        .await
        .map_err(|e| Stop::Fatal {
            code: "encode_failed",
            message: format!("the encoder stopped unexpectedly: {e}"),
        })??;
    let tail = encoder_done.tail;
    if !tail.is_empty() {
        upload.push(deps, tail).await?;
    }
    if upload.parts.is_empty() {
        // S3 refuses to complete an upload without parts; an empty file is one empty part.
        upload.push(deps, Vec::new()).await?;
    }
    deps.files
        .complete_upload(&upload.key, &upload.id, &upload.parts)
        .await?;
    let bytes = upload.bytes();
    let sha256 = match upload.hasher.take() {
        Some(h) => hex::encode(h.finalize()),
        None => {
            let (size, digest) = deps.files.digest(&upload.key).await?;
            if size != bytes {
                return Err(Stop::Fatal {
                    code: "upload_mismatch",
                    message: format!("uploaded {bytes} bytes but the object has {size}"),
                });
            }
            digest
        }
    };

    let now = deps.clock.now();
    let fresh_until = now + Duration::seconds(ds.ttl_seconds as i64);
    let entry = CacheEntry {
        tenant: job.tenant.clone(),
        user: job.user.clone(),
        cache_key: job.cache_key.clone(),
        spec: job.spec.clone(),
        job_id: job.job_id.clone(),
        object_key: upload.key.clone(),
        manifest_key: manifest_key(&upload.key),
        rows,
        bytes,
        sha256,
        sheets: encoder_done.sheets,
        created_at: now,
        fresh_until,
        stale_until: fresh_until + Duration::seconds(ds.stale_seconds as i64),
        generation: job.generation,
        hits: 0,
        last_hit_at: None,
    };
    job.truncated_cells = encoder_done.truncated_cells;
    job.sheets = encoder_done.sheets;
    write_manifest(deps, &ds, job, &entry).await?;
    Ok(RunEnd::Done(Box::new(entry)))
}

fn read_chunk(r: &mut dyn Read, size: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(size);
    r.take(size as u64).read_to_end(&mut buf)?;
    Ok(buf)
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
    ds: &Dataset,
    job: &Job,
    entry: &CacheEntry,
) -> Result<(), Stop> {
    let columns = selected_columns(ds, &job.spec);
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
        tz: job.spec.tz.as_deref().unwrap_or("UTC"),
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
    let body = serde_json::to_vec_pretty(&manifest).map_err(|e| Stop::Fatal {
        code: "manifest_failed",
        message: e.to_string(),
    })?;
    deps.files
        .put_object(&entry.manifest_key, body, "application/json")
        .await?;
    Ok(())
}

async fn finish_success(deps: &Deps, mut job: Job, mut entry: CacheEntry) -> Result<(), Stop> {
    // Popularity survives a refresh, or the warmer would forget an entry it just refreshed.
    if let Ok((Some(previous), _)) = deps
        .meta
        .lookup(&job.tenant, &job.user, &job.cache_key)
        .await
    {
        entry.hits = previous.hits;
        entry.last_hit_at = previous.last_hit_at;
    }
    let now = deps.clock.now();
    job.status = JobStatus::Succeeded;
    job.finished_at = Some(now);
    job.updated_at = now;
    job.rows_written = entry.rows;
    job.rows_total = Some(entry.rows);
    job.bytes_written = entry.bytes;
    job.sha256 = Some(entry.sha256.clone());
    job.object_key = Some(entry.object_key.clone());
    job.download_until = Some(entry.stale_until);
    job.error = None;
    job.lease = None;
    job.checkpoint = None;
    job.version += 1;
    deps.meta.complete_job(&job, &entry).await?;
    release_marker(deps, &job).await;
    tracing::info!(job_id = %job.job_id, tenant = %job.tenant, dataset = %job.spec.dataset,
        rows = entry.rows, bytes = entry.bytes, pages = job.pages_read,
        read_capacity = job.read_capacity, "job succeeded");
    Ok(())
}

async fn fail_job(deps: &Deps, mut job: Job, code: &str, message: &str) {
    tracing::warn!(job_id = %job.job_id, tenant = %job.tenant, dataset = %job.spec.dataset,
        code, message, "job failed");
    if let Some(cp) = job.checkpoint.take() {
        abort_quietly(deps, &cp.object_key, &cp.upload_id).await;
    }
    let now = deps.clock.now();
    job.status = JobStatus::Failed;
    job.error = Some(JobError {
        code: code.to_string(),
        message: message.to_string(),
    });
    job.finished_at = Some(now);
    job.lease = None;
    job.object_key = None;
    if let Err(e) = save(deps, &mut job).await {
        tracing::error!(job_id = %job.job_id, error = %e, "could not record the failure");
    }
    release_marker(deps, &job).await;
}

async fn release_marker(deps: &Deps, job: &Job) {
    if let Err(e) = deps
        .meta
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

impl From<RetryLater> for ServiceError {
    fn from(e: RetryLater) -> Self {
        ServiceError::Unavailable(e.to_string())
    }
}
