//! Plays locally what AWS does around the worker and the warmer: the SQS event source mapping
//! (BatchSize 1, ReportBatchItemFailures) and the EventBridge schedule, against the functions
//! served by `cargo lambda watch`.
//!
//! Delivery follows Lambda's rules: messages the function did not report as failed are deleted;
//! failed ones are left to reappear after their visibility timeout (and reach the DLQ after
//! `maxReceiveCount`); when the invoke itself fails, nothing is deleted.
//!
//! A worker that dies or hangs mid-invocation is what Lambda handles by ending the invocation
//! (crash, or its timeout) and giving the next one a fresh runtime; the message comes back after
//! its visibility timeout. `cargo lambda watch` does neither: a dead function is never started
//! again and its invokes are never answered. So the bridge can run the worker under a watch of its
//! own ([`crate::supervise`]), notice a dead worker process at once and a hung one at the
//! function's timeout plus a grace period, restart that watch, and make the message visible again
//! after a few seconds ([`BridgeConfig::redeliver_after`]) instead of the queue's visibility
//! timeout (90 minutes in the template, sized for AWS's 15-minute invocations).

use crate::streams::StreamTap;
use crate::supervise::{Health, Supervisor, WatchSpec};
use anyhow::{anyhow, bail, Context};
use aws_config::SdkConfig;
use aws_lambda_events::encodings::Base64Data;
use aws_lambda_events::eventbridge::EventBridgeEvent;
use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent, SqsMessage, SqsMessageAttribute};
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName, QueueAttributeName,
};
use chrono::{DateTime, SubsecRound, Utc};
use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Mutex};

pub const WORKER_FUNCTION: &str = "export-worker";
pub const WARMER_FUNCTION: &str = "export-warmer";
pub const INVALIDATOR_FUNCTION: &str = "export-invalidator";
/// How often the source tables' streams are read, like Lambda's poller does about every second.
const STREAM_POLL: Duration = Duration::from_secs(1);
/// Matches the template's event source mapping.
pub const BATCH_SIZE: i32 = 1;
/// Pause before trying the watch again when it does not accept connections yet.
const UNREACHABLE_BACKOFF: Duration = Duration::from_secs(2);
/// The template's `Timeout` of the worker function (seconds), used when none is given.
pub const WORKER_TIMEOUT_SECS: u64 = 900;
/// Added to the function's timeout before an invocation is given up: Lambda's own timeout is
/// enforced inside the function's sandbox, the bridge only sees the HTTP answer come later.
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// The job queue (`${S}-jobs`).
    pub queue_url: String,
    /// Base URL of `cargo lambda watch`, e.g. `http://127.0.0.1:9000`.
    pub watch: String,
    /// Period of the warmer schedule; 0 disables it.
    pub schedule_secs: u64,
    /// Long-poll wait per ReceiveMessage (1..=20). Shutdown waits for at most one poll.
    pub wait_secs: i32,
    /// Longest a worker invocation may run: the function's timeout plus [`TIMEOUT_GRACE`]. With
    /// a supervised watch the clock starts when the worker's process is there (Lambda's timeout
    /// never includes a build); otherwise it bounds the whole HTTP invoke.
    pub invoke_timeout: Duration,
    /// With a supervised watch: longest wait for the worker's process to appear after an invoke
    /// (the first `cargo run` compiles it).
    pub cold_start_timeout: Duration,
    /// Name used in the schedule event's rule ARN.
    pub rule_name: String,
    /// The function SQS batches are delivered to.
    pub worker_function: String,
    /// Serve the worker from a `cargo lambda watch` of the bridge's own, restarted when the
    /// worker dies or hangs; `None` invokes the worker on `watch` and can only time out.
    pub worker_watch: Option<WatchSpec>,
    /// After a dead or hung invocation the message is visible again this soon (Lambda would
    /// leave it for the queue's visibility timeout; locally nothing else holds it).
    pub redeliver_after: Duration,
    /// How often the worker's process is looked at during an invocation.
    pub liveness_every: Duration,
    /// Source tables whose streams are played to the invalidator (none: no stream is read).
    pub stream_tables: Vec<String>,
    /// Where the source tables are, when not on the emulator `sdk` points at.
    pub source_endpoint: Option<String>,
}

