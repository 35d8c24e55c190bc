//! The worker function: SQS batch in, one export job per message, failures reported per message
//! (`ReportBatchItemFailures`) so only those come back.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use chrono::{DateTime, TimeZone, Utc};
use tracing::Instrument;

use shared::domain::JobMessage;
use shared::services::process::{process_job, Fate, Outcome};
use shared::services::Deps;

/// Handles one SQS batch. `deadline` is the invocation's deadline, `owner` the lease owner name
/// (the invocation's request id).
pub async fn handle_batch(
    deps: &Deps,
    event: SqsEvent,
    owner: &str,
    deadline: DateTime<Utc>,
) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    for message in event.records {
        let id = message.message_id.clone().unwrap_or_default();
        let span = tracing::info_span!("message", message_id = %id);
        let ok = handle_message(deps, &message, owner, deadline)
            .instrument(span)
            .await;
        if !ok {
            response.add_failure(id);
        }
    }
    response
}

/// True when the message is done with (succeeded, failed for good, or nothing to do).
async fn handle_message(
    deps: &Deps,
    message: &SqsMessage,
    owner: &str,
    deadline: DateTime<Utc>,
) -> bool {
    let body = message.body.as_deref().unwrap_or_default();
    let msg: JobMessage = match serde_json::from_str(body) {
        Ok(m) => m,
        Err(e) => {
            // Reported as failed so that, after the retry budget, it lands in the DLQ for a look.
            tracing::error!(error = %e, body, "message is not a job message");
            return false;
        }
    };
    // The queue's redrive policy moves a message to the DLQ after maxReceiveCount deliveries;
    // the job's own budget is the same number (MAX_ATTEMPTS).
    let receive_count: u32 = message
        .attributes
        .get("ApproximateReceiveCount")
        .and_then(|c| c.parse().ok())
        .unwrap_or(1);
    let last_delivery = receive_count >= deps.config.worker.max_attempts;
    let span = tracing::info_span!("job", job_id = %msg.job_id, kind = ?msg.kind, receive_count);
    async {
        let outcome = process_job(deps, &msg, owner, deadline, last_delivery).await;
        let fate = outcome.fate(deps.clock.now());
        match &outcome {
            Outcome::Succeeded { rows, bytes } => tracing::info!(rows, bytes, "export written"),
            Outcome::Failed { code } => tracing::warn!(code, "export failed"),
            Outcome::Exhausted { code } => {
                tracing::error!(code, "export failed for good; the message goes to the DLQ")
            }
            Outcome::UnknownJob => tracing::warn!("no such job; message dropped"),
            Outcome::Transient { attempt, message } => {
                tracing::warn!(attempt, error = %message, ?fate, "transient error; will be retried")
            }
            other => tracing::info!(outcome = ?other, ?fate, "message handled"),
        }
        let delay = match fate {
            Fate::Done => return true,
            Fate::RetryIn(seconds) => seconds,
            // Seen again at once, past maxReceiveCount: SQS moves it to the DLQ.
            Fate::DeadLetter => 0,
        };
        if let Some(handle) = message.receipt_handle.as_deref() {
            if let Err(e) = deps.queue.retry_after(handle, delay).await {
                tracing::warn!(error = %e, "message stays until its visibility timeout");
            }
        }
        false
    }
    .instrument(span)
    .await
}

/// The invocation deadline from the Lambda context (milliseconds since the epoch).
pub fn deadline_of(ctx: &lambda_runtime::Context) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ctx.deadline as i64)
        .single()
        .unwrap_or_else(|| Utc::now() + chrono::Duration::minutes(15))
}
