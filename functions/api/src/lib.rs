//! The HTTP API function: an axum router over the shared use cases. Translation only: parse the
//! request, call the service, shape the answer (DESIGN.md's HTTP contract).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;

use shared::domain::identity::{identity_from_claims, AuthError, BearerVerifier};
use shared::domain::{Identity, Job, RawExportRequest};
use shared::services::cache_admin::{self, Scope};
use shared::services::export::{request_export, ExportAnswer};
use shared::services::{jobs, Deps};

mod problem;
pub use problem::ApiError;

/// Seconds a client should wait before polling a job again.
const POLL_AFTER_SECONDS: u32 = 2;

#[derive(Clone)]
pub struct AppState {
    deps: Deps,
    verifier: Option<Arc<BearerVerifier>>,
}

impl AppState {
    pub fn new(deps: Deps) -> Self {
        let verifier = deps
            .config
            .local_jwt_secret
            .as_ref()
            .map(|s| Arc::new(BearerVerifier::hs256(s.as_bytes())));
        Self { deps, verifier }
    }
}

pub fn router(deps: Deps) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/exports", post(post_export))
        .route("/exports/{dataset}", get(get_export))
        .route("/exports/jobs/{job_id}", get(job_status))
        .route("/exports/jobs/{job_id}/download", get(download))
        .route("/exports/cache", delete(invalidate_scope))
        .route("/exports/cache/stats", get(stats))
        .route("/exports/cache/{dataset}", delete(invalidate_entry))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(AppState::new(deps))
}

/// The verified caller. In AWS: the JWT authorizer's claims from the request context. Elsewhere:
/// the bearer token verified with the configured local key; with neither, every call is refused.
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let tenant_claim = &state.deps.config.tenant_claim;
        if let Some(lambda_http::request::RequestContext::ApiGatewayV2(ctx)) =
            parts
                .extensions
                .get::<lambda_http::request::RequestContext>()
        {
            if let Some(jwt) = ctx.authorizer.as_ref().and_then(|a| a.jwt.as_ref()) {
                let id = identity_from_claims(&jwt.claims, jwt.scopes.as_deref(), tenant_claim)?;
                return Ok(Caller(id));
            }
        }
        let Some(verifier) = &state.verifier else {
            return Err(AuthError::NotConfigured.into());
        };
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok());
        let claims = verifier.verify(header)?;
        Ok(Caller(identity_from_claims(&claims, None, tenant_claim)?))
    }
}

async fn health(State(state): State<AppState>) -> Response {
    Json(json!({
        "status": "ok",
        "datasets": state.deps.catalog.names(),
    }))
    .into_response()
}

fn query_pairs(raw: Option<String>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

async fn get_export(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(dataset): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let raw = RawExportRequest::from_query(&dataset, query_pairs(query));
    export(&state, &who, raw).await
}

async fn post_export(
    State(state): State<AppState>,
    Caller(who): Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "body",
            format!(
                "is not valid JSON ({e}); send {{\"dataset\": \"orders\", \"format\": \"csv\"}}"
            ),
        )
    })?;
    export(&state, &who, RawExportRequest::from_json(&value)).await
}

async fn export(
    state: &AppState,
    who: &Identity,
    raw: RawExportRequest,
) -> Result<Response, ApiError> {
    let answer = request_export(&state.deps, who, &raw).await?;
    let result = answer.cache_result();
    match answer {
        ExportAnswer::File {
            entry,
            url,
            age,
            stale,
        } => {
            tracing::info!(tenant = %who.tenant, dataset = %entry.spec.dataset, cache = result,
                job_id = %entry.job_id, age_s = age.num_seconds(), "export served from cache");
            let mut headers = HeaderMap::new();
            headers.insert(header::LOCATION, header_value(&url)?);
            headers.insert("x-export-cache", HeaderValue::from_static(result));
            headers.insert("x-export-id", header_value(&entry.job_id)?);
            headers.insert(header::AGE, HeaderValue::from(age.num_seconds().max(0)));
            headers.insert(
                header::ETAG,
                header_value(&format!("\"{}\"", entry.sha256))?,
            );
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-store"),
            );
            let body = json!({
                "cache": result,
                "stale": stale,
                "export_id": entry.job_id,
                "download_url": url,
                "file_name": entry.file_name(),
                "rows": entry.rows,
                "bytes": entry.bytes,
                "sha256": entry.sha256,
                "created_at": entry.created_at,
                "fresh_until": entry.fresh_until,
            });
            Ok((StatusCode::SEE_OTHER, headers, Json(body)).into_response())
        }
        ExportAnswer::Job { job, joined } => {
            tracing::info!(tenant = %who.tenant, dataset = %job.spec.dataset, cache = result,
                job_id = %job.job_id, joined, "export queued");
            let mut headers = HeaderMap::new();
            headers.insert(
                header::LOCATION,
                header_value(&format!("/exports/jobs/{}", job.job_id))?,
            );
            headers.insert(header::RETRY_AFTER, HeaderValue::from(POLL_AFTER_SECONDS));
            headers.insert("x-export-cache", HeaderValue::from_static(result));
            headers.insert("x-export-id", header_value(&job.job_id)?);
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok((StatusCode::ACCEPTED, headers, Json(job_body(&job))).into_response())
        }
    }
}

