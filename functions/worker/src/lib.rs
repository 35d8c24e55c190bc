//! The worker function: SQS batch in, one export job per message, failures reported per message
//! (`ReportBatchItemFailures`) so only those come back.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tracing::Instrument;

use shared::config::MAX_LAMBDA_TIMEOUT;
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

/// How far ahead a deadline may lie before it is not believed: Lambda's longest timeout, plus
/// a minute for clocks that disagree.
const LATEST_BELIEVABLE_DEADLINE: Duration = Duration::from_secs(MAX_LAMBDA_TIMEOUT + 60);

/// The invocation's deadline from the Lambda context (`deadline_ms`, milliseconds since the
/// epoch), as seen at `now`. A deadline already past when the invocation starts, or further off
/// than any Lambda timeout, is none the runtime meant: cargo-lambda's local runtime sends 600000
/// (ten minutes after 1970), which would make the worker hand over after every page. Then the
/// invocation gets `timeout` (the function's configured timeout) from now, as Lambda would.
pub fn deadline_of(deadline_ms: u64, now: DateTime<Utc>, timeout: Duration) -> DateTime<Utc> {
    let assumed = now + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    let latest = now
        + chrono::Duration::from_std(LATEST_BELIEVABLE_DEADLINE).unwrap_or(chrono::Duration::MAX);
    match i64::try_from(deadline_ms)
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
    {
        Some(deadline) if deadline > now && deadline <= latest => deadline,
        _ => assumed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap()
    }

    const TIMEOUT: Duration = Duration::from_secs(900);

    #[test]
    fn a_deadline_the_runtime_gives_is_kept() {
        let in_five_minutes = now() + chrono::Duration::minutes(5);
        let ms = in_five_minutes.timestamp_millis() as u64;
        assert_eq!(deadline_of(ms, now(), TIMEOUT), in_five_minutes);
        let at_the_limit = now() + chrono::Duration::seconds(960);
        let ms = at_the_limit.timestamp_millis() as u64;
        assert_eq!(deadline_of(ms, now(), TIMEOUT), at_the_limit);
    }

    #[test]
    fn cargo_lambdas_deadline_in_1970_becomes_the_functions_timeout_from_now() {
        // What cargo-lambda 1.9.2's local runtime sends: 600000 ms after the epoch.
        assert_eq!(
            deadline_of(600_000, now(), TIMEOUT),
            now() + chrono::Duration::seconds(900)
        );
        assert_eq!(
            deadline_of(600_000, now(), Duration::from_secs(120)),
            now() + chrono::Duration::seconds(120)
        );
    }

    #[test]
    fn deadlines_past_or_absurdly_far_become_the_functions_timeout_from_now() {
        let expected = now() + chrono::Duration::seconds(900);
        let just_past = (now() - chrono::Duration::milliseconds(1)).timestamp_millis() as u64;
        let tomorrow = (now() + chrono::Duration::days(1)).timestamp_millis() as u64;
        for ms in [
            0,
            just_past,
            now().timestamp_millis() as u64,
            tomorrow,
            u64::MAX,
        ] {
            assert_eq!(deadline_of(ms, now(), TIMEOUT), expected, "{ms}");
        }
    }
}

#[cfg(test)]
mod metric_tests {
    use std::collections::BTreeSet;

    use shared::domain::identity::SCOPE_READ;
    use shared::domain::{Identity, RawExportRequest};
    use shared::services::export::{request_export, ExportAnswer};
    use shared::testing::{emf_documents, fakes, test_config};

    use super::*;

    #[tokio::test]
    async fn a_finished_job_emits_its_outcome_as_emf() {
        let f = fakes(test_config(), 10);
        let who = Identity {
            tenant: "acme".into(),
            user: "alice".into(),
            scopes: BTreeSet::from([SCOPE_READ.to_string()]),
        };
        let raw = RawExportRequest::from_query("customers", vec![("format".into(), "xlsx".into())]);
        let ExportAnswer::Job { job, .. } = request_export(&f.deps, &who, &raw).await.unwrap()
        else {
            panic!("expected a miss");
        };
        let mut event: SqsEvent =
            serde_json::from_str(include_str!("../events/sqs-job.json")).unwrap();
        let msg = f.queue.drain().pop().unwrap();
        event.records[0].body = Some(serde_json::to_string(&msg).unwrap());
        let deadline = f.deps.clock.now() + chrono::Duration::minutes(15);
        let response = handle_batch(&f.deps, event, "w1", deadline).await;
        assert!(response.batch_item_failures.is_empty());

        let docs = emf_documents(&f.metrics, &["acme", "alice", &job.job_id]);
        let jobs: Vec<_> = docs
            .iter()
            .filter(|d| d.get("JobDuration").is_some())
            .collect();
        assert_eq!(jobs.len(), 1, "{docs:?}");
        assert_eq!(jobs[0]["outcome"], "succeeded");
        assert_eq!(jobs[0]["dataset"], "customers");
        assert_eq!(jobs[0]["format"], "xlsx");
        assert_eq!(jobs[0]["job_id"], job.job_id.as_str());
    }
}
