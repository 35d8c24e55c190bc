//! The OpenAPI document against the router it describes: every route served is documented and
//! every documented route is served, the README lists the same routes, the documented parameters
//! and bodies are the ones the parsers read, and real answers have the documented shape.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use axum::body::Body;
use http::{Request, StatusCode};
use serde_json::Value;
use shared::domain::request::{JSON_FIELDS, QUERY_OPTIONS};
use shared::testing::{fakes, test_config, Fakes};
use tower::ServiceExt;

const KEY: &str = "openapi-test-signing-key-of-32-bytes-or-more";
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

fn doc() -> Value {
    serde_json::to_value(api::openapi_document()).unwrap()
}

/// (method, path template) of every documented operation.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

/// (method, path template) of every row of the README's "HTTP API" table.
fn readme_routes() -> BTreeSet<(String, String)> {
    let readme = include_str!("../../../README.md");
    let section = readme
        .split("\n## HTTP API\n")
        .nth(1)
        .expect("README has an HTTP API section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|l| {
            let cell = l.split('`').next().unwrap();
            let (method, rest) = cell.split_once(' ').unwrap();
            let path = rest.split('?').next().unwrap().trim();
            (method.to_string(), path.to_string())
        })
        .collect()
}

fn concrete(template: &str) -> String {
    template
        .replace("{dataset}", "orders")
        .replace("{job_id}", "no-such-job")
}

fn keyed() -> Fakes {
    let mut config = test_config();
    config.local_jwt_secret = Some(KEY.into());
    fakes(config, 10)
}

fn token(tenant: &str) -> String {
    let claims = serde_json::json!({"sub": "alice", "tenant_id": tenant, "scope": "exports:read",
        "exp": chrono::Utc::now().timestamp() + 600});
    let t = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(KEY.as_bytes()),
    )
    .unwrap();
    format!("Bearer {t}")
}

async fn send(f: &Fakes, method: &str, uri: &str, auth: Option<&str>) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let body = if method == "POST" {
        Body::from(r#"{"dataset":"orders"}"#)
    } else {
        Body::empty()
    };
    let resp = api::router(f.deps.clone())
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

/// Whether the router has a handler for this method and path: anything but its fallbacks.
async fn served(f: &Fakes, method: &str, uri: &str) -> bool {
    let (status, body) = send(f, method, uri, None).await;
    status != StatusCode::METHOD_NOT_ALLOWED && body["type"] != "/problems/no-route"
}

#[tokio::test]
async fn every_served_route_is_documented_and_every_documented_route_is_served() {
    let doc = doc();
    let documented = documented(&doc);
    assert!(documented.len() >= 10, "{documented:?}");
    let paths: BTreeSet<String> = documented
        .iter()
        .chain(readme_routes().iter())
        .map(|(_, p)| p.clone())
        .collect();
    let f = fakes(test_config(), 10);
    let mut wrong = Vec::new();
    for path in &paths {
        for method in METHODS {
            let is_served = served(&f, method, &concrete(path)).await;
            let is_documented = documented.contains(&(method.to_string(), path.clone()));
            if is_served != is_documented {
                wrong.push(format!(
                    "{method} {path}: served {is_served}, documented {is_documented}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_readme_lists_exactly_the_documented_routes() {
    assert_eq!(readme_routes(), documented(&doc()));
}

#[test]
fn the_document_is_openapi_3_1_with_bearer_auth_on_every_route_but_three() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    for (method, path) in documented(&doc) {
        let op = &doc["paths"][&path][method.to_lowercase()];
        let open = ["/", "/health", "/openapi.json"].contains(&path.as_str());
        let secured = op["security"] == serde_json::json!([{"bearer": []}]);
        assert_eq!(secured, !open, "{method} {path}: {op}");
        if secured {
            for status in ["401", "403"] {
                let answer = &op["responses"][status]["content"]["application/problem+json"];
                assert!(answer.is_object(), "{method} {path} lacks {status}");
            }
        }
    }
}

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_reference_resolves() {
    let doc = doc();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 10);
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        assert!(doc["components"]["schemas"][name].is_object(), "{r}");
    }
}

#[test]
fn documented_query_and_body_fields_are_the_ones_the_parsers_read() {
    let doc = doc();
    let options: BTreeSet<&str> = QUERY_OPTIONS.into_iter().collect();
    for (method, path) in [
        ("get", "/exports/{dataset}"),
        ("delete", "/exports/cache/{dataset}"),
    ] {
        let params = doc["paths"][path][method]["parameters"].as_array().unwrap();
        let query: BTreeSet<&str> = params
            .iter()
            .filter(|p| p["in"] == "query" && p["name"] != "filters")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(query, options, "{method} {path}");
        let filters = params.iter().find(|p| p["name"] == "filters").unwrap();
        assert_eq!(filters["style"], "form");
        assert_eq!(filters["explode"], true);
    }
    let body = properties(&doc, &doc["components"]["schemas"]["ExportRequest"]);
    assert_eq!(body, JSON_FIELDS.into_iter().map(String::from).collect());
    let formats = &doc["components"]["schemas"]["Format"]["enum"];
    assert_eq!(
        formats,
        &serde_json::json!(["csv", "xlsx", "csv.gz", "ndjson"])
    );
}

/// A schema's property names, through references and `allOf` (a flattened struct).
fn properties(doc: &Value, schema: &Value) -> BTreeSet<String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        return properties(doc, &doc["components"]["schemas"][name]);
    }
    let mut out: BTreeSet<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        out.extend(properties(doc, part));
    }
    out
}

