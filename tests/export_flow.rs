//! End-to-end flows against the local AWS emulator through the real SDK: API router in-process,
//! worker fed from the real SQS queue, files in the real (emulated) S3 bucket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;
use http::{Method, StatusCode};
use integration_tests::{neutralised, Stack, SECRET};
use shared::testing::HitBeforeCompletion;

const ALL: &[&str] = &["exports:read", "exports:admin"];

/// The CSV cells a seeded order must become, derived from the item itself, not from our encoder.
fn expected_order_cells(item: &HashMap<String, AttributeValue>) -> Vec<String> {
    let text = |k: &str| match item.get(k) {
        Some(AttributeValue::S(s)) => s.clone(),
        Some(AttributeValue::N(n)) => n.clone(),
        Some(AttributeValue::Bool(b)) => b.to_string(),
        None => String::new(),
        other => panic!("unexpected {other:?}"),
    };
    vec![
        text("order_id"),
        text("created_at"),
        text("customer_id"),
        neutralised(&text("customer_name")),
        text("status"),
        text("currency"),
        text("amount"),
        text("tax"),
        text("items"),
        text("paid"),
        text("ship_date"),
        neutralised(&text("note")),
    ]
}

fn parse_csv(bytes: &[u8]) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(bytes)
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

fn assert_problem(a: &integration_tests::Answer, status: StatusCode, field: Option<&str>) {
    assert_eq!(a.status, status, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.header("content-type"), "application/problem+json");
    let body = a.json();
    for k in ["type", "title", "status", "detail"] {
        assert!(body.get(k).is_some(), "problem lacks {k}: {body}");
    }
    assert_eq!(body["status"], status.as_u16());
    if let Some(f) = field {
        let fields: Vec<&str> = body["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors in {body}"))
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert!(fields.contains(&f), "{fields:?} should name {f}: {body}");
    }
}

#[tokio::test]
async fn miss_then_hit_serves_byte_identical_seeded_rows_without_reading_the_source() {
    // Enough rows for two multipart parts of 5 MiB.
    const ROWS: u64 = 48_000;
    let stack = Stack::new(0, &[("PART_SIZE_BYTES", "5242880")]).await;
    infra::seed::seed(
        &stack.sdk,
        &stack.p.names.orders_table,
        &stack.p.names.customers_table,
        &["acme"],
        ROWS,
    )
    .await
    .unwrap();
    let token = stack.reader("acme");

    let miss = stack.get("/exports/orders?format=csv", &token).await;
    assert_eq!(miss.status, StatusCode::ACCEPTED);
    assert_eq!(miss.header("x-export-cache"), "miss");
    assert!(miss.header("retry-after").parse::<u32>().unwrap() > 0);
    let job_id = miss.json()["job_id"].as_str().unwrap().to_string();
    assert_eq!(miss.header("location"), format!("/exports/jobs/{job_id}"));
    assert_eq!(miss.json()["status"], "queued");

    let not_ready = stack
        .get(&format!("/exports/jobs/{job_id}/download"), &token)
        .await;
    assert_problem(&not_ready, StatusCode::CONFLICT, None);

    assert_eq!(stack.run_worker().await, 1);
    let status = stack
        .get(&format!("/exports/jobs/{job_id}"), &token)
        .await
        .json();
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["rows_written"], ROWS);
    assert_eq!(status["rows_total"], ROWS);
    assert_eq!(status["progress"], 1.0);
    assert!(status["pages_read"].as_u64().unwrap() >= 2, "{status}");
    assert!(status["read_capacity"].as_f64().unwrap() > 0.0, "{status}");
    assert_eq!(
        status["download_url"],
        format!("/exports/jobs/{job_id}/download")
    );

    let dl = stack
        .get(&format!("/exports/jobs/{job_id}/download"), &token)
        .await;
    assert_eq!(dl.status, StatusCode::SEE_OTHER);
    let (code, headers, first) = stack.fetch(dl.header("location")).await;
    assert!(code.is_success());
    let disposition = headers["content-disposition"].to_str().unwrap();
    assert!(
        disposition.contains("filename=\"orders-") && disposition.ends_with(".csv\""),
        "{disposition}"
    );
    assert_eq!(status["bytes_written"], first.len() as u64);
    assert_eq!(
        status["sha256"],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&first))
    );

    // The file holds exactly the seeded rows, in sort-key order, header first.
    let records = parse_csv(&first);
    assert_eq!(records.len() as u64, ROWS + 1);
    assert_eq!(records[0][0], "Order ID");
    for (i, rec) in records[1..].iter().enumerate() {
        assert_eq!(
            rec,
            &expected_order_cells(&infra::seed::order_item("acme", i as u64)),
            "row {i}"
        );
    }
    // It was uploaded in more than one part.
    let files = stack.export_files().await;
    assert_eq!(files.len(), 1);
    let head = stack
        .s3()
        .head_object()
        .bucket(&stack.p.names.bucket)
        .key(&files[0])
        .send()
        .await
        .unwrap();
    assert!(
        head.e_tag().unwrap().ends_with("-2\""),
        "{:?} for {} bytes",
        head.e_tag(),
        first.len()
    );

    // Prove the hit reads nothing: remove the source table entirely.
    aws_sdk_dynamodb::Client::new(&stack.sdk)
        .delete_table()
        .table_name(&stack.p.names.orders_table)
        .send()
        .await
        .unwrap();
    let hit = stack.get("/exports/orders?format=csv", &token).await;
    assert_eq!(
        hit.status,
        StatusCode::SEE_OTHER,
        "{}",
        String::from_utf8_lossy(&hit.body)
    );
    assert_eq!(hit.header("x-export-cache"), "hit");
    assert_eq!(hit.header("x-export-id"), job_id);
    assert!(hit.header("age").parse::<u64>().is_ok());
    assert_eq!(
        hit.header("etag"),
        format!("\"{}\"", status["sha256"].as_str().unwrap())
    );
    let (_, _, second) = stack.fetch(hit.header("location")).await;
    assert_eq!(first, second, "the hit serves the same bytes");

    let stats = stack.get("/exports/cache/stats", &token).await.json();
    assert_eq!(
        (stats["hits"].as_u64(), stats["misses"].as_u64()),
        (Some(1), Some(1)),
        "{stats}"
    );
    assert_eq!(stats["entries"], 1);
    assert_eq!(stats["bytes"], first.len() as u64);
}

