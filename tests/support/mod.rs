//! Integration-test harness: a uniquely named stack in the local AWS emulator (provisioned from
//! template.yaml, seeded with the demo data), the real adapters, the API router called in-process,
//! and the worker fed from the real SQS queue the way the Lambda trigger does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use aws_config::{BehaviorVersion, SdkConfig};
use axum::body::Body;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use infra::provision::{provision_with_source, teardown_with_source, template_path, Provisioned};
use shared::adapters::deps_from_aws;
use shared::config::Config;
use shared::domain::catalog::Catalog;
use shared::services::Deps;
use shared::testing::ManualClock;

/// At least 32 bytes: the API refuses shorter local signing keys at start-up.
pub const SECRET: &str = "integration-test-secret-of-32-bytes-at-least";

pub async fn sdk() -> SdkConfig {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok(),
        "AWS_ENDPOINT_URL is not set: these tests talk to the local AWS emulator; run them with `make test`"
    );
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// A provisioned stack, torn down when dropped: at the end of its test, and as well when an
/// assertion fails first.
pub struct Stack {
    pub sdk: SdkConfig,
    pub p: Provisioned,
    pub deps: Deps,
    pub clock: Arc<ManualClock>,
    pub queue_arn: String,
    _teardown: Teardown,
}

/// How long a teardown may take; past it the stack is reported as left behind.
const TEARDOWN_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// Deletes a stack's resources when dropped, from the moment they exist (a failing seed or
/// set-up step leaves nothing behind either). Drop cannot await, and the test's runtime may be
/// a current-thread one that this very call blocks, so the teardown runs on a thread of its own
/// with its own runtime, through SDK clients built there.
struct Teardown {
    sdk: SdkConfig,
    /// Where the source tables are (the same as `sdk` unless a test moves them).
    source: SdkConfig,
    p: Provisioned,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let (sdk, source, p) = (self.sdk.clone(), self.source.clone(), self.p.clone());
        let done = std::thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let torn_down = teardown_with_source(&sdk, &source, &p);
                match tokio::time::timeout(TEARDOWN_WITHIN, torn_down).await {
                    Ok(result) => result.map_err(|e| format!("{e:#}")),
                    Err(_) => Err(format!("not done within {TEARDOWN_WITHIN:?}")),
                }
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the teardown thread panicked".into()));
        if let Err(e) = done {
            let what = format!("stack {} was not torn down: {e}", self.p.names.stack);
            // A second panic while the test unwinds would abort the whole test binary.
            if std::thread::panicking() {
                eprintln!("{what}");
            } else {
                panic!("{what}");
            }
        }
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }
}

impl Stack {
    /// A fresh stack with `rows` orders per tenant (acme, globex), and extra config.
    pub async fn new(rows: u64, extra: &[(&str, &str)]) -> Self {
        Self::on(sdk().await, rows, extra).await
    }

    /// The same, in the emulator `sdk` points at.
    pub async fn on(sdk: SdkConfig, rows: u64, extra: &[(&str, &str)]) -> Self {
        Self::with_source(sdk.clone(), sdk, rows, extra).await
    }

    /// A stack whose source tables are in `region` of the emulator (moto keeps regions apart),
    /// and whose functions are told so through `SOURCE_REGION`.
    pub async fn with_source_region(rows: u64, region: &str, extra: &[(&str, &str)]) -> Self {
        let sdk = sdk().await;
        let source = sdk
            .to_builder()
            .region(aws_config::Region::new(region.to_owned()))
            .build();
        let extra: Vec<(&str, &str)> = [("SOURCE_REGION", region)]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        Self::with_source(sdk, source, rows, &extra).await
    }

