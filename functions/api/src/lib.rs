//! The HTTP API function: an axum router over the shared use cases. Translation only: parse the
//! request, call the service, shape the answer (docs/contract.md, "HTTP API").

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use shared::domain::identity::{identity_from_claims, AuthError, BearerVerifier};
use shared::domain::request::quoted;
use shared::domain::{Identity, RawExportRequest};
use shared::services::cache_admin::{self, CacheStats, Scope};
use shared::services::export::{
    request_export_waiting, request_refresh, ExportAnswer, MAX_WAIT_SECONDS,
};
use shared::services::{status, Deps};

mod openapi;
mod problem;
pub mod wire;
pub use problem::ApiError;
use wire::{
    CachedFileBody, DatasetBody, DatasetList, ExportOptions, ExportQuery, ExportRequest,
    HealthBody, JobStatusBody, Problem, ScopeQuery,
};

/// Largest request body accepted (docs/contract.md, "Limits"); more is a 413 problem.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

const REPRESENTATION: &str = "return=representation";

const PREFER_DOC: &str = "RFC 7240. `wait=N` (N <= 25): on a miss, wait up to N seconds for the job and answer `303` when it finished in time, else the usual `202`. `return=representation`: `200` with the file's description instead of a `303`.";

/// Seconds a client should wait before polling a job again.
const POLL_AFTER_SECONDS: u32 = 2;

#[derive(Clone)]
pub struct AppState {
    deps: Deps,
    verifier: Option<Arc<BearerVerifier>>,
    openapi: Arc<utoipa::openapi::OpenApi>,
}

impl AppState {
    fn new(deps: Deps, openapi: utoipa::openapi::OpenApi) -> Self {
        let c = &deps.config;
        let verifier = c.local_jwt_secret.as_ref().map(|s| {
            Arc::new(BearerVerifier::hs256(
                s.as_bytes(),
                c.local_jwt_issuer.as_deref(),
                c.local_jwt_audience.as_deref(),
            ))
        });
        Self {
            deps,
            verifier,
            openapi: Arc::new(openapi),
        }
    }
}

/// Every route, each registered with its OpenAPI path item in one call: the one place both the
/// router and the document come from, so neither can list a route the other lacks.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(page))
        .routes(routes!(health))
        .routes(routes!(openapi_json))
        .routes(routes!(post_export))
        .routes(routes!(post_refresh))
        .routes(routes!(datasets))
        .routes(routes!(get_export))
        .routes(routes!(job_status))
        .routes(routes!(download))
        .routes(routes!(invalidate_scope))
        .routes(routes!(stats))
        .routes(routes!(invalidate_entry))
}

fn split() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = routes().split_for_parts();
    openapi::finish(&mut doc);
    (router, doc)
}

/// The OpenAPI 3.1 document `GET /openapi.json` serves.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    split().1
}

pub fn router(deps: Deps) -> Router {
    let (router, doc) = split();
    router
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(AppState::new(deps, doc))
}

/// The verified caller. With a local key configured (no API Gateway in front), only a bearer
/// token verified with that key counts: anyone who reaches the invoke endpoint could put
/// authorizer claims into the event. Without one, the JWT authorizer's claims from the request
/// context; with neither, every call is refused.
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let tenant_claim = &state.deps.config.tenant_claim;
        if let Some(verifier) = &state.verifier {
            let header = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|h| h.to_str().ok());
            let claims = verifier.verify(header)?;
            return Ok(Caller(identity_from_claims(&claims, None, tenant_claim)?));
        }
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
        Err(AuthError::NotConfigured.into())
    }
}

/// A path parameter whose rejection (bad percent-encoding, say) is a problem like any other.
pub struct Segment(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| Segment(p))
            .map_err(|_| ApiError::invalid("path", "is not a valid path segment"))
    }
}

/// The export page, compiled into the binary (no CDN, nothing fetched at runtime). No identity
/// needed for the page itself: it calls the API with the bearer token the user gives it.
const PAGE: &str = include_str!("../assets/index.html");

/// The web page for people: pick dataset, columns, filters, range and format, watch the job,
/// download the file, see the cache.
#[utoipa::path(get, path = "/", tag = "service",
    responses((status = 200, description = "The export page", body = String,
        content_type = "text/html")))]
