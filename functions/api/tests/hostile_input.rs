//! The whole router under arbitrary input: methods, paths, query strings, headers and bodies.
//! Whatever arrives, the answer is never a 5xx, never a panic, and an error body stays small.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use proptest::prelude::*;
use shared::testing::{fakes, test_config, Fakes};
use tower::ServiceExt;

const KEY: &str = "hostile-input-test-key-of-32-bytes-or-more";
/// Generous for a problem body: the domain bounds its errors far below this.
const MAX_PROBLEM_BYTES: usize = 8 * 1024;

fn token(scopes: &str) -> String {
    let claims = serde_json::json!({"sub": "alice", "tenant_id": "acme", "scope": scopes,
        "exp": chrono::Utc::now().timestamp() + 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(KEY.as_bytes()),
    )
    .unwrap()
}

/// Fakes with one finished `orders` export, now stale, so the hit/stale paths are reachable too.
fn stack(rt: &tokio::runtime::Runtime) -> Fakes {
    let mut config = test_config();
    config.local_jwt_secret = Some(KEY.into());
    let f = fakes(config, 10);
    rt.block_on(async {
        let req = Request::get("/exports/orders")
            .header("authorization", format!("Bearer {}", token("exports:read")))
            .body(Body::empty())
            .unwrap();
        let resp = api::router(f.deps.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        f.run_jobs().await;
    });
    f.clock.advance(chrono::Duration::seconds(1000));
    f
}

fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                (*b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("orders".to_string()),
        Just("customers".to_string()),
        Just("stats".to_string()),
        proptest::collection::vec(any::<u8>(), 0..80).prop_map(|b| encode(&b)),
        "[a-zA-Z0-9]{0,70}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    let any_path = (0..12usize, segment(), segment()).prop_map(|(shape, a, b)| match shape {
        0 => format!("/exports/{a}"),
        1 => "/exports".to_string(),
        2 => format!("/exports/jobs/{a}"),
        3 => format!("/exports/jobs/{a}/download"),
        4 => "/exports/cache".to_string(),
        5 => format!("/exports/cache/{a}"),
        6 => "/exports/cache/stats".to_string(),
        7 => "/health".to_string(),
        8 => format!("/{a}/{b}"),
        9 => "/exports/datasets".to_string(),
        10 => "/openapi.json".to_string(),
        _ => format!("/exports/{a}/{b}"),
    });
    // The export route most often: it is where the numbers and the cache paths are.
    prop_oneof![2 => Just("/exports/orders".to_string()), 3 => any_path]
}

fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("format".to_string()),
        Just("columns".to_string()),
        Just("from".to_string()),
        Just("to".to_string()),
        Just("max_stale".to_string()),
        Just("tz".to_string()),
        Just("bom".to_string()),
        Just("delimiter".to_string()),
        Just("status".to_string()),
        Just("paid".to_string()),
        Just("scope".to_string()),
        ".{0,30}",
    ];
    let value = prop_oneof![
        ".{0,40}",
        "[0-9]{1,25}",
        Just("18446744073709551616".to_string()),
        Just("-9223372036854775808".to_string()),
        Just("9999-12-31T23:59:59Z".to_string()),
        Just("+275760-09-13T00:00:00Z".to_string()),
        Just("order_id,order_id,amount".to_string()),
        proptest::collection::vec(any::<u8>(), 0..1500)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    // Otherwise valid requests with an extreme `max_stale`: they reach the stale-entry arithmetic.
    let numbers = (
        any::<u64>(),
        proptest::sample::select(vec!["", "&format=csv", "&status=paid", "&format=xlsx"]),
    )
        .prop_map(|(n, rest)| format!("max_stale={n}{rest}"));
    prop_oneof![
        numbers,
        proptest::collection::vec((key, value), 0..12).prop_map(|pairs| {
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs)
                .finish()
        }),
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| encode(&b)),
        "[a-z=&%0-9A-F+]{0,100}",
    ]
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,30}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("orders")),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        let field = prop_oneof![
            Just("dataset".to_string()),
            Just("format".to_string()),
            Just("columns".to_string()),
            Just("filters".to_string()),
            Just("max_stale".to_string()),
            Just("from".to_string()),
            Just("status".to_string()),
            ".{0,12}",
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(field, inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..600),
        json().prop_map(|v| v.to_string().into_bytes()),
        (json(), 0..70_000usize).prop_map(|(v, pad)| {
            serde_json::json!({"dataset": "orders", "filters": v, "pad": "x".repeat(pad)})
                .to_string()
                .into_bytes()
        }),
    ]
}

fn authorization() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(format!("Bearer {}", token("exports:read")))),
        Just(Some(format!("Bearer {}", token("exports:read")))),
        Just(Some(format!(
            "Bearer {}",
            token("exports:read exports:admin")
        ))),
        Just(Some(format!("Bearer {}", token("")))),
        ".{0,60}".prop_map(Some),
        "[A-Za-z0-9._-]{0,200}".prop_map(|t| Some(format!("Bearer {t}"))),
    ]
}

fn method() -> impl Strategy<Value = http::Method> {
    prop_oneof![
        Just(http::Method::GET),
        Just(http::Method::GET),
        Just(http::Method::POST),
        Just(http::Method::DELETE),
        Just(http::Method::PUT),
        Just(http::Method::PATCH),
        Just(http::Method::HEAD),
        Just(http::Method::OPTIONS),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        Just("content-type".to_string()),
        Just("prefer".to_string()),
        Just("accept".to_string()),
        Just("x-forwarded-for".to_string()),
        "[a-z][a-z0-9-]{0,20}",
    ];
    proptest::collection::vec((name, "[ -~]{0,80}"), 0..5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_requests_never_get_a_5xx_or_a_panic(
        method in method(),
        path in path(),
        query in query(),
        auth in authorization(),
        extra in headers(),
        body in body(),
    ) {
        thread_local! {
            static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            static FAKES: Fakes = RT.with(stack);
        }
        let uri = if query.is_empty() { path } else { format!("{path}?{query}") };
        let Ok(uri) = http::Uri::try_from(uri) else {
            return Ok(());
        };
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in extra {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                req = req.header(k, v);
            }
        }
        if let Some(a) = auth {
            if let Ok(v) = HeaderValue::try_from(a) {
                req = req.header("authorization", v);
            }
        }
        let req = req.body(Body::from(body)).unwrap();
        let router = FAKES.with(|f| api::router(f.deps.clone()));
        let (status, content_type, len) = RT.with(|rt| rt.block_on(async {
            let resp = router.oneshot(req).await.unwrap();
            let status = resp.status();
            let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
            (status, ct, bytes.len())
        }));
        prop_assert!(!status.is_server_error(), "{status}");
        if content_type.as_deref() == Some("application/problem+json") {
            prop_assert!(len <= MAX_PROBLEM_BYTES, "{len} bytes of problem");
        }
    }
}
