//! Append-only datasets (`append_only` in the catalog): a file holds the rows up to a sort key
//! fixed when its job starts, and a later build of the same export, when only rows past that key
//! can have come since, extends the previous file instead of reading everything again: the old
//! object's bytes are copied inside S3 as the first parts (`UploadPartCopy`; a file under one part
//! is read back and carried into the first part instead), and only the new rows are read and
//! encoded after them. Rows come in sort-key order, so the result is byte for byte the file a
//! full read makes.
//!
//! Plain text only (csv, ndjson): a csv.gz member's deflate blocks follow the parts and pages
//! they were cut at, so an extended member would decompress to the same text but differ in its
//! bytes from a full rebuild; an XLSX file ends in a ZIP directory and closes its sheet's XML,
//! and its sheets roll over by row count. Those formats, exports with `from`/`to` (read in range
//! order, not key order) and a file invalidated since by hand are rebuilt in full.

use chrono::Duration;

use super::process::{source_query, Failure, Stop};
use super::{Deps, KEEP_RECORDS_FOR_DAYS};
use crate::domain::plan::key_after;
use crate::domain::{AppendRead, BaseFile, Format, Job, ResolvedExport};
use crate::ports::{RangeQuery, SourceQuery};

/// How long extensions may build on one full read.
const FULL_READ_EVERY: Duration = Duration::days(1);

/// Fixes the key the job's file ends at and, when the previous file can be extended, names it.
/// Runs once, before anything is read or uploaded; the job records the result.
pub(super) async fn prepare(deps: &Deps, job: &mut Job) -> Result<(), Stop> {
    let export = deps
        .catalog
        .resolve(&job.spec)
        .map_err(|e| Stop::Fatal(Failure::new("dataset_unknown", e.to_string(), &e)))?;
    if export.dataset.append_only.is_none() || job.spec.from.is_some() || job.spec.to.is_some() {
        return Ok(());
    }
    let query = source_query(&export, &job.tenant, &deps.config.source_table_prefix, None);
    let Some((_, until)) = deps
        .source
        .key_bounds(&query, &export.dataset.sort_attribute)
        .await?
    else {
        // No rows yet: nothing to fix, and nothing to extend later.
        return Ok(());
    };
    let base = base_file(deps, job, &until).await?;
    if let Some(b) = &base {
        tracing::info!(job_id = %job.job_id, base_job = %b.job_id, base_rows = b.rows,
            after = %b.last_key, %until, "extending the previous file with the rows past its last key");
    }
    job.append = Some(AppendRead { until, base });
    Ok(())
}

/// The previous file of the job's key, if this build may extend it.
async fn base_file(deps: &Deps, job: &Job, until: &str) -> Result<Option<BaseFile>, Stop> {
    if !matches!(job.spec.format, Format::Csv | Format::Ndjson) {
        return Ok(None);
    }
    let found = deps
        .entries
        .find(
            &job.tenant,
            &job.user,
            &job.spec.dataset,
            &job.cache_key,
            deps.clock.now(),
        )
        .await?;
    let Some(entry) = found.entry else {
        return Ok(None);
    };
    let Some(last_key) = entry.append_key.clone() else {
        return Ok(None);
    };
    // Invalidated by hand since: whoever did it wants everything read again.
    let invalidated = entry.generation.tenant != job.generation.tenant
        || entry.generation.user != job.generation.user;
    // Keys went backwards: rows were removed, so the dataset is not append-only after all.
    let shrunk = last_key.as_str() > until;
    // The bucket keeps files KEEP_RECORDS_FOR_DAYS after they were written; one near that age
    // may be gone before the copy, so it is rebuilt instead.
    let now = deps.clock.now();
    let ageing = now >= entry.created_at + Duration::days(KEEP_RECORDS_FOR_DAYS - 1);
    // A change no stream reported (none is wired up, or one was lost) would live on in every
    // extension; a full read at least once a day bounds how long.
    let since = entry.append_since.unwrap_or(entry.created_at);
    let due_in_full = now >= since + FULL_READ_EVERY;
    if invalidated || shrunk || ageing || due_in_full || key_after(&last_key).is_none() {
        return Ok(None);
    }
    // A row it holds was changed or removed since (the invalidator saw it on the stream).
    let rewritten = deps
        .generations
        .dataset_generation(&job.tenant, &job.spec.dataset)
        .await?
        .rewritten;
    if entry.generation.dataset < rewritten {
        return Ok(None);
    }
    Ok(Some(BaseFile {
        object_key: entry.object_key,
        bytes: entry.bytes,
        rows: entry.rows,
        last_key,
        job_id: entry.job_id,
        since,
    }))
}

/// The job's query narrowed to its key bounds: up to `until`, and past the previous file's last
/// key when it extends one. `None` when an extension has no new rows to read.
pub(super) fn narrow(
    export: &ResolvedExport,
    query: SourceQuery,
    append: &AppendRead,
) -> Option<SourceQuery> {
    let from = match &append.base {
        Some(b) => Some(key_after(&b.last_key)?),
        None => None,
    };
    if from.as_ref().is_some_and(|f| *f > append.until) {
        return None;
    }
    Some(SourceQuery {
        range: Some(RangeQuery {
            index: None,
            attribute: export.dataset.sort_attribute.clone(),
            from,
            to: Some(append.until.clone()),
        }),
        ..query
    })
}