    /// A stack with its source tables provisioned and seeded through `source`.
    async fn with_source(
        sdk: SdkConfig,
        source: SdkConfig,
        rows: u64,
        extra: &[(&str, &str)],
    ) -> Self {
        let stack = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let p = provision_with_source(&sdk, &source, &template_path(), &stack)
            .await
            .unwrap();
        let torn_down = Teardown {
            sdk: sdk.clone(),
            source: source.clone(),
            p: p.clone(),
        };
        if rows > 0 {
            infra::seed::seed(
                &source,
                &p.names.orders_table,
                &p.names.customers_table,
                &["acme", "globex"],
                rows,
            )
            .await
            .unwrap();
        }
        let mut env: HashMap<String, String> = [
            ("META_TABLE", p.names.meta_table.as_str()),
            ("EXPORT_BUCKET", p.names.bucket.as_str()),
            ("JOB_QUEUE_URL", p.queue_url.as_str()),
            ("SOURCE_TABLE_PREFIX", p.names.source_table_prefix.as_str()),
            ("LOCAL_JWT_SECRET", SECRET),
            ("S3_FORCE_PATH_STYLE", "true"),
            ("LOG_FORMAT", "text"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        let config = Config::from_map(&env).unwrap();
        let mut deps = deps_from_aws(&sdk, config, Catalog::builtin().unwrap()).await;
        let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
        deps.clock = clock.clone();
        let queue_arn = aws_sdk_sqs::Client::new(&sdk)
            .get_queue_attributes()
            .queue_url(&p.queue_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()
            .remove(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .unwrap();
        Self {
            sdk,
            p,
            deps,
            clock,
            queue_arn,
            _teardown: torn_down,
        }
    }

    pub fn token(&self, tenant: &str, scopes: &[&str]) -> String {
        self.user_token(tenant, "alice", scopes)
    }

    pub fn user_token(&self, tenant: &str, user: &str, scopes: &[&str]) -> String {
        infra::token::dev_token(SECRET, tenant, user, scopes, 600).unwrap()
    }

    pub fn reader(&self, tenant: &str) -> String {
        self.token(tenant, &["exports:read"])
    }

    /// One request through the API router, as API Gateway would hand it over.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Answer {
        self.call_with(method, uri, token, body, &[]).await
    }

    /// The same, with extra request headers.
    pub async fn call_with(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = api::router(self.deps.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, uri: &str, token: &str) -> Answer {
        self.call(Method::GET, uri, Some(token), None).await
    }

    /// Just the status of a GET.
    pub async fn status(&self, uri: &str, token: &str) -> StatusCode {
        self.get(uri, token).await.status
    }

    pub async fn delete(&self, uri: &str, token: &str) -> StatusCode {
        self.call(Method::DELETE, uri, Some(token), None)
            .await
            .status
    }

    /// Plays the SQS trigger: receive a batch from the real queue, invoke the worker handler,
    /// delete what it did not report as failed. Returns the number of messages handled.
    pub async fn run_worker_once(&self) -> usize {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let resp = sqs
            .receive_message()
            .queue_url(&self.p.queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(0)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap();
        let messages = resp.messages.unwrap_or_default();
        if messages.is_empty() {
            return 0;
        }
        let queue = infra::bridge::QueueIdentity::from_arn(&self.queue_arn).unwrap();
        let event = infra::bridge::sqs_event(&queue, &messages);
        let deadline = self.clock.0.lock().map(|t| *t).unwrap() + chrono::Duration::minutes(15);
        let answer = worker::handle_batch(&self.deps, event, "test-worker", deadline).await;
        let failed: Vec<String> = answer
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect();
        for m in &messages {
            if !failed.contains(m.message_id.as_ref().unwrap()) {
                sqs.delete_message()
                    .queue_url(&self.p.queue_url)
                    .receipt_handle(m.receipt_handle.as_ref().unwrap())
                    .send()
                    .await
                    .unwrap();
            }
        }
        messages.len()
    }

    /// Runs the worker until the queue is empty.
    pub async fn run_worker(&self) -> usize {
        let mut total = 0;
        loop {
            let n = self.run_worker_once().await;
            if n == 0 {
                return total;
            }
            total += n;
        }
    }

    /// Messages waiting in the queue (received and left to reappear).
    pub async fn queued_messages(&self) -> Vec<String> {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let mut bodies = Vec::new();
        loop {
            let resp = sqs
                .receive_message()
                .queue_url(&self.p.queue_url)
                .max_number_of_messages(10)
                .visibility_timeout(30)
                .send()
                .await
                .unwrap();
            let batch = resp.messages.unwrap_or_default();
            if batch.is_empty() {
                return bodies;
            }
            bodies.extend(batch.into_iter().filter_map(|m| m.body));
        }
    }

    pub fn s3(&self) -> aws_sdk_s3::Client {
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&self.sdk)
                .force_path_style(true)
                .build(),
        )
    }

    /// Every key under `exports/`: files and their manifests.
    pub async fn object_keys(&self) -> Vec<String> {
        let resp = self
            .s3()
            .list_objects_v2()
            .bucket(&self.p.names.bucket)
            .prefix("exports/")
            .send()
            .await
            .unwrap();
        resp.contents
            .unwrap_or_default()
            .into_iter()
            .filter_map(|o| o.key)
            .collect()
    }

    /// Keys of the export files (not manifests) in the bucket.
    pub async fn export_files(&self) -> Vec<String> {
        let mut keys = self.object_keys().await;
        keys.retain(|k| !k.ends_with(".manifest.json"));
        keys
    }

    pub async fn read_object(&self, key: &str) -> Vec<u8> {
        let resp = self
            .s3()
            .get_object()
            .bucket(&self.p.names.bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        resp.body.collect().await.unwrap().into_bytes().to_vec()
    }

    /// Follows a presigned URL like a browser would.
    pub async fn fetch(&self, url: &str) -> (reqwest::StatusCode, HeaderMap, Vec<u8>) {
        let resp = reqwest::get(url).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        (status, headers, resp.bytes().await.unwrap().to_vec())
    }

    /// Requests an export, expects a miss, runs the worker, and returns the finished job id.
    pub async fn export_through_worker(&self, uri: &str, token: &str) -> String {
        let miss = self.get(uri, token).await;
        assert_eq!(
            miss.status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&miss.body)
        );
        let job_id = miss.json()["job_id"].as_str().unwrap().to_string();
        self.run_worker().await;
        let status = self
            .get(&format!("/exports/jobs/{job_id}"), token)
            .await
            .json();
        assert_eq!(status["status"], "succeeded", "{status}");
        job_id
    }
}

/// What a spreadsheet-safe cell of a seeded text value must be (computed here, independently of
/// the encoders under test).
pub fn neutralised(s: &str) -> String {
    if matches!(
        s.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    ) {
        format!("'{s}")
    } else {
        s.to_string()
    }
}

/// A moto server of the test's own, on a free port: a test that pauses the emulator (SIGSTOP)
/// must never pause the one other tests share. Stopped, by PID, when dropped.
pub struct OwnMoto {
    child: std::process::Child,
    pub url: String,
}

impl OwnMoto {
    pub fn start() -> Self {
        use std::io::BufRead;
        let venv =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.local/venv/bin/moto_server");
        let bin = if venv.exists() {
            venv.into_os_string()
        } else {
            "moto_server".into()
        };
        let mut child = std::process::Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("moto_server (make bootstrap installs it into .local/venv)");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // moto names its port only on stderr; keep draining it so moto never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("Running on http://127.0.0.1:").nth(1) {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("moto did not report its port");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// An SDK config for this emulator alone, with the dummy credentials the emulator takes.
    pub async fn sdk(&self) -> SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&self.url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "test", "test", None, None, "own-moto",
            ))
            .load()
            .await
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal}");
    }

