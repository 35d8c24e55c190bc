//! Completion events over the fakes: one per finished job, whatever happens to its messages.

use std::sync::Arc;

use chrono::Duration;

use super::process::{process_job, Outcome};
use super::status::job_for;
use super::tests::{far_deadline, miss, orders, run_queue, setup, setup_with, who};
use crate::domain::catalog::{Catalog, BUILTIN_CATALOG};
use crate::domain::{Job, JobKind, JobStatus};
use crate::testing::{CrashAt, CrashPlan, Fakes, HookedJobs};

fn stored(f: &Fakes, job_id: &str) -> Job {
    f.meta.jobs.lock().unwrap()[job_id].clone()
}

#[tokio::test]
async fn a_succeeded_job_announces_itself_once_even_when_its_message_comes_again() {
    let f = setup(40);
    let job_id = miss(&f, "acme", &orders(&[("format", "ndjson")])).await;
    let msg = f.queue.drain().remove(0);
    f.queue.sent.lock().unwrap().push(msg.clone());
    let outcomes = run_queue(&f).await;
    assert!(
        matches!(outcomes[..], [Outcome::Succeeded { rows: 40, .. }]),
        "{outcomes:?}"
    );

    let sent = f.events.sent();
    assert_eq!(sent.len(), 1);
    let ev = &sent[0];
    assert_eq!(ev.detail_type(), "Export Succeeded");
    let job = stored(&f, &job_id);
    assert_eq!(
        (
            ev.tenant.as_str(),
            ev.dataset.as_str(),
            ev.job_id.as_str(),
            ev.format.as_str()
        ),
        ("acme", "orders", job_id.as_str(), "ndjson")
    );
    assert_eq!(
        (ev.kind, ev.status),
        (JobKind::Export, JobStatus::Succeeded)
    );
    assert_eq!((ev.rows, ev.bytes), (40, job.bytes_written));
    assert!(ev.bytes > 0);
    assert_eq!(ev.error_code, None);
    assert_eq!(Some(ev.finished_at), job.finished_at);
    assert!(job.notified && job.lease.is_none(), "{job:?}");

    // Redelivered, late, by another worker: nothing more goes out.
    for owner in ["w1", "w2"] {
        assert_eq!(
            process_job(&f.deps, &msg, owner, far_deadline(&f), false).await,
            Outcome::AlreadyFinished
        );
    }
    assert_eq!(f.events.sent().len(), 1);
}

#[tokio::test]
async fn a_failed_job_announces_export_failed_with_its_error_code() {
    let small =
        Catalog::from_toml(&BUILTIN_CATALOG.replace("row_limit = 5000000", "row_limit = 25"))
            .unwrap();
    let f = setup_with(60, small);
    let job_id = miss(&f, "acme", &orders(&[])).await;
    run_queue(&f).await;
    let sent = f.events.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].detail_type(), "Export Failed");
    assert_eq!(sent[0].job_id, job_id);
    assert_eq!(sent[0].status, JobStatus::Failed);
    assert_eq!(sent[0].error_code.as_deref(), Some("row_limit_exceeded"));
    assert_eq!((sent[0].rows, sent[0].bytes), (0, 0));
    assert!(stored(&f, &job_id).notified);
}