async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page's script and style are inline; nothing else may load or frame it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// Liveness: answers once the configuration loaded. No identity needed.
#[utoipa::path(get, path = "/health", tag = "service",
    responses((status = 200, description = "The function is up", body = HealthBody)))]
async fn health(State(state): State<AppState>) -> Json<HealthBody> {
    Json(HealthBody {
        status: "ok",
        datasets: state
            .deps
            .catalog
            .names()
            .into_iter()
            .map(String::from)
            .collect(),
    })
}

/// This document: the OpenAPI 3.1 description of every route. No identity needed.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object,
        content_type = "application/json")))]
async fn openapi_json(State(state): State<AppState>) -> Response {
    Json(state.openapi.as_ref()).into_response()
}

/// What the caller may export: per dataset its columns (name, label, type), filters, whether
/// `from`/`to` is supported, formats and freshness. Catalog data, the same for every tenant.
#[utoipa::path(get, path = "/exports/datasets", tag = "exports",
    responses((status = 200, description = "The datasets", body = DatasetList)),
    security(("bearer" = [])))]
async fn datasets(
    State(state): State<AppState>,
    Caller(who): Caller,
) -> Result<Json<DatasetList>, ApiError> {
    let datasets = shared::services::datasets::list(&state.deps, &who)?;
    Ok(Json(DatasetList {
        datasets: datasets.into_iter().map(DatasetBody::from).collect(),
    }))
}

fn query_pairs(raw: Option<String>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Export a dataset: a cached file, or a job that makes it.
///
/// A fresh file is a `303` to a presigned URL (`X-Export-Cache: hit`); a stale one within the
/// dataset's window and the caller's `max_stale` too (`stale`, and a refresh starts). Otherwise
/// `202` with the job (`miss`); identical requests while it runs get the same job.
#[utoipa::path(get, path = "/exports/{dataset}", tag = "exports",
    params(("dataset" = String, Path, description = "A dataset of `GET /exports/datasets`"),
        ExportQuery, ExportOptions,
        ("Prefer" = Option<String>, Header, description = PREFER_DOC)),
    responses(
        (status = 303, description = "A cached file: `Location` is its presigned URL (at most 15 minutes). Also after `Prefer: wait=N` when the job finished in time (`X-Export-Cache: miss`, `Preference-Applied: wait=N`)",
            body = CachedFileBody, headers(
                ("Location" = String, description = "Presigned URL of the file"),
                ("X-Export-Cache" = String, description = "`hit` or `stale`"),
                ("X-Export-Id" = String, description = "The job that made the file"),
                ("Age" = u64, description = "Seconds since the file was made"),
                ("ETag" = String, description = "The file's SHA-256, quoted"))),
        (status = 200, description = "A cached file as with `303`, when the request says `Prefer: return=representation`",
            body = CachedFileBody, headers(
                ("Preference-Applied" = String, description = "`return=representation`"))),
        (status = 202, description = "No file yet: a job makes it; poll `Location`",
            body = JobStatusBody, headers(
                ("Location" = String, description = "`/exports/jobs/{job_id}`"),
                ("Retry-After" = u32, description = "Seconds before polling"),
                ("X-Export-Cache" = String, description = "`miss`"),
                ("X-Export-Id" = String, description = "The job id"))),
        (status = 400, description = "Invalid request: `errors` names each field and what it allows",
            body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown dataset", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, description = "Too many new exports this minute; see `Retry-After`",
            body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn get_export(
    State(state): State<AppState>,
    Caller(who): Caller,
    Segment(dataset): Segment,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let raw = RawExportRequest::from_query(&dataset, query_pairs(query));
    export(&state, &who, raw, &headers).await
}

/// The same request as `GET /exports/{dataset}`, as a JSON body.
#[utoipa::path(post, path = "/exports", tag = "exports",
    request_body(content = ExportRequest, description = "The export request"),
    params(("Prefer" = Option<String>, Header, description = PREFER_DOC)),
    responses(
        (status = 303, description = "A cached file, as for `GET /exports/{dataset}`, also after `Prefer: wait=N`",
            body = CachedFileBody),
        (status = 200, description = "A cached file as with `303`, when the request says `Prefer: return=representation`",
            body = CachedFileBody),
        (status = 202, description = "No file yet: a job makes it, as for `GET /exports/{dataset}`",
            body = JobStatusBody),
        (status = 400, description = "Invalid request or body: `errors` names each field",
            body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown dataset", body = Problem,
            content_type = "application/problem+json"),
        (status = 413, description = "Body over 64 KiB", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, description = "Too many new exports this minute; see `Retry-After`",
            body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn post_export(
    State(state): State<AppState>,
    Caller(who): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    export(&state, &who, json_request(body)?, &headers).await
}

/// The request in a `POST` body: bounded (413 past 64 KiB) and JSON, or a problem naming `body`.
fn json_request(body: Result<Bytes, BytesRejection>) -> Result<RawExportRequest, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::invalid("body", "could not be read")
        }
    })?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "body",
            format!(
                "is not valid JSON ({e}); send {{\"dataset\": \"orders\", \"format\": \"csv\"}}"
            ),
        )
    })?;
    Ok(RawExportRequest::from_json(&value))
}

