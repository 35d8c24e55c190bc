//! Incremental refresh of an append-only dataset (`orders`) over the in-memory fakes.

use super::cache_admin::{invalidate_scope, Scope};
use super::export::{request_export, request_refresh, ExportAnswer};
use super::status::job_for;
use super::tests::{order_rows, orders, run_queue, setup, who};
use crate::domain::{CacheEntry, Job, RawExportRequest};
use crate::testing::Fakes;

/// Adds orders past the current last one, as a shop taking new orders would.
fn append(f: &Fakes, tenant: &str, total: usize) {
    let mut rows = f.source.rows.lock().unwrap();
    let have = rows.get(tenant).map_or(0, Vec::len);
    let all = order_rows(total);
    rows.entry(tenant.into())
        .or_default()
        .extend(all[have..].iter().cloned());
}

async fn served(f: &Fakes, tenant: &str, req: &RawExportRequest) -> CacheEntry {
    match request_export(&f.deps, &who(tenant), req).await.unwrap() {
        ExportAnswer::File { entry, .. } => *entry,
        other => panic!("expected a file, got {other:?}"),
    }
}

fn bytes_of(f: &Fakes, entry: &CacheEntry) -> Vec<u8> {
    f.files.objects.lock().unwrap()[&entry.object_key].clone()
}

async fn refresh(f: &Fakes, tenant: &str, req: &RawExportRequest) -> Job {
    let ExportAnswer::Job { job, .. } = request_refresh(&f.deps, &who(tenant), req).await.unwrap()
    else {
        panic!("a refresh answers with its job")
    };
    run_queue(f).await;
    job_for(&f.deps, &who(tenant), &job.job_id).await.unwrap()
}

/// Builds `req` for acme from `before` rows, appends up to `after`, refreshes, and returns the
/// refresh job, acme's new file and globex's file read in full from the same `after` rows.
async fn extended(before: usize, after: usize, req: &RawExportRequest) -> (Job, Vec<u8>, Vec<u8>) {
    let f = setup(before);
    f.source.rows.lock().unwrap().remove("globex");
    request_export(&f.deps, &who("acme"), req).await.unwrap();
    run_queue(&f).await;
    let first = served(&f, "acme", req).await;
    assert_eq!(first.rows, before as u64);

    append(&f, "acme", after);
    append(&f, "globex", after);
    let job = refresh(&f, "acme", req).await;
    let new = served(&f, "acme", req).await;
    assert_eq!(new.job_id, job.job_id);
    assert_eq!(new.rows, after as u64);

    request_export(&f.deps, &who("globex"), req).await.unwrap();
    run_queue(&f).await;
    let full = served(&f, "globex", req).await;
    (job, bytes_of(&f, &new), bytes_of(&f, &full))
}

#[tokio::test]
async fn a_refresh_after_appends_reads_only_the_new_rows_into_the_file_a_full_read_makes() {
    for format in ["csv", "ndjson"] {
        let req = orders(&[("format", format)]);
        // 57 rows make a file of many 300-byte parts: the old bytes are copied as a part.
        let (job, extended, full) = extended(57, 70, &req).await;
        assert_eq!(job.rows_written, 70, "{format}");
        assert_eq!(job.pages_read, 2, "{format}: 13 new rows, pages of 10");
        assert_eq!(extended, full, "{format}: byte for byte a full read");
    }
}

#[tokio::test]
async fn a_previous_file_under_one_part_is_carried_into_the_first_part() {
    let req = orders(&[]);
    let (job, extended, full) = extended(1, 4, &req).await;
    assert_eq!(job.pages_read, 1);
    assert_eq!(extended, full);
    assert_eq!(
        String::from_utf8(extended).unwrap().matches("\r\n").count(),
        5
    );
}

#[tokio::test]
async fn a_refresh_with_nothing_new_copies_the_file_and_reads_nothing() {
    let req = orders(&[]);
    let (job, extended, full) = extended(40, 40, &req).await;
    assert_eq!(job.pages_read, 0);
    assert_eq!(job.rows_written, 40);
    assert_eq!(extended, full);
}

#[tokio::test]
async fn formats_that_cannot_be_extended_and_range_exports_read_everything() {
    for pairs in [
        vec![("format", "csv.gz")],
        vec![("format", "xlsx")],
        vec![("from", "2023-01-01T00:00:00Z")],
    ] {
        let req = orders(&pairs);
        let (job, _, _) = extended(45, 50, &req).await;
        assert_eq!(job.pages_read, 5, "{pairs:?}: all 50 rows, pages of 10");
        assert_eq!(job.rows_written, 50, "{pairs:?}");
    }
}

#[tokio::test]
async fn rows_appended_while_a_job_runs_wait_for_the_next_refresh() {
    let f = setup(30);
    let req = orders(&[]);
    request_export(&f.deps, &who("acme"), &req).await.unwrap();
    // The job fixes its last key when it starts; rows added after that are not half read.
    let msg = f.queue.drain().remove(0);
    let deadline = f.deps.clock.now() + chrono::Duration::minutes(15);
    let mut job = f.deps.jobs.get_job(&msg.job_id).await.unwrap().unwrap();
    assert!(super::append::prepare(&f.deps, &mut job).await.is_ok());
    assert_eq!(job.append.as_ref().unwrap().until, "ORD-000029");
    super::process::save(&f.deps, &mut job).await.unwrap();
    append(&f, "acme", 35);
    super::process::process_job(&f.deps, &msg, "w1", deadline, false).await;
    assert_eq!(served(&f, "acme", &req).await.rows, 30);
    let job = refresh(&f, "acme", &req).await;
    assert_eq!((job.rows_written, job.pages_read), (35, 1));
}