fn header_value(s: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(s).map_err(|e| ApiError::Internal(format!("header value {s:?}: {e}")))
}

/// The job status document of the contract.
pub fn job_body(job: &Job) -> serde_json::Value {
    let succeeded = job.status == shared::domain::JobStatus::Succeeded;
    json!({
        "job_id": job.job_id,
        "dataset": job.spec.dataset,
        "format": job.spec.format.as_str(),
        "kind": job.kind.as_str(),
        "status": job.status.as_str(),
        "rows_written": job.rows_written,
        "rows_total": job.rows_total,
        "progress": job.progress(),
        "rows_per_second": job.rows_per_second().map(|r| r.round()),
        "eta_seconds": job.eta_seconds(),
        "bytes_written": job.bytes_written,
        "pages_read": job.pages_read,
        "watermark": job.watermark,
        "read_capacity": job.read_capacity,
        "sheets": (job.sheets > 0).then_some(job.sheets),
        "truncated_cells": job.truncated_cells,
        "sha256": job.sha256,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": job.error,
        "download_url": succeeded.then(|| format!("/exports/jobs/{}/download", job.job_id)),
    })
}

async fn job_status(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let job = jobs::job_for(&state.deps, &who, &job_id).await?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !job.status.is_terminal() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(POLL_AFTER_SECONDS));
    }
    Ok((StatusCode::OK, headers, Json(job_body(&job))).into_response())
}

async fn download(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let url = jobs::download_url(&state.deps, &who, &job_id).await?;
    tracing::info!(tenant = %who.tenant, job_id = %job_id, "download link signed");
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, header_value(&url)?),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response())
}

async fn invalidate_entry(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(dataset): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let raw = RawExportRequest::from_query(&dataset, query_pairs(query));
    cache_admin::invalidate_entry(&state.deps, &who, &raw).await?;
    tracing::info!(tenant = %who.tenant, dataset = %dataset, "cache entry invalidated");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn invalidate_scope(
    State(state): State<AppState>,
    Caller(who): Caller,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(query);
    let scope = match pairs
        .iter()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.as_str())
    {
        Some("tenant") => Scope::Tenant,
        Some("user") => Scope::User,
        Some(other) => {
            return Err(ApiError::invalid(
                "scope",
                format!("`{other}` is not a scope; allowed: tenant, user"),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                "scope",
                "is required; allowed: tenant, user",
            ))
        }
    };
    cache_admin::invalidate_scope(&state.deps, &who, scope).await?;
    tracing::info!(tenant = %who.tenant, scope = ?scope, "cache invalidated");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn stats(State(state): State<AppState>, Caller(who): Caller) -> Result<Response, ApiError> {
    let stats = cache_admin::stats(&state.deps, &who).await?;
    Ok(Json(stats).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use shared::testing::{fakes, test_config};
    use tower::ServiceExt;

    async fn call(
        router: Router,
        uri: &str,
        auth: Option<&str>,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut req = Request::builder().uri(uri);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = router
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or_default(),
        )
    }

    fn token(secret: &str) -> String {
        let claims = json!({"sub": "alice", "tenant_id": "acme", "scope": "exports:read",
            "exp": chrono::Utc::now().timestamp() + 600});
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        format!("Bearer {t}")
    }

    #[tokio::test]
    async fn without_authorizer_or_local_key_every_call_is_refused() {
        let f = fakes(test_config(), 10);
        let (status, headers, body) =
            call(router(f.deps.clone()), "/exports/orders", Some(&token("k"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert!(
            body["detail"].as_str().unwrap().contains("no local key"),
            "{body}"
        );
        // Health needs no identity.
        assert_eq!(
            call(router(f.deps), "/health", None).await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn rate_limited_misses_get_429_with_retry_after() {
        let mut config = test_config();
        config.local_jwt_secret = Some("k".into());
        config.miss_rate_per_minute = 1;
        let f = fakes(config, 10);
        let auth = token("k");
        assert_eq!(
            call(router(f.deps.clone()), "/exports/orders", Some(&auth))
                .await
                .0,
            StatusCode::ACCEPTED
        );
        let (status, headers, body) = call(
            router(f.deps.clone()),
            "/exports/orders?status=paid",
            Some(&auth),
        )
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            headers[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse::<u32>()
                .unwrap()
                <= 60
        );
        assert_eq!(body["status"], 429);
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_answer_problem_json() {
        let f = fakes(test_config(), 10);
        let (status, headers, _) = call(router(f.deps.clone()), "/nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        let resp = router(f.deps)
            .oneshot(
                Request::builder()
                    .method("PUT")
                    .uri("/exports")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