/// Build the export's file again, even when the cached one is fresh.
///
/// Same body as `POST /exports`. Answers `202` with the refresh job (an identical request while
/// one runs joins it); the current file stays served by `GET /exports/{dataset}` until the new
/// one replaces it.
#[utoipa::path(post, path = "/exports/refresh", tag = "exports",
    request_body(content = ExportRequest, description = "The export to build again"),
    responses(
        (status = 202, description = "The refresh job; poll `Location`", body = JobStatusBody,
            headers(
                ("Location" = String, description = "`/exports/jobs/{job_id}`"),
                ("Retry-After" = u32, description = "Seconds before polling"),
                ("X-Export-Id" = String, description = "The job id"))),
        (status = 400, description = "Invalid request or body: `errors` names each field",
            body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown dataset", body = Problem,
            content_type = "application/problem+json"),
        (status = 413, description = "Body over 64 KiB", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, description = "Too many new exports this minute; see `Retry-After`",
            body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn post_refresh(
    State(state): State<AppState>,
    Caller(who): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = json_request(body)?;
    let ExportAnswer::Job { job, joined } = request_refresh(&state.deps, &who, &raw).await? else {
        return Err(ApiError::Internal("a refresh answered with a file".into()));
    };
    tracing::info!(tenant = %who.tenant, dataset = %job.spec.dataset, job_id = %job.job_id,
        joined, "refresh requested");
    let mut response = job_accepted(&job)?;
    // Not a cache lookup: the refresh says nothing about hit or miss.
    response.headers_mut().remove("x-export-cache");
    Ok(response)
}

/// The preferences of the request's `Prefer` headers (RFC 7240), each trimmed.
fn preferences(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether the request's `Prefer` header holds `preference`.
fn prefers(headers: &HeaderMap, preference: &str) -> bool {
    preferences(headers).any(|p| p.eq_ignore_ascii_case(preference))
}

/// Seconds of `Prefer: wait=N`, at most [`MAX_WAIT_SECONDS`]. A preference the server cannot
/// read is ignored, as RFC 7240 asks, rather than refused.
fn preferred_wait(headers: &HeaderMap) -> Option<u32> {
    preferences(headers).find_map(|p| {
        let (name, value) = p.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("wait") {
            return None;
        }
        let value = value.split(';').next()?.trim().trim_matches('"');
        if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let seconds = value.parse::<u64>().ok()?;
        Some(seconds.min(u64::from(MAX_WAIT_SECONDS)) as u32)
    })
}

async fn export(
    state: &AppState,
    who: &Identity,
    raw: RawExportRequest,
    request: &HeaderMap,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let wait = preferred_wait(request).filter(|w| *w > 0);
    let answer = request_export_waiting(
        &state.deps,
        who,
        &raw,
        std::time::Duration::from_secs(wait.unwrap_or(0).into()),
    )
    .await?;
    let result = answer.cache_result().as_str();
    let metric = answer.metric(&who.tenant, started.elapsed());
    state
        .deps
        .metrics
        .export_request(state.deps.clock.now(), metric);
    match answer {
        ExportAnswer::File {
            entry,
            url,
            age,
            stale,
            waited,
        } => {
            tracing::info!(tenant = %who.tenant, dataset = %entry.spec.dataset, cache = result,
                job_id = %entry.job_id, age_s = age.num_seconds(), waited, "export served");
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
            let body = CachedFileBody {
                cache: result,
                stale,
                file_name: entry.file_name(),
                export_id: entry.job_id,
                download_url: url,
                rows: entry.rows,
                bytes: entry.bytes,
                sha256: entry.sha256,
                created_at: entry.created_at,
                fresh_until: entry.fresh_until,
            };
            // `Prefer: return=representation`: the file's description itself rather than a
            // redirect, for a page whose script cannot see where a redirect went.
            let representation = prefers(request, REPRESENTATION);
            let mut applied = Vec::new();
            if representation {
                applied.push(REPRESENTATION.to_string());
            }
            if let Some(w) = wait.filter(|_| waited) {
                applied.push(format!("wait={w}"));
            }
            if !applied.is_empty() {
                headers.insert("preference-applied", header_value(&applied.join(", "))?);
            }
            let status = if representation {
                StatusCode::OK
            } else {
                StatusCode::SEE_OTHER
            };
            Ok((status, headers, Json(body)).into_response())
        }
        ExportAnswer::Job { job, joined } => {
            tracing::info!(tenant = %who.tenant, dataset = %job.spec.dataset, cache = result,
                job_id = %job.job_id, joined, waited_s = wait, "export queued");
            job_accepted(&job)
        }
    }
}

/// `202` with the job to poll: a miss, or a refresh.
fn job_accepted(job: &shared::domain::Job) -> Result<Response, ApiError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::LOCATION,
        header_value(&format!("/exports/jobs/{}", job.job_id))?,
    );
    if !job.status.is_terminal() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(POLL_AFTER_SECONDS));
    }
    headers.insert("x-export-cache", HeaderValue::from_static("miss"));
    headers.insert("x-export-id", header_value(&job.job_id)?);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok((
        StatusCode::ACCEPTED,
        headers,
        Json(JobStatusBody::from(job)),
    )
        .into_response())
}