/// Source tables apart from the stack (`SOURCE_REGION`; moto keeps regions apart): the export
/// reads them there, while jobs, entries and files stay in the stack's region, where no source
/// table exists at all.
#[tokio::test]
async fn an_export_reads_source_tables_in_their_own_region() {
    let stack = Stack::with_source_region(40, "eu-west-1", &[]).await;
    let token = stack.reader("acme");
    let here = aws_sdk_dynamodb::Client::new(&stack.sdk);
    let missing = here
        .describe_table()
        .table_name(&stack.p.names.orders_table)
        .send()
        .await;
    assert!(
        missing.is_err_and(|e| e
            .as_service_error()
            .is_some_and(|e| e.is_resource_not_found_exception())),
        "no source table in the stack's region"
    );

    let job_id = stack
        .export_through_worker("/exports/orders?format=csv", &token)
        .await;
    let download = stack
        .get(&format!("/exports/jobs/{job_id}/download"), &token)
        .await;
    assert_eq!(download.status, StatusCode::SEE_OTHER);
    let (status, _, body) = stack.fetch(download.header("location")).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let rows = parse_csv(&body);
    assert_eq!(
        rows.len(),
        41,
        "header and the 40 orders seeded in eu-west-1"
    );
    let expected = expected_order_cells(&infra::seed::order_item("acme", 0));
    assert_eq!(rows[1], expected);
}

#[tokio::test]
async fn concurrent_identical_misses_create_one_job() {
    let stack = Stack::new(200, &[]).await;
    let token = stack.reader("acme");
    let uris = [
        "/exports/orders?columns=order_id,amount&status=paid",
        "/exports/orders?status=paid&columns=amount,order_id",
        "/exports/orders?columns=amount,%20order_id&status=paid&format=csv",
    ];
    let calls = (0..9).map(|i| stack.get(uris[i % 3], &token));
    let answers = futures::future::join_all(calls).await;
    let ids: BTreeSet<String> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, StatusCode::ACCEPTED);
            a.json()["job_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    // POST with the same export joins it too.
    let post = stack
        .call(
            Method::POST,
            "/exports",
            Some(&token),
            Some(serde_json::json!({"dataset": "orders", "columns": ["order_id", "amount"], "filters": {"status": "paid"}})),
        )
        .await;
    assert_eq!(
        post.json()["job_id"].as_str().unwrap(),
        ids.iter().next().unwrap()
    );
    assert_eq!(
        stack.queued_messages().await.len(),
        1,
        "one message for one job"
    );
}

