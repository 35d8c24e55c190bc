//! The source reader's two decoders against real tables in the emulator: every page of a
//! partition read with the fast decoder is the page the SDK's parse makes of it (rows, cursor,
//! read capacity), for seeded rows and for items that hold what the seeder never writes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use integration_tests::Stack;
use shared::adapters::dynamodb::DynamoSource;
use shared::config::SourceDecoder;
use shared::domain::catalog::Catalog;
use shared::domain::request::normalise;
use shared::domain::{RawExportRequest, Value};
use shared::ports::{PortError, RowSource, SourceQuery};
use shared::services::process::source_query;

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: &str) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// Orders of tenant `odd`: escapes, control characters, other scripts and emoji (in the sort key
/// too, so cursors carry them), attributes missing, NULL, or held in the other forms the reader
/// takes (booleans and integers as text, a timestamp as epoch seconds), and attributes of no
/// column in every other type.
fn odd_orders() -> Vec<HashMap<String, AttributeValue>> {
    let item = |pairs: Vec<(&str, AttributeValue)>| -> HashMap<String, AttributeValue> {
        let mut item: HashMap<String, AttributeValue> =
            pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        item.insert("tenant_id".into(), s("odd"));
        item
    };
    vec![
        item(vec![
            ("order_id", s("ORD-1")),
            ("created_at", s("2024-05-01T09:30:00Z")),
            (
                "customer_name",
                s("Zoë \"Z\" \\ / Martín\n\t😀\u{2028}株式会社"),
            ),
            ("note", s("bell \u{7} nul \u{0} unit \u{1f} del \u{7f}")),
            ("status", s("paid")),
            ("currency", s("EUR")),
            ("amount", n("12.50")),
            ("tax", n("-0.001")),
            ("items", n("3")),
            ("paid", AttributeValue::Bool(true)),
            ("ship_date", s("2024-05-03")),
        ]),
        item(vec![("order_id", s("ORD-2 only the key"))]),
        item(vec![
            ("order_id", s("ORD-3 é/ü \"quoted\" 😀")),
            ("created_at", n("1700000000.5")),
            ("note", AttributeValue::Null(true)),
            ("ship_date", AttributeValue::Null(true)),
            ("paid", s("1")),
            ("items", s("7")),
            ("amount", s("-0.01")),
            ("customer_name", n("42")),
            ("status", AttributeValue::Bool(false)),
        ]),
        item(vec![
            ("order_id", s("ORD-4")),
            ("created_at", s("2024-05-01T09:30:00.123+02:00")),
            ("paid", s("false")),
            ("tags", AttributeValue::Ss(vec!["a".into(), "b\"".into()])),
            ("sizes", AttributeValue::Ns(vec!["1".into(), "2.5".into()])),
            (
                "blob",
                AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(vec![0, 255, 10])),
            ),
            (
                "meta",
                AttributeValue::M(HashMap::from([(
                    "k".to_string(),
                    AttributeValue::L(vec![s("v"), AttributeValue::Null(true)]),
                )])),
            ),
        ]),
        item(vec![("order_id", s("ORD-5\u{10ffff}"))]),
    ]
}

async fn put(stack: &Stack, table: &str, items: Vec<HashMap<String, AttributeValue>>) {
    let client = aws_sdk_dynamodb::Client::new(&stack.sdk);
    for item in items {
        client
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .send()
            .await
            .unwrap();
    }
}

fn query(stack: &Stack, params: &[(&str, &str)], tenant: &str, page: Option<i32>) -> SourceQuery {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let dataset = pairs.remove(0).1;
    let export = normalise(
        &Catalog::builtin().unwrap(),
        &RawExportRequest::from_query(&dataset, pairs),
    )
    .unwrap();
    source_query(&export, tenant, &stack.p.names.source_table_prefix, page)
}