fn header_value(s: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(s).map_err(|e| ApiError::Internal(format!("header value {s:?}: {e}")))
}

/// The status of a job of the caller's.
#[utoipa::path(get, path = "/exports/jobs/{job_id}", tag = "exports",
    params(("job_id" = String, Path, description = "From the `202` or its `Location`")),
    responses(
        (status = 200, description = "The job; `Retry-After` while it runs", body = JobStatusBody),
        (status = 404, description = "No such job of the caller's", body = Problem,
            content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn job_status(
    State(state): State<AppState>,
    Caller(who): Caller,
    Segment(job_id): Segment,
) -> Result<Response, ApiError> {
    let job = status::job_for(&state.deps, &who, &job_id).await?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !job.status.is_terminal() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(POLL_AFTER_SECONDS));
    }
    Ok((StatusCode::OK, headers, Json(JobStatusBody::from(&job))).into_response())
}

/// The job's file: a freshly signed URL each time, so the link outlives any one signature.
#[utoipa::path(get, path = "/exports/jobs/{job_id}/download", tag = "exports",
    params(("job_id" = String, Path, description = "A succeeded job of the caller's")),
    responses(
        (status = 303, description = "`Location` is a presigned URL of the file",
            headers(("Location" = String, description = "Presigned URL of the file"))),
        (status = 200, description = "`{\"download_url\": ...}`, when the request says `Prefer: return=representation`",
            body = Object, headers(
                ("Preference-Applied" = String, description = "`return=representation`"))),
        (status = 404, description = "No such job of the caller's", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "Not ready yet, or the job failed", body = Problem,
            content_type = "application/problem+json"),
        (status = 410, description = "The file is no longer served (expired, invalidated or replaced)",
            body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn download(
    State(state): State<AppState>,
    Caller(who): Caller,
    Segment(job_id): Segment,
    request: HeaderMap,
) -> Result<Response, ApiError> {
    let url = status::download_url(&state.deps, &who, &job_id).await?;
    tracing::info!(tenant = %who.tenant, job_id = %job_id, "download link signed");
    if prefers(&request, REPRESENTATION) {
        return Ok((
            StatusCode::OK,
            [
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                (
                    HeaderName::from_static("preference-applied"),
                    HeaderValue::from_static(REPRESENTATION),
                ),
            ],
            Json(json!({ "download_url": url })),
        )
            .into_response());
    }
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, header_value(&url)?),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response())
}

