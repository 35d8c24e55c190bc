//! Every format resumes against the emulator: real S3 multipart uploads and real DynamoDB
//! checkpoints, with the worker killed at each step of a run (a crash drops the run's future where
//! it stands, as a killed process would). Rows come from an in-memory source, fast enough to make
//! files of several 5 MiB parts (S3's minimum) in seconds; the source is not what is under test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use integration_tests::{noisy_orders as rows, Stack};
use shared::domain::identity::SCOPE_READ;
use shared::domain::{Identity, JobMessage, JobStatus, MessageKind, RawExportRequest};
use shared::services::export::{request_export, ExportAnswer};
use shared::services::process::{process_job, Outcome};
use shared::testing::{crash_points, CrashPlan, CrashingFiles, HookedJobs, MemorySource};

const ROWS: usize = 40_000;

fn who(tenant: &str) -> Identity {
    Identity {
        tenant: tenant.into(),
        user: "alice".into(),
        scopes: BTreeSet::from([SCOPE_READ.to_string()]),
    }
}

fn request(format: &str) -> RawExportRequest {
    RawExportRequest::from_query("orders", vec![("format".into(), format.into())])
}

/// Starts the export of `format` for `tenant` at a fixed instant (so every job writes the same
/// bytes, the XLSX creation time included) and returns its message.
async fn miss(stack: &Stack, tenant: &str, format: &str) -> JobMessage {
    *stack.clock.0.lock().unwrap() = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
    match request_export(&stack.deps, &who(tenant), &request(format))
        .await
        .unwrap()
    {
        ExportAnswer::Job { job, .. } => JobMessage {
            job_id: job.job_id,
            kind: MessageKind::Export,
            segment: None,
        },
        other => panic!("expected a miss, got {other:?}"),
    }
}

fn far(stack: &Stack) -> chrono::DateTime<Utc> {
    stack.deps.clock.now() + Duration::minutes(15)
}

async fn finished_sha(stack: &Stack, job_id: &str) -> String {
    let job = stack.deps.jobs.get_job(job_id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let key = job.object_key.clone().unwrap();
    let (size, digest) = stack.deps.files.digest(&key).await.unwrap();
    assert_eq!(size, job.bytes_written);
    assert_eq!(
        Some(&digest),
        job.sha256.as_ref(),
        "the entry's checksum is the file's"
    );
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_survives_a_worker_killed_at_each_step_with_the_identical_file() {
    let mut stack = Stack::new(
        0,
        &[
            ("PART_SIZE_BYTES", "5242880"),
            ("PROGRESS_INTERVAL_SECONDS", "3600"),
        ],
    )
    .await;
    let tenants: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
    let source = Arc::new(MemorySource {
        page_rows: 1000,
        ..MemorySource::default()
    });
    {
        let data = rows(ROWS);
        let mut by_tenant = source.rows.lock().unwrap();
        for t in &tenants {
            by_tenant.insert(t.clone(), data.clone());
        }
    }
    stack.deps.source = source;
    let plan = Arc::new(CrashPlan::default());
    stack.deps.files = Arc::new(CrashingFiles {
        inner: stack.deps.files.clone(),
        plan: plan.clone(),
    });
    stack.deps.jobs = Arc::new(HookedJobs {
        inner: stack.deps.jobs.clone(),
        hook: plan.clone(),
    });

    let mut tenant = tenants.iter();
    for format in ["csv", "csv.gz", "xlsx", "ndjson"] {
        let reference = miss(&stack, tenant.next().unwrap(), format).await;
        let outcome = process_job(&stack.deps, &reference, "ref", far(&stack), false).await;
        assert!(
            matches!(outcome, Outcome::Succeeded { .. }),
            "{format}: {outcome:?}"
        );
        let job = stack
            .deps
            .jobs
            .get_job(&reference.job_id)
            .await
            .unwrap()
            .unwrap();
        assert!(
            job.bytes_written > 5 << 20,
            "{format}: {} bytes is one part; the test needs two",
            job.bytes_written
        );
        let want = finished_sha(&stack, &reference.job_id).await;

        for at in crash_points() {
            let msg = miss(&stack, tenant.next().unwrap(), format).await;
            plan.arm(at);
            let first = plan
                .run(process_job(&stack.deps, &msg, "w1", far(&stack), false))
                .await;
            assert!(first.is_none(), "{format} {at:?}: did not crash: {first:?}");
            // Redelivered once the dead worker's lease ran out.
            stack.clock.advance(Duration::seconds(
                stack.deps.config.worker.lease.as_secs() as i64 + 1,
            ));
            let second = process_job(&stack.deps, &msg, "w2", far(&stack), false).await;
            assert!(
                matches!(second, Outcome::Succeeded { rows, .. } if rows == ROWS as u64),
                "{format} {at:?}: {second:?}"
            );
            assert_eq!(
                finished_sha(&stack, &msg.job_id).await,
                want,
                "{format} {at:?}: the resumed file differs"
            );
        }
    }
    plan.disarm();
}
