//! A job read as several key ranges at once ([`crate::domain::plan`]): in this worker
//! (`RANGES_PER_WORKER`), and for very large exports across invocations, one SQS message per
//! segment (`FAN_OUT_ROWS`, `FAN_OUT_SEGMENTS`).
//!
//! Each range runs the sequential loop of `process` on its slice of the key space with its own
//! encoder and its own block of part numbers, and checkpoints into its slot of the job record
//! (a compare-and-set write that re-reads and retries when another range wrote first). The range
//! whose write leaves every range done completes the file: it stitches the held-back pieces into
//! parts, completes the upload and records the entry, as a sequential job does.
//!
//! Plain text (csv) comes out byte-identical to a sequential read. A gzip member cannot be
//! byte-identical, since each range starts a fresh deflate stream, but it is one valid member with
//! the same text (and deterministic for a given plan). XLSX is always read sequentially: which
//! sheet a row lands in, and the ZIP's offsets and sizes, depend on every row before it.

use chrono::{DateTime, Utc};
use tokio::task::JoinSet;

use super::process::{
    fail_job, finished, job_query, record, save, settle, to_chrono, Failure, FileInProgress,
    Outcome, Stop,
};
use super::tenant_slots;
use super::Deps;
use crate::domain::job::Lease;
use crate::domain::plan::{key_before, split_points, Piece, Plan, RunState, Slot};
use crate::domain::{EncoderState, Format, Job, JobMessage, MessageKind, ResolvedExport};
use crate::domain::{UploadedPart, Value};
use crate::encode::{encoder_for, FileInfo};
use crate::ports::{PortError, RangeQuery, SourceQuery};

/// Compare-and-set writes a range retries when the other ranges keep writing first.
const CONTENDED_WRITES: u32 = 40;

/// The empty final deflate block that ends a member whose segments all ended in a full flush.
const DEFLATE_END: [u8; 2] = [0x03, 0x00];

/// Whether a job that has not started would be read as ranges.
pub(super) fn wanted(deps: &Deps, job: &Job) -> bool {
    let w = &deps.config.worker;
    job.checkpoint.is_none()
        && job.plan.is_none()
        // An extension reads only the rows past its previous file, in this run.
        && job.append.as_ref().is_none_or(|a| a.base.is_none())
        && matches!(
            job.spec.format,
            Format::Csv | Format::CsvGz | Format::Ndjson
        )
        && (w.ranges > 1 || segments_for(deps, job) > 1)
}

fn segments_for(deps: &Deps, job: &Job) -> u32 {
    let w = &deps.config.worker;
    let big = w.fan_out_rows > 0 && job.rows_total.is_some_and(|r| r >= w.fan_out_rows);
    if big {
        w.fan_out_segments
    } else {
        1
    }
}

/// Splits the job's key space and starts its upload; `None` when there is nothing to split
/// (no rows, one key, or keys that are not strings), and the job goes on sequentially.
pub(super) async fn plan(deps: &Deps, job: &Job) -> Result<Option<Plan>, Stop> {
    let export = resolve(deps, job)?;
    let Some(query) = job_query(&export, job, &deps.config.source_table_prefix, None) else {
        return Ok(None);
    };
    let attribute = split_attribute(&export, &query);
    let segments = segments_for(deps, job);
    let wanted = (deps.config.worker.ranges * segments) as usize;
    let Some((min, max)) = deps.source.key_bounds(&query, &attribute).await? else {
        return Ok(None);
    };
    let splits = split_points(&min, &max, wanted);
    if splits.is_empty() {
        return Ok(None);
    }
    let key = super::jobs::object_key(job);
    let upload_id = deps
        .files
        .start_upload(
            &key,
            job.spec.format.content_type(),
            &crate::domain::job::file_name(&job.spec, job.created_at),
        )
        .await?;
    let continued = match job.spec.format {
        Format::CsvGz => EncoderState::Gzip {
            crc32: 0,
            length: 0,
        },
        _ => EncoderState::Plain,
    };
    tracing::info!(job_id = %job.job_id, ranges = splits.len() + 1, segments, %min, %max,
        "reading the job as key ranges");
    Ok(Some(Plan::new(
        key, upload_id, attribute, segments, &splits, continued,
    )))
}