impl BridgeConfig {
    pub fn new(queue_url: impl Into<String>, watch: impl Into<String>) -> Self {
        BridgeConfig {
            queue_url: queue_url.into(),
            watch: watch.into(),
            schedule_secs: 900,
            wait_secs: 3,
            invoke_timeout: Duration::from_secs(WORKER_TIMEOUT_SECS) + TIMEOUT_GRACE,
            cold_start_timeout: Duration::from_secs(1_800),
            rule_name: "export-cache-warmer-schedule".to_owned(),
            worker_function: WORKER_FUNCTION.to_owned(),
            worker_watch: None,
            redeliver_after: Duration::from_secs(5),
            liveness_every: Duration::from_millis(300),
            stream_tables: Vec::new(),
            source_endpoint: None,
        }
    }
}

/// `{watch}/2015-03-31/functions/{function}/invocations`
pub fn invoke_url(watch: &str, function: &str) -> String {
    format!(
        "{}/2015-03-31/functions/{function}/invocations",
        watch.trim_end_matches('/')
    )
}

/// Where a queue lives, as Lambda puts it in every record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueIdentity {
    pub arn: String,
    pub region: String,
    pub account: String,
}

impl QueueIdentity {
    /// Parses `arn:aws:sqs:{region}:{account}:{name}`.
    pub fn from_arn(arn: &str) -> anyhow::Result<Self> {
        let parts: Vec<&str> = arn.split(':').collect();
        match parts.as_slice() {
            ["arn", _, "sqs", region, account, name] if !name.is_empty() => Ok(QueueIdentity {
                arn: arn.to_owned(),
                region: (*region).to_owned(),
                account: (*account).to_owned(),
            }),
            _ => bail!("not an SQS queue ARN: {arn}"),
        }
    }
}

fn base64_data(bytes: &[u8]) -> Base64Data {
    let mut data = Base64Data::default();
    data.extend_from_slice(bytes);
    data
}

/// Wraps received messages into the event Lambda's SQS event source mapping sends.
pub fn sqs_event(queue: &QueueIdentity, messages: &[Message]) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = messages
        .iter()
        .map(|m| {
            let mut record = SqsMessage::default();
            record.message_id = m.message_id.clone();
            record.receipt_handle = m.receipt_handle.clone();
            record.body = m.body.clone();
            record.md5_of_body = m.md5_of_body.clone();
            record.md5_of_message_attributes = m.md5_of_message_attributes.clone();
            record.attributes = m
                .attributes
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                .collect();
            record.message_attributes = m
                .message_attributes
                .iter()
                .flatten()
                .map(|(k, v)| {
                    let mut attr = SqsMessageAttribute::default();
                    attr.string_value = v.string_value.clone();
                    attr.binary_value = v.binary_value.as_ref().map(|b| base64_data(b.as_ref()));
                    attr.string_list_values = v.string_list_values.clone().unwrap_or_default();
                    attr.binary_list_values = v
                        .binary_list_values
                        .iter()
                        .flatten()
                        .map(|b| base64_data(b.as_ref()))
                        .collect();
                    attr.data_type = Some(v.data_type.clone());
                    (k.clone(), attr)
                })
                .collect();
            record.event_source_arn = Some(queue.arn.clone());
            record.event_source = Some("aws:sqs".to_owned());
            record.aws_region = Some(queue.region.clone());
            record
        })
        .collect();
    event
}

/// The event an EventBridge schedule rule delivers.
pub fn scheduled_event(
    region: &str,
    account: &str,
    rule_name: &str,
    time: DateTime<Utc>,
) -> EventBridgeEvent {
    let mut event = EventBridgeEvent::default();
    event.version = Some("0".to_owned());
    event.id = Some(uuid::Uuid::new_v4().to_string());
    event.detail_type = "Scheduled Event".to_owned();
    event.source = "aws.events".to_owned();
    event.account = Some(account.to_owned());
    event.time = Some(time.trunc_subsecs(0));
    event.region = Some(region.to_owned());
    event.resources = Some(vec![format!(
        "arn:aws:events:{region}:{account}:rule/{rule_name}"
    )]);
    event.detail = serde_json::Value::Object(serde_json::Map::new());
    event
}