#[tokio::test]
async fn duplicate_sqs_delivery_makes_one_file() {
    let stack = Stack::new(300, &[]).await;
    let token = stack.reader("acme");
    let job_id = stack.get("/exports/orders", &token).await.json()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    // The same message delivered again (SQS is at-least-once), and twice at the same time.
    let body = serde_json::json!({"job_id": job_id, "kind": "export"}).to_string();
    let sqs = aws_sdk_sqs::Client::new(&stack.sdk);
    for _ in 0..2 {
        sqs.send_message()
            .queue_url(&stack.p.queue_url)
            .message_body(&body)
            .send()
            .await
            .unwrap();
    }
    let (a, b) = tokio::join!(stack.run_worker_once(), stack.run_worker_once());
    assert!(a + b >= 1);
    stack.run_worker().await;
    assert_eq!(stack.export_files().await.len(), 1);
    let status = stack
        .get(&format!("/exports/jobs/{job_id}"), &token)
        .await
        .json();
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["rows_written"], 300);
    assert!(
        stack.queued_messages().await.is_empty(),
        "every delivery was settled"
    );
}

#[tokio::test]
async fn other_tenants_job_id_is_404() {
    let stack = Stack::new(20, &[]).await;
    let job_id = stack
        .export_through_worker("/exports/orders", &stack.reader("acme"))
        .await;
    let other = stack.reader("globex");
    assert_problem(
        &stack.get(&format!("/exports/jobs/{job_id}"), &other).await,
        StatusCode::NOT_FOUND,
        None,
    );
    assert_problem(
        &stack
            .get(&format!("/exports/jobs/{job_id}/download"), &other)
            .await,
        StatusCode::NOT_FOUND,
        None,
    );
    // And globex's identical request is its own miss, never acme's file.
    let theirs = stack.get("/exports/orders", &other).await;
    assert_eq!(theirs.status, StatusCode::ACCEPTED);
    assert_ne!(theirs.json()["job_id"].as_str().unwrap(), job_id);
}