/// The schema the document gives for this answer, references followed.
fn answer_schema<'a>(doc: &'a Value, method: &str, path: &str, status: u16) -> &'a Value {
    let content = &doc["paths"][path][method]["responses"][status.to_string()]["content"];
    let (_, media) = content.as_object().unwrap().iter().next().unwrap();
    let r = media["schema"]["$ref"].as_str().unwrap();
    &doc["components"]["schemas"][r.strip_prefix("#/components/schemas/").unwrap()]
}

/// Every key of `body` is a documented property, and every required property is there.
fn assert_shape(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let schema = answer_schema(doc, method, path, status);
    let props = schema["properties"].as_object().unwrap();
    let obj = body.as_object().unwrap();
    for k in obj.keys() {
        assert!(
            props.contains_key(k),
            "{method} {path} {status}: `{k}` undocumented"
        );
    }
    for r in schema["required"].as_array().unwrap() {
        let r = r.as_str().unwrap();
        assert!(
            obj.contains_key(r),
            "{method} {path} {status}: no `{r}` in {body}"
        );
    }
}

#[tokio::test]
async fn real_answers_have_the_documented_shape() {
    let doc = doc();
    let f = keyed();
    let auth = token("acme");
    let auth = Some(auth.as_str());

    let (status, body) = send(&f, "GET", "/health", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_shape(&doc, "get", "/health", 200, &body);

    let (status, body) = send(&f, "GET", "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, doc, "served as generated, without identity");
    // CI validates the served document with openapi-spec-validator.
    if let Ok(path) = std::env::var("OPENAPI_OUT") {
        std::fs::write(path, serde_json::to_vec_pretty(&body).unwrap()).unwrap();
    }

    let (status, body) = send(&f, "GET", "/exports/datasets", auth).await;
    assert_eq!(status, StatusCode::OK);
    assert_shape(&doc, "get", "/exports/datasets", 200, &body);
    let item = |name: &str| {
        doc["components"]["schemas"][name]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    for ds in body["datasets"].as_array().unwrap() {
        let keys: BTreeSet<String> = ds.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, item("DatasetBody"));
        for c in ds["columns"].as_array().unwrap() {
            let keys: BTreeSet<String> = c.as_object().unwrap().keys().cloned().collect();
            assert_eq!(keys, item("ColumnBody"));
        }
    }

    let (status, job) = send(&f, "GET", "/exports/orders?format=ndjson", auth).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_shape(&doc, "get", "/exports/{dataset}", 202, &job);
    let job_id = job["job_id"].as_str().unwrap();
    f.run_jobs().await;
    let path = format!("/exports/jobs/{job_id}");
    let (status, body) = send(&f, "GET", &path, auth).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "succeeded");
    assert_shape(&doc, "get", "/exports/jobs/{job_id}", 200, &body);

    let (status, body) = send(&f, "GET", "/exports/orders?format=ndjson", auth).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_shape(&doc, "get", "/exports/{dataset}", 303, &body);
    let (status, body) = send(&f, "POST", "/exports", auth).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_shape(&doc, "post", "/exports", 202, &body);

    let (status, body) = send(&f, "GET", "/exports/cache/stats", auth).await;
    assert_eq!(status, StatusCode::OK);
    assert_shape(&doc, "get", "/exports/cache/stats", 200, &body);

    let (status, body) = send(&f, "GET", "/exports/orders?format=pdf", auth).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_shape(&doc, "get", "/exports/{dataset}", 400, &body);
    let (status, body) = send(&f, "GET", &path, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_shape(&doc, "get", "/exports/jobs/{job_id}", 401, &body);
}