#[tokio::test]
async fn after_an_invalidation_or_a_day_the_refresh_reads_everything_again() {
    let f = setup(30);
    let req = orders(&[]);
    request_export(&f.deps, &who("acme"), &req).await.unwrap();
    run_queue(&f).await;
    append(&f, "acme", 33);
    invalidate_scope(&f.deps, &who("acme"), Scope::Tenant)
        .await
        .unwrap();
    let job = refresh(&f, "acme", &req).await;
    assert_eq!((job.rows_written, job.pages_read), (33, 4));

    append(&f, "acme", 36);
    f.clock.advance(chrono::Duration::hours(25));
    let job = refresh(&f, "acme", &req).await;
    assert_eq!(
        (job.rows_written, job.pages_read),
        (36, 4),
        "a day after the full read"
    );
    append(&f, "acme", 38);
    let job = refresh(&f, "acme", &req).await;
    assert_eq!(
        (job.rows_written, job.pages_read),
        (38, 1),
        "extending the new full read"
    );
}

#[tokio::test]
async fn a_worker_killed_at_any_step_of_an_extension_resumes_into_the_full_read_file() {
    use super::process::process_job;
    use super::tests::{far_deadline, fixed_fakes, uninterrupted, with_crashes};
    use crate::testing::crash_points;
    // Parts smaller than the previous file (copied), and larger (carried into the first part).
    for (format, part) in [("csv", 2_000), ("ndjson", 2_000), ("csv", 100_000)] {
        let req = orders(&[("format", format)]);
        let reference = uninterrupted(300, 10, part, format).await;
        for at in crash_points() {
            let mut f = fixed_fakes(250, 10, part);
            request_export(&f.deps, &who("acme"), &req).await.unwrap();
            run_queue(&f).await;
            append(&f, "acme", 300);
            let plan = with_crashes(&mut f);
            request_refresh(&f.deps, &who("acme"), &req).await.unwrap();
            let msg = f.queue.drain().remove(0);
            plan.arm(at);
            let first = plan
                .run(process_job(&f.deps, &msg, "w1", far_deadline(&f), false))
                .await;
            match first {
                None => {}
                // A step this extension never takes (one part only, say): nothing to resume.
                Some(super::process::Outcome::Succeeded { .. }) if part > 10_000 => continue,
                Some(other) => panic!("{format} {at:?}: did not crash: {other:?}"),
            }
            f.clock.advance(chrono::Duration::seconds(
                f.deps.config.worker.lease.as_secs() as i64 + 1,
            ));
            process_job(&f.deps, &msg, "w2", far_deadline(&f), false).await;
            let entry = served(&f, "acme", &req).await;
            assert_eq!(entry.rows, 300, "{format} {at:?}");
            assert!(
                bytes_of(&f, &entry) == reference,
                "{format} {at:?}: the resumed extension differs from a full read"
            );
            let job = job_for(&f.deps, &who("acme"), &msg.job_id).await.unwrap();
            assert!(
                job.pages_read <= 10,
                "{format} {at:?}: read {} pages",
                job.pages_read
            );
        }
    }
}

fn stream_change(seq: &str, tenant: &str, rewrite: bool) -> super::invalidate::SourceChange {
    super::invalidate::SourceChange {
        sequence_number: seq.into(),
        stream_arn:
            "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2026-12-07T00:00:00.000"
                .into(),
        attributes: std::collections::HashMap::from([(
            "tenant_id".to_string(),
            tenant.to_string(),
        )]),
        rewrite,
    }
}

#[tokio::test]
async fn an_insert_seen_on_the_stream_makes_the_next_file_an_extension_and_an_update_a_full_read() {
    use super::invalidate::invalidate;
    let f = setup(30);
    let req = orders(&[]);
    request_export(&f.deps, &who("acme"), &req).await.unwrap();
    run_queue(&f).await;

    // New orders: the entry is no longer current, and the next file extends the old one.
    append(&f, "acme", 33);
    invalidate(
        &f.deps,
        &[stream_change("1", "acme", false)],
        f.deps.clock.now(),
    )
    .await;
    let ExportAnswer::Job { job, .. } = request_export(&f.deps, &who("acme"), &req).await.unwrap()
    else {
        panic!("an insert makes the next request miss")
    };
    run_queue(&f).await;
    let job = job_for(&f.deps, &who("acme"), &job.job_id).await.unwrap();
    assert_eq!((job.rows_written, job.pages_read), (33, 1));

    // An order changed: the next file is read in full, past the debounce window.
    f.clock.advance(chrono::Duration::minutes(5));
    invalidate(
        &f.deps,
        &[stream_change("2", "acme", true)],
        f.deps.clock.now(),
    )
    .await;
    let ExportAnswer::Job { job, .. } = request_export(&f.deps, &who("acme"), &req).await.unwrap()
    else {
        panic!("an update makes the next request miss")
    };
    run_queue(&f).await;
    let job = job_for(&f.deps, &who("acme"), &job.job_id).await.unwrap();
    assert_eq!((job.rows_written, job.pages_read), (33, 4), "read in full");

    // Inserts again: extensions of that full read.
    append(&f, "acme", 36);
    f.clock.advance(chrono::Duration::minutes(5));
    invalidate(
        &f.deps,
        &[stream_change("3", "acme", false)],
        f.deps.clock.now(),
    )
    .await;
    let job = refresh(&f, "acme", &req).await;
    assert_eq!((job.rows_written, job.pages_read), (36, 1));
}