/// What to do with a batch after the worker answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Delete these message ids; the others failed and come back after the visibility timeout.
    Partial {
        delete: Vec<String>,
        failed: Vec<String>,
    },
    /// The invocation failed as a whole: delete nothing.
    InvokeFailed(String),
}

/// Lambda's rules for a `ReportBatchItemFailures` answer: an empty or null answer means all
/// succeeded; a function error, an unparsable answer or a failure naming no message of the batch
/// fails the whole batch.
pub fn settle(
    message_ids: &[String],
    status: u16,
    function_error: Option<&str>,
    body: &[u8],
) -> Settlement {
    if !(200..300).contains(&status) {
        return Settlement::InvokeFailed(format!("invoke answered {status}: {}", excerpt(body)));
    }
    if let Some(kind) = function_error {
        return Settlement::InvokeFailed(format!("function error {kind}: {}", excerpt(body)));
    }
    let trimmed = String::from_utf8_lossy(body);
    let trimmed = trimmed.trim();
    let failures: Vec<String> = if trimmed.is_empty() || trimmed == "null" {
        Vec::new()
    } else {
        match serde_json::from_str::<SqsBatchResponse>(trimmed) {
            Ok(response) => response
                .batch_item_failures
                .into_iter()
                .map(|f| f.item_identifier)
                .collect(),
            Err(e) => {
                return Settlement::InvokeFailed(format!(
                    "answer is not an SqsBatchResponse ({e}): {}",
                    excerpt(body)
                ))
            }
        }
    };
    let known: HashSet<&str> = message_ids.iter().map(String::as_str).collect();
    if let Some(unknown) = failures.iter().find(|id| !known.contains(id.as_str())) {
        return Settlement::InvokeFailed(format!(
            "batchItemFailures names {unknown:?}, not a message of this batch"
        ));
    }
    let failed: HashSet<&str> = failures.iter().map(String::as_str).collect();
    let (failed, delete): (Vec<String>, Vec<String>) = message_ids
        .iter()
        .cloned()
        .partition(|id| failed.contains(id.as_str()));
    Settlement::Partial { delete, failed }
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text.chars().take(300).collect();
    if text.chars().count() > 300 {
        out.push('…');
    }
    out.replace('\n', " ")
}