#[tokio::test]
async fn a_refused_event_never_fails_the_job_and_goes_out_when_its_message_comes_back() {
    let f = setup(40);
    let job_id = miss(&f, "acme", &orders(&[])).await;
    *f.events.refuse.lock().unwrap() = 1;
    let outcomes = run_queue(&f).await;
    assert!(
        matches!(outcomes[..], [Outcome::Succeeded { .. }]),
        "{outcomes:?}"
    );
    assert!(f.events.sent().is_empty());
    let job = job_for(&f.deps, &who("acme"), &job_id).await.unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "the job stands");
    let job = stored(&f, &job_id);
    assert!(!job.notified && job.lease.is_none(), "{job:?}");

    // The worker queued the job's message again, delayed, to send the event then.
    let delayed = std::mem::take(&mut *f.queue.delayed.lock().unwrap());
    assert_eq!(delayed.len(), 1);
    let (msg, _) = &delayed[0];
    assert_eq!(msg.job_id, job_id);
    assert_eq!(
        process_job(&f.deps, msg, "w2", far_deadline(&f), false).await,
        Outcome::AlreadyFinished
    );
    let sent = f.events.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].detail_type(), "Export Succeeded");
    assert!(stored(&f, &job_id).notified);
    assert_eq!(
        process_job(&f.deps, msg, "w3", far_deadline(&f), false).await,
        Outcome::AlreadyFinished
    );
    assert_eq!(f.events.sent().len(), 1);
}

#[tokio::test]
async fn a_redelivery_that_cannot_send_the_event_either_is_retried() {
    let f = setup(10);
    let job_id = miss(&f, "acme", &orders(&[])).await;
    let msg = f.queue.drain().remove(0);
    *f.events.refuse.lock().unwrap() = 2;
    let first = process_job(&f.deps, &msg, "w1", far_deadline(&f), false).await;
    assert!(matches!(first, Outcome::Succeeded { .. }), "{first:?}");
    let again = process_job(&f.deps, &msg, "w2", far_deadline(&f), false).await;
    assert!(matches!(again, Outcome::Transient { .. }), "{again:?}");
    assert!(!stored(&f, &job_id).notified);
    assert_eq!(
        process_job(&f.deps, &msg, "w2", far_deadline(&f), false).await,
        Outcome::AlreadyFinished
    );
    assert_eq!(f.events.sent().len(), 1);
}

#[tokio::test]
async fn a_worker_killed_after_the_terminal_write_leaves_the_event_to_the_redelivery() {
    let mut f = setup(40);
    let plan = Arc::new(CrashPlan::default());
    f.deps.jobs = Arc::new(HookedJobs {
        inner: f.meta.clone(),
        hook: plan.clone(),
    });
    let job_id = miss(&f, "acme", &orders(&[])).await;
    let msg = f.queue.drain().remove(0);
    plan.arm(CrashAt {
        op: "complete_job",
        nth: 1,
        after: true,
    });
    let first = plan
        .run(process_job(&f.deps, &msg, "w1", far_deadline(&f), false))
        .await;
    assert!(first.is_none(), "did not crash: {first:?}");
    let job = stored(&f, &job_id);
    assert_eq!(job.status, JobStatus::Succeeded);
    assert!(!job.notified);
    assert!(f.events.sent().is_empty());

    // While the dead worker's lease runs, a duplicate leaves the event to it and comes back.
    let busy = process_job(&f.deps, &msg, "w2", far_deadline(&f), false).await;
    assert!(matches!(busy, Outcome::Busy { .. }), "{busy:?}");
    assert!(f.events.sent().is_empty());
    f.clock.advance(Duration::seconds(
        f.deps.config.worker.lease.as_secs() as i64 + 1,
    ));
    assert_eq!(
        process_job(&f.deps, &msg, "w2", far_deadline(&f), false).await,
        Outcome::AlreadyFinished
    );
    assert_eq!(f.events.sent().len(), 1);
    assert!(stored(&f, &job_id).notified);
}

#[tokio::test]
async fn a_job_read_as_key_ranges_announces_itself_once() {
    let mut f = setup(60);
    let mut config = (*f.deps.config).clone();
    config.worker.ranges = 3;
    f.deps.config = Arc::new(config);
    let job_id = miss(&f, "acme", &orders(&[])).await;
    let outcomes = run_queue(&f).await;
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Succeeded { rows: 60, .. })),
        "{outcomes:?}"
    );
    assert!(stored(&f, &job_id).plan.is_none());
    let sent = f.events.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (sent[0].rows, sent[0].job_id.as_str()),
        (60, job_id.as_str())
    );
}
