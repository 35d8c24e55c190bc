//! Completion events against the emulator: the worker's PutEvents on the default bus, read back
//! through a rule whose target is an SQS queue of the test's own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_sdk_eventbridge::types::Target;
use http::StatusCode;
use serde_json::Value;

use integration_tests::Stack;
use shared::domain::catalog::{Catalog, BUILTIN_CATALOG};
use shared::domain::{JobMessage, MessageKind};

/// A rule on the default bus for `source: export-cache`, delivering to a queue; both deleted
/// when dropped (on a thread of its own, as the stack's teardown), also after a failed assertion.
struct EventTap {
    sdk: SdkConfig,
    rule: String,
    queue_url: String,
}

impl EventTap {
    async fn new(sdk: &SdkConfig, stack: &str) -> Self {
        let name = format!("{stack}-job-events");
        let sqs = aws_sdk_sqs::Client::new(sdk);
        let queue_url = sqs
            .create_queue()
            .queue_name(&name)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let tap = Self {
            sdk: sdk.clone(),
            rule: name.clone(),
            queue_url,
        };
        let arn = sqs
            .get_queue_attributes()
            .queue_url(&tap.queue_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()
            .remove(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .unwrap();
        let events = aws_sdk_eventbridge::Client::new(sdk);
        events
            .put_rule()
            .name(&name)
            .event_bus_name("default")
            .event_pattern(r#"{"source": ["export-cache"]}"#)
            .send()
            .await
            .unwrap();
        events
            .put_targets()
            .rule(&name)
            .event_bus_name("default")
            .targets(Target::builder().id("queue").arn(arn).build().unwrap())
            .send()
            .await
            .unwrap();
        tap
    }

    /// The events of `job_id` that arrive within `wait` (other tests' jobs share the bus and the
    /// rule's source, so only this job's count).
    async fn events_of(&self, job_id: &str, wait: Duration) -> Vec<Value> {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let until = Instant::now() + wait;
        let mut found = Vec::new();
        while Instant::now() < until {
            let got = sqs
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap();
            for m in got.messages.unwrap_or_default() {
                let event: Value = serde_json::from_str(m.body.as_deref().unwrap()).unwrap();
                sqs.delete_message()
                    .queue_url(&self.queue_url)
                    .receipt_handle(m.receipt_handle.unwrap())
                    .send()
                    .await
                    .unwrap();
                if event["detail"]["job_id"] == job_id {
                    found.push(event);
                }
            }
            if !found.is_empty() && wait <= Duration::from_secs(10) {
                return found;
            }
        }
        found
    }
}

impl Drop for EventTap {
    fn drop(&mut self) {
        let (sdk, rule, queue_url) = (self.sdk.clone(), self.rule.clone(), self.queue_url.clone());
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let events = aws_sdk_eventbridge::Client::new(&sdk);
                let targets = events
                    .remove_targets()
                    .rule(&rule)
                    .event_bus_name("default")
                    .ids("queue")
                    .send()
                    .await;
                let deleted = events
                    .delete_rule()
                    .name(&rule)
                    .event_bus_name("default")
                    .send()
                    .await;
                let queue = aws_sdk_sqs::Client::new(&sdk)
                    .delete_queue()
                    .queue_url(&queue_url)
                    .send()
                    .await;
                (targets.is_ok() && deleted.is_ok() && queue.is_ok())
                    .then_some(())
                    .ok_or(format!("{rule}: {targets:?} {deleted:?} {queue:?}"))
            })
        })
        .join();
        if !matches!(done, Ok(Ok(()))) && !std::thread::panicking() {
            panic!("the event rule or its queue was left behind: {done:?}");
        }
    }
}

/// The message the API queued for the job, sent again as SQS would redeliver it.
async fn redeliver(stack: &Stack, job_id: &str) {
    let msg = JobMessage {
        job_id: job_id.to_string(),
        kind: MessageKind::Export,
        segment: None,
    };
    aws_sdk_sqs::Client::new(&stack.sdk)
        .send_message()
        .queue_url(&stack.p.queue_url)
        .message_body(serde_json::to_string(&msg).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(stack.run_worker().await, 1);
}

#[tokio::test]
async fn a_finished_job_publishes_one_event_to_the_default_bus_even_when_redelivered() {
    let mut stack = Stack::new(30, &[]).await;
    let tap = EventTap::new(&stack.sdk, &stack.p.names.stack).await;
    let token = stack.reader("acme");

    let job_id = stack
        .export_through_worker("/exports/orders?format=csv", &token)
        .await;
    let events = tap.events_of(&job_id, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = &events[0];
    assert_eq!(ev["source"], "export-cache");
    assert_eq!(ev["detail-type"], "Export Succeeded");
    let status = stack
        .get(&format!("/exports/jobs/{job_id}"), &token)
        .await
        .json();
    let d = &ev["detail"];
    assert_eq!(d["tenant"], "acme");
    assert_eq!(d["dataset"], "orders");
    assert_eq!(d["format"], "csv");
    assert_eq!(d["kind"], "export");
    assert_eq!(d["status"], "succeeded");
    assert_eq!(d["rows"], 30);
    assert_eq!(d["bytes"], status["bytes_written"]);
    assert!(d["bytes"].as_u64().unwrap() > 0, "{d}");
    assert!(d["error_code"].is_null(), "{d}");
    assert!(d["finished_at"].is_string(), "{d}");

    // The finished job's message once more: nothing more goes out.
    redeliver(&stack, &job_id).await;
    let again = tap.events_of(&job_id, Duration::from_secs(4)).await;
    assert!(again.is_empty(), "a second event: {again:?}");

    // A job that fails says so, with its error code.
    let small = BUILTIN_CATALOG.replace("row_limit = 5000000", "row_limit = 10");
    assert_ne!(
        small, BUILTIN_CATALOG,
        "the orders row limit is where the test expects it"
    );
    stack.deps.catalog = Arc::new(Catalog::from_toml(&small).unwrap());
    let miss = stack.get("/exports/orders?format=ndjson", &token).await;
    assert_eq!(miss.status, StatusCode::ACCEPTED);
    let failed_id = miss.json()["job_id"].as_str().unwrap().to_string();
    stack.run_worker().await;
    let status = stack
        .get(&format!("/exports/jobs/{failed_id}"), &token)
        .await
        .json();
    assert_eq!(status["status"], "failed", "{status}");
    let events = tap.events_of(&failed_id, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["detail-type"], "Export Failed");
    let d = &events[0]["detail"];
    assert_eq!(d["status"], "failed");
    assert_eq!(d["format"], "ndjson");
    assert_eq!(d["error_code"], "row_limit_exceeded");
    assert_eq!(d["error_code"], status["error"]["code"]);
    redeliver(&stack, &failed_id).await;
    assert!(tap
        .events_of(&failed_id, Duration::from_secs(4))
        .await
        .is_empty());
}
