//! A job read as key ranges (in one worker, and fanned out over several invocations) writes the
//! same file as a sequential read: byte for byte in csv, the same text in one valid gzip member
//! in csv.gz. Real S3 multipart uploads and DynamoDB checkpoints in the emulator, segment messages
//! through the real queue; rows from an in-memory source that honours key ranges.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use integration_tests::{noisy_orders, start_export, Stack};
use shared::domain::{JobMessage, JobStatus};
use shared::services::process::{process_job, Outcome};
use shared::testing::{CrashAt, CrashPlan, CrashingFiles, MemorySource};

/// About 40 MB of csv: three ranges of about 13 MB each cut two 5 MiB parts and a tail, so the
/// file has held heads and tails on both sides of every range boundary.
const ROWS: usize = 100_000;

async fn miss(stack: &Stack, tenant: &str, format: &str) -> JobMessage {
    *stack.clock.0.lock().unwrap() = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
    start_export(stack, tenant, &[("format", format)]).await
}

fn configure(stack: &mut Stack, ranges: u32, fan_out_rows: u64, segments: u32) {
    let mut config = (*stack.deps.config).clone();
    config.worker.ranges = ranges;
    config.worker.fan_out_rows = fan_out_rows;
    config.worker.fan_out_segments = segments;
    stack.deps.config = Arc::new(config);
}

