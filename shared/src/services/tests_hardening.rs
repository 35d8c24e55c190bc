//! Use-case tests for the guarantees of the hardening round (issue 7): coalescing at completion,
//! generations of new jobs, revoked links, rate limits, user-scoped jobs, the warmer's budget.
//! Each fails on the code before that round. The same flows run against the emulator in `tests/`.

use chrono::Duration;

use super::cache_admin::{invalidate_entry, invalidate_scope, Scope};
use super::export::{request_export, ExportAnswer};
use super::status::{download_url, job_for};
use super::tests::{miss, orders, run_queue, setup, setup_with, who};
use super::warm::warm;
use super::ServiceError;
use crate::domain::catalog::{Catalog, BUILTIN_CATALOG};
use crate::domain::Value;
use crate::domain::{Identity, RawExportRequest};

fn bob() -> Identity {
    Identity {
        user: "bob".into(),
        ..who("acme")
    }
}

async fn answer(
    f: &crate::testing::Fakes,
    caller: &Identity,
    req: &RawExportRequest,
) -> &'static str {
    match request_export(&f.deps, caller, req).await {
        Ok(ExportAnswer::File { stale: false, .. }) => "hit",
        Ok(ExportAnswer::File { stale: true, .. }) => "stale",
        Ok(ExportAnswer::Job { joined: false, .. }) => "new job",
        Ok(ExportAnswer::Job { joined: true, .. }) => "joined",
        Err(ServiceError::RateLimited { .. }) => "rate limited",
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn a_request_that_looked_while_the_job_ran_serves_its_file_instead_of_a_second_job() {
    let f = setup(20);
    let first = miss(&f, "acme", &orders(&[])).await;
    let (reached_tx, reached) = tokio::sync::oneshot::channel();
    let (resume, resume_rx) = tokio::sync::oneshot::channel();
    *f.meta.pause_after_find.lock().unwrap() = Some((reached_tx, resume_rx));
    let deps = f.deps.clone();
    let late = tokio::spawn(async move { request_export(&deps, &who("acme"), &orders(&[])).await });
    // It looked: the job is still running and there is no file yet.
    reached.await.unwrap();
    // The job finishes: its entry is written and the in-flight marker released.
    run_queue(&f).await;
    resume.send(()).unwrap();
    match late.await.unwrap().unwrap() {
        ExportAnswer::File { entry, .. } => assert_eq!(entry.job_id, first),
        other => panic!("expected the finished file, got {other:?}"),
    }
    assert_eq!(f.meta.jobs.lock().unwrap().len(), 1, "no second job");
    assert!(f.queue.drain().is_empty());
}

#[tokio::test]
async fn a_file_built_after_a_user_invalidation_is_served_to_its_builder() {
    let f = setup(5);
    miss(&f, "acme", &orders(&[])).await;
    run_queue(&f).await;
    // Alice drops her entries; bob's next request rebuilds the shared key.
    invalidate_scope(&f.deps, &who("acme"), Scope::User)
        .await
        .unwrap();
    assert_eq!(answer(&f, &bob(), &orders(&[])).await, "new job");
    run_queue(&f).await;
    assert_eq!(
        answer(&f, &bob(), &orders(&[])).await,
        "hit",
        "the file bob's job built is current for bob"
    );
}

#[tokio::test]
async fn a_pinned_export_rebuilt_after_a_user_invalidation_stays_fresh() {
    let pinned = BUILTIN_CATALOG.replace(
        "\n[[datasets]]\nname = \"customers\"",
        "\n[[datasets.pins]]\ntenants = [\"acme\"]\nquery = \"status=paid\"\n\n[[datasets]]\nname = \"customers\"",
    );
    let f = setup_with(5, Catalog::from_toml(&pinned).unwrap());
    // Alice builds the pinned key herself, then invalidates her entries.
    miss(&f, "acme", &orders(&[("status", "paid")])).await;
    run_queue(&f).await;
    invalidate_scope(&f.deps, &who("acme"), Scope::User)
        .await
        .unwrap();
    let report = warm(&f.deps, f.deps.clock.now()).await.unwrap();
    assert_eq!(report.pinned_enqueued, 1, "{report:?}");
    run_queue(&f).await;
    let report = warm(&f.deps, f.deps.clock.now()).await.unwrap();
    assert_eq!(
        (report.pinned_enqueued, report.pinned_fresh),
        (0, 1),
        "the warmer's file is current for the warmer: {report:?}"
    );
}

#[tokio::test]
async fn deleting_an_entry_revokes_its_download_link() {
    let f = setup(5);
    let job_id = miss(&f, "acme", &orders(&[("status", "paid")])).await;
    run_queue(&f).await;
    assert!(download_url(&f.deps, &who("acme"), &job_id).await.is_ok());
    invalidate_entry(&f.deps, &who("acme"), &orders(&[("status", "paid")]))
        .await
        .unwrap();
    assert!(matches!(
        download_url(&f.deps, &who("acme"), &job_id).await,
        Err(ServiceError::Gone(_))
    ));
}

#[tokio::test]
async fn joining_a_running_export_does_not_spend_the_rate_limit() {
    let mut f = setup(5);
    let mut config = (*f.deps.config).clone();
    config.miss_rate_per_minute = 1;
    f.deps.config = std::sync::Arc::new(config);
    assert_eq!(answer(&f, &who("acme"), &orders(&[])).await, "new job");
    // Polling the export URL while the job runs joins it, however often.
    for _ in 0..5 {
        assert_eq!(answer(&f, &who("acme"), &orders(&[])).await, "joined");
    }
    assert_eq!(
        answer(&f, &who("acme"), &orders(&[("status", "paid")])).await,
        "rate limited",
        "a second new export in the minute is still limited"
    );
    f.clock.advance(Duration::seconds(60));
    assert_eq!(
        answer(&f, &who("acme"), &orders(&[("status", "paid")])).await,
        "new job"
    );
}

#[tokio::test]
async fn another_user_of_the_tenant_cannot_see_a_user_scoped_job() {
    let f = setup(5);
    let row = vec![Value::Str("C1".into()); 5];
    f.source
        .rows
        .lock()
        .unwrap()
        .insert("customers/acme".into(), vec![row; 3]);
    let contacts = RawExportRequest::from_query("contacts", vec![]);
    let job_id = miss(&f, "acme", &contacts).await;
    assert!(job_for(&f.deps, &who("acme"), &job_id).await.is_ok());
    assert!(matches!(
        job_for(&f.deps, &bob(), &job_id).await,
        Err(ServiceError::NotFound(_))
    ));
    run_queue(&f).await;
    assert!(download_url(&f.deps, &who("acme"), &job_id).await.is_ok());
    assert!(matches!(
        download_url(&f.deps, &bob(), &job_id).await,
        Err(ServiceError::NotFound(_))
    ));
    // Bob's identical request is his own export, never alice's file.
    assert_eq!(answer(&f, &bob(), &contacts).await, "new job");
    // A tenant-wide dataset is still shared within the tenant.
    let shared = miss(&f, "acme", &orders(&[])).await;
    assert!(job_for(&f.deps, &bob(), &shared).await.is_ok());
}

#[tokio::test]
async fn the_warmer_starts_at_most_its_budget_per_tenant_per_run() {
    let mut f = setup(3);
    let mut config = (*f.deps.config).clone();
    config.warmer.max_refreshes_per_tenant = 2;
    f.deps.config = std::sync::Arc::new(config);
    let acme = ["paid", "shipped", "open", "void"];
    for status in acme {
        miss(&f, "acme", &orders(&[("status", status)])).await;
    }
    miss(&f, "globex", &orders(&[])).await;
    run_queue(&f).await;
    // Everything is hit; the hottest acme entries should win the budget.
    for (i, status) in acme.iter().enumerate() {
        for _ in 0..=i {
            assert_eq!(
                answer(&f, &who("acme"), &orders(&[("status", status)])).await,
                "hit"
            );
        }
    }
    assert_eq!(answer(&f, &who("globex"), &orders(&[])).await, "hit");
    // Inside the warmer's window: fresh until less than one interval from now.
    f.clock.advance(Duration::seconds(60));
    let report = warm(&f.deps, f.deps.clock.now()).await.unwrap();
    assert_eq!(
        (report.enqueued, report.skipped_budget),
        (3, 2),
        "two for acme, one for globex: {report:?}"
    );
    let refreshed: Vec<String> = f
        .queue
        .drain()
        .iter()
        .map(|m| f.meta.jobs.lock().unwrap()[&m.job_id].clone())
        .filter(|j| j.tenant == "acme")
        .map(|j| j.spec.filters["status"].clone())
        .collect();
    assert_eq!(refreshed.len(), 2);
    assert!(
        refreshed.iter().all(|s| s == "open" || s == "void"),
        "{refreshed:?}"
    );
}

#[test]
fn a_retryable_port_error_is_unavailable_and_says_nothing_internal() {
    let stalled = crate::ports::PortError::failed(
        "metadata get",
        "dispatch failure: timeout talking to arn:aws:dynamodb:eu-west-1:123456789012",
        true,
    );
    match ServiceError::from(stalled) {
        ServiceError::Unavailable(m) => assert!(!m.contains("arn:"), "{m}"),
        other => panic!("{other:?}"),
    }
    let broken = crate::ports::PortError::failed("decode metadata", "no doc", false);
    assert!(matches!(
        ServiceError::from(broken),
        ServiceError::Internal(_)
    ));
}
