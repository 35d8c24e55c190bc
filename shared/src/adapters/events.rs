//! EventBridge: each finished job's completion event, on the bus `EVENT_BUS_NAME` names.

use async_trait::async_trait;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_eventbridge::Client;

use super::IamResource::DefaultEventBus;
use super::{sdk_error, IamNeed};
use crate::domain::event::EVENT_SOURCE;
use crate::domain::JobEvent;
use crate::ports::{JobEvents, PortError, PortResult};

/// IAM needs of the events' methods (see [`IamNeed`]).
#[rustfmt::skip]
pub const EVENTS_IAM: &[IamNeed] = &[
    IamNeed::new("events", "job_finished", &["put_events"], &["events:PutEvents"], DefaultEventBus),
];

/// Per-entry error codes of a PutEvents answer after which sending the entry again may work.
const RETRYABLE_ENTRY_CODES: [&str; 2] = ["InternalFailure", "ThrottlingException"];

#[derive(Clone)]
pub struct BusEvents {
    client: Client,
    bus: String,
}

impl BusEvents {
    pub fn new(client: Client, bus: &str) -> Self {
        Self {
            client,
            bus: bus.to_string(),
        }
    }
}

#[async_trait]
impl JobEvents for BusEvents {
    async fn job_finished(&self, event: &JobEvent) -> PortResult<()> {
        let op = "publish the completion event";
        let detail = serde_json::to_string(event)
            .map_err(|e| PortError::failed(op, e.to_string(), false))?;
        let entry = PutEventsRequestEntry::builder()
            .event_bus_name(&self.bus)
            .source(EVENT_SOURCE)
            .detail_type(event.detail_type())
            .detail(detail)
            .time(aws_smithy_types::DateTime::from_millis(
                event.finished_at.timestamp_millis(),
            ))
            .build();
        let out = self
            .client
            .put_events()
            .entries(entry)
            .send()
            .await
            .map_err(|e| sdk_error(op, e))?;
        // A refused entry comes back in a 200 answer: only FailedEntryCount says so.
        if out.failed_entry_count() == 0 {
            return Ok(());
        }
        let refused = out.entries().iter().find(|e| e.error_code().is_some());
        let code = refused.and_then(|e| e.error_code()).unwrap_or("unknown");
        let message = refused
            .and_then(|e| e.error_message())
            .unwrap_or("no message");
        Err(PortError::failed(
            op,
            format!("the bus refused the event: {code}: {message}"),
            RETRYABLE_ENTRY_CODES.contains(&code),
        ))
    }
}

/// Events turned off (`EVENT_BUS_NAME=off`): nothing is sent, and a job counts as announced.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEvents;

#[async_trait]
impl JobEvents for NoEvents {
    async fn job_finished(&self, _event: &JobEvent) -> PortResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use aws_smithy_http_client::test_util::StaticReplayClient;
    use serde_json::{json, Value as Json};

    use super::*;
    use crate::adapters::testkit::{answer, answering, eventbridge, job};

    fn events(http: &StaticReplayClient) -> BusEvents {
        BusEvents::new(eventbridge(http), "default")
    }

    fn put_events_answer(body: Json) -> http::Response<aws_smithy_types::body::SdkBody> {
        answer(
            200,
            &[("content-type", "application/x-amz-json-1.1")],
            &body.to_string(),
        )
    }

    fn failed_event() -> JobEvent {
        let mut j = job("acme", "j1");
        j.fail("row_limit_exceeded", "too many rows", j.created_at);
        JobEvent::of(&j).unwrap()
    }

    #[tokio::test]
    async fn the_event_goes_to_the_bus_with_its_source_detail_type_and_detail() {
        let http = answering(vec![put_events_answer(
            json!({ "FailedEntryCount": 0, "Entries": [ { "EventId": "e1" } ] }),
        )]);
        let ev = failed_event();
        events(&http).job_finished(&ev).await.unwrap();

        let sent: Vec<_> = http.actual_requests().collect();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].headers().get("x-amz-target"),
            Some("AWSEvents.PutEvents")
        );
        let body: Json = serde_json::from_slice(sent[0].body().bytes().unwrap()).unwrap();
        let entries = body["Entries"].as_array().unwrap();
        assert_eq!(entries.len(), 1);
        let entry = &entries[0];
        assert_eq!(entry["EventBusName"], "default");
        assert_eq!(entry["Source"], "export-cache");
        assert_eq!(entry["DetailType"], "Export Failed");
        let detail: Json = serde_json::from_str(entry["Detail"].as_str().unwrap()).unwrap();
        assert_eq!(detail, serde_json::to_value(&ev).unwrap());
        assert_eq!(detail["error_code"], "row_limit_exceeded");
        assert_eq!(detail["job_id"], "j1");
    }

    #[tokio::test]
    async fn an_entry_the_bus_refuses_in_a_200_answer_is_an_error() {
        let http = answering(vec![
            put_events_answer(json!({
                "FailedEntryCount": 1,
                "Entries": [ { "ErrorCode": "InternalFailure", "ErrorMessage": "try again" } ],
            })),
            put_events_answer(json!({
                "FailedEntryCount": 1,
                "Entries": [ { "ErrorCode": "MalformedDetail", "ErrorMessage": "bad detail" } ],
            })),
        ]);
        let bus = events(&http);
        let err = bus.job_finished(&failed_event()).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(
            err.to_string().contains("InternalFailure: try again"),
            "{err}"
        );
        let err = bus.job_finished(&failed_event()).await.unwrap_err();
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains("MalformedDetail"), "{err}");
    }

    #[tokio::test]
    async fn a_refused_call_is_an_error_that_says_whether_a_retry_can_help() {
        let http = answering(vec![answer(
            400,
            &[("content-type", "application/x-amz-json-1.1")],
            r#"{"__type":"AccessDeniedException","message":"not allowed"}"#,
        )]);
        let err = events(&http)
            .job_finished(&failed_event())
            .await
            .unwrap_err();
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains("AccessDeniedException"), "{err}");
    }
}
