//! `Prefer: wait` and `POST /exports/refresh` over the in-memory fakes.

use std::time::Duration as StdDuration;

use chrono::Duration;

use super::export::{request_export, request_export_waiting, request_refresh, ExportAnswer};
use super::tests::{miss, orders, run_queue, setup, setup_with, who};
use crate::domain::catalog::{Catalog, BUILTIN_CATALOG};
use crate::domain::{HitKind, JobKind, JobStatus};

/// A caller that waits up to 10 s while the worker picks the message up a moment after the
/// request queued it.
async fn waiting_while_the_worker_runs(
    f: &crate::testing::Fakes,
    caller: &crate::domain::Identity,
    req: &crate::domain::RawExportRequest,
) -> Result<ExportAnswer, super::ServiceError> {
    let (answer, _) = tokio::join!(
        request_export_waiting(&f.deps, caller, req, StdDuration::from_secs(10)),
        async {
            tokio::time::sleep(StdDuration::from_millis(50)).await;
            run_queue(f).await
        }
    );
    answer
}

#[tokio::test]
async fn a_waiting_caller_gets_the_file_its_job_made_and_it_counts_as_a_miss() {
    let f = setup(30);
    let caller = who("acme");
    let req = orders(&[]);
    let answer = waiting_while_the_worker_runs(&f, &caller, &req)
        .await
        .unwrap();
    assert_eq!(answer.cache_result(), HitKind::Miss);
    let ExportAnswer::File {
        entry,
        waited,
        stale,
        ..
    } = answer
    else {
        panic!("expected the file, got {answer:?}")
    };
    assert!(waited && !stale);
    assert_eq!(entry.rows, 30);
    // The next caller hits the same entry without waiting.
    match request_export(&f.deps, &caller, &req).await.unwrap() {
        ExportAnswer::File {
            entry: hit,
            waited: false,
            ..
        } => assert_eq!(hit.job_id, entry.job_id),
        other => panic!("expected a hit, got {other:?}"),
    }
}

#[tokio::test]
async fn a_wait_that_runs_out_answers_with_the_job_as_it_stands() {
    let f = setup(30);
    let started = std::time::Instant::now();
    let answer = request_export_waiting(
        &f.deps,
        &who("acme"),
        &orders(&[]),
        StdDuration::from_millis(300),
    )
    .await
    .unwrap();
    assert!(started.elapsed() >= StdDuration::from_millis(300));
    match answer {
        ExportAnswer::Job { job, joined: false } => assert_eq!(job.status, JobStatus::Queued),
        other => panic!("expected the job, got {other:?}"),
    }
    assert_eq!(f.queue.drain().len(), 1, "waiting queued one job, no more");
}

#[tokio::test]
async fn a_waited_job_that_fails_answers_with_the_failed_job() {
    let small =
        Catalog::from_toml(&BUILTIN_CATALOG.replace("row_limit = 5000000", "row_limit = 25"))
            .unwrap();
    let f = setup_with(60, small);
    let caller = who("acme");
    let req = orders(&[]);
    match waiting_while_the_worker_runs(&f, &caller, &req)
        .await
        .unwrap()
    {
        ExportAnswer::Job { job, .. } => assert_eq!(job.status, JobStatus::Failed),
        other => panic!("expected the failed job, got {other:?}"),
    }
}

#[tokio::test]
async fn a_hit_does_not_wait() {
    let f = setup(10);
    miss(&f, "acme", &orders(&[])).await;
    run_queue(&f).await;
    let started = std::time::Instant::now();
    let answer = request_export_waiting(
        &f.deps,
        &who("acme"),
        &orders(&[]),
        StdDuration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(started.elapsed() < StdDuration::from_secs(5));
    assert_eq!(answer.cache_result(), HitKind::Hit);
}

#[tokio::test]
async fn refresh_of_a_fresh_entry_keeps_serving_the_old_file_until_the_new_one_lands() {
    let f = setup(20);
    let req = orders(&[]);
    let caller = who("acme");
    let first = miss(&f, "acme", &req).await;
    run_queue(&f).await;
    f.clock.advance(Duration::seconds(10));

    let ExportAnswer::Job { job, joined: false } =
        request_refresh(&f.deps, &caller, &req).await.unwrap()
    else {
        panic!("expected a new refresh job")
    };
    assert_eq!(job.kind, JobKind::Refresh);
    assert_ne!(job.job_id, first);
    // A second refresh, and a caller that accepts no staleness, join it.
    match request_refresh(&f.deps, &caller, &req).await.unwrap() {
        ExportAnswer::Job {
            job: j,
            joined: true,
        } => assert_eq!(j.job_id, job.job_id),
        other => panic!("expected to join the refresh, got {other:?}"),
    }
    // Meanwhile the fresh file is still served.
    match request_export(&f.deps, &caller, &req).await.unwrap() {
        ExportAnswer::File {
            entry,
            stale: false,
            ..
        } => assert_eq!(entry.job_id, first),
        other => panic!("expected the old file, got {other:?}"),
    }
    assert_eq!(
        f.queue.sent.lock().unwrap().len(),
        1,
        "one message for the refresh"
    );

    run_queue(&f).await;
    match request_export(&f.deps, &caller, &req).await.unwrap() {
        ExportAnswer::File { entry, .. } => assert_eq!(entry.job_id, job.job_id),
        other => panic!("expected the new file, got {other:?}"),
    }
}

#[tokio::test]
async fn refresh_of_a_missing_entry_builds_it() {
    let f = setup(8);
    let req = orders(&[("format", "csv.gz")]);
    let ExportAnswer::Job { job, joined: false } =
        request_refresh(&f.deps, &who("acme"), &req).await.unwrap()
    else {
        panic!("expected a job")
    };
    run_queue(&f).await;
    match request_export(&f.deps, &who("acme"), &req).await.unwrap() {
        ExportAnswer::File { entry, .. } => {
            assert_eq!(entry.job_id, job.job_id);
            assert_eq!(entry.rows, 8);
        }
        other => panic!("expected a hit, got {other:?}"),
    }
}

#[tokio::test]
async fn refresh_needs_the_read_scope_and_a_valid_request() {
    let f = setup(3);
    let mut caller = who("acme");
    assert!(
        request_refresh(&f.deps, &caller, &orders(&[("columns", "nope")]))
            .await
            .is_err()
    );
    caller.scopes.clear();
    assert!(request_refresh(&f.deps, &caller, &orders(&[]))
        .await
        .is_err());
    assert!(f.queue.drain().is_empty(), "nothing was queued");
}