/// The attribute the sequential read is ordered by: the range index's when the export has a time
/// range, else the table's sort key.
fn split_attribute(export: &ResolvedExport, query: &SourceQuery) -> String {
    match &query.range {
        Some(r) => r.attribute.clone(),
        None => export.dataset.sort_attribute.clone(),
    }
}

fn resolve(deps: &Deps, job: &Job) -> Result<ResolvedExport, Stop> {
    deps.catalog
        .resolve(&job.spec)
        .map_err(|e| Stop::Fatal(Failure::new("dataset_unknown", e.to_string(), &e)))
}

/// The planning run of a job (its own message): queue the other segments, then work on the first.
pub(super) async fn start(
    deps: &Deps,
    mut job: Job,
    owner: &str,
    deadline: DateTime<Utc>,
    last_delivery: bool,
) -> Outcome {
    let segments = job.plan.as_ref().map_or(1, |p| p.segments);
    // The ranges carry their own leases from here on.
    job.lease = None;
    if let Err(e) = save(deps, &mut job).await {
        return match e {
            PortError::Conflict(_) => Outcome::LostLease,
            other => transient(other.to_string()),
        };
    }
    tenant_slots::release(deps, &job).await;
    for segment in 1..segments {
        let msg = JobMessage {
            job_id: job.job_id.clone(),
            kind: MessageKind::Continue,
            segment: Some(segment),
        };
        if let Err(e) = deps.queue.enqueue(&msg).await {
            // This message comes back and queues them again; a segment delivered twice finds its
            // ranges leased or done.
            return transient(e.to_string());
        }
    }
    run_segment(deps, &job.job_id, 0, owner, deadline, last_delivery).await
}

fn transient(message: String) -> Outcome {
    Outcome::Transient {
        attempt: 0,
        message,
    }
}

/// How one range's run ended (short of a failure).
enum RunEnd {
    Done,
    Handover,
}

/// Works on the ranges of `segment` until they are done or the deadline nears; the range that
/// finishes the last of the job's ranges completes the file.
pub async fn run_segment(
    deps: &Deps,
    job_id: &str,
    segment: u32,
    owner: &str,
    deadline: DateTime<Utc>,
    last_delivery: bool,
) -> Outcome {
    let (job, mine) = match take_runs(deps, job_id, segment, owner).await {
        Ok(taken) => taken,
        Err(outcome) => return outcome,
    };
    let export = match resolve(deps, &job) {
        Ok(e) => e,
        Err(Stop::Fatal(f)) => return fail_planned(deps, job_id, &f).await,
        Err(_) => return Outcome::UnknownJob,
    };
    let mut tasks = JoinSet::new();
    for &k in &mine {
        let (deps, job, export, owner) =
            (deps.clone(), job.clone(), export.clone(), owner.to_string());
        tasks.spawn(async move {
            (
                k,
                run_range(&deps, &job, &export, k, &owner, deadline).await,
            )
        });
    }
    let mut handed_over = Vec::new();
    let mut retry: Option<String> = None;
    while let Some(joined) = tasks.join_next().await {
        let (k, end) = match joined {
            Ok(r) => r,
            Err(e) => (
                usize::MAX,
                Err(Stop::Fatal(Failure::new(
                    "encode_failed",
                    "writing the file failed",
                    e,
                ))),
            ),
        };
        match end {
            Ok(RunEnd::Done) => {}
            Ok(RunEnd::Handover) => handed_over.push(k),
            Err(Stop::Transient(m)) => {
                retry.get_or_insert(m);
                handed_over.push(k);
            }
            Err(Stop::Handover) => handed_over.push(k),
            Err(Stop::LostLease) => {
                tasks.abort_all();
                return Outcome::LostLease;
            }
            Err(Stop::Fatal(f)) => {
                tasks.abort_all();
                return fail_planned(deps, job_id, &f).await;
            }
        }
    }
    if let Some(message) = retry {
        release_runs(deps, job_id, &handed_over, owner).await;
        if last_delivery {
            let f = Failure::new(
                "retries_exhausted",
                "the export failed on temporary errors and was stopped; request it again later",
                &message,
            );
            return match fail_planned(deps, job_id, &f).await {
                Outcome::Failed { code } => Outcome::Exhausted { code },
                other => other,
            };
        }
        return transient(message);
    }
    if !handed_over.is_empty() {
        release_runs(deps, job_id, &handed_over, owner).await;
        let cont = JobMessage {
            job_id: job_id.to_string(),
            kind: MessageKind::Continue,
            segment: Some(segment),
        };
        let rows = job.plan.as_ref().map_or(0, Plan::rows);
        return match deps.queue.enqueue(&cont).await {
            Ok(()) => Outcome::Continued { rows },
            Err(e) => transient(e.to_string()),
        };
    }
    finish_if_last(deps, job_id, owner, last_delivery).await
}

