//! A stalled AWS service (the emulator frozen with SIGSTOP, as a stuck connection to DynamoDB
//! looks) must not hang requests: the SDK timeouts from config turn it into a quick 503 problem
//! with Retry-After in the API and a retry later in the worker. The test runs its own emulator so
//! pausing it never stalls anybody else's tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use http::StatusCode;
use integration_tests::{OwnMoto, Stack};

/// Whole-call budget given to the SDK; every answer must come well within a few of them.
const CALL_MS: u64 = 1500;

#[tokio::test]
async fn a_paused_emulator_gets_a_quick_503_and_the_worker_a_retry() {
    let moto = OwnMoto::start();
    let call_ms = CALL_MS.to_string();
    let stack = Stack::on(
        moto.sdk().await,
        5,
        &[
            ("SDK_CONNECT_TIMEOUT_MS", "500"),
            ("SDK_ATTEMPT_TIMEOUT_MS", "500"),
            ("SDK_CALL_TIMEOUT_MS", &call_ms),
        ],
    )
    .await;
    let token = stack.reader("acme");
    let job_id = stack.get("/exports/orders", &token).await.json()["job_id"]
        .as_str()
        .unwrap()
        .to_string();

    let paused = moto.pause();
    for uri in ["/exports/orders", "/exports/cache/stats"] {
        let started = Instant::now();
        let a = tokio::time::timeout(Duration::from_secs(30), stack.get(uri, &token))
            .await
            .unwrap_or_else(|_| panic!("{uri} hung with the emulator paused"));
        let took = started.elapsed();
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        assert_eq!(a.header("content-type"), "application/problem+json");
        assert!(a.header("retry-after").parse::<u32>().unwrap() > 0);
        assert!(
            took < Duration::from_millis(3 * CALL_MS),
            "{uri} took {took:?}"
        );
    }

    // The worker gives the message back for later instead of waiting out its run.
    let mut event: aws_lambda_events::event::sqs::SqsEvent =
        serde_json::from_str(include_str!("../functions/worker/events/sqs-job.json")).unwrap();
    event.records[0].body =
        Some(serde_json::json!({"job_id": job_id, "kind": "export"}).to_string());
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        worker::handle_batch(
            &stack.deps,
            event,
            "w",
            chrono::Utc::now() + chrono::Duration::minutes(15),
        ),
    )
    .await
    .expect("the worker hung with the emulator paused");
    let took = started.elapsed();
    assert_eq!(answer.batch_item_failures.len(), 1, "retried, not settled");
    assert!(
        took < Duration::from_millis(4 * CALL_MS),
        "worker took {took:?}"
    );

    drop(paused);
}
