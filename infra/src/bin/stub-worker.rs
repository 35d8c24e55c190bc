//! A stand-in for `export-worker` in the bridge's crash test (`infra/tests/worker_crash.rs`): an
//! SQS-triggered function run by `cargo lambda watch` exactly like the real one, but with no AWS
//! behind it, so the test is about delivery alone.
//!
//! For each record with body `{"job_id": ID, "hang_first": bool}` it writes `ID.hanging` (its pid)
//! and then never answers when `hang_first` is set and this is the first delivery; otherwise it
//! writes `ID.done` (the receive count) and answers success. Files go to `$STUB_WORKER_DIR`.

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use std::path::{Path, PathBuf};

/// Written whole or not at all, so the test never reads half a file.
fn write_marker(dir: &Path, name: &str, content: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(tmp, dir.join(name))
}

async fn handle(dir: &Path, event: SqsEvent) -> Result<SqsBatchResponse, Error> {
    for record in event.records {
        let body: serde_json::Value =
            serde_json::from_str(record.body.as_deref().unwrap_or("{}")).unwrap_or_default();
        let id = body["job_id"].as_str().unwrap_or("unknown").to_owned();
        let count: u32 = record
            .attributes
            .get("ApproximateReceiveCount")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        if body["hang_first"] == true && count == 1 {
            write_marker(
                dir,
                &format!("{id}.hanging"),
                &std::process::id().to_string(),
            )?;
            // Mid-export as far as anyone can tell: alive, busy, no answer.
            std::future::pending::<()>().await;
        }
        write_marker(dir, &format!("{id}.done"), &count.to_string())?;
    }
    Ok(SqsBatchResponse::default())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let dir =
        PathBuf::from(std::env::var("STUB_WORKER_DIR").map_err(|_| "STUB_WORKER_DIR is required")?);
    let dir = &dir;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        handle(dir, event.payload).await
    }))
    .await
}