/// Leases the segment's ranges that are not done. `Err` is the message's outcome.
async fn take_runs(
    deps: &Deps,
    job_id: &str,
    segment: u32,
    owner: &str,
) -> Result<(Job, Vec<usize>), Outcome> {
    for attempt in 0..CONTENDED_WRITES {
        let mut job = match deps.jobs.get_job(job_id).await {
            Ok(Some(j)) => j,
            Ok(None) => return Err(Outcome::UnknownJob),
            Err(e) => return Err(transient(e.to_string())),
        };
        if job.status.is_terminal() {
            return Err(finished(deps, job, owner).await);
        }
        let now = deps.clock.now();
        let until = now + to_chrono(deps.config.worker.lease);
        let Some(plan) = job.plan.as_mut() else {
            return Err(Outcome::AlreadyFinished);
        };
        let mine: Vec<usize> = plan
            .runs_of(segment)
            .into_iter()
            .filter(|&k| !plan.runs[k].done)
            .collect();
        for &k in &mine {
            if let Some(until) = plan.runs[k].leased_by_other(owner, now) {
                return Err(Outcome::Busy { until });
            }
            plan.runs[k].lease = Some(Lease {
                owner: owner.to_string(),
                until,
            });
        }
        if mine.is_empty() {
            return Ok((job, mine));
        }
        match save(deps, &mut job).await {
            Ok(()) => return Ok((job, mine)),
            Err(PortError::Conflict(_)) => contended(job_id, attempt).await,
            Err(e) => return Err(transient(e.to_string())),
        }
    }
    Err(transient("the job record stayed contended".into()))
}

/// A short pause that differs per job and attempt, so contending writers spread out.
async fn contended(job_id: &str, attempt: u32) {
    let spread = job_id
        .bytes()
        .fold(attempt, |h, b| h.wrapping_mul(31) ^ b as u32)
        % 40;
    tokio::time::sleep(std::time::Duration::from_millis(5 + spread as u64)).await;
}

