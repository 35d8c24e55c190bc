//! What the adapters' tests use to see the requests an adapter builds: SDK clients whose HTTP
//! client answers from a list (`StaticReplayClient`) and keeps every request it was sent, and
//! the domain values the adapters write.

use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::test_util::{ReplayEvent, StaticReplayClient};
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::retry::RetryConfig;
use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::Value as Json;

use crate::domain::{CacheEntry, CacheKey, Generation, Job};
use crate::testing::orders_job;

/// An HTTP client that gives these answers, in order, to whatever it is sent.
pub(crate) fn answering(answers: Vec<http::Response<SdkBody>>) -> StaticReplayClient {
    StaticReplayClient::new(
        answers
            .into_iter()
            .map(|answer| {
                // Only the answer matters: the tests look at the requests actually sent.
                let unused = http::Request::builder()
                    .uri("http://unused.invalid/")
                    .body(SdkBody::empty())
                    .unwrap();
                ReplayEvent::new(unused, answer)
            })
            .collect(),
    )
}

pub(crate) fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> http::Response<SdkBody> {
    let mut b = http::Response::builder().status(status);
    for (name, value) in headers {
        b = b.header(*name, *value);
    }
    b.body(SdkBody::from(body.to_string())).unwrap()
}

/// A DynamoDB answer with this JSON body.
pub(crate) fn ok(body: Json) -> http::Response<SdkBody> {
    answer(
        200,
        &[("content-type", "application/x-amz-json-1.0")],
        &body.to_string(),
    )
}

/// A DynamoDB error answer of this type (`ConditionalCheckFailedException`, ...).
pub(crate) fn error(kind: &str, extra: Json) -> http::Response<SdkBody> {
    let mut body = serde_json::json!({
        "__type": format!("com.amazonaws.dynamodb.v20120810#{kind}"),
        "message": "refused by the test",
    });
    if let (Some(body), Json::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    answer(
        400,
        &[("content-type", "application/x-amz-json-1.0")],
        &body.to_string(),
    )
}

/// A transaction cancelled with these reasons, one per item in order ("None" for items that
/// passed).
pub(crate) fn cancelled(codes: &[&str]) -> http::Response<SdkBody> {
    let reasons: Vec<Json> = codes
        .iter()
        .map(|c| serde_json::json!({ "Code": c }))
        .collect();
    error(
        "TransactionCanceledException",
        serde_json::json!({ "CancellationReasons": reasons }),
    )
}

fn credentials() -> Credentials {
    Credentials::new("AKIDTEST", "secret", None, None, "adapter-tests")
}

pub(crate) fn dynamodb(http: &StaticReplayClient) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(credentials())
            .retry_config(RetryConfig::disabled())
            .http_client(http.clone())
            .build(),
    )
}

pub(crate) fn s3(http: &StaticReplayClient) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(credentials())
            .retry_config(RetryConfig::disabled())
            .force_path_style(true)
            .http_client(http.clone())
            .build(),
    )
}

pub(crate) fn eventbridge(http: &StaticReplayClient) -> aws_sdk_eventbridge::Client {
    aws_sdk_eventbridge::Client::from_conf(
        aws_sdk_eventbridge::Config::builder()
            .behavior_version(aws_sdk_eventbridge::config::BehaviorVersion::latest())
            .region(aws_sdk_eventbridge::config::Region::new("us-east-1"))
            .credentials_provider(credentials())
            .retry_config(RetryConfig::disabled())
            .http_client(http.clone())
            .build(),
    )
}

/// The DynamoDB calls sent, as (operation, JSON body): `("Query", {...})`.
pub(crate) fn dynamodb_calls(http: &StaticReplayClient) -> Vec<(String, Json)> {
    http.actual_requests()
        .map(|r| {
            let target = r.headers().get("x-amz-target").unwrap_or_default();
            let op = target.rsplit('.').next().unwrap_or_default().to_string();
            let body = serde_json::from_slice(r.body().bytes().unwrap_or_default()).unwrap();
            (op, body)
        })
        .collect()
}

/// The one DynamoDB call sent, which must be `op`.
pub(crate) fn only_call(http: &StaticReplayClient, op: &str) -> Json {
    let mut calls = dynamodb_calls(http);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let (sent, body) = calls.remove(0);
    assert_eq!(sent, op);
    body
}

pub(crate) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 9, 30, 0).unwrap()
}

/// A queued export of all orders of `tenant`, created at `t0` for key `k1`.
pub(crate) fn job(tenant: &str, job_id: &str) -> Job {
    Job {
        cache_key: CacheKey("k1".into()),
        generation: Generation {
            tenant: 2,
            user: 5,
            dataset: 0,
        },
        ..orders_job(tenant, job_id, t0())
    }
}

/// The entry `job` makes when it finishes at `t0` (fresh 900 s, stale 3600 s more).
pub(crate) fn entry(job: &Job) -> CacheEntry {
    let fresh_until = t0() + Duration::seconds(900);
    CacheEntry {
        tenant: job.tenant.clone(),
        user: job.user.clone(),
        cache_key: job.cache_key.clone(),
        spec: job.spec.clone(),
        job_id: job.job_id.clone(),
        object_key: format!("exports/{}/orders/k1/{}.csv", job.tenant, job.job_id),
        manifest_key: format!(
            "exports/{}/orders/k1/{}.manifest.json",
            job.tenant, job.job_id
        ),
        rows: 3,
        bytes: 120,
        sha256: "ab".repeat(32),
        sheets: 0,
        created_at: t0(),
        fresh_until,
        stale_until: fresh_until + Duration::seconds(3600),
        generation: job.generation,
        hits: 0,
        last_hit_at: None,
        append_key: None,
        append_since: None,
    }
}
