//! SQS: the job queue. Messages carry a job id and a kind; the job record holds the truth.

use async_trait::async_trait;
use aws_sdk_sqs::types::MessageAttributeValue;
use aws_sdk_sqs::Client;

use super::IamResource::JobQueue as Queue;
use super::{sdk_error, IamNeed};
use crate::domain::JobMessage;
use crate::ports::{JobQueue, PortError, PortResult};

/// IAM needs of the job queue's methods (see [`IamNeed`]).
#[rustfmt::skip]
pub const QUEUE_IAM: &[IamNeed] = &[
    IamNeed::new("queue", "enqueue", &["send_message"], &["sqs:SendMessage"], Queue),
    IamNeed::new("queue", "enqueue_delayed", &["send_message"], &["sqs:SendMessage"], Queue),
    // The worker's backoff: without it every retry waits the queue's whole visibility timeout.
    IamNeed::new("queue", "retry_after", &["change_message_visibility"], &["sqs:ChangeMessageVisibility"], Queue),
];

#[derive(Clone)]
pub struct SqsQueue {
    client: Client,
    url: String,
}

impl SqsQueue {
    pub fn new(client: Client, url: &str) -> Self {
        Self {
            client,
            url: url.to_string(),
        }
    }
}

/// SQS's longest message delay.
const MAX_DELAY_SECONDS: u32 = 900;

impl SqsQueue {
    async fn send(&self, msg: &JobMessage, delay_seconds: Option<i32>) -> PortResult<()> {
        let body = serde_json::to_string(msg)
            .map_err(|e| PortError::failed("enqueue", e.to_string(), false))?;
        let kind = serde_json::to_value(msg.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let attr = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(kind)
            .build()
            .map_err(|e| PortError::failed("enqueue", e.to_string(), false))?;
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .message_attributes("kind", attr)
            .set_delay_seconds(delay_seconds)
            .send()
            .await
            .map_err(|e| sdk_error("enqueue", e))?;
        Ok(())
    }
}

#[async_trait]
impl JobQueue for SqsQueue {
    async fn enqueue(&self, msg: &JobMessage) -> PortResult<()> {
        self.send(msg, None).await
    }

    async fn enqueue_delayed(&self, msg: &JobMessage, seconds: u32) -> PortResult<()> {
        self.send(msg, Some(seconds.min(MAX_DELAY_SECONDS) as i32))
            .await
    }

    async fn retry_after(&self, receipt_handle: &str, seconds: i32) -> PortResult<()> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(seconds.clamp(0, 43_200))
            .send()
            .await
            .map_err(|e| sdk_error("retry later", e))?;
        Ok(())
    }
}
