//! The EMF lines the use cases write: one per finished job, with what it cost, and never a
//! tenant or job id among the dimensions.

use chrono::Duration;

use super::tests::{miss, orders, run_queue, setup, setup_with};
use crate::domain::catalog::{Catalog, BUILTIN_CATALOG};
use crate::testing::emf_documents;

#[tokio::test]
async fn a_succeeded_job_emits_its_duration_rows_bytes_and_source_reads() {
    let f = setup(35);
    let job_id = miss(&f, "acme", &orders(&[])).await;
    run_queue(&f).await;
    let docs = emf_documents(&f.metrics, &["acme", "alice", &job_id]);
    let jobs: Vec<_> = docs.iter().filter(|d| d.get("JobRows").is_some()).collect();
    assert_eq!(jobs.len(), 1, "{docs:?}");
    let doc = jobs[0];
    assert_eq!(
        (&doc["dataset"], &doc["format"], &doc["outcome"]),
        (&"orders".into(), &"csv".into(), &"succeeded".into())
    );
    assert_eq!(doc["JobRows"], 35.0);
    let bytes = f
        .files
        .objects
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| k.ends_with(".csv"))
        .map(|(_, b)| b.len())
        .unwrap();
    assert_eq!(doc["JobBytes"], bytes as f64);
    // 35 rows in pages of 10.
    assert_eq!(doc["SourcePagesRead"], 4.0);
    assert!(doc["JobDuration"].as_f64().unwrap() >= 0.0);
    assert_eq!(doc["job_id"], job_id.as_str());
    assert_eq!(doc["tenant"], "acme");
}

#[tokio::test]
async fn a_failed_job_emits_outcome_failed_with_its_code_once() {
    let small =
        Catalog::from_toml(&BUILTIN_CATALOG.replace("row_limit = 5000000", "row_limit = 25"))
            .unwrap();
    let f = setup_with(60, small);
    let job_id = miss(&f, "acme", &orders(&[("format", "ndjson")])).await;
    f.clock.advance(Duration::seconds(3));
    run_queue(&f).await;
    let docs = emf_documents(&f.metrics, &["acme", &job_id]);
    let jobs: Vec<_> = docs.iter().filter(|d| d.get("JobRows").is_some()).collect();
    assert_eq!(jobs.len(), 1, "{docs:?}");
    assert_eq!(jobs[0]["outcome"], "failed");
    assert_eq!(jobs[0]["format"], "ndjson");
    assert_eq!(jobs[0]["error_code"], "row_limit_exceeded");
}
