//! The guarantees of the hardening round (issue 7) against the local AWS emulator, through the
//! real SDK: the conditions live in DynamoDB transactions, so the in-memory fakes alone would not
//! prove them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::Duration;
use http::StatusCode;
use integration_tests::Stack;
use shared::domain::request::normalise;
use shared::domain::{JobKind, Owner, RawExportRequest};
use shared::encode::ENCODER_VERSION;
use shared::services::jobs::{start_or_join, Start, StartOptions};

const ALL: &[&str] = &["exports:read", "exports:admin"];

fn job_id(a: &integration_tests::Answer) -> String {
    assert_eq!(
        a.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()["job_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_create_that_looked_before_the_job_finished_starts_nothing() {
    let stack = Stack::new(30, &[]).await;
    let token = stack.reader("acme");
    let first = stack
        .export_through_worker("/exports/orders?status=paid", &token)
        .await;
    // A request that looked while that job ran saw no entry; its create comes after the job
    // wrote its entry and released the marker.
    let raw = RawExportRequest::from_query("orders", vec![("status".into(), "paid".into())]);
    let export = normalise(&stack.deps.catalog, &raw).unwrap();
    let owner = Owner {
        tenant: "acme",
        user: "alice",
    };
    let key = export.cache_key(owner, ENCODER_VERSION);
    let spec = export.spec;
    let late = start_or_join(
        &stack.deps,
        "acme",
        "alice",
        &key,
        &spec,
        StartOptions {
            kind: JobKind::Export,
            generation: Default::default(),
            rows_estimate: None,
            entry_seen: None,
            miss_limit: Some(120),
        },
    )
    .await
    .unwrap();
    assert!(matches!(late, Start::EntryChanged));
    assert!(stack.queued_messages().await.is_empty(), "no second job");
    let hit = stack.get("/exports/orders?status=paid", &token).await;
    assert_eq!(hit.status, StatusCode::SEE_OTHER);
    assert_eq!(hit.header("x-export-id"), first);
}

#[tokio::test]
async fn identical_misses_racing_the_job_completion_make_one_job() {
    let stack = Stack::new(40, &[]).await;
    let token = stack.reader("acme");
    let first = job_id(&stack.get("/exports/orders", &token).await);
    // 16 identical requests while the worker finishes the job.
    let requests = futures::future::join_all((0..16).map(|_| stack.get("/exports/orders", &token)));
    let (answers, _) = tokio::join!(requests, stack.run_worker());
    let mut jobs = BTreeSet::from([first]);
    for a in &answers {
        match a.status {
            StatusCode::ACCEPTED => {
                jobs.insert(job_id(a));
            }
            StatusCode::SEE_OTHER => {
                jobs.insert(a.header("x-export-id").to_string());
            }
            other => panic!("{other}: {}", String::from_utf8_lossy(&a.body)),
        }
    }
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(stack.queued_messages().await.is_empty());
    assert_eq!(stack.export_files().await.len(), 1);
}

#[tokio::test]
async fn a_file_built_after_a_user_invalidation_is_served_to_its_builder() {
    let stack = Stack::new(10, &[]).await;
    let alice = stack.reader("acme");
    let bob = stack.user_token("acme", "bob", &["exports:read"]);
    stack.export_through_worker("/exports/orders", &alice).await;
    assert_eq!(
        stack.delete("/exports/cache?scope=user", &alice).await,
        StatusCode::NO_CONTENT
    );
    let rebuilt = stack.export_through_worker("/exports/orders", &bob).await;
    let hit = stack.get("/exports/orders", &bob).await;
    assert_eq!(hit.status, StatusCode::SEE_OTHER, "bob's file is current");
    assert_eq!(hit.header("x-export-id"), rebuilt);
}

#[tokio::test]
async fn deleting_an_entry_revokes_its_download_link() {
    let stack = Stack::new(10, &[]).await;
    let token = stack.reader("acme");
    let job = stack
        .export_through_worker("/exports/orders?status=paid", &token)
        .await;
    let link = format!("/exports/jobs/{job}/download");
    assert_eq!(stack.status(&link, &token).await, StatusCode::SEE_OTHER);
    assert_eq!(
        stack
            .delete("/exports/cache/orders?status=paid", &token)
            .await,
        StatusCode::NO_CONTENT
    );
    let gone = stack.get(&link, &token).await;
    assert_eq!(gone.status, StatusCode::GONE);
    assert_eq!(gone.header("content-type"), "application/problem+json");
}

#[tokio::test]
async fn polling_a_running_export_is_never_rate_limited() {
    let stack = Stack::new(10, &[("MISS_RATE_LIMIT_PER_MINUTE", "1")]).await;
    let token = stack.reader("acme");
    let first = job_id(&stack.get("/exports/orders", &token).await);
    for _ in 0..5 {
        assert_eq!(job_id(&stack.get("/exports/orders", &token).await), first);
    }
    let limited = stack.get("/exports/orders?status=paid", &token).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.header("retry-after").parse::<u32>().unwrap() <= 60);
}

#[tokio::test]
async fn a_user_scoped_export_is_invisible_to_other_users_of_the_tenant() {
    let stack = Stack::new(20, &[]).await;
    let alice = stack.reader("acme");
    let bob = stack.user_token("acme", "bob", &["exports:read"]);
    let job = job_id(&stack.get("/exports/contacts", &alice).await);
    let status = format!("/exports/jobs/{job}");
    let link = format!("{status}/download");
    assert_eq!(stack.status(&status, &bob).await, StatusCode::NOT_FOUND);
    stack.run_worker().await;
    assert_eq!(stack.status(&status, &alice).await, StatusCode::OK);
    assert_eq!(stack.status(&status, &bob).await, StatusCode::NOT_FOUND);
    assert_eq!(stack.status(&link, &bob).await, StatusCode::NOT_FOUND);
    let dl = stack.get(&link, &alice).await;
    assert_eq!(dl.status, StatusCode::SEE_OTHER);
    let (_, _, file) = stack.fetch(dl.header("location")).await;
    assert!(file.starts_with(b"Customer ID,Name,Email,Country,Tier\r\n"));
    // Bob's identical request is his own export, never alice's file.
    let theirs = stack.get("/exports/contacts", &bob).await;
    assert_ne!(job_id(&theirs), job);
}

#[tokio::test]
async fn tenant_running_slots_hold_their_limit_in_dynamodb() {
    let stack = Stack::new(0, &[]).await;
    let slots = &stack.deps.slots;
    let now = stack.deps.clock.now();
    let until = now + Duration::minutes(16);
    let ids: Vec<String> = (0..6).map(|i| format!("a{i}")).collect();
    let takes = futures::future::join_all(
        ids.iter()
            .map(|id| slots.take_tenant_slot("acme", id, now, until, 2)),
    )
    .await;
    let granted: Vec<usize> = takes
        .iter()
        .enumerate()
        .filter(|(_, t)| *t.as_ref().unwrap())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(granted.len(), 2, "{takes:?}");
    let holder = format!("a{}", granted[0]);
    // A renewal keeps the same slot; another tenant is not affected.
    assert!(slots
        .take_tenant_slot("acme", &holder, now, until, 2)
        .await
        .unwrap());
    assert!(!slots
        .take_tenant_slot("acme", "late", now, until, 2)
        .await
        .unwrap());
    assert!(slots
        .take_tenant_slot("globex", "g", now, until, 2)
        .await
        .unwrap());
    slots.release_tenant_slot("acme", &holder).await.unwrap();
    assert!(slots
        .take_tenant_slot("acme", "late", now, until, 2)
        .await
        .unwrap());
    // Slots of dead workers expire with their lease.
    let later = until + Duration::seconds(1);
    assert!(slots
        .take_tenant_slot("acme", "later", later, later + Duration::minutes(16), 2)
        .await
        .unwrap());
}

#[tokio::test]
async fn stats_read_counters_not_entries_and_follow_every_change() {
    let stack = Stack::new(25, &[]).await;
    let token = stack.token("acme", ALL);
    let stats = || async { stack.get("/exports/cache/stats", &token).await.json() };
    stack.export_through_worker("/exports/orders", &token).await;
    let first = stats().await;
    assert_eq!(first["entries"], 1, "{first}");
    let bytes = first["bytes"].as_u64().unwrap();
    assert!(bytes > 0);

    // Entry items the counters never heard of are not read: stats costs the same however many
    // entries the tenant has.
    let ddb = aws_sdk_dynamodb::Client::new(&stack.sdk);
    let far = (chrono::Utc::now() + Duration::days(1))
        .timestamp()
        .to_string();
    for i in 0..30 {
        ddb.put_item()
            .table_name(&stack.p.names.meta_table)
            .item("pk", AttributeValue::S("T#acme".into()))
            .item("sk", AttributeValue::S(format!("E#unread{i}")))
            .item("dataset", AttributeValue::S("orders".into()))
            .item("bytes", AttributeValue::N("1000".into()))
            .item("rows", AttributeValue::N("1".into()))
            .item("gen_t", AttributeValue::N("0".into()))
            .item("stale_until", AttributeValue::N(far.clone()))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(stats().await["entries"], 1);

    // A refresh replaces the entry: still one, with the new file's bytes.
    stack.clock.advance(Duration::seconds(1000));
    assert_eq!(
        stack
            .get("/exports/orders", &token)
            .await
            .header("x-export-cache"),
        "stale"
    );
    stack.run_worker().await;
    let refreshed = stats().await;
    assert_eq!(refreshed["entries"], 1, "{refreshed}");
    assert_eq!(refreshed["bytes"].as_u64().unwrap(), bytes);

    // A second entry, then deleting one, then invalidating the tenant.
    stack
        .export_through_worker("/exports/orders?status=paid", &token)
        .await;
    assert_eq!(stats().await["entries"], 2);
    assert_eq!(
        stack.delete("/exports/cache/orders", &token).await,
        StatusCode::NO_CONTENT
    );
    let after_delete = stats().await;
    assert_eq!(after_delete["entries"], 1, "{after_delete}");
    assert_eq!(
        stack.delete("/exports/cache?scope=tenant", &token).await,
        StatusCode::NO_CONTENT
    );
    let after_bump = stats().await;
    assert_eq!(
        (after_bump["entries"].as_u64(), after_bump["bytes"].as_u64()),
        (Some(0), Some(0)),
        "{after_bump}"
    );
    // Past their stale deadline entries stop counting (orders: 900 s fresh + 3600 s stale).
    stack
        .export_through_worker("/exports/orders?status=shipped", &token)
        .await;
    assert_eq!(stats().await["entries"], 1);
    stack.clock.advance(Duration::hours(3));
    assert_eq!(stats().await["entries"], 0);
}
