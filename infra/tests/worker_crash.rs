//! The bridge survives a worker that dies or hangs mid-invocation (issue 6, item 4).
//!
//! Real pieces: the bridge, a real `cargo lambda watch` it supervises, an SQS queue in the emulator
//! with the template's 90-minute visibility timeout. The function is `stub-worker` (this crate's
//! stand-in for export-worker), which hangs on the first delivery of a message that asks for it,
//! so the test can `kill -9` it mid-invocation. Run with `make test` (emulator + cargo-lambda).

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::types::QueueAttributeName;
use infra::bridge::{self, BridgeConfig};
use infra::supervise::WatchSpec;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FUNCTION: &str = "stub-worker";
/// The first delivery may build the stub under `cargo run` (features differ from `cargo test`'s).
const FIRST_DELIVERY: Duration = Duration::from_secs(900);
/// What "within a minute or two" means here, for each recovery.
const RECOVERY: Duration = Duration::from_secs(90);

async fn sdk() -> SdkConfig {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok(),
        "AWS_ENDPOINT_URL is not set: this test uses an SQS queue in the local emulator; run it with `make test`"
    );
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .test_credentials()
        .load()
        .await
}

fn require_cargo_lambda() {
    let ok = std::process::Command::new("cargo")
        .args(["lambda", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "`cargo lambda` is not on PATH: run this test with `make test` (it puts .local/venv/bin first)"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Waits for the stub's marker file `name`; bounded, polled every 100 ms.
async fn marker(dir: &Path, name: &str, within: Duration) -> String {
    let path = dir.join(name);
    let until = Instant::now() + within;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return text;
        }
        assert!(
            Instant::now() < until,
            "{name} did not appear within {within:?}; watch log:\n{}",
            std::fs::read_to_string(dir.join("watch.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Running, as opposed to gone or a zombie: a killed process stays a zombie until its parent
/// (the watch) reaps it, which a loaded machine may do a moment later.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses and may hold spaces.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Whether `pid` stops running within `within`.
async fn stops(pid: u32, within: Duration) -> bool {
    let until = Instant::now() + within;
    while alive(pid) {
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

async fn send(sqs: &aws_sdk_sqs::Client, queue_url: &str, body: serde_json::Value) {
    sqs.send_message()
        .queue_url(queue_url)
        .message_body(body.to_string())
        .send()
        .await
        .expect("SendMessage");
}

/// Sends a message the stub hangs on at its first delivery; returns the stub's pid once it does.
async fn send_hanging(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    dir: &Path,
    id: &str,
    within: Duration,
) -> u32 {
    send(
        sqs,
        queue_url,
        serde_json::json!({"job_id": id, "hang_first": true}),
    )
    .await;
    marker(dir, &format!("{id}.hanging"), within)
        .await
        .trim()
        .parse()
        .expect("the stub writes its pid")
}

/// Visible plus in-flight messages.
async fn messages_left(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> u64 {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("GetQueueAttributes")
        .attributes
        .unwrap_or_default();
    attrs.values().map(|v| v.parse::<u64>().unwrap_or(0)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_or_hung_mid_invocation_is_restarted_and_its_message_served_again() {
    require_cargo_lambda();
    let sdk = sdk().await;
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let queue_url = sqs
        .create_queue()
        .queue_name(format!("bridge-crash-{}", uuid::Uuid::new_v4().simple()))
        // As in template.yaml: without the bridge's redelivery a lost message would be back
        // only after 90 minutes, far past this test's bounds.
        .attributes(QueueAttributeName::VisibilityTimeout, "5400")
        .send()
        .await
        .expect("CreateQueue")
        .queue_url
        .expect("queue URL");

    let dir = tempfile::tempdir().expect("temp dir");
    let dir_path: PathBuf = dir.path().to_owned();
    let mut spec = WatchSpec::cargo_lambda(free_port(), FUNCTION);
    spec.env = vec![("STUB_WORKER_DIR".to_owned(), dir_path.display().to_string())];
    spec.log = Some(dir_path.join("watch.log"));
    // The workspace root, where `cargo lambda watch` finds the stub's package.
    spec.args.extend([
        "--manifest-path".to_owned(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../Cargo.toml")
            .display()
            .to_string(),
    ]);
    let mut cfg = BridgeConfig::new(&queue_url, spec.url());
    cfg.worker_function = FUNCTION.to_owned();
    cfg.worker_watch = Some(spec);
    cfg.schedule_secs = 0;
    cfg.wait_secs = 1;
    cfg.invoke_timeout = Duration::from_secs(10);
    cfg.redeliver_after = Duration::from_secs(1);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let bridge_sdk = sdk.clone();
    let bridge = tokio::spawn(async move {
        bridge::run(&bridge_sdk, cfg, async {
            let _ = stop_rx.await;
        })
        .await
    });

    // 1. Killed mid-invocation: noticed, watch restarted, message delivered again and served.
    let pid = send_hanging(&sqs, &queue_url, &dir_path, "killed", FIRST_DELIVERY).await;
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -9 {pid}");
    let killed = Instant::now();
    let count = marker(&dir_path, "killed.done", RECOVERY).await;
    assert_eq!(
        count, "2",
        "served by the second delivery of the same message"
    );
    println!(
        "killed worker: message served again {:.1?} after kill -9",
        killed.elapsed()
    );

    // 2. The next invocation is served by the restarted worker.
    let sent = Instant::now();
    send(&sqs, &queue_url, serde_json::json!({"job_id": "next"})).await;
    assert_eq!(marker(&dir_path, "next.done", RECOVERY).await, "1");
    println!(
        "next message served {:.1?} after it was sent",
        sent.elapsed()
    );

    // 3. Hung (alive, never answering): given up after the timeout, its process ended, the
    //    message served again.
    let hung_pid = send_hanging(&sqs, &queue_url, &dir_path, "hung", RECOVERY).await;
    let hung = Instant::now();
    assert_eq!(marker(&dir_path, "hung.done", RECOVERY).await, "2");
    assert!(
        stops(hung_pid, Duration::from_secs(5)).await,
        "the hung worker {hung_pid} was stopped"
    );
    println!(
        "hung worker: message served again {:.1?} after it hung (timeout 10 s)",
        hung.elapsed()
    );

    // Everything settled: nothing visible, nothing in flight.
    let until = Instant::now() + Duration::from_secs(20);
    while messages_left(&sqs, &queue_url).await > 0 {
        assert!(Instant::now() < until, "messages left on the queue");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), bridge)
        .await
        .expect("the bridge stops within 30 s")
        .expect("bridge task")
        .expect("bridge run");
    let _ = sqs.delete_queue().queue_url(&queue_url).send().await;
}