/// Writes range `k`'s state into the job record (its lease must still be ours) and the job's
/// progress summed over the ranges; returns the record as written.
async fn save_run(
    deps: &Deps,
    job_id: &str,
    k: usize,
    owner: &str,
    state: &RunState,
    watermark: Option<DateTime<Utc>>,
) -> Result<Job, Stop> {
    for attempt in 0..CONTENDED_WRITES {
        let mut job = deps.jobs.get_job(job_id).await?.ok_or(Stop::LostLease)?;
        if job.status.is_terminal() {
            return Err(Stop::LostLease);
        }
        let plan = job.plan.as_mut().ok_or(Stop::LostLease)?;
        let run = plan.runs.get_mut(k).ok_or(Stop::LostLease)?;
        if run.lease.as_ref().is_none_or(|l| l.owner != owner) {
            return Err(Stop::LostLease);
        }
        let lease = run.lease.clone();
        *run = RunState {
            lease,
            ..state.clone()
        };
        let (seen, pages, rcu, bytes) = plan.runs.iter().fold((0, 0, 0.0, 0), |a, r| {
            (
                a.0 + r.rows_seen,
                a.1 + r.pages,
                a.2 + r.read_capacity,
                a.3 + r.bytes(),
            )
        });
        job.record_page(seen, pages, rcu);
        job.bytes_written = bytes;
        job.watermark = job.watermark.max(watermark);
        match save(deps, &mut job).await {
            Ok(()) => return Ok(job),
            Err(PortError::Conflict(_)) => contended(job_id, attempt).await,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Stop::Transient("the job record stayed contended".into()))
}

async fn release_runs(deps: &Deps, job_id: &str, ks: &[usize], owner: &str) {
    for attempt in 0..CONTENDED_WRITES {
        let Ok(Some(mut job)) = deps.jobs.get_job(job_id).await else {
            return;
        };
        let Some(plan) = job.plan.as_mut() else {
            return;
        };
        for &k in ks {
            if let Some(run) = plan.runs.get_mut(k) {
                if run.lease.as_ref().is_some_and(|l| l.owner == owner) {
                    run.lease = None;
                }
            }
        }
        match save(deps, &mut job).await {
            Err(PortError::Conflict(_)) => contended(job_id, attempt).await,
            Ok(()) => return,
            Err(e) => {
                // The leases run out by themselves; the continuation then takes the ranges.
                tracing::warn!(job_id, error = %e, "could not release the ranges' leases");
                return;
            }
        }
    }
}

/// The query of range `k`: the job's own query narrowed to `[lower, upper)` of the split
/// attribute. `None` when the two do not overlap.
fn range_query(base: &SourceQuery, plan: &Plan, run: &RunState) -> Option<SourceQuery> {
    let upper = match &run.upper {
        Some(u) => Some(key_before(u)?),
        None => None,
    };
    let (index, from, to) = match &base.range {
        Some(r) => (r.index.clone(), r.from.clone(), r.to.clone()),
        None => (None, None, None),
    };
    let from = from.into_iter().chain(run.lower.clone()).max();
    let to = match (to, upper) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let (Some(f), Some(t)) = (&from, &to) {
        if f > t {
            return None;
        }
    }
    Some(SourceQuery {
        range: Some(RangeQuery {
            index,
            attribute: plan.attribute.clone(),
            from,
            to,
        }),
        ..base.clone()
    })
}

/// Range `k`'s loop: read, encode, and at each part's worth cut, place the bytes (held back as
/// the range's head, or uploaded into its block) and checkpoint; hand over right after a
/// checkpoint when the deadline nears; at the end hold back the tail and mark the range done.
async fn run_range(
    deps: &Deps,
    job: &Job,
    export: &ResolvedExport,
    k: usize,
    owner: &str,
    deadline: DateTime<Utc>,
) -> Result<RunEnd, Stop> {
    let plan = job.plan.as_ref().ok_or(Stop::LostLease)?;
    let mut committed = plan.runs.get(k).ok_or(Stop::LostLease)?.clone();
    let settings = deps.config.worker.clone();
    let query = job_query(
        export,
        job,
        &deps.config.source_table_prefix,
        settings.page_size,
    )
    .and_then(|base| range_query(&base, plan, &committed));
    let file = FileInfo {
        spec: &job.spec,
        created_at: job.created_at,
    };
    let mut encoder = encoder_for(
        file,
        export.columns.clone(),
        &deps.config.encode,
        committed.encoder.as_ref(),
    )?;
    let (interval, margin) = (
        to_chrono(settings.progress_interval),
        to_chrono(settings.deadline_margin),
    );
    let row_limit = export.dataset.row_limit;
    let mut live = committed.clone();
    let mut watermark = None;
    let mut last_progress = deps.clock.now();
    let exhausted = |r: &RunState| r.cursor.is_none() && r.pages > 0;
    if let Some(query) = query.filter(|_| !exhausted(&committed)) {
        loop {
            let page = deps
                .source
                .read_page(&query, live.cursor.as_deref())
                .await?;
            live.pages += 1;
            live.rows += page.rows.len() as u64;
            live.rows_seen = live.rows_seen.max(live.rows);
            live.read_capacity += page.read_capacity;
            live.cursor.clone_from(&page.next);
            encoder.write_rows(&page.rows)?;
            watermark = page_watermark(&page.rows).max(watermark);
            if live.rows > row_limit {
                return Err(over_limit(export, live.rows));
            }
            let now = deps.clock.now();
            let end = page.next.is_none();
            if encoder.buffered() >= settings.part_size {
                let cut = encoder.cut()?;
                place(deps, plan, k, &mut live, cut.bytes).await?;
                live.encoder = Some(cut.state);
                committed = live.clone();
                let saved = save_run(deps, &job.job_id, k, owner, &committed, watermark).await?;
                let total = saved.plan.as_ref().map_or(0, Plan::rows);
                if total > row_limit {
                    return Err(over_limit(export, total));
                }
                last_progress = now;
                if !end && now + margin >= deadline {
                    tracing::info!(job_id = %job.job_id, range = k, rows = live.rows,
                        "deadline near: handing the range over to a continuation");
                    return Ok(RunEnd::Handover);
                }
            } else if now - last_progress >= interval {
                let progress = RunState {
                    rows_seen: live.rows_seen,
                    ..committed.clone()
                };
                save_run(deps, &job.job_id, k, owner, &progress, watermark).await?;
                last_progress = now;
            }
            if end {
                break;
            }
        }
    }
    let cut = encoder.cut()?;
    if !cut.bytes.is_empty() {
        let key = piece_key(&plan.object_key, k, "tail");
        let size = cut.bytes.len() as u64;
        deps.files
            .put_object(&key, cut.bytes, "application/octet-stream")
            .await?;
        live.tail = Some(Piece { key, size });
    }
    live.encoder = Some(cut.state);
    live.cursor = None;
    live.done = true;
    save_run(deps, &job.job_id, k, owner, &live, watermark).await?;
    Ok(RunEnd::Done)
}

fn over_limit(export: &ResolvedExport, rows: u64) -> Stop {
    let ds = &export.dataset;
    Stop::Fatal(Failure::new(
        "row_limit_exceeded",
        format!(
            "the export has more than {} rows, the limit for `{}`; narrow it with filters or from/to",
            ds.row_limit, ds.name
        ),
        rows,
    ))
}

fn page_watermark(rows: &[crate::domain::Row]) -> Option<DateTime<Utc>> {
    rows.iter()
        .flatten()
        .filter_map(|v| match v {
            Value::Ts(t) => Some(*t),
            _ => None,
        })
        .max()
}

fn piece_key(object_key: &str, k: usize, which: &str) -> String {
    format!("{object_key}.ranges/{k}.{which}")
}

/// A cut's bytes: a later range's first cut is held back (it may have to join the tail of the
/// range before it); every other cut is a part of the range's block.
async fn place(
    deps: &Deps,
    plan: &Plan,
    k: usize,
    run: &mut RunState,
    bytes: Vec<u8>,
) -> Result<(), Stop> {
    let size = bytes.len() as u64;
    if k > 0 && run.head.is_none() {
        let key = piece_key(&plan.object_key, k, "head");
        deps.files
            .put_object(&key, bytes, "application/octet-stream")
            .await?;
        run.head = Some(Piece { key, size });
        return Ok(());
    }
    let number = run.first_part + 1 + run.parts.len() as i32;
    if number >= run.last_part {
        return Err(Stop::Fatal(Failure::new(
            "file_too_large",
            "the export is too large to be written in this many ranges; the operators have the details",
            format!("range {k} needs more than its {} parts", run.last_part - run.first_part - 1),
        )));
    }
    let etag = deps
        .files
        .upload_part(&plan.object_key, &plan.upload_id, number, bytes)
        .await?;
    run.parts.push(UploadedPart { number, etag, size });
    Ok(())
}

/// Completes the file when every range is done and no one else is completing it.
async fn finish_if_last(deps: &Deps, job_id: &str, owner: &str, last_delivery: bool) -> Outcome {
    let mut job = match deps.jobs.get_job(job_id).await {
        Ok(Some(j)) => j,
        Ok(None) => return Outcome::UnknownJob,
        Err(e) => return transient(e.to_string()),
    };
    let rows = job.plan.as_ref().map_or(0, Plan::rows);
    if job.status.is_terminal() {
        return finished(deps, job, owner).await;
    }
    if !job.plan.as_ref().is_some_and(Plan::all_done) {
        return Outcome::RangesDone { rows };
    }
    let now = deps.clock.now();
    if let Some(until) = job.leased_by_other(owner, now) {
        return Outcome::Busy { until };
    }
    job.lease(owner, now, now + to_chrono(deps.config.worker.lease), true);
    match save(deps, &mut job).await {
        Ok(()) => {}
        // Another range's worker saw the same and took it first.
        Err(PortError::Conflict(_)) => return Outcome::RangesDone { rows },
        Err(e) => return transient(e.to_string()),
    }
    let end = complete_planned(deps, &mut job).await;
    if end.is_ok() {
        if let Some(plan) = &job.plan {
            for piece in plan.pieces() {
                if let Err(e) = deps.files.delete_object(&piece.key).await {
                    // Under `exports/`, so the bucket's lifecycle rule removes it within a week.
                    tracing::warn!(key = %piece.key, error = %e, "could not delete a held piece");
                }
            }
        }
    }
    settle(deps, job, end, last_delivery).await
}

/// Stitches the held pieces into parts, completes the upload, and describes the file.
async fn complete_planned(
    deps: &Deps,
    job: &mut Job,
) -> Result<Box<crate::domain::CacheEntry>, Stop> {
    let export = resolve(deps, job)?;
    let mut plan = job.plan.clone().ok_or(Stop::LostLease)?;
    if plan.final_parts.is_empty() {
        let gzip = job.spec.format == Format::CsvGz;
        let mut slots = plan.layout();
        if gzip && !matches!(slots.last(), Some(Slot::Stitch { .. })) {
            let number = plan.runs.last().map_or(1, |r| r.last_part);
            slots.push(Slot::Stitch {
                number,
                pieces: Vec::new(),
            });
        }
        let last = slots.len() - 1;
        let mut parts = Vec::with_capacity(slots.len());
        for (i, slot) in slots.into_iter().enumerate() {
            match slot {
                Slot::Uploaded(p) => parts.push(p),
                Slot::Stitch { number, pieces } => {
                    let mut bytes = Vec::new();
                    for piece in &pieces {
                        bytes.extend(deps.files.get_object(&piece.key).await?);
                    }
                    if gzip && i == last {
                        bytes.extend_from_slice(&gzip_end(&plan));
                    }
                    let size = bytes.len() as u64;
                    let etag = deps
                        .files
                        .upload_part(&plan.object_key, &plan.upload_id, number, bytes)
                        .await?;
                    parts.push(UploadedPart { number, etag, size });
                }
            }
        }
        plan.final_parts = parts;
        job.plan = Some(plan.clone());
        save(deps, job).await?;
    }
    let mut file = FileInProgress::completed(
        plan.object_key.clone(),
        plan.upload_id.clone(),
        plan.final_parts.clone(),
        plan.rows(),
        job.pages_read,
        job.read_capacity,
    );
    record(deps, job, &export, &mut file).await
}

/// The gzip member's end: an empty final block, then CRC-32 and length of the whole text, from
/// the ranges' own CRCs and lengths.
fn gzip_end(plan: &Plan) -> Vec<u8> {
    let mut crc = crc32fast::Hasher::new();
    for run in &plan.runs {
        if let Some(EncoderState::Gzip { crc32, length }) = run.encoder {
            crc.combine(&crc32fast::Hasher::new_with_initial_len(crc32, length));
        }
    }
    let length = plan
        .runs
        .iter()
        .map(|r| match r.encoder {
            Some(EncoderState::Gzip { length, .. }) => length,
            _ => 0,
        })
        .sum::<u64>();
    let mut out = DEFLATE_END.to_vec();
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    // ISIZE is the length modulo 2^32 (RFC 1952).
    out.extend_from_slice(&(length as u32).to_le_bytes());
    out
}

/// Fails the job for good whatever the other ranges are writing: the upload is aborted, the
/// held pieces are left to the lifecycle rule.
async fn fail_planned(deps: &Deps, job_id: &str, failure: &Failure) -> Outcome {
    let code = Outcome::Failed {
        code: failure.code.into(),
    };
    for attempt in 0..CONTENDED_WRITES {
        match deps.jobs.get_job(job_id).await {
            // `fail_job` writes compare-and-set: another range may have written first.
            Ok(Some(job)) if !job.status.is_terminal() => fail_job(deps, job, failure).await,
            _ => return code,
        }
        contended(job_id, attempt).await;
    }
    code
}