/// Reads the whole partition both ways, page against page; returns the rows and the pages.
async fn read_both(stack: &Stack, q: &SourceQuery) -> (Vec<Vec<Value>>, usize) {
    let client = aws_sdk_dynamodb::Client::new(&stack.sdk);
    let sdk = DynamoSource::new(client.clone(), SourceDecoder::Sdk);
    let fast = DynamoSource::new(client, SourceDecoder::Fast);
    let (mut rows, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let a = sdk.read_page(q, cursor.as_deref()).await.unwrap();
        let b = fast.read_page(q, cursor.as_deref()).await.unwrap();
        assert_eq!(b.rows, a.rows, "page {pages} of {q:?}");
        assert_eq!(b.next, a.next, "page {pages} of {q:?}");
        assert_eq!(b.read_capacity, a.read_capacity, "page {pages} of {q:?}");
        pages += 1;
        rows.extend(b.rows);
        match b.next {
            Some(next) => cursor = Some(next),
            None => return (rows, pages),
        }
    }
}

#[tokio::test]
async fn both_decoders_read_every_page_of_real_tables_alike() {
    let stack = Stack::new(120, &[]).await;
    put(&stack, &stack.p.names.orders_table, odd_orders()).await;

    // Seeded rows, whole partitions in pages of DynamoDB's size and in small ones, by the table
    // and by the range index, with filters.
    for (params, tenant, page, expect_rows) in [
        (vec![("dataset", "orders")], "acme", None, Some(120)),
        (vec![("dataset", "orders")], "globex", Some(17), Some(120)),
        (
            vec![("dataset", "orders"), ("status", "paid")],
            "acme",
            Some(9),
            None,
        ),
        (
            vec![
                ("dataset", "orders"),
                ("from", "2024-01-01T00:00:00Z"),
                ("columns", "order_id,created_at,amount,paid"),
            ],
            "acme",
            Some(25),
            None,
        ),
        (vec![("dataset", "customers")], "acme", Some(5), None),
        (vec![("dataset", "contacts")], "globex", None, None),
    ] {
        let q = query(&stack, &params, tenant, page);
        let (rows, pages) = read_both(&stack, &q).await;
        assert!(!rows.is_empty(), "{params:?}");
        if let Some(expect) = expect_rows {
            assert_eq!(rows.len(), expect, "{params:?}");
        }
        if page.is_some_and(|p| (p as usize) < rows.len()) {
            assert!(pages > 1, "{params:?}: one page only");
        }
    }

    // The odd items, one a page, so each cursor holds their keys.
    let q = query(&stack, &[("dataset", "orders")], "odd", Some(1));
    let (rows, pages) = read_both(&stack, &q).await;
    assert_eq!(rows.len(), 5);
    assert!(pages >= 5);
    assert_eq!(
        rows[0][3],
        Value::Str("Zoë \"Z\" \\ / Martín\n\t😀\u{2028}株式会社".into())
    );
    assert_eq!(rows[2][3], Value::Str("42".into()));
    assert_eq!(rows[2][9], Value::Bool(true));
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_the_same_error_either_way() {
    let stack = Stack::new(0, &[]).await;
    let mut bad = odd_orders().remove(0);
    bad.insert("tenant_id".into(), s("bad"));
    bad.insert("amount".into(), AttributeValue::Ss(vec!["12.50".into()]));
    put(&stack, &stack.p.names.orders_table, vec![bad]).await;
    let q = query(&stack, &[("dataset", "orders")], "bad", None);
    let client = aws_sdk_dynamodb::Client::new(&stack.sdk);
    let sdk = DynamoSource::new(client.clone(), SourceDecoder::Sdk)
        .read_page(&q, None)
        .await
        .unwrap_err();
    let fast = DynamoSource::new(client, SourceDecoder::Fast)
        .read_page(&q, None)
        .await
        .unwrap_err();
    assert_eq!(
        fast,
        PortError::Data("attribute `amount` should hold a decimal but holds SS".into())
    );
    assert_eq!(fast, sdk);
}