#[tokio::test]
async fn bad_requests_get_problem_json_naming_the_field() {
    let stack = Stack::new(0, &[]).await;
    let token = stack.reader("acme");
    let unknown = stack.get("/exports/invoices", &token).await;
    assert_problem(&unknown, StatusCode::NOT_FOUND, Some("dataset"));
    assert!(unknown.json()["detail"]
        .as_str()
        .unwrap()
        .contains("orders"));
    for (uri, field) in [
        ("/exports/orders?format=pdf", "format"),
        ("/exports/orders?columns=order_id,colour", "columns"),
        ("/exports/orders?colour=red", "colour"),
        ("/exports/orders?from=yesterday", "from"),
        (
            "/exports/orders?from=2024-02-01T00:00:00Z&to=2024-01-01T00:00:00Z",
            "to",
        ),
        ("/exports/orders?paid=maybe", "paid"),
        ("/exports/orders?tz=Mars/Olympus", "tz"),
        ("/exports/orders?max_stale=soon", "max_stale"),
        ("/exports/cache?scope=planet", "scope"),
    ] {
        let method = if uri.starts_with("/exports/cache") {
            Method::DELETE
        } else {
            Method::GET
        };
        let a = stack.call(method, uri, Some(&token), None).await;
        assert_problem(&a, StatusCode::BAD_REQUEST, Some(field));
        let allowed = a.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!allowed.is_empty(), "{uri}");
    }
    let bad_json = stack
        .call(Method::POST, "/exports", Some(&token), None)
        .await;
    assert_problem(&bad_json, StatusCode::BAD_REQUEST, Some("body"));
    // Identity: none, forged, or without the scope.
    assert_problem(
        &stack.call(Method::GET, "/exports/orders", None, None).await,
        StatusCode::UNAUTHORIZED,
        None,
    );
    let forged = infra::token::dev_token("not-the-secret", "acme", "mallory", ALL, 600).unwrap();
    assert_problem(
        &stack.get("/exports/orders", &forged).await,
        StatusCode::UNAUTHORIZED,
        None,
    );
    let no_scope = infra::token::dev_token(SECRET, "acme", "bob", &[], 600).unwrap();
    assert_problem(
        &stack.get("/exports/orders", &no_scope).await,
        StatusCode::FORBIDDEN,
        None,
    );
    assert_problem(
        &stack
            .call(
                Method::DELETE,
                "/exports/cache?scope=tenant",
                Some(&token),
                None,
            )
            .await,
        StatusCode::FORBIDDEN,
        None,
    );
    // Health needs no identity.
    assert_eq!(
        stack.call(Method::GET, "/health", None, None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn expired_entry_is_a_miss_again_and_invalidation_hides_entries() {
    let stack = Stack::new(50, &[]).await;
    let token = stack.token("acme", ALL);
    let first = stack
        .export_through_worker("/exports/orders?status=paid", &token)
        .await;
    assert_eq!(
        stack.status("/exports/orders?status=paid", &token).await,
        StatusCode::SEE_OTHER
    );

    // orders: fresh for 900 s, then servable stale for 3600 s; past that it is a miss.
    stack
        .clock
        .advance(chrono::Duration::seconds(900 + 3600 + 1));
    let again = stack.get("/exports/orders?status=paid", &token).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.header("x-export-cache"), "miss");
    let second = again.json()["job_id"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    stack.run_worker().await;
    assert_eq!(
        stack.status("/exports/orders?status=paid", &token).await,
        StatusCode::SEE_OTHER
    );
    // The old job's link is gone with its file's window.
    assert_problem(
        &stack
            .get(&format!("/exports/jobs/{first}/download"), &token)
            .await,
        StatusCode::GONE,
        None,
    );

    // Dropping the one entry, then the whole tenant, makes the next request a miss.
    let del = stack
        .delete("/exports/cache/orders?status=paid", &token)
        .await;
    assert_eq!(del, StatusCode::NO_CONTENT);
    assert_eq!(
        stack.status("/exports/orders?status=paid", &token).await,
        StatusCode::ACCEPTED
    );
    stack.run_worker().await;
    assert_eq!(
        stack.status("/exports/orders?status=paid", &token).await,
        StatusCode::SEE_OTHER
    );
    let del = stack.delete("/exports/cache?scope=tenant", &token).await;
    assert_eq!(del, StatusCode::NO_CONTENT);
    assert_eq!(
        stack.status("/exports/orders?status=paid", &token).await,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn stale_entry_is_served_while_a_refresh_runs() {
    let stack = Stack::new(30, &[]).await;
    let token = stack.reader("acme");
    let first = stack.export_through_worker("/exports/orders", &token).await;
    stack.clock.advance(chrono::Duration::seconds(1000));
    let stale = stack.get("/exports/orders", &token).await;
    assert_eq!(stale.status, StatusCode::SEE_OTHER);
    assert_eq!(stale.header("x-export-cache"), "stale");
    assert_eq!(stale.header("x-export-id"), first);
    // A caller that must have fresh data joins the refresh.
    let strict = stack.get("/exports/orders?max_stale=0", &token).await;
    assert_eq!(strict.status, StatusCode::ACCEPTED);
    assert_eq!(
        stack.queued_messages().await.len(),
        1,
        "one refresh, joined by the strict caller"
    );
}

#[tokio::test]
async fn a_hit_counted_while_a_refresh_completes_survives_the_new_entry() {
    let mut stack = Stack::new(30, &[]).await;
    let token = stack.reader("acme");
    let first = stack.export_through_worker("/exports/orders", &token).await;
    let key = stack
        .deps
        .jobs
        .get_job(&first)
        .await
        .unwrap()
        .unwrap()
        .cache_key;
    assert_eq!(
        stack.status("/exports/orders", &token).await,
        StatusCode::SEE_OTHER
    );
    stack.clock.advance(chrono::Duration::seconds(1000));
    let stale = stack.get("/exports/orders", &token).await;
    assert_eq!(stale.header("x-export-cache"), "stale");

    // Each completion is preceded by a hit on the entry it replaces, as a request served in
    // the meantime would count it.
    let racing_hit = stack.deps.clock.now() + chrono::Duration::seconds(5);
    HitBeforeCompletion::before_every_completion(&mut stack.deps, racing_hit);
    stack.run_worker().await;
    let entry = stack
        .deps
        .entries
        .find("acme", "alice", "orders", &key, stack.deps.clock.now())
        .await
        .unwrap()
        .entry
        .unwrap();
    assert_ne!(entry.job_id, first, "the refresh wrote its entry");
    assert_eq!(
        entry.hits, 3,
        "two hits before the refresh, one while it completed"
    );
    assert_eq!(
        entry.last_hit_at.map(|t| t.timestamp()),
        Some(racing_hit.timestamp())
    );
}

#[tokio::test]
async fn warmer_enqueues_exactly_the_hit_entries_about_to_expire() {
    let stack = Stack::new(30, &[]).await;
    let token = stack.reader("acme");
    // A: orders, hit after the export; expires within the next run (ttl 900 = interval).
    stack.export_through_worker("/exports/orders", &token).await;
    // B: orders filtered, never hit.
    stack
        .export_through_worker("/exports/orders?status=paid", &token)
        .await;
    // C: customers, hit, but fresh for an hour: not due yet.
    stack
        .export_through_worker("/exports/customers", &token)
        .await;
    stack.clock.advance(chrono::Duration::seconds(60));
    assert_eq!(
        stack.status("/exports/orders", &token).await,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        stack.status("/exports/customers", &token).await,
        StatusCode::SEE_OTHER
    );

    let mut event: aws_lambda_events::event::eventbridge::EventBridgeEvent =
        serde_json::from_str(include_str!("../functions/warmer/events/schedule.json")).unwrap();
    event.time = Some(stack.clock.0.lock().map(|t| *t).unwrap() + chrono::Duration::seconds(60));
    let report = warmer::handle(&stack.deps, event.clone()).await.unwrap();
    assert_eq!(
        (report.candidates, report.enqueued, report.skipped_cold),
        (2, 1, 1),
        "{report:?}"
    );

    let queued = stack.queued_messages().await;
    assert_eq!(queued.len(), 1);
    let msg: serde_json::Value = serde_json::from_str(&queued[0]).unwrap();
    assert_eq!(msg["kind"], "refresh");
    let job = stack
        .get(
            &format!("/exports/jobs/{}", msg["job_id"].as_str().unwrap()),
            &token,
        )
        .await
        .json();
    assert_eq!(
        (job["dataset"].as_str(), job["kind"].as_str()),
        (Some("orders"), Some("refresh"))
    );

    // The next run joins the in-flight refresh rather than queuing a second one.
    let again = warmer::handle(&stack.deps, event).await.unwrap();
    assert_eq!((again.enqueued, again.joined), (0, 1), "{again:?}");
}

#[tokio::test]
async fn authorizer_claims_identify_the_caller_in_aws() {
    let stack = Stack::new(5, &[]).await;
    // API Gateway's JWT authorizer verified the token; the claims arrive in the request context.
    let req =
        lambda_http::request::from_str(include_str!("../functions/api/events/get-export.json"))
            .unwrap();
    use tower::ServiceExt;
    // In AWS no local key is configured: the authorizer is what verified the token.
    let mut in_aws = stack.deps.clone();
    let mut config = (*in_aws.config).clone();
    config.local_jwt_secret = None;
    in_aws.config = std::sync::Arc::new(config);
    let resp = api::router(in_aws).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job_id = resp.headers()["x-export-id"].to_str().unwrap().to_string();
    // The job belongs to the claims' tenant.
    assert_eq!(
        stack
            .get(&format!("/exports/jobs/{job_id}"), &stack.reader("acme"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        stack
            .get(&format!("/exports/jobs/{job_id}"), &stack.reader("globex"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // The health fixture answers without any identity.
    let health =
        lambda_http::request::from_str(include_str!("../functions/api/events/health.json"))
            .unwrap();
    let resp = api::router(stack.deps.clone())
        .oneshot(health)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn worker_fixture_for_an_unknown_job_is_settled_not_retried() {
    let stack = Stack::new(0, &[]).await;
    let event: aws_lambda_events::event::sqs::SqsEvent =
        serde_json::from_str(include_str!("../functions/worker/events/sqs-job.json")).unwrap();
    let answer = worker::handle_batch(
        &stack.deps,
        event,
        "w",
        chrono::Utc::now() + chrono::Duration::minutes(5),
    )
    .await;
    assert!(answer.batch_item_failures.is_empty());
    // A body that is not a job message is reported as failed (it will end in the DLQ).
    let mut bad: aws_lambda_events::event::sqs::SqsEvent =
        serde_json::from_str(include_str!("../functions/worker/events/sqs-job.json")).unwrap();
    bad.records[0].body = Some("not json".into());
    let answer = worker::handle_batch(&stack.deps, bad, "w", chrono::Utc::now()).await;
    assert_eq!(answer.batch_item_failures.len(), 1);
}

#[tokio::test]
async fn too_many_new_exports_get_429_while_hits_keep_flowing() {
    let stack = Stack::new(10, &[("MISS_RATE_LIMIT_PER_MINUTE", "2")]).await;
    let token = stack.reader("acme");
    stack.export_through_worker("/exports/orders", &token).await;
    assert_eq!(
        stack.status("/exports/orders?status=paid", &token).await,
        StatusCode::ACCEPTED
    );
    let limited = stack.get("/exports/orders?status=shipped", &token).await;
    assert_problem(&limited, StatusCode::TOO_MANY_REQUESTS, None);
    assert!(limited.header("retry-after").parse::<u32>().unwrap() <= 60);
    assert_eq!(
        stack.status("/exports/orders", &token).await,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        stack
            .status("/exports/orders?status=shipped", &stack.reader("globex"))
            .await,
        StatusCode::ACCEPTED
    );
}

/// Runs the worker as soon as the queue holds a message, the way the SQS trigger would while an
/// API call is still waiting.
async fn worker_when_queued(stack: &Stack) {
    for _ in 0..100 {
        if stack.run_worker().await > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("nothing was queued");
}

#[tokio::test]
async fn prefer_wait_gives_303_when_the_job_finishes_in_time_and_202_when_not() {
    let stack = Stack::new(40, &[]).await;
    let token = stack.reader("acme");
    let (waited, _) = tokio::join!(
        stack.call_with(
            Method::GET,
            "/exports/orders",
            Some(&token),
            None,
            &[("prefer", "wait=10")]
        ),
        worker_when_queued(&stack)
    );
    assert_eq!(
        waited.status,
        StatusCode::SEE_OTHER,
        "{}",
        String::from_utf8_lossy(&waited.body)
    );
    assert_eq!(waited.header("x-export-cache"), "miss");
    assert_eq!(waited.header("preference-applied"), "wait=10");
    let (status, _, file) = stack.fetch(waited.header("location")).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(parse_csv(&file).len(), 41, "header + 40 rows");
    // The next request is a plain hit: nothing to wait for, nothing applied.
    let hit = stack
        .call_with(
            Method::GET,
            "/exports/orders",
            Some(&token),
            None,
            &[("prefer", "wait=10")],
        )
        .await;
    assert_eq!(hit.header("x-export-cache"), "hit");
    assert!(hit.headers.get("preference-applied").is_none());

    // No worker picks this one up: after the wait, the usual 202 with the job.
    let started = std::time::Instant::now();
    let pending = stack
        .call_with(
            Method::POST,
            "/exports",
            Some(&token),
            Some(serde_json::json!({"dataset": "orders", "format": "xlsx"})),
            &[("prefer", "wait=1")],
        )
        .await;
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert_eq!(pending.status, StatusCode::ACCEPTED);
    assert_eq!(pending.header("x-export-cache"), "miss");
    assert!(pending.headers.get("preference-applied").is_none());
    assert_eq!(pending.json()["status"], "queued");
}

#[tokio::test]
async fn refresh_on_demand_keeps_serving_the_old_file_until_the_new_one_lands() {
    let stack = Stack::new(25, &[]).await;
    let token = stack.reader("acme");
    let first = stack.export_through_worker("/exports/orders", &token).await;
    let body = serde_json::json!({"dataset": "orders"});
    let refresh = stack
        .call(
            Method::POST,
            "/exports/refresh",
            Some(&token),
            Some(body.clone()),
        )
        .await;
    assert_eq!(
        refresh.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&refresh.body)
    );
    let job = refresh.json();
    assert_eq!(job["kind"], "refresh");
    let refresh_id = job["job_id"].as_str().unwrap().to_string();
    assert_ne!(refresh_id, first);
    assert_eq!(
        refresh.header("location"),
        format!("/exports/jobs/{refresh_id}")
    );
    // A second refresh joins the running one.
    let again = stack
        .call(Method::POST, "/exports/refresh", Some(&token), Some(body))
        .await;
    assert_eq!(again.json()["job_id"], refresh_id.as_str());
    // Until the refresh lands, the fresh old file is what callers get.
    let old = stack.get("/exports/orders", &token).await;
    assert_eq!(old.header("x-export-cache"), "hit");
    assert_eq!(old.header("x-export-id"), first);

    assert_eq!(stack.run_worker().await, 1, "one message for the refresh");
    let new = stack.get("/exports/orders", &token).await;
    assert_eq!(new.status, StatusCode::SEE_OTHER);
    assert_eq!(new.header("x-export-id"), refresh_id);
    let (_, _, file) = stack.fetch(new.header("location")).await;
    assert_eq!(parse_csv(&file).len(), 26);

    // The same limits and problems as POST /exports.
    let bad = stack
        .call(
            Method::POST,
            "/exports/refresh",
            Some(&token),
            Some(serde_json::json!({"dataset": "orders", "format": "pdf"})),
        )
        .await;
    assert_problem(&bad, StatusCode::BAD_REQUEST, Some("format"));
    let anonymous = stack
        .call(Method::POST, "/exports/refresh", None, None)
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}

/// Writes orders `from..to` of `tenant` into the source table, as a shop taking new orders.
async fn append_orders(stack: &Stack, tenant: &str, from: u64, to: u64) {
    let ddb = aws_sdk_dynamodb::Client::new(&stack.sdk);
    for i in from..to {
        ddb.put_item()
            .table_name(&stack.p.names.orders_table)
            .set_item(Some(infra::seed::order_item(tenant, i)))
            .send()
            .await
            .unwrap();
    }
}

async fn job_json(stack: &Stack, job_id: &str, token: &str) -> serde_json::Value {
    stack
        .get(&format!("/exports/jobs/{job_id}"), token)
        .await
        .json()
}

#[tokio::test]
async fn a_refresh_of_appended_orders_reads_only_them_and_makes_the_file_a_full_read_makes() {
    // Pages of 10 rows, so pages read tell rows read.
    let stack = Stack::new(45, &[("SOURCE_PAGE_SIZE", "10")]).await;
    let acme = stack.token("acme", ALL);
    for format in ["csv", "ndjson"] {
        let uri = format!("/exports/orders?format={format}");
        let first = stack.export_through_worker(&uri, &acme).await;
        assert_eq!(job_json(&stack, &first, &acme).await["pages_read"], 5);
    }
    append_orders(&stack, "acme", 45, 57).await;
    let mut extended = Vec::new();
    for format in ["csv", "ndjson"] {
        let uri = format!("/exports/orders?format={format}");
        let refresh = stack
            .call(
                Method::POST,
                "/exports/refresh",
                Some(&acme),
                Some(serde_json::json!({"dataset": "orders", "format": format})),
            )
            .await;
        assert_eq!(refresh.status, StatusCode::ACCEPTED);
        let refresh_id = refresh.json()["job_id"].as_str().unwrap().to_string();
        assert_eq!(stack.run_worker().await, 1);
        let job = job_json(&stack, &refresh_id, &acme).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["rows_written"], 57, "{job}");
        assert_eq!(
            job["pages_read"], 2,
            "{format}: only the 12 new orders were read: {job}"
        );
        let served = stack.get(&uri, &acme).await;
        assert_eq!(served.header("x-export-id"), refresh_id);
        let (_, _, bytes) = stack.fetch(served.header("location")).await;
        assert!(String::from_utf8_lossy(&bytes).contains("ORD-acme-00000056"));
        extended.push(bytes);
    }
    // Invalidated by hand, the same exports are read in full: the same bytes.
    assert_eq!(
        stack.delete("/exports/cache?scope=tenant", &acme).await,
        StatusCode::NO_CONTENT
    );
    for (format, extended) in ["csv", "ndjson"].into_iter().zip(extended) {
        let uri = format!("/exports/orders?format={format}");
        let full_id = stack.export_through_worker(&uri, &acme).await;
        assert_eq!(job_json(&stack, &full_id, &acme).await["pages_read"], 6);
        let full = stack.get(&uri, &acme).await;
        let (_, _, full) = stack.fetch(full.header("location")).await;
        assert_eq!(
            extended, full,
            "{format}: byte for byte the file a full read makes"
        );
    }
}

#[tokio::test]
async fn a_part_copied_from_a_stored_object_joins_new_parts_in_one_file() {
    let stack = Stack::new(0, &[]).await;
    let files = &stack.deps.files;
    // S3 wants every part but the last to be 5 MiB at least.
    let old: Vec<u8> = (0..6 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    files
        .put_object("exports/base.csv", old.clone(), "text/csv")
        .await
        .unwrap();
    let upload = files
        .start_upload("exports/new.csv", "text/csv", "new.csv")
        .await
        .unwrap();
    let len = old.len() as u64;
    let etag = files
        .copy_part(
            "exports/new.csv",
            &upload,
            1,
            "exports/base.csv",
            (0, len - 1),
        )
        .await
        .unwrap();
    let tail = b"more rows\r\n".to_vec();
    let etag2 = files
        .upload_part("exports/new.csv", &upload, 2, tail.clone())
        .await
        .unwrap();
    let parts = [
        shared::domain::UploadedPart {
            number: 1,
            etag,
            size: len,
        },
        shared::domain::UploadedPart {
            number: 2,
            etag: etag2,
            size: tail.len() as u64,
        },
    ];
    files
        .complete_upload("exports/new.csv", &upload, &parts)
        .await
        .unwrap();
    let mut expected = old;
    expected.extend_from_slice(&tail);
    assert_eq!(stack.read_object("exports/new.csv").await, expected);
}

/// Reads what the source streams hold since `tap` was opened and hands it to the invalidator,
/// as Lambda's event source mapping would; returns the records delivered.
async fn play_streams(stack: &Stack, tap: &mut infra::streams::StreamTap) -> usize {
    let mut delivered = 0;
    for (shard, event) in tap.poll().await.unwrap() {
        delivered += event.records.len();
        let answer = invalidator::handle(&stack.deps, event).await;
        assert!(answer.batch_item_failures.is_empty(), "{answer:?}");
        assert_eq!(tap.settle(shard, &answer).await.unwrap(), None);
    }
    delivered
}

#[tokio::test]
async fn source_writes_on_the_stream_make_the_next_request_miss_once_per_window_unless_opted_out() {
    let mut stack = Stack::new(20, &[]).await;
    // customers opts out: its entries live out their TTL whatever is written.
    let catalog = shared::domain::catalog::BUILTIN_CATALOG.replace(
        "invalidate_after_seconds = 300",
        "invalidate_after_seconds = 0",
    );
    stack.deps.catalog =
        std::sync::Arc::new(shared::domain::catalog::Catalog::from_toml(&catalog).unwrap());
    let token = stack.token("acme", ALL);
    stack.export_through_worker("/exports/orders", &token).await;
    let customers = stack
        .export_through_worker("/exports/customers", &token)
        .await;

    let ddb = aws_sdk_dynamodb::Client::new(&stack.sdk);
    let tables = [
        stack.p.names.orders_table.clone(),
        stack.p.names.customers_table.clone(),
    ];
    let mut tap = infra::streams::StreamTap::open(
        &ddb,
        aws_sdk_dynamodbstreams::Client::new(&stack.sdk),
        "us-east-1",
        &tables,
    )
    .await
    .unwrap()
    .expect("moto keeps the source tables' streams");

    // Two new orders and a changed one: one bump, and the next request misses.
    infra::seed::change_orders(&ddb, &tables[0], "acme", (2, 1, 0))
        .await
        .unwrap();
    ddb.update_item()
        .table_name(&tables[1])
        .key("tenant_id", AttributeValue::S("acme".into()))
        .key("customer_id", AttributeValue::S("CUS-acme-00000000".into()))
        .update_expression("SET tier = :t")
        .expression_attribute_values(":t", AttributeValue::S("gold".into()))
        .send()
        .await
        .unwrap();
    assert_eq!(play_streams(&stack, &mut tap).await, 4);
    let gen = |dataset: &'static str| {
        let deps = stack.deps.clone();
        async move {
            deps.generations
                .dataset_generation("acme", dataset)
                .await
                .unwrap()
        }
    };
    assert_eq!(gen("orders").await.gen, 1);
    assert_eq!(gen("customers").await.gen, 0, "opted out");
    let after = stack.get("/exports/orders", &token).await;
    assert_eq!(
        after.status,
        StatusCode::ACCEPTED,
        "the change makes it a miss"
    );
    assert_eq!(stack.run_worker().await, 1);
    let hit = stack.get("/exports/orders", &token).await;
    assert_eq!(hit.header("x-export-cache"), "hit");
    let (_, _, file) = stack.fetch(hit.header("location")).await;
    let text = String::from_utf8(file).unwrap();
    assert!(text.contains("ORD-acme-00000021"), "the new orders are in");
    assert!(text.contains("changed at"), "and the changed one");
    // The opted-out dataset still serves its entry.
    let still = stack.get("/exports/customers", &token).await;
    assert_eq!(still.header("x-export-cache"), "hit");
    assert_eq!(still.header("x-export-id"), customers);

    // More writes inside the same window cost no bump yet: the entry stays served...
    infra::seed::change_orders(&ddb, &tables[0], "acme", (1, 0, 1))
        .await
        .unwrap();
    assert_eq!(play_streams(&stack, &mut tap).await, 2);
    assert_eq!(gen("orders").await.gen, 1);
    assert_eq!(
        stack
            .get("/exports/orders", &token)
            .await
            .header("x-export-cache"),
        "hit"
    );
    // ...until the window ends: then the pending bump shows and the next request misses.
    stack.clock.advance(chrono::Duration::seconds(61));
    assert_eq!(
        stack.get("/exports/orders", &token).await.status,
        StatusCode::ACCEPTED
    );
}