    /// Freezes the emulator (connections are accepted by the kernel, never answered) until the
    /// returned guard is dropped, so a failed assertion never leaves it frozen for the teardown.
    pub fn pause(&self) -> Paused<'_> {
        self.signal("-STOP");
        Paused(self)
    }
}

/// The emulator stays frozen while this lives.
pub struct Paused<'a>(&'a OwnMoto);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.signal("-CONT");
    }
}

impl Drop for OwnMoto {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Orders in key order (by order id, and by creation time) whose note is 300 characters of
/// pseudo-random hex: text that compresses about 2:1, so every format makes more than one 5 MiB
/// part from 40,000 rows.
pub fn noisy_orders(n: usize) -> Vec<shared::domain::Row> {
    use chrono::{TimeZone, Utc};
    use shared::domain::Value;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|i| {
            let note: String = (0..300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from_digit((x % 16) as u32, 16).unwrap()
                })
                .collect();
            vec![
                Value::Str(format!("ORD-{i:07}")),
                Value::Ts(Utc.timestamp_opt(1_700_000_000 + i as i64 * 37, 0).unwrap()),
                Value::Str(format!("C{}", i % 97)),
                Value::Str(format!("Customer {}", i % 97)),
                Value::Str("paid".into()),
                Value::Str("EUR".into()),
                Value::Dec(format!("{}.{:02}", i % 5000, i % 100)),
                Value::Dec("1.10".into()),
                Value::Int(i as i64 % 9),
                Value::Bool(i % 2 == 0),
                Value::Date(chrono::NaiveDate::from_ymd_opt(2024, 1, 1 + (i % 28) as u32).unwrap()),
                Value::Str(note),
            ]
        })
        .collect()
}

/// A reader of `tenant` (user alice), as the API's identity check would make them.
pub fn reader_identity(tenant: &str) -> shared::domain::Identity {
    shared::domain::Identity {
        tenant: tenant.into(),
        user: "alice".into(),
        scopes: std::collections::BTreeSet::from(
            [shared::domain::identity::SCOPE_READ.to_string()],
        ),
    }
}

/// Starts an export of `orders` with `query` for a reader of `tenant`; it must be a miss. Returns
/// the job's message, as the API would queue it.
pub async fn start_export(
    stack: &Stack,
    tenant: &str,
    query: &[(&str, &str)],
) -> shared::domain::JobMessage {
    use shared::services::export::{request_export, ExportAnswer};
    let pairs = query
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let req = shared::domain::RawExportRequest::from_query("orders", pairs);
    match request_export(&stack.deps, &reader_identity(tenant), &req)
        .await
        .unwrap()
    {
        ExportAnswer::Job { job, .. } => shared::domain::JobMessage {
            job_id: job.job_id,
            kind: shared::domain::MessageKind::Export,
            segment: None,
        },
        other => panic!("expected a miss, got {other:?}"),
    }
}