/// Stop serving the one cached file a `GET /exports/{dataset}` with this query would get.
#[utoipa::path(delete, path = "/exports/cache/{dataset}", tag = "cache",
    params(("dataset" = String, Path, description = "A dataset of `GET /exports/datasets`"),
        ExportQuery, ExportOptions),
    responses(
        (status = 204, description = "That entry is no longer served"),
        (status = 400, description = "Invalid request: `errors` names each field",
            body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown dataset", body = Problem,
            content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn invalidate_entry(
    State(state): State<AppState>,
    Caller(who): Caller,
    Segment(dataset): Segment,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let raw = RawExportRequest::from_query(&dataset, query_pairs(query));
    cache_admin::invalidate_entry(&state.deps, &who, &raw).await?;
    tracing::info!(tenant = %who.tenant, dataset = %dataset, "cache entry invalidated");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Stop serving every cached file of the caller's tenant (`exports:admin`) or of the caller.
#[utoipa::path(delete, path = "/exports/cache", tag = "cache", params(ScopeQuery),
    responses(
        (status = 204, description = "Those entries are no longer served"),
        (status = 400, description = "`scope` missing or unknown", body = Problem,
            content_type = "application/problem+json")),
    security(("bearer" = [])))]
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
                format!("{} is not a scope; allowed: tenant, user", quoted(other)),
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

/// Hits, misses and live entries of the caller's tenant, in all and per dataset.
#[utoipa::path(get, path = "/exports/cache/stats", tag = "cache",
    responses((status = 200, description = "The tenant's cache statistics", body = CacheStats)),
    security(("bearer" = [])))]