/// The job id from a message body `{"job_id": "...", "kind": "..."}`, for the log.
pub fn job_id_of(body: Option<&str>) -> String {
    body.and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .and_then(|v| v.get("job_id").and_then(|j| j.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// Runs until `shutdown` completes.
pub async fn run(
    sdk: &SdkConfig,
    cfg: BridgeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")?;
    let queue = queue_identity(&sqs, &cfg.queue_url).await?;
    tracing::info!(
        queue = %cfg.queue_url,
        watch = %cfg.watch,
        schedule_secs = cfg.schedule_secs,
        "bridge started"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let supervisor = match cfg.worker_watch.clone() {
        Some(spec) => Some(Mutex::new(Supervisor::start(spec).await?)),
        None => None,
    };
    let bridge = Bridge {
        sqs,
        http,
        cfg,
        queue,
        supervisor,
    };
    let (polled, scheduled, streamed) = tokio::join!(
        bridge.poll_loop(stop_rx.clone()),
        bridge.schedule_loop(stop_rx.clone()),
        bridge.stream_loop(sdk, stop_rx)
    );
    if let Some(s) = &bridge.supervisor {
        s.lock().await.stop().await;
    }
    tracing::info!("bridge stopped");
    polled.and(scheduled).and(streamed)
}

async fn queue_identity(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
) -> anyhow::Result<QueueIdentity> {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| {
            anyhow!(
                "GetQueueAttributes {queue_url}: {}",
                DisplayErrorContext(&e)
            )
        })?;
    let arn = attrs
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .ok_or_else(|| anyhow!("queue {queue_url} has no QueueArn attribute"))?;
    QueueIdentity::from_arn(&arn)
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens after it sent `true`.
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps `d` unless told to stop first; true when stopping.
async fn pause(d: Duration, stop: &watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = stopped(stop.clone()) => true,
        _ = tokio::time::sleep(d) => false,
    }
}

struct Bridge {
    sqs: aws_sdk_sqs::Client,
    http: reqwest::Client,
    cfg: BridgeConfig,
    queue: QueueIdentity,
    /// The worker's own watch, when the bridge runs it.
    supervisor: Option<Mutex<Supervisor>>,
}

struct Answer {
    status: u16,
    function_error: Option<String>,
    body: Vec<u8>,
}

/// How one worker invocation ended.
enum Attempt {
    /// The bridge is stopping.
    Stopped,
    Answered(Result<Answer, reqwest::Error>),
    /// The worker's process (or its watch) is gone: no answer will ever come.
    Died(String),
    /// Ran past the function's timeout plus grace.
    TimedOut(String),
}

impl Bridge {
    async fn poll_loop(&self, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let wait = self.cfg.wait_secs.clamp(1, 20);
        while !*stop.borrow() {
            // A receive is never abandoned half way (a dropped long poll could still take a
            // message and hide it for the visibility timeout), so stopping waits for one poll.
            let received = self
                .sqs
                .receive_message()
                .queue_url(&self.cfg.queue_url)
                .max_number_of_messages(BATCH_SIZE)
                .wait_time_seconds(wait)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                .message_system_attribute_names(MessageSystemAttributeName::SenderId)
                .message_system_attribute_names(
                    MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
                )
                .message_attribute_names("All")
                .send()
                .await;
            let messages = match received {
                Ok(out) => out.messages.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %DisplayErrorContext(&e), "ReceiveMessage failed");
                    if pause(UNREACHABLE_BACKOFF, &stop).await {
                        break;
                    }
                    continue;
                }
            };
            if !messages.is_empty() {
                self.deliver(&messages, &stop).await;
            }
        }
        Ok(())
    }

    async fn deliver(&self, messages: &[Message], stop: &watch::Receiver<bool>) {
        let started = Instant::now();
        let ids: Vec<String> = messages
            .iter()
            .filter_map(|m| m.message_id.clone())
            .collect();
        let message_id = ids.join(",");
        let job_id = messages
            .iter()
            .map(|m| job_id_of(m.body.as_deref()))
            .collect::<Vec<_>>()
            .join(",");
        let receive_count = messages
            .iter()
            .map(|m| {
                m.attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .map(String::as_str)
                    .unwrap_or("?")
            })
            .collect::<Vec<_>>()
            .join(",");
        let body = match serde_json::to_vec(&sqs_event(&self.queue, messages)) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "could not serialise the SQS event");
                return;
            }
        };
        // With a supervised watch the supervisor enforces the timeout (its clock starts when the
        // worker runs); the HTTP timeout is only a backstop.
        let http_timeout = match self.supervisor {
            Some(_) => self.cfg.cold_start_timeout + self.cfg.invoke_timeout,
            None => self.cfg.invoke_timeout,
        };

        let mut warned = false;
        let attempt = loop {
            let url = invoke_url(&self.worker_base().await, &self.cfg.worker_function);
            let attempt = tokio::select! {
                _ = stopped(stop.clone()) => Attempt::Stopped,
                answer = self.invoke(&url, body.clone(), http_timeout) => Attempt::Answered(answer),
                end = self.watch_invocation() => end,
            };
            match attempt {
                Attempt::Answered(Err(e)) if e.is_connect() => {
                    if !warned {
                        tracing::warn!(url = %url, "worker not reachable yet; holding the message and retrying");
                        warned = true;
                    }
                    if pause(UNREACHABLE_BACKOFF, stop).await {
                        self.set_visibility(messages, 0).await;
                        return;
                    }
                }
                other => break other,
            }
        };
        let settlement = match attempt {
            Attempt::Stopped => {
                // Stopping mid-invoke: make the messages visible again right away so the
                // next bridge picks them up (the job's lease guards against double work).
                self.set_visibility(messages, 0).await;
                tracing::info!(%message_id, %job_id, outcome = "released (bridge stopping)", "delivery");
                return;
            }
            // No answer from the function, and none coming: like a crashed or timed-out Lambda
            // invocation, not like a function error.
            Attempt::Died(reason) => Err(format!("worker died: {reason}")),
            Attempt::TimedOut(reason) => Err(reason),
            Attempt::Answered(Err(e)) if e.is_timeout() => {
                Err(format!("no answer within {http_timeout:?}"))
            }
            Attempt::Answered(Err(e)) => Err(format!("invoke failed: {e}")),
            Attempt::Answered(Ok(a)) => {
                Ok(settle(&ids, a.status, a.function_error.as_deref(), &a.body))
            }
        };
        let ms = started.elapsed().as_millis();
        let settlement = match settlement {
            Ok(settlement) => settlement,
            Err(reason) => {
                let outcome = self.abandon(messages, &reason).await;
                tracing::warn!(%message_id, %job_id, %receive_count, ms, %outcome, "delivery");
                return;
            }
        };
        match settlement {
            Settlement::Partial { delete, failed } => {
                let deleted = self.delete(messages, &delete).await;
                let outcome = match (failed.is_empty(), deleted) {
                    (true, Ok(())) => "succeeded, deleted".to_owned(),
                    (false, Ok(())) => {
                        "failure reported, left for retry after the visibility timeout".to_owned()
                    }
                    (_, Err(e)) => format!("delete failed: {e:#}"),
                };
                tracing::info!(%message_id, %job_id, %receive_count, ms, %outcome, "delivery");
            }
            Settlement::InvokeFailed(reason) => {
                let outcome = format!("invoke failed, nothing deleted: {reason}");
                tracing::warn!(%message_id, %job_id, %receive_count, ms, %outcome, "delivery");
            }
        }
    }

    async fn invoke(
        &self,
        url: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Answer, reqwest::Error> {
        let response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(timeout)
            .body(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let function_error = response
            .headers()
            .get("x-amz-function-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await?.to_vec();
        Ok(Answer {
            status,
            function_error,
            body,
        })
    }

    async fn delete(&self, messages: &[Message], ids: &[String]) -> anyhow::Result<()> {
        let entries = messages
            .iter()
            .filter(|m| m.message_id.as_ref().is_some_and(|id| ids.contains(id)))
            .enumerate()
            .map(|(n, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(format!("m{n}"))
                    .set_receipt_handle(m.receipt_handle.clone())
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .context("building delete entries")?;
        if entries.is_empty() {
            return Ok(());
        }
        let out = self
            .sqs
            .delete_message_batch()
            .queue_url(&self.cfg.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| anyhow!("DeleteMessageBatch: {}", DisplayErrorContext(&e)))?;
        if let Some(failed) = Some(out.failed).filter(|f| !f.is_empty()) {
            let reasons: Vec<String> = failed
                .iter()
                .map(|f| format!("{}: {}", f.code, f.message.as_deref().unwrap_or("")))
                .collect();
            bail!("DeleteMessageBatch failed for {}", reasons.join("; "));
        }
        Ok(())
    }

    /// Makes the messages visible again in `secs` seconds.
    async fn set_visibility(&self, messages: &[Message], secs: i32) {
        for m in messages {
            let Some(handle) = m.receipt_handle.as_deref() else {
                continue;
            };
            if let Err(e) = self
                .sqs
                .change_message_visibility()
                .queue_url(&self.cfg.queue_url)
                .receipt_handle(handle)
                .visibility_timeout(secs)
                .send()
                .await
            {
                tracing::warn!(error = %DisplayErrorContext(&e), "could not change a message's visibility; it comes back after the queue's visibility timeout");
            }
        }
    }

    /// Where the worker is invoked. A supervised worker that died between invocations is
    /// started again first: its watch would take the invoke and never answer it.
    async fn worker_base(&self) -> String {
        let Some(sup) = &self.supervisor else {
            return self.cfg.watch.clone();
        };
        let mut sup = sup.lock().await;
        if let Health::Dead(reason) = sup.health().await {
            tracing::warn!(%reason, "worker found dead before an invocation; restarting its watch");
            if let Err(e) = sup.restart().await {
                tracing::error!(error = %format!("{e:#}"), "could not restart the worker's watch");
            }
        }
        sup.url()
    }

    /// Completes when the running invocation can no longer be answered (the worker's process
    /// died) or ran past the function's timeout; never without a supervised watch.
    async fn watch_invocation(&self) -> Attempt {
        let Some(sup) = &self.supervisor else {
            return std::future::pending().await;
        };
        let invoked = Instant::now();
        let mut running_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(self.cfg.liveness_every).await;
            let health = sup.lock().await.health().await;
            match health {
                Health::Dead(reason) => return Attempt::Died(reason),
                Health::NotStarted | Health::Building(_) => {
                    if invoked.elapsed() > self.cfg.cold_start_timeout {
                        return Attempt::TimedOut(format!(
                            "{} did not start within {:?}",
                            self.cfg.worker_function, self.cfg.cold_start_timeout
                        ));
                    }
                }
                Health::Running(_) | Health::Unknown => {
                    let since = *running_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.cfg.invoke_timeout {
                        return Attempt::TimedOut(format!(
                            "no answer {:?} into the invocation (the function's timeout plus grace)",
                            self.cfg.invoke_timeout
                        ));
                    }
                }
            }
        }
    }

    /// Gives up an invocation that will not answer: restarts the worker's watch (which also ends
    /// a hung worker) and lets the message come back soon, as a fresh Lambda runtime would take
    /// it after the visibility timeout. Nothing is deleted: the job's checkpoint and lease
    /// decide what the next delivery does. Returns the outcome for the delivery log line.
    async fn abandon(&self, messages: &[Message], reason: &str) -> String {
        let restarted = match &self.supervisor {
            Some(sup) => match sup.lock().await.restart().await {
                Ok(()) => "worker watch restarted".to_owned(),
                Err(e) => format!("worker watch NOT restarted: {e:#}"),
            },
            None => "no supervised watch to restart (run the bridge with --worker-port); later invokes may hang too".to_owned(),
        };
        let secs = i32::try_from(self.cfg.redeliver_after.as_secs()).unwrap_or(i32::MAX);
        self.set_visibility(messages, secs).await;
        format!("{reason}; {restarted}; message visible again in {secs} s")
    }

    /// Plays the source tables' streams to the invalidator ([`crate::streams`]), when they
    /// have streams: on dynalite they have none, and says so once.
    async fn stream_loop(
        &self,
        sdk: &SdkConfig,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        if self.cfg.stream_tables.is_empty() {
            return Ok(());
        }
        let source = match &self.cfg.source_endpoint {
            Some(url) => sdk.to_builder().endpoint_url(url).build(),
            None => sdk.clone(),
        };
        let tap = StreamTap::open(
            &aws_sdk_dynamodb::Client::new(&source),
            aws_sdk_dynamodbstreams::Client::new(&source),
            &self.queue.region,
            &self.cfg.stream_tables,
        )
        .await?;
        let Some(mut tap) = tap else {
            tracing::warn!(tables = ?self.cfg.stream_tables,
                "the source tables have no stream (dynalite keeps none): writes to them show only when entries expire; SOURCE_EMULATOR=moto plays them to {INVALIDATOR_FUNCTION}");
            return Ok(());
        };
        tracing::info!(tables = ?self.cfg.stream_tables, "playing the source tables' streams to {INVALIDATOR_FUNCTION}");
        let url = invoke_url(&self.cfg.watch, INVALIDATOR_FUNCTION);
        loop {
            if pause(STREAM_POLL, &stop).await {
                return Ok(());
            }
            let events = match tap.poll().await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "reading the source streams failed; trying again");
                    continue;
                }
            };
            for (shard, event) in events {
                let records = event.records.len();
                let first = event
                    .records
                    .first()
                    .and_then(|r| r.change.sequence_number.clone());
                let body = serde_json::to_vec(&event).context("serialising the stream event")?;
                let answer = match self.invoke(&url, body, Duration::from_secs(120)).await {
                    Ok(a) if (200..300).contains(&a.status) && a.function_error.is_none() => {
                        serde_json::from_slice::<DynamoDbEventResponse>(&a.body).unwrap_or_default()
                    }
                    // The whole batch failed: Lambda retries it from its first record.
                    failed => {
                        let why = match failed {
                            Ok(a) => format!("answered {}: {}", a.status, excerpt(&a.body)),
                            Err(e) => e.to_string(),
                        };
                        tracing::warn!(records, error = %why, "stream batch delivery failed; read again");
                        let mut all = DynamoDbEventResponse::default();
                        let mut failure = DynamoDbBatchItemFailure::default();
                        failure.item_identifier = first;
                        all.batch_item_failures.push(failure);
                        all
                    }
                };
                match tap.settle(shard, &answer).await {
                    Ok(None) => {
                        tracing::info!(records, "stream batch delivered to {INVALIDATOR_FUNCTION}")
                    }
                    Ok(Some(from)) => tracing::warn!(
                        records,
                        from,
                        "stream batch partly failed; read again from its first failed record"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "repositioning the stream failed")
                    }
                }
            }
        }
    }

    async fn schedule_loop(&self, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        if self.cfg.schedule_secs == 0 {
            return Ok(());
        }
        let period = Duration::from_secs(self.cfg.schedule_secs);
        let url = invoke_url(&self.cfg.watch, WARMER_FUNCTION);
        // Like a `rate(...)` rule: the first event one period after start.
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped(stop.clone()) => return Ok(()),
                _ = ticks.tick() => {}
            }
            let event = scheduled_event(
                &self.queue.region,
                &self.queue.account,
                &self.cfg.rule_name,
                Utc::now(),
            );
            let id = event.id.clone().unwrap_or_default();
            let body = serde_json::to_vec(&event).context("serialising the schedule event")?;
            let started = Instant::now();
            let answer = tokio::select! {
                _ = stopped(stop.clone()) => return Ok(()),
                answer = self.invoke(&url, body, period.max(Duration::from_secs(900))) => answer,
            };
            let ms = started.elapsed().as_millis();
            match answer {
                Ok(a) if (200..300).contains(&a.status) && a.function_error.is_none() => {
                    tracing::info!(event_id = %id, ms, answer = %excerpt(&a.body), "schedule delivered to {WARMER_FUNCTION}");
                }
                Ok(a) => {
                    tracing::warn!(event_id = %id, ms, status = a.status, answer = %excerpt(&a.body), "schedule delivery failed");
                }
                Err(e) => {
                    tracing::warn!(event_id = %id, ms, error = %e, "schedule delivery failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::types::MessageAttributeValue;

    fn queue() -> QueueIdentity {
        QueueIdentity::from_arn("arn:aws:sqs:us-east-1:123456789012:export-cache-jobs").unwrap()
    }

    fn message(id: &str, job: &str) -> Message {
        Message::builder()
            .message_id(id)
            .receipt_handle(format!("handle-{id}"))
            .body(format!(r#"{{"job_id":"{job}","kind":"export"}}"#))
            .md5_of_body("0123456789abcdef0123456789abcdef")
            .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "1")
            .attributes(MessageSystemAttributeName::SentTimestamp, "1704067200000")
            .message_attributes(
                "origin",
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value("api")
                    .build()
                    .unwrap(),
            )
            .build()
    }

    #[test]
    fn queue_arn_is_parsed() {
        let q = queue();
        assert_eq!(q.region, "us-east-1");
        assert_eq!(q.account, "123456789012");
        assert!(QueueIdentity::from_arn("https://sqs.us-east-1/123/q").is_err());
    }

    #[test]
    fn sqs_event_has_lambdas_shape() {
        let event = sqs_event(&queue(), &[message("m-1", "job-42")]);
        let json = serde_json::to_value(&event).unwrap();
        let record = &json["Records"][0];
        assert_eq!(record["eventSource"], "aws:sqs");
        assert_eq!(
            record["eventSourceARN"],
            "arn:aws:sqs:us-east-1:123456789012:export-cache-jobs"
        );
        assert_eq!(record["awsRegion"], "us-east-1");
        assert_eq!(record["messageId"], "m-1");
        assert_eq!(record["receiptHandle"], "handle-m-1");
        assert_eq!(record["md5OfBody"], "0123456789abcdef0123456789abcdef");
        assert_eq!(record["attributes"]["ApproximateReceiveCount"], "1");
        assert_eq!(record["attributes"]["SentTimestamp"], "1704067200000");
        assert_eq!(record["messageAttributes"]["origin"]["stringValue"], "api");
        assert_eq!(record["messageAttributes"]["origin"]["dataType"], "String");
        let body: serde_json::Value =
            serde_json::from_str(record["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["job_id"], "job-42");

        let back: SqsEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn sqs_event_reads_like_lambdas_fixture() {
        // The keys of a real Lambda SQS record must all be present in ours.
        let fixture: serde_json::Value = serde_json::from_str(
            r#"{"Records":[{"messageId":"x","receiptHandle":"h","body":"b","md5OfBody":"m",
            "md5OfMessageAttributes":null,"eventSourceARN":"a","eventSource":"aws:sqs",
            "awsRegion":"us-east-1","attributes":{},"messageAttributes":{}}]}"#,
        )
        .unwrap();
        let ours = serde_json::to_value(sqs_event(&queue(), &[message("m", "j")])).unwrap();
        for key in fixture["Records"][0].as_object().unwrap().keys() {
            assert!(ours["Records"][0].get(key).is_some(), "missing {key}");
        }
    }

    #[test]
    fn scheduled_event_has_eventbridges_shape() {
        let time = DateTime::parse_from_rfc3339("2024-05-01T10:15:00.750Z")
            .unwrap()
            .with_timezone(&Utc);
        let event = scheduled_event("us-east-1", "123456789012", "warm", time);
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["detail-type"], "Scheduled Event");
        assert_eq!(json["source"], "aws.events");
        assert_eq!(json["version"], "0");
        assert_eq!(json["account"], "123456789012");
        assert_eq!(json["region"], "us-east-1");
        assert_eq!(json["time"], "2024-05-01T10:15:00Z");
        assert_eq!(
            json["resources"][0],
            "arn:aws:events:us-east-1:123456789012:rule/warm"
        );
        assert_eq!(json["detail"], serde_json::json!({}));
        let back: EventBridgeEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn empty_or_null_answer_deletes_everything() {
        for body in [&b""[..], b"null", br#"{"batchItemFailures":[]}"#] {
            assert_eq!(
                settle(&ids(&["a", "b"]), 200, None, body),
                Settlement::Partial {
                    delete: ids(&["a", "b"]),
                    failed: vec![]
                }
            );
        }
    }

    #[test]
    fn reported_failures_stay_on_the_queue() {
        let body = br#"{"batchItemFailures":[{"itemIdentifier":"b"}]}"#;
        assert_eq!(
            settle(&ids(&["a", "b"]), 200, None, body),
            Settlement::Partial {
                delete: ids(&["a"]),
                failed: ids(&["b"])
            }
        );
    }

    #[test]
    fn invoke_errors_delete_nothing() {
        let ok = br#"{"batchItemFailures":[]}"#;
        assert!(matches!(
            settle(&ids(&["a"]), 500, None, b"{\"errorType\":\"x\"}"),
            Settlement::InvokeFailed(_)
        ));
        assert!(matches!(
            settle(&ids(&["a"]), 200, Some("Unhandled"), ok),
            Settlement::InvokeFailed(_)
        ));
        assert!(matches!(
            settle(&ids(&["a"]), 200, None, b"not json"),
            Settlement::InvokeFailed(_)
        ));
        let stranger = br#"{"batchItemFailures":[{"itemIdentifier":"zzz"}]}"#;
        assert!(matches!(
            settle(&ids(&["a"]), 200, None, stranger),
            Settlement::InvokeFailed(_)
        ));
    }

    #[test]
    fn job_id_is_read_from_the_body() {
        assert_eq!(job_id_of(Some(r#"{"job_id":"j1","kind":"refresh"}"#)), "j1");
        assert_eq!(job_id_of(Some("garbage")), "?");
        assert_eq!(job_id_of(None), "?");
    }

    #[test]
    fn invoke_url_is_the_lambda_invoke_path() {
        assert_eq!(
            invoke_url("http://127.0.0.1:9000/", WORKER_FUNCTION),
            "http://127.0.0.1:9000/2015-03-31/functions/export-worker/invocations"
        );
    }
}
