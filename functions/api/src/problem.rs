//! Errors as RFC 9457 `application/problem+json`. Callers learn what was wrong and what is
//! allowed; internal causes are logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::wire::Problem;

use shared::domain::identity::AuthError;
use shared::domain::{FieldError, RequestError};
use shared::services::ServiceError;

#[derive(Debug)]
pub enum ApiError {
    Invalid(Vec<FieldError>),
    UnknownDataset { name: String, allowed: Vec<String> },
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    NotReady(String),
    Gone(String),
    Unavailable(String),
    RateLimited { retry_after: u32 },
    PayloadTooLarge,
    RouteNotFound,
    MethodNotAllowed,
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldError::new(field, message)])
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::Unauthorized(e.to_string())
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Request(RequestError::Invalid(errors)) => Self::Invalid(errors),
            ServiceError::Request(RequestError::UnknownDataset { name, allowed }) => {
                Self::UnknownDataset { name, allowed }
            }
            ServiceError::Forbidden(m) => Self::Forbidden(m),
            ServiceError::NotFound(m) => Self::NotFound(m),
            ServiceError::NotReady(m) => Self::NotReady(m),
            ServiceError::Gone(m) => Self::Gone(m),
            ServiceError::Unavailable(m) => Self::Unavailable(m),
            ServiceError::RateLimited { retry_after } => Self::RateLimited { retry_after },
            ServiceError::Internal(e) => Self::Internal(e.to_string()),
        }
    }
}

/// Longest `detail` sent; domain errors are bounded already, this is the last line of defence.
const MAX_DETAIL_CHARS: usize = 2048;

fn problem(status: StatusCode, slug: &str, title: &str, mut detail: String) -> Problem {
    if let Some((cut, _)) = detail.char_indices().nth(MAX_DETAIL_CHARS) {
        detail.truncate(cut);
        detail.push('…');
    }
    Problem {
        kind: format!("/problems/{slug}"),
        title: title.to_string(),
        status: status.as_u16(),
        detail,
        errors: None,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = match &self {
            ApiError::RateLimited { retry_after } => Some(*retry_after),
            ApiError::Unavailable(_) => Some(5),
            _ => None,
        };
        let (status, body) = match self {
            ApiError::Invalid(errors) => {
                // Names the fields only: what is allowed is said once, in `errors`.
                let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
                let detail = format!(
                    "invalid: {}; `errors` says what each allows",
                    fields.join(", ")
                );
                let mut body = problem(
                    StatusCode::BAD_REQUEST,
                    "invalid-request",
                    "Invalid export request",
                    detail,
                );
                body.errors = Some(errors);
                (StatusCode::BAD_REQUEST, body)
            }
            ApiError::UnknownDataset { name, allowed } => {
                let mut body = problem(
                    StatusCode::NOT_FOUND,
                    "unknown-dataset",
                    "Unknown dataset",
                    format!(
                        "there is no dataset `{name}`; available: {}",
                        allowed.join(", ")
                    ),
                );
                body.errors = Some(vec![FieldError::new(
                    "dataset",
                    format!("allowed: {}", allowed.join(", ")),
                )]);
                (StatusCode::NOT_FOUND, body)
            }
            ApiError::Unauthorized(m) => (
                StatusCode::UNAUTHORIZED,
                problem(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "Identity required",
                    m,
                ),
            ),
            ApiError::Forbidden(m) => (
                StatusCode::FORBIDDEN,
                problem(StatusCode::FORBIDDEN, "forbidden", "Not allowed", m),
            ),
            ApiError::NotFound(m) => (
                StatusCode::NOT_FOUND,
                problem(StatusCode::NOT_FOUND, "not-found", "Not found", m),
            ),
            ApiError::NotReady(m) => (
                StatusCode::CONFLICT,
                problem(StatusCode::CONFLICT, "not-ready", "Export not ready", m),
            ),
            ApiError::Gone(m) => (
                StatusCode::GONE,
                problem(StatusCode::GONE, "expired", "Export expired", m),
            ),
            ApiError::Unavailable(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "Try again shortly",
                    m,
                ),
            ),
            ApiError::RateLimited { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                problem(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate-limited",
                    "Too many new exports",
                    format!("this tenant started too many new exports this minute; retry in {retry_after} s (cached exports are not limited)"),
                ),
            ),
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload-too-large",
                    "Request body too large",
                    format!(
                        "the body may be at most {} bytes",
                        crate::MAX_BODY_BYTES
                    ),
                ),
            ),
            ApiError::RouteNotFound => (
                StatusCode::NOT_FOUND,
                problem(
                    StatusCode::NOT_FOUND,
                    "no-route",
                    "No such endpoint",
                    "see GET /openapi.json for every route; GET /exports/datasets lists the datasets".into(),
                ),
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                problem(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method-not-allowed",
                    "Method not allowed",
                    "this endpoint does not take that method".into(),
                ),
            ),
            ApiError::Internal(cause) => {
                tracing::error!(cause = %cause, "internal error answering a request");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "Internal error",
                        "something went wrong on our side; it has been logged".into(),
                    ),
                )
            }
        };
        let mut resp = (status, axum::Json(body)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