async fn stats(
    State(state): State<AppState>,
    Caller(who): Caller,
) -> Result<Json<CacheStats>, ApiError> {
    Ok(Json(cache_admin::stats(&state.deps, &who).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use serde_json::json;
    use shared::domain::Job;
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

    const KEY: &str = "api-unit-test-signing-key-32-bytes-or-more";

    fn keyed() -> shared::config::Config {
        let mut config = test_config();
        config.local_jwt_secret = Some(KEY.into());
        config
    }

    fn token(secret: &str) -> String {
        token_for(secret, "acme", "exports:read")
    }

    fn token_for(secret: &str, tenant: &str, scope: &str) -> String {
        let claims = json!({"sub": "alice", "tenant_id": tenant, "scope": scope,
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
    async fn datasets_list_the_catalog_the_same_for_every_tenant() {
        let f = fakes(keyed(), 10);
        let (status, _, acme) = call(
            router(f.deps.clone()),
            "/exports/datasets",
            Some(&token(KEY)),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let globex_token = token_for(KEY, "globex", "exports:read");
        let (_, _, globex) = call(
            router(f.deps.clone()),
            "/exports/datasets",
            Some(&globex_token),
        )
        .await;
        assert_eq!(acme, globex, "catalog data only, nothing of the tenant");
        let names: Vec<&str> = acme["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, f.deps.catalog.names());
        let orders = acme["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "orders")
            .unwrap();
        assert_eq!(
            orders["description"],
            "Orders of the tenant, one row per order"
        );
        assert_eq!(orders["columns"].as_array().unwrap().len(), 12);
        assert_eq!(
            orders["columns"][6],
            json!({"name": "amount", "label": "Amount", "type": "decimal"})
        );
        assert_eq!(orders["filters"], json!(["status", "currency", "paid"]));
        assert_eq!(orders["range"], true);
        assert_eq!(orders["range_column"], "created_at");
        assert_eq!(
            orders["formats"],
            json!(["csv", "csv.gz", "xlsx", "ndjson"])
        );
        assert_eq!(orders["ttl"], 900);
        assert_eq!(orders["stale"], 3600);
        let contacts = acme["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "contacts")
            .unwrap();
        assert_eq!(contacts["range"], false);
        assert!(contacts["range_column"].is_null());
        assert_eq!(contacts["user_scoped"], true);
        // Where the rows live stays inside: no table, tenant attribute or source attribute.
        let text = acme.to_string();
        for internal in [
            "table",
            "tenant_attribute",
            "sort_attribute",
            "source",
            "tenant_id",
        ] {
            assert!(
                !text.contains(&format!("\"{internal}\"")),
                "{internal} in {text}"
            );
        }
        // Auth as every other route: none is 401, no read scope 403.
        let (status, _, _) = call(router(f.deps.clone()), "/exports/datasets", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let admin_only = token_for(KEY, "acme", "exports:admin");
        let (status, headers, _) =
            call(router(f.deps), "/exports/datasets", Some(&admin_only)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    }

    #[tokio::test]
    async fn without_authorizer_or_local_key_every_call_is_refused() {
        let f = fakes(test_config(), 10);
        let (status, headers, body) =
            call(router(f.deps.clone()), "/exports/orders", Some(&token(KEY))).await;
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
        config.local_jwt_secret = Some(KEY.into());
        config.miss_rate_per_minute = 1;
        let f = fakes(config, 10);
        let auth = token(KEY);
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

    /// A failed job of alice's whose stored error carries what must never reach a caller.
    fn failed_job(f: &shared::testing::Fakes) -> String {
        let raw = RawExportRequest::from_query("orders", vec![]);
        let export = shared::domain::request::normalise(&f.deps.catalog, &raw).unwrap();
        let owner = shared::domain::Owner {
            tenant: "acme",
            user: "alice",
        };
        let key = export.cache_key(owner, shared::encode::ENCODER_VERSION);
        let spec = export.spec;
        let mut job = Job::new(
            "j1".into(),
            "acme",
            "alice",
            key,
            spec,
            shared::domain::JobKind::Export,
            Default::default(),
            None,
            chrono::Utc::now(),
            chrono::Duration::days(1),
        );
        job.status = shared::domain::JobStatus::Failed;
        job.error = Some(shared::domain::JobError {
            code: "storage_failed".into(),
            message: "upload part failed: AccessDenied: arn:aws:s3:::bucket-123456789012 \
                      row value 4111-1111-1111-1111"
                .into(),
        });
        f.meta.jobs.lock().unwrap().insert(job.job_id.clone(), job);
        "j1".into()
    }

    #[tokio::test]
    async fn job_errors_show_only_a_code_and_a_safe_sentence() {
        let f = fakes(keyed(), 10);
        let id = failed_job(&f);
        let auth = token(KEY);
        let mut shown = Vec::new();
        for (uri, expected) in [
            (format!("/exports/jobs/{id}"), StatusCode::OK),
            (format!("/exports/jobs/{id}/download"), StatusCode::CONFLICT),
        ] {
            let (status, _, body) = call(router(f.deps.clone()), &uri, Some(&auth)).await;
            assert_eq!(status, expected, "{uri}");
            shown.push(body);
        }
        for body in &shown {
            let text = body.to_string();
            for secret in ["arn:", "123456789012", "4111", "AccessDenied"] {
                assert!(!text.contains(secret), "{secret} leaked: {text}");
            }
        }
        let body = &shown[0];
        assert_eq!(body["error"]["code"], "storage_failed");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request it again"));
        assert_eq!(body["error"].as_object().unwrap().len(), 2);
    }

    fn fixture() -> lambda_http::Request {
        lambda_http::request::from_str(include_str!("../events/get-export.json")).unwrap()
    }

    #[tokio::test]
    async fn authorizer_claims_are_ignored_when_a_local_key_is_configured() {
        // Anyone who reaches `cargo lambda watch` can send an event with claims in it.
        let f = fakes(keyed(), 10);
        let resp = router(f.deps).oneshot(fixture()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        // Where no local key is configured, API Gateway's authorizer is what ran.
        let f = fakes(test_config(), 10);
        let resp = router(f.deps).oneshot(fixture()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
    }

    async fn send(router: Router, req: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let resp = router.oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, body.to_vec())
    }

    fn post(body: impl Into<Body>) -> Request<Body> {
        Request::builder()
            .method("POST")
            .uri("/exports")
            .header("authorization", token(KEY))
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap()
    }

    #[tokio::test]
    async fn bodies_over_64_kib_get_a_413_problem() {
        let f = fakes(keyed(), 10);
        let pad = "x".repeat(MAX_BODY_BYTES);
        let big = format!(r#"{{"dataset":"orders","pad":"{pad}"}}"#);
        let (status, headers, _) = send(router(f.deps.clone()), post(big)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        let (status, _, _) = send(router(f.deps), post(r#"{"dataset":"orders"}"#)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn hostile_filter_values_are_refused_and_never_echoed() {
        let f = fakes(keyed(), 10);
        let long = "a".repeat(20_000);
        for uri in [
            format!("/exports/orders?status={long}"),
            "/exports/orders?status=paid%00evil".to_string(),
            "/exports/orders?status=%1B%5B31m".to_string(),
        ] {
            let (status, _, body) = call(router(f.deps.clone()), &uri, Some(&token(KEY))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert_eq!(body["errors"][0]["field"], "status");
            assert!(body.to_string().len() < 1024, "{body}");
        }
        assert!(f.queue.drain().is_empty(), "no job started");
    }

    #[tokio::test]
    async fn half_a_million_unknown_columns_get_a_small_error_body() {
        let f = fakes(keyed(), 10);
        // Stays under the body limit with short names; the limit is what stops longer lists.
        let names: Vec<String> = (0..6_000).map(|i| format!("c{i}")).collect();
        let body = serde_json::json!({"dataset": "orders", "columns": names}).to_string();
        assert!(body.len() < MAX_BODY_BYTES);
        let (status, _, bytes) = send(router(f.deps.clone()), post(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(bytes.len() < 2048, "{} bytes", bytes.len());
        let names: Vec<String> = (0..500_000).map(|i| format!("c{i}")).collect();
        let body = serde_json::json!({"dataset": "orders", "columns": names}).to_string();
        let (status, _, bytes) = send(router(f.deps.clone()), post(body)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(bytes.len() < 1024);
        // Repeats and more names than the dataset has are refused too.
        for cols in ["order_id,order_id", &vec!["order_id"; 13].join(",")] {
            let (status, _, body) = call(
                router(f.deps.clone()),
                &format!("/exports/orders?columns={cols}"),
                Some(&token(KEY)),
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{cols}");
            assert_eq!(body["errors"][0]["field"], "columns");
        }
        // Thousands of unknown filters: one error each for the first few, allowed list once.
        let query: Vec<String> = (0..3_000).map(|i| format!("f{i}=x")).collect();
        let (status, _, body) = call(
            router(f.deps),
            &format!("/exports/orders?{}", query.join("&")),
            Some(&token(KEY)),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.to_string().len() < 4096, "{}", body.to_string().len());
        assert_eq!(body.to_string().matches("allowed filters").count(), 1);
    }

    #[tokio::test]
    async fn huge_max_stale_is_served_not_a_panic() {
        let f = fakes(keyed(), 10);
        let auth = token(KEY);
        assert_eq!(
            call(router(f.deps.clone()), "/exports/orders", Some(&auth))
                .await
                .0,
            StatusCode::ACCEPTED
        );
        f.run_jobs().await;
        // Past its fresh deadline: whether it is served depends on max_stale arithmetic.
        f.clock.advance(chrono::Duration::seconds(1000));
        for v in [
            "18446744073709551615",
            "9223372036854775807",
            "9223372036854776",
        ] {
            let (status, headers, _) = call(
                router(f.deps.clone()),
                &format!("/exports/orders?max_stale={v}"),
                Some(&auth),
            )
            .await;
            assert_eq!(status, StatusCode::SEE_OTHER, "{v}");
            assert_eq!(headers["x-export-cache"], "stale");
        }
    }

    #[tokio::test]
    async fn a_hit_is_its_description_when_the_caller_prefers_a_representation() {
        let f = fakes(keyed(), 10);
        let body = r#"{"dataset":"orders","format":"csv"}"#;
        assert_eq!(
            send(router(f.deps.clone()), post(body)).await.0,
            StatusCode::ACCEPTED
        );
        f.run_jobs().await;
        let (status, headers, _) = send(router(f.deps.clone()), post(body)).await;
        assert_eq!(
            status,
            StatusCode::SEE_OTHER,
            "a plain request still redirects"
        );
        assert!(!headers.contains_key("preference-applied"));
        let mut req = post(body);
        req.headers_mut().insert(
            "prefer",
            HeaderValue::from_static("wait=3, Return=Representation"),
        );
        let (status, headers, bytes) = send(router(f.deps), req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["preference-applied"], "return=representation");
        assert_eq!(headers["x-export-cache"], "hit");
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(doc["cache"], "hit");
        assert!(doc["download_url"]
            .as_str()
            .unwrap()
            .starts_with("memory://"));
    }

    #[tokio::test]
    async fn the_page_is_served_without_a_token_and_loads_nothing_from_elsewhere() {
        let f = fakes(keyed(), 10);
        let req = Request::builder().uri("/").body(Body::empty()).unwrap();
        let (status, headers, bytes) = send(router(f.deps), req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
        let page = String::from_utf8(bytes).unwrap();
        assert!(page.contains("exports/datasets") && page.contains("<label for=\"token\">"));
        for external in ["http://", "https://", "//cdn"] {
            assert!(!page.contains(external), "the page names {external}");
        }
    }

    #[tokio::test]
    async fn a_bad_path_segment_is_a_problem_not_plain_text() {
        let f = fakes(keyed(), 10);
        let (status, headers, body) =
            call(router(f.deps), "/exports/%FF%FE", Some(&token(KEY))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(body["errors"][0]["field"], "path");
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

    #[tokio::test]
    async fn every_export_request_emits_its_cache_result_as_emf() {
        let f = fakes(keyed(), 10);
        let uri = "/exports/orders?format=xlsx&columns=order_id";
        let (status, _, job) = call(router(f.deps.clone()), uri, Some(&token(KEY))).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        f.run_jobs().await;
        let (status, _, _) = call(router(f.deps.clone()), uri, Some(&token(KEY))).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        // A refused request has no cache result, so no metric.
        let (status, _, _) = call(router(f.deps.clone()), "/exports/nope", Some(&token(KEY))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let job_id = job["job_id"].as_str().unwrap();
        let docs = shared::testing::emf_documents(&f.metrics, &["acme", "alice", job_id]);
        let requests: Vec<_> = docs
            .iter()
            .filter(|d| d.get("ExportRequests").is_some())
            .collect();
        assert_eq!(requests.len(), 2, "{docs:?}");
        for (doc, result) in requests.iter().zip(["miss", "hit"]) {
            assert_eq!(doc["result"], result);
            assert_eq!(
                (&doc["dataset"], &doc["format"]),
                (&json!("orders"), &json!("xlsx"))
            );
            assert!(doc["ExportLatency"].as_f64().unwrap() >= 0.0);
            assert_eq!(
                (&doc["tenant"], &doc["export_id"]),
                (&json!("acme"), &json!(job_id))
            );
        }
    }

    #[test]
    fn wait_preferences_are_read_capped_or_ignored_never_refused() {
        let wait = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("prefer", HeaderValue::from_str(v).unwrap());
            }
            preferred_wait(&h)
        };
        assert_eq!(wait(&["wait=10"]), Some(10));
        assert_eq!(wait(&["respond-async, Wait = 3"]), Some(3));
        assert_eq!(wait(&["return=representation", "wait=\"7\""]), Some(7));
        assert_eq!(wait(&["wait=600"]), Some(MAX_WAIT_SECONDS));
        assert_eq!(wait(&["wait=99999999999999999999"]), None);
        for ignored in ["wait=", "wait=-1", "wait=1.5", "wait=abc", "waiting=3", ""] {
            assert_eq!(wait(&[ignored]), None, "{ignored}");
        }
        assert_eq!(wait(&[]), None);
    }
}