/// Runs the job's message, then every message it queued (continuations, segments), and returns
/// the finished file.
/// `first` says how the job's own message must end: done, handed over, or its segment done
/// while others are queued.
async fn export(
    stack: &Stack,
    msg: &JobMessage,
    deadline_in: Duration,
    first: fn(&Outcome) -> bool,
) -> Vec<u8> {
    let deadline = stack.deps.clock.now() + deadline_in;
    let outcome = process_job(&stack.deps, msg, "w0", deadline, false).await;
    assert!(first(&outcome), "{outcome:?}");
    stack.run_worker().await;
    let job = stack.deps.jobs.get_job(&msg.job_id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(job.rows_written, ROWS as u64);
    assert!(job.plan.is_none(), "a finished job keeps no plan");
    let key = job.object_key.unwrap();
    let bytes = stack.read_object(&key).await;
    assert_eq!(bytes.len() as u64, job.bytes_written);
    let (_, digest) = stack.deps.files.digest(&key).await.unwrap();
    assert_eq!(
        Some(digest),
        job.sha256,
        "the entry's checksum is the file's"
    );
    bytes
}

/// The held pieces are gone once the file is complete.
async fn no_pieces_left(stack: &Stack) {
    let left: Vec<String> = stack
        .object_keys()
        .await
        .into_iter()
        .filter(|k| k.contains(".ranges/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn gunzip_one_member(bytes: &[u8]) -> Vec<u8> {
    // `GzDecoder` reads one member only: the whole text from it proves the file is one member.
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut text)
        .unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_and_segments_write_the_sequential_file() {
    let mut stack = Stack::new(
        0,
        &[
            ("PART_SIZE_BYTES", "5242880"),
            ("PROGRESS_INTERVAL_SECONDS", "1"),
            ("DEADLINE_MARGIN_SECONDS", "60"),
        ],
    )
    .await;
    let tenants: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
    let source = Arc::new(MemorySource {
        page_rows: 1000,
        ..MemorySource::default()
    });
    {
        let data = noisy_orders(ROWS);
        let mut by_tenant = source.rows.lock().unwrap();
        for t in &tenants {
            by_tenant.insert(t.clone(), data.clone());
        }
    }
    stack.deps.source = source;
    let far = Duration::minutes(15);
    let mut tenant = tenants.iter();

    let done = |o: &Outcome| matches!(o, Outcome::Succeeded { .. });
    configure(&mut stack, 1, 0, 1);
    let csv = export(
        &stack,
        &miss(&stack, tenant.next().unwrap(), "csv").await,
        far,
        done,
    )
    .await;
    let msg = miss(&stack, tenant.next().unwrap(), "csv.gz").await;
    let gz = export(&stack, &msg, far, done).await;
    let text = gunzip_one_member(&gz);
    assert_eq!(text, csv, "csv.gz holds the csv");
    assert!(
        csv.len() > 30 << 20,
        "{} bytes is too little to test",
        csv.len()
    );

    // Three ranges in one worker.
    configure(&mut stack, 3, 0, 1);
    let msg = miss(&stack, tenant.next().unwrap(), "csv").await;
    assert!(
        export(&stack, &msg, far, done).await == csv,
        "3 ranges: csv differs"
    );
    no_pieces_left(&stack).await;

    // Three ranges whose worker runs out of time at every part: each range hands over to a
    // continuation at each of its checkpoints and goes on from there.
    let msg = miss(&stack, tenant.next().unwrap(), "csv").await;
    assert!(
        export(&stack, &msg, Duration::seconds(30), |o| {
            matches!(o, Outcome::Continued { .. })
        })
        .await
            == csv,
        "3 ranges with hand-overs: csv differs"
    );

    // Fanned out: three segments of two ranges each, through the queue.
    configure(&mut stack, 2, 1, 3);
    let msg = miss(&stack, tenant.next().unwrap(), "csv").await;
    let mut job = stack.deps.jobs.get_job(&msg.job_id).await.unwrap().unwrap();
    job.rows_total = Some(ROWS as u64);
    job.version += 1;
    stack.deps.jobs.put_job(&job).await.unwrap();
    let segment_done = |o: &Outcome| matches!(o, Outcome::RangesDone { .. });
    assert!(
        export(&stack, &msg, far, segment_done).await == csv,
        "fan-out: csv differs"
    );
    no_pieces_left(&stack).await;

    // csv.gz: one valid member with the same text, and the same bytes whenever the plan is the
    // same.
    configure(&mut stack, 3, 0, 1);
    let a = miss(&stack, tenant.next().unwrap(), "csv.gz").await;
    let a = export(&stack, &a, far, done).await;
    let b = miss(&stack, tenant.next().unwrap(), "csv.gz").await;
    let b = export(&stack, &b, far, done).await;
    assert!(
        a != gz,
        "csv.gz in ranges cannot be the sequential bytes (fresh deflate per range)"
    );
    assert!(
        gunzip_one_member(&a) == csv,
        "3 ranges: csv.gz text differs"
    );
    assert!(a == b, "the same plan wrote different csv.gz bytes");
    no_pieces_left(&stack).await;
}

/// A segment killed mid-way resumes from its own last checkpoint, reading only its own rows
/// again; the others are not touched, and the file is the sequential one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_segment_resumes_alone() {
    let mut stack = Stack::new(0, &[("PART_SIZE_BYTES", "5242880")]).await;
    let source = Arc::new(MemorySource {
        page_rows: 1000,
        ..MemorySource::default()
    });
    {
        let data = noisy_orders(ROWS);
        let mut by_tenant = source.rows.lock().unwrap();
        for t in ["k0", "k1"] {
            by_tenant.insert(t.into(), data.clone());
        }
    }
    stack.deps.source = source.clone();
    let crash = Arc::new(CrashPlan::default());
    stack.deps.files = Arc::new(CrashingFiles {
        inner: stack.deps.files.clone(),
        plan: crash.clone(),
    });
    let far = Duration::minutes(15);
    let done = |o: &Outcome| matches!(o, Outcome::Succeeded { .. });
    configure(&mut stack, 1, 0, 1);
    let csv = export(&stack, &miss(&stack, "k0", "csv").await, far, done).await;

    configure(&mut stack, 1, 1, 3);
    let msg = miss(&stack, "k1", "csv").await;
    let mut job = stack.deps.jobs.get_job(&msg.job_id).await.unwrap().unwrap();
    job.rows_total = Some(ROWS as u64);
    job.version += 1;
    stack.deps.jobs.put_job(&job).await.unwrap();
    let deadline = stack.deps.clock.now() + far;
    let first = process_job(&stack.deps, &msg, "w0", deadline, false).await;
    assert!(matches!(first, Outcome::RangesDone { .. }), "{first:?}");

    // Segment 1 dies right after uploading its first own part, before checkpointing it.
    let segment = JobMessage {
        segment: Some(1),
        ..msg.clone()
    };
    crash.arm(CrashAt {
        op: "upload_part",
        nth: 1,
        after: true,
    });
    let killed = crash
        .run(process_job(&stack.deps, &segment, "w1", deadline, false))
        .await;
    assert!(killed.is_none(), "did not crash: {killed:?}");
    let job = stack.deps.jobs.get_job(&msg.job_id).await.unwrap().unwrap();
    let plan = job.plan.clone().unwrap();
    let (at_crash, checkpointed) = (plan.runs[1].pages, plan.runs[1].head.is_some());
    assert!(checkpointed && !plan.runs[1].done, "{:?}", plan.runs[1]);
    assert!(plan.runs[0].done && !plan.runs[2].done);

    // Redelivered once the dead worker's lease ran out: it reads on from its checkpoint.
    stack.clock.advance(Duration::seconds(
        stack.deps.config.worker.lease.as_secs() as i64 + 1,
    ));
    let before = *source.pages_read.lock().unwrap();
    let deadline = stack.deps.clock.now() + far;
    let again = process_job(&stack.deps, &segment, "w2", deadline, false).await;
    assert!(matches!(again, Outcome::RangesDone { .. }), "{again:?}");
    let job = stack.deps.jobs.get_job(&msg.job_id).await.unwrap().unwrap();
    let run = &job.plan.as_ref().unwrap().runs[1];
    let read_again = *source.pages_read.lock().unwrap() - before;
    assert_eq!(
        read_again,
        run.pages - at_crash,
        "only the segment's rows after its checkpoint"
    );
    assert!(
        !job.plan.as_ref().unwrap().runs[2].done,
        "segment 2 untouched"
    );

    stack.run_worker().await;
    let job = stack.deps.jobs.get_job(&msg.job_id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let bytes = stack.read_object(&job.object_key.unwrap()).await;
    assert!(bytes == csv, "the file after a killed segment differs");
}

/// The real source on the emulator: key ranges through the table's sort key and through the
/// range index (`from`/`to`) read exactly the sequential rows, split points and the 1 KiB key
/// bound included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dynamodb_source_reads_ranges_exactly() {
    let mut stack = Stack::new(400, &[]).await;
    let far = Duration::minutes(15);
    let done = |o: &Outcome| matches!(o, Outcome::Succeeded { .. });
    // Rows 40 to 359 by creation time (37 s apart from 2024-01-01T00:00:00Z).
    let ranged = [
        ("format", "csv"),
        ("from", "2024-01-01T00:24:40Z"),
        ("to", "2024-01-01T03:41:23Z"),
    ];
    for (i, query) in [&[("format", "csv")][..], &ranged[..]]
        .into_iter()
        .enumerate()
    {
        configure(&mut stack, 1, 0, 1);
        let msg = start_export(&stack, "acme", query).await;
        let sequential = export_rows(&stack, &msg, far, done, i).await;
        configure(&mut stack, 4, 0, 1);
        // A new generation: the same request misses again.
        stack
            .deps
            .generations
            .bump_generation("acme", None)
            .await
            .unwrap();
        let msg = start_export(&stack, "acme", query).await;
        let ranges = export_rows(&stack, &msg, far, done, i).await;
        assert!(
            ranges == sequential,
            "query {i}: {} bytes in ranges, {} sequential",
            ranges.len(),
            sequential.len()
        );
    }
}

/// The file of a job over the real source, whose row count is 400 or, for the ranged query, 320.
async fn export_rows(
    stack: &Stack,
    msg: &JobMessage,
    far: Duration,
    first: fn(&Outcome) -> bool,
    query: usize,
) -> Vec<u8> {
    let deadline = stack.deps.clock.now() + far;
    let outcome = process_job(&stack.deps, msg, "w0", deadline, false).await;
    assert!(first(&outcome), "{outcome:?}");
    let job = stack.deps.jobs.get_job(&msg.job_id).await.unwrap().unwrap();
    assert_eq!(job.rows_written, [400, 320][query], "{job:?}");
    // One 1 MB page holds them all; each key range is a Query of its own.
    let ranges = stack.deps.config.worker.ranges as u64;
    assert_eq!(job.pages_read, ranges, "{job:?}");
    stack.read_object(&job.object_key.unwrap()).await
}
