//! The frame of the OpenAPI 3.1 document (`GET /openapi.json`): title, tags, the bearer scheme,
//! and the problems every authenticated route can answer. The paths themselves come from the
//! handlers' `#[utoipa::path]` attributes, registered with their routes in `routes()`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder};

/// Name of the security scheme the handlers' `security(("bearer" = []))` refer to.
pub const BEARER: &str = "bearer";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "export-cache",
        description = "Exports of DynamoDB datasets as CSV, csv.gz, XLSX or NDJSON files: a cached \
            file is a `303` to a presigned S3 URL, anything else a background job to poll. Errors \
            are `application/problem+json` (RFC 9457)."
    ),
    tags(
        (name = "exports", description = "Datasets, export requests, jobs and downloads"),
        (name = "cache", description = "Invalidation and statistics of the caller's cached files"),
        (name = "service", description = "Health and this document; no identity needed"),
    )
)]
struct Frame;

pub fn base() -> OpenApi {
    <Frame as utoipa::OpenApi>::openapi()
}

/// Answers of every route that needs an identity, whatever it does.
const AUTH_PROBLEMS: [(&str, &str); 3] = [
    ("401", "No bearer token, or one that does not verify"),
    (
        "403",
        "The token lacks the scope (`exports:read`, `exports:admin`)",
    ),
    (
        "503",
        "A backing service is slow or unavailable; see `Retry-After`",
    ),
];

/// Adds what the handlers' attributes do not say themselves: the bearer scheme and the problems
/// shared by every authenticated route.
pub fn finish(doc: &mut OpenApi) {
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT with `sub`, the tenant claim and the scopes `exports:read` (and \
                         `exports:admin` for tenant-wide invalidation). In AWS the HTTP API's JWT \
                         authorizer verifies it; locally the function does.",
                    ))
                    .build(),
            ),
        );
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for op in operations.into_iter().flatten() {
            if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                for (status, description) in AUTH_PROBLEMS {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| problem(description));
                }
            }
        }
    }
}

fn problem(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
        .into()
}
