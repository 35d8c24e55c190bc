//! Deterministic demo data for the `orders` and `customers` datasets.
//!
//! Every row is a pure function of `(tenant, i)`: a splitmix64 hash of the tenant and the row number
//! picks each field, so any row can be rebuilt without the others and seeding twice writes the same
//! items. The names are deliberately awkward for exporters: commas, double quotes, newlines,
//! unicode, and leading `=`, `+`, `-`, `@`.

use anyhow::{anyhow, bail, Context};
use aws_config::SdkConfig;
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use aws_sdk_dynamodb::Client;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use futures::stream::{self, StreamExt};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// 2024-01-01T00:00:00Z: row `i` was created `i * CREATED_STEP_SECS` seconds later.
pub const EPOCH_SECS: i64 = 1_704_067_200;
pub const CREATED_STEP_SECS: i64 = 37;
/// BatchWriteItem accepts at most 25 put requests.
pub const BATCH_SIZE: u64 = 25;
/// BatchWriteItem requests in flight at once.
pub const CONCURRENCY: usize = 8;
const MAX_UNPROCESSED_RETRIES: u32 = 12;

pub const STATUSES: &[&str] = &["pending", "paid", "shipped", "cancelled", "refunded"];
pub const CURRENCIES: &[&str] = &["EUR", "USD", "GBP"];
pub const TIERS: &[&str] = &["bronze", "silver", "gold"];
pub const FORMULA_PREFIXES: &[char] = &['=', '+', '-', '@'];

/// (display name, ASCII slug for e-mail addresses)
const FIRST_NAMES: &[(&str, &str)] = &[
    ("Alice", "alice"),
    ("José", "jose"),
    ("Zoë", "zoe"),
    ("Renée", "renee"),
    ("Mohammed", "mohammed"),
    ("Wei", "wei"),
    ("Ingrid", "ingrid"),
    ("Chloé", "chloe"),
    ("Sven", "sven"),
    ("Priya", "priya"),
    ("Łukasz", "lukasz"),
    ("Hiroshi", "hiroshi"),
    ("Ana", "ana"),
    ("Björn", "bjorn"),
    ("Fatima", "fatima"),
    ("Olu", "olu"),
];
const LAST_NAMES: &[&str] = &[
    "Martin", "García", "Müller", "中村", "O'Brien", "Dubois", "Smith", "Kowalski", "李", "Nguyen",
    "Rossi", "Öztürk", "Silva", "Jensen", "Ivanova", "Okafor",
];
const NICKNAMES: &[&str] = &["Ace", "Bee", "Doc", "Zed"];
const COUNTRIES: &[&str] = &[
    "DE", "FR", "US", "GB", "ES", "IT", "NL", "CN", "JP", "BR", "PL", "SE",
];
const NOTES: &[&str] = &[
    "Leave at the door, please",
    "Call before delivery: \"urgent\"",
    "Gift wrap — fragile",
    "请尽快发货",
    "Rechnung per E-Mail",
    "-10% loyalty discount",
    "=SUM(A1:A2)",
    "Deliver to reception\nBuilding B",
];

/// Where a row's pseudo-random choices come from: one base hash per (domain, tenant, i), one
/// independent value per named field.
struct Draw(u64);

impl Draw {
    fn new(domain: u64, tenant: &str, i: u64) -> Self {
        Draw(splitmix64(
            fnv1a(tenant.as_bytes()) ^ splitmix64(i ^ domain),
        ))
    }

    fn field(&self, salt: u64) -> u64 {
        splitmix64(self.0 ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// A value in `0..n` (n > 0).
    fn below(&self, salt: u64, n: u64) -> u64 {
        self.field(salt) % n.max(1)
    }

    fn pick<'a, T>(&self, salt: u64, items: &'a [T]) -> &'a T {
        &items[self.below(salt, items.len() as u64) as usize]
    }
}

const ORDER_DOMAIN: u64 = 0x6f72_6465_7273; // "orders"
const CUSTOMER_DOMAIN: u64 = 0x6375_7374_6f6d; // "custom"

pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Customers seeded per tenant for `rows_per_tenant` orders: a tenth, at least one.
pub fn customer_count(rows_per_tenant: u64) -> u64 {
    (rows_per_tenant / 10).max(1)
}

pub fn order_id(tenant: &str, i: u64) -> String {
    format!("ORD-{tenant}-{i:08}")
}

pub fn customer_id(tenant: &str, c: u64) -> String {
    format!("CUS-{tenant}-{c:08}")
}

fn created(i: u64) -> DateTime<Utc> {
    let offset = i64::try_from(i)
        .ok()
        .and_then(|i| i.checked_mul(CREATED_STEP_SECS))
        .and_then(|s| s.checked_add(EPOCH_SECS));
    offset
        .and_then(|secs| DateTime::<Utc>::from_timestamp(secs, 0))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `created_at` of row `i`: 2024-01-01T00:00:00Z + 37 s per row, RFC 3339 to the second.
pub fn created_at(i: u64) -> String {
    created(i).format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn decimal(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// The name of customer `c` of `tenant` (orders carry the same name as their customer).
/// About 1 in 7 contain a comma or a double quote, 1 in 13 a newline, 1 in 11 start with one of
/// `= + - @`; many carry non-ASCII letters.
pub fn customer_name(tenant: &str, c: u64) -> String {
    let d = Draw::new(CUSTOMER_DOMAIN, tenant, c);
    let (first, _) = *d.pick(1, FIRST_NAMES);
    let last = *d.pick(2, LAST_NAMES);
    let mut name = if d.below(3, 7) == 0 {
        match d.below(4, 3) {
            0 => format!("{last}, {first}"),
            1 => format!("{first} \"{}\" {last}", d.pick(5, NICKNAMES)),
            _ => format!("{last} & Sons, Ltd."),
        }
    } else {
        format!("{first} {last}")
    };
    if d.below(6, 13) == 0 {
        name.push_str("\nAttn: Accounts Payable");
    }
    if d.below(7, 11) == 0 {
        let prefix = *d.pick(8, FORMULA_PREFIXES);
        name = match prefix {
            '=' => format!("=1+2 {name}"),
            other => format!("{other}{name}"),
        };
    }
    name
}

/// Order `i` of `tenant` (12 columns; `ship_date` only when shipped, `note` absent for about a
/// third). Its customer is one of the first `max(1, i / 10)` customers, so it exists whenever at
/// least `i + 1` orders (and so `customer_count` customers) are seeded.
pub fn order_item(tenant: &str, i: u64) -> HashMap<String, AttributeValue> {
    let d = Draw::new(ORDER_DOMAIN, tenant, i);
    let customer = d.below(1, (i / 10).max(1));
    let status_roll = d.below(2, 100);
    let status = match status_roll {
        0..=14 => "pending",
        15..=54 => "paid",
        55..=79 => "shipped",
        80..=89 => "cancelled",
        _ => "refunded",
    };
    let currency = *d.pick(3, CURRENCIES);
    let amount_cents = 100 + d.below(4, 250_000);
    let tax_pct = if currency == "USD" { 8 } else { 20 };
    let tax_cents = (amount_cents * tax_pct + 50) / 100;
    let items = 1 + d.below(5, 12);
    let paid = matches!(status, "paid" | "shipped" | "refunded");

    let mut item = HashMap::with_capacity(13);
    item.insert("tenant_id".to_owned(), s(tenant));
    item.insert("order_id".to_owned(), s(order_id(tenant, i)));
    item.insert("created_at".to_owned(), s(created_at(i)));
    item.insert("customer_id".to_owned(), s(customer_id(tenant, customer)));
    item.insert(
        "customer_name".to_owned(),
        s(customer_name(tenant, customer)),
    );
    item.insert("status".to_owned(), s(status));
    item.insert("currency".to_owned(), s(currency));
    item.insert("amount".to_owned(), n(decimal(amount_cents)));
    item.insert("tax".to_owned(), n(decimal(tax_cents)));
    item.insert("items".to_owned(), n(items));
    item.insert("paid".to_owned(), AttributeValue::Bool(paid));
    if status == "shipped" {
        let days = 1 + d.below(6, 5) as i64;
        let ship = created(i) + ChronoDuration::days(days);
        item.insert(
            "ship_date".to_owned(),
            s(ship.format("%Y-%m-%d").to_string()),
        );
    }
    if d.below(7, 3) != 0 {
        item.insert("note".to_owned(), s(*d.pick(8, NOTES)));
    }
    item
}

/// Customer `c` of `tenant` (10 columns; `birthday` absent for about a quarter).
pub fn customer_item(tenant: &str, c: u64) -> HashMap<String, AttributeValue> {
    let d = Draw::new(CUSTOMER_DOMAIN, tenant, c);
    let (_, slug) = *d.pick(1, FIRST_NAMES);
    let tier = match d.below(20, 10) {
        0..=5 => "bronze",
        6..=8 => "silver",
        _ => "gold",
    };

    let mut item = HashMap::with_capacity(11);
    item.insert("tenant_id".to_owned(), s(tenant));
    item.insert("customer_id".to_owned(), s(customer_id(tenant, c)));
    item.insert("created_at".to_owned(), s(created_at(c)));
    item.insert("name".to_owned(), s(customer_name(tenant, c)));
    item.insert(
        "email".to_owned(),
        s(format!("{slug}.{c}@{tenant}.example")),
    );
    item.insert("country".to_owned(), s(*d.pick(21, COUNTRIES)));
    item.insert("tier".to_owned(), s(tier));
    item.insert(
        "lifetime_value".to_owned(),
        n(decimal(d.below(22, 5_000_000))),
    );
    item.insert("orders_count".to_owned(), n(d.below(23, 251)));
    item.insert(
        "active".to_owned(),
        AttributeValue::Bool(d.below(24, 7) != 0),
    );
    if d.below(25, 4) != 0 {
        let birthday = format!(
            "{:04}-{:02}-{:02}",
            1950 + d.below(26, 56),
            1 + d.below(27, 12),
            1 + d.below(28, 28)
        );
        item.insert("birthday".to_owned(), s(birthday));
    }
    item
}

/// What a seed run wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedReport {
    pub tenants: usize,
    pub orders: u64,
    pub customers: u64,
    /// BatchWriteItem calls made, retries of unprocessed items included.
    pub requests: u64,
    /// Items that came back unprocessed at least once and were sent again.
    pub retried_items: u64,
    pub elapsed: Duration,
}

impl SeedReport {
    pub fn items_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            (self.orders + self.customers) as f64 / secs
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Orders,
    Customers,
}

/// One BatchWriteItem worth of rows, described but not yet built (memory stays bounded).
struct Chunk<'a> {
    kind: Kind,
    tenant: &'a str,
    start: u64,
    end: u64,
}

fn chunks<'a>(
    kind: Kind,
    tenants: &'a [&'a str],
    rows: u64,
) -> impl Iterator<Item = Chunk<'a>> + 'a {
    tenants.iter().flat_map(move |tenant| {
        (0..rows.div_ceil(BATCH_SIZE)).map(move |b| Chunk {
            kind,
            tenant,
            start: b * BATCH_SIZE,
            end: ((b + 1) * BATCH_SIZE).min(rows),
        })
    })
}

#[derive(Default)]
struct ChunkResult {
    items: u64,
    requests: u64,
    retried: u64,
}

/// Writes `rows_per_tenant` orders and `customer_count(rows_per_tenant)` customers for each
/// tenant with BatchWriteItem (25 items a request, `CONCURRENCY` requests in flight), retrying
/// unprocessed items with backoff. Rows are built just before they are sent.
pub async fn seed(
    sdk: &SdkConfig,
    table_orders: &str,
    table_customers: &str,
    tenants: &[&str],
    rows_per_tenant: u64,
) -> anyhow::Result<SeedReport> {
    if tenants.is_empty() {
        bail!("no tenants to seed");
    }
    let client = Client::new(sdk);
    let started = Instant::now();
    let customers = customer_count(rows_per_tenant);
    let tenant_count = tenants.len() as u64;
    let total = (customers + rows_per_tenant) * tenant_count;

    let work = chunks(Kind::Customers, tenants, customers).chain(chunks(
        Kind::Orders,
        tenants,
        rows_per_tenant,
    ));
    let mut results = stream::iter(work)
        .map(|chunk| {
            let client = &client;
            async move {
                let (table, items): (&str, Vec<_>) = match chunk.kind {
                    Kind::Orders => (
                        table_orders,
                        (chunk.start..chunk.end)
                            .map(|i| order_item(chunk.tenant, i))
                            .collect(),
                    ),
                    Kind::Customers => (
                        table_customers,
                        (chunk.start..chunk.end)
                            .map(|c| customer_item(chunk.tenant, c))
                            .collect(),
                    ),
                };
                write_batch(client, table, items).await.with_context(|| {
                    format!(
                        "seeding {table} rows {}..{} of tenant {}",
                        chunk.start, chunk.end, chunk.tenant
                    )
                })
            }
        })
        .buffer_unordered(CONCURRENCY);

    let mut done = ChunkResult::default();
    let mut next_report = total / 10;
    while let Some(result) = results.next().await {
        let r = result?;
        done.items += r.items;
        done.requests += r.requests;
        done.retried += r.retried;
        if total >= 10_000 && done.items >= next_report && done.items < total {
            tracing::info!(
                written = done.items,
                total,
                "seeding {}%",
                done.items * 100 / total.max(1)
            );
            next_report += total / 10;
        }
    }
    Ok(SeedReport {
        tenants: tenants.len(),
        orders: rows_per_tenant * tenant_count,
        customers: customers * tenant_count,
        requests: done.requests,
        retried_items: done.retried,
        elapsed: started.elapsed(),
    })
}

async fn write_batch(
    client: &Client,
    table: &str,
    items: Vec<HashMap<String, AttributeValue>>,
) -> anyhow::Result<ChunkResult> {
    let count = items.len() as u64;
    let mut pending = items
        .into_iter()
        .map(|item| {
            PutRequest::builder()
                .set_item(Some(item))
                .build()
                .map(|put| WriteRequest::builder().put_request(put).build())
        })
        .collect::<Result<Vec<_>, _>>()
        .context("building put requests")?;
    let mut result = ChunkResult {
        items: count,
        ..ChunkResult::default()
    };
    let mut backoff = Duration::from_millis(50);
    for attempt in 0..=MAX_UNPROCESSED_RETRIES {
        if pending.is_empty() {
            return Ok(result);
        }
        if attempt > 0 {
            result.retried += pending.len() as u64;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        let output = client
            .batch_write_item()
            .request_items(table, pending)
            .send()
            .await
            .map_err(|e| anyhow!("BatchWriteItem on {table}: {}", DisplayErrorContext(&e)))?;
        result.requests += 1;
        pending = output
            .unprocessed_items
            .and_then(|mut tables| tables.remove(table))
            .unwrap_or_default();
    }
    if pending.is_empty() {
        Ok(result)
    } else {
        bail!(
            "{} items still unprocessed after {MAX_UNPROCESSED_RETRIES} retries",
            pending.len()
        )
    }
}

/// What [`change_orders`] did, by order id.
#[derive(Debug, Default)]
pub struct OrderChanges {
    pub inserted: Vec<String>,
    pub updated: Vec<String>,
    pub deleted: Vec<String>,
}

/// Writes to a tenant's orders the way an application would while the stack runs: `insert` new
/// orders after its last one, a changed note and status on its first `update` orders, and the
/// `delete` orders after those removed. Each write is its own request, so a stream sees each.
pub async fn change_orders(
    client: &Client,
    table: &str,
    tenant: &str,
    (insert, update, delete): (u64, usize, usize),
) -> anyhow::Result<OrderChanges> {
    let ids = |forward: bool, limit: usize| async move {
        let found = client
            .query()
            .table_name(table)
            .key_condition_expression("tenant_id = :t")
            .expression_attribute_values(":t", AttributeValue::S(tenant.to_owned()))
            .projection_expression("order_id")
            .scan_index_forward(forward)
            .limit(i32::try_from(limit.max(1)).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(|e| anyhow!("Query {table}: {}", DisplayErrorContext(&e)))?;
        Ok::<Vec<String>, anyhow::Error>(
            found
                .items
                .unwrap_or_default()
                .into_iter()
                .filter_map(|mut i| match i.remove("order_id") {
                    Some(AttributeValue::S(id)) => Some(id),
                    _ => None,
                })
                .collect(),
        )
    };
    let mut done = OrderChanges::default();
    let next = match ids(false, 1).await?.first() {
        Some(last) => last
            .rsplit('-')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .map_or(0, |n| n + 1),
        None => 0,
    };
    for i in next..next + insert {
        let item = order_item(tenant, i);
        client
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| anyhow!("PutItem {table}: {}", DisplayErrorContext(&e)))?;
        done.inserted.push(order_id(tenant, i));
    }
    let first = ids(true, update + delete).await?;
    let now = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    for id in first.iter().take(update) {
        client
            .update_item()
            .table_name(table)
            .key("tenant_id", AttributeValue::S(tenant.to_owned()))
            .key("order_id", AttributeValue::S(id.clone()))
            .update_expression("SET #s = :s, note = :n")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":s", AttributeValue::S("shipped".into()))
            .expression_attribute_values(":n", AttributeValue::S(format!("changed at {now}")))
            .send()
            .await
            .map_err(|e| anyhow!("UpdateItem {table}: {}", DisplayErrorContext(&e)))?;
        done.updated.push(id.clone());
    }
    for id in first.iter().skip(update).take(delete) {
        client
            .delete_item()
            .table_name(table)
            .key("tenant_id", AttributeValue::S(tenant.to_owned()))
            .key("order_id", AttributeValue::S(id.clone()))
            .send()
            .await
            .map_err(|e| anyhow!("DeleteItem {table}: {}", DisplayErrorContext(&e)))?;
        done.deleted.push(id.clone());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn text<'a>(item: &'a HashMap<String, AttributeValue>, key: &str) -> &'a str {
        item[key].as_s().unwrap()
    }

    fn num<'a>(item: &'a HashMap<String, AttributeValue>, key: &str) -> &'a str {
        item[key].as_n().unwrap()
    }

    fn is_two_place_decimal(v: &str) -> bool {
        let Some((int, frac)) = v.split_once('.') else {
            return false;
        };
        !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.len() == 2
            && frac.bytes().all(|b| b.is_ascii_digit())
    }

    fn fraction(count: usize, of: u64) -> f64 {
        count as f64 / of as f64
    }

    #[test]
    fn rows_are_pure_functions_of_tenant_and_index() {
        for i in [0, 1, 7, 999, 123_456, 40_000_000] {
            assert_eq!(order_item("acme", i), order_item("acme", i));
            assert_eq!(customer_item("acme", i), customer_item("acme", i));
        }
        let acme: Vec<_> = (0..50).map(|i| order_item("acme", i)).collect();
        let globex: Vec<_> = (0..50).map(|i| order_item("globex", i)).collect();
        let differing = acme
            .iter()
            .zip(&globex)
            .filter(|(a, g)| text(a, "status") != text(g, "status") || a["amount"] != g["amount"])
            .count();
        assert!(differing > 25, "tenants should get different data");
    }

    #[test]
    fn known_values_do_not_drift() {
        let first = order_item("acme", 0);
        assert_eq!(text(&first, "order_id"), "ORD-acme-00000000");
        assert_eq!(text(&first, "created_at"), "2024-01-01T00:00:00Z");
        assert_eq!(text(&first, "customer_id"), "CUS-acme-00000000");
        assert_eq!(text(&first, "tenant_id"), "acme");
        assert_eq!(created_at(100), "2024-01-01T01:01:40Z");
        assert_eq!(
            text(&order_item("acme", 12), "order_id"),
            "ORD-acme-00000012"
        );
        let customer = customer_item("globex", 3);
        assert_eq!(text(&customer, "customer_id"), "CUS-globex-00000003");
        assert_eq!(text(&customer, "created_at"), "2024-01-01T00:01:51Z");
    }

    #[test]
    fn created_at_is_unique_and_increasing() {
        let stamps: Vec<String> = (0..5_000).map(created_at).collect();
        assert!(stamps.windows(2).all(|w| w[0] < w[1]));
        for stamp in stamps.iter().step_by(97) {
            assert!(DateTime::parse_from_rfc3339(stamp).is_ok(), "{stamp}");
            assert_eq!(stamp.len(), 20);
        }
        assert_eq!(created_at(20_000_000), "2047-06-13T19:33:20Z");
    }

    #[test]
    fn orders_have_the_contract_columns_and_types() {
        for i in 0..3_000 {
            let o = order_item("acme", i);
            assert!(STATUSES.contains(&text(&o, "status")));
            assert!(CURRENCIES.contains(&text(&o, "currency")));
            assert!(is_two_place_decimal(num(&o, "amount")), "{:?}", o["amount"]);
            assert!(is_two_place_decimal(num(&o, "tax")), "{:?}", o["tax"]);
            let items: u64 = num(&o, "items").parse().unwrap();
            assert!((1..=12).contains(&items));
            let paid = *o["paid"].as_bool().unwrap();
            let status = text(&o, "status");
            assert_eq!(paid, matches!(status, "paid" | "shipped" | "refunded"));
            match o.get("ship_date") {
                Some(ship) => {
                    assert_eq!(status, "shipped");
                    let ship = ship.as_s().unwrap();
                    assert!(chrono::NaiveDate::parse_from_str(ship, "%Y-%m-%d").is_ok());
                    assert!(ship.as_str() > &text(&o, "created_at")[..10]);
                }
                None => assert_ne!(status, "shipped"),
            }
            let expected_keys = 12
                - usize::from(!o.contains_key("ship_date"))
                - usize::from(!o.contains_key("note"))
                + 1; // tenant_id
            assert_eq!(o.len(), expected_keys);
        }
    }

    #[test]
    fn every_status_appears_and_notes_are_absent_for_about_a_third() {
        let rows = 6_000;
        let orders: Vec<_> = (0..rows).map(|i| order_item("globex", i)).collect();
        let statuses: HashSet<&str> = orders.iter().map(|o| text(o, "status")).collect();
        assert_eq!(statuses.len(), STATUSES.len());
        let without_note = orders.iter().filter(|o| !o.contains_key("note")).count();
        let f = fraction(without_note, rows);
        assert!((0.28..0.39).contains(&f), "no note: {f}");
        assert!(orders.iter().any(|o| o.contains_key("ship_date")));
    }

    #[test]
    fn orders_reference_seeded_customers() {
        for rows in [1, 9, 10, 25, 99, 1_000, 20_000] {
            let customers = customer_count(rows);
            let ids: HashSet<String> = (0..customers).map(|c| customer_id("acme", c)).collect();
            for i in 0..rows {
                let o = order_item("acme", i);
                assert!(
                    ids.contains(text(&o, "customer_id")),
                    "rows {rows}, order {i}"
                );
            }
        }
    }

    #[test]
    fn order_carries_its_customers_name() {
        for i in (0..2_000).step_by(13) {
            let o = order_item("acme", i);
            let id = text(&o, "customer_id");
            let c: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
            assert_eq!(
                text(&o, "customer_name"),
                text(&customer_item("acme", c), "name")
            );
        }
    }

    #[test]
    fn customer_names_are_awkward_in_the_advertised_proportions() {
        let rows = 20_000;
        let names: Vec<String> = (0..rows).map(|c| customer_name("acme", c)).collect();
        let comma_or_quote = names.iter().filter(|n| n.contains([',', '"'])).count();
        let formula = names
            .iter()
            .filter(|n| n.starts_with(FORMULA_PREFIXES))
            .count();
        let newline = names.iter().filter(|n| n.contains('\n')).count();
        let f = fraction(comma_or_quote, rows);
        assert!(
            (1.0 / 7.0 - 0.02..1.0 / 7.0 + 0.02).contains(&f),
            "comma/quote {f}"
        );
        let f = fraction(formula, rows);
        assert!(
            (1.0 / 11.0 - 0.015..1.0 / 11.0 + 0.015).contains(&f),
            "formula {f}"
        );
        let f = fraction(newline, rows);
        assert!(
            (1.0 / 13.0 - 0.015..1.0 / 13.0 + 0.015).contains(&f),
            "newline {f}"
        );
        for prefix in FORMULA_PREFIXES {
            assert!(names.iter().any(|n| n.starts_with(*prefix)), "{prefix}");
        }
        assert!(names.iter().any(|n| n.contains('é')));
        assert!(names.iter().any(|n| n.contains('中')));
    }

    #[test]
    fn customers_have_the_contract_columns_and_types() {
        let rows = 4_000;
        let mut without_birthday = 0;
        for c in 0..rows {
            let cu = customer_item("globex", c);
            let country = text(&cu, "country");
            assert!(country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase()));
            assert!(TIERS.contains(&text(&cu, "tier")));
            assert!(is_two_place_decimal(num(&cu, "lifetime_value")));
            assert!(num(&cu, "orders_count").parse::<u64>().is_ok());
            assert!(cu["active"].as_bool().is_ok());
            assert!(text(&cu, "email").contains('@'));
            assert!(text(&cu, "email").is_ascii());
            match cu.get("birthday") {
                Some(b) => {
                    assert!(
                        chrono::NaiveDate::parse_from_str(b.as_s().unwrap(), "%Y-%m-%d").is_ok()
                    )
                }
                None => without_birthday += 1,
            }
        }
        let f = fraction(without_birthday, rows);
        assert!((0.2..0.3).contains(&f), "no birthday: {f}");
    }

    async fn query_all(
        client: &Client,
        table: &str,
        tenant: &str,
    ) -> Vec<HashMap<String, AttributeValue>> {
        client
            .query()
            .table_name(table)
            .key_condition_expression("tenant_id = :t")
            .expression_attribute_values(":t", AttributeValue::S(tenant.to_owned()))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .unwrap()
    }

    /// Runs against the emulator when `AWS_ENDPOINT_URL` is set (`make test` sets it), on its
    /// own stack provisioned from template.yaml and torn down afterwards.
    #[tokio::test]
    async fn seeded_rows_read_back_through_query() {
        if std::env::var("AWS_ENDPOINT_URL").is_err() {
            eprintln!("skipped: AWS_ENDPOINT_URL is not set");
            return;
        }
        let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let stack = format!("seed-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let stack_res =
            crate::provision::provision(&sdk, &crate::provision::template_path(), &stack)
                .await
                .unwrap();
        let (orders, customers) = (
            stack_res.names.orders_table.clone(),
            stack_res.names.customers_table.clone(),
        );
        let client = Client::new(&sdk);
        let outcome = async {
            let tenants = ["acme", "globex"];
            let report = seed(&sdk, &orders, &customers, &tenants, 2_000).await?;
            assert_eq!((report.orders, report.customers), (4_000, 400));
            assert!(report.requests >= 4_400 / 25);
            for tenant in tenants {
                let rows = query_all(&client, &orders, tenant).await;
                assert_eq!(rows.len(), 2_000, "orders of {tenant}");
                for row in &rows {
                    let id = text(row, "order_id");
                    let i: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
                    assert_eq!(row, &order_item(tenant, i), "{id}");
                }
                let rows = query_all(&client, &customers, tenant).await;
                assert_eq!(rows.len(), 200, "customers of {tenant}");
                assert!(rows.iter().all(|r| text(r, "tenant_id") == tenant));
            }
            // The created_at index answers range queries: rows 100..=199 of one tenant.
            let ranged: Vec<_> = client
                .query()
                .table_name(&orders)
                .index_name("by_created_at")
                .key_condition_expression("tenant_id = :t AND created_at BETWEEN :a AND :b")
                .expression_attribute_values(":t", AttributeValue::S("globex".to_owned()))
                .expression_attribute_values(":a", AttributeValue::S(created_at(100)))
                .expression_attribute_values(":b", AttributeValue::S(created_at(199)))
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await?;
            assert_eq!(ranged.len(), 100);
            anyhow::Ok(())
        }
        .await;
        crate::provision::teardown(&sdk, &stack_res).await.unwrap();
        outcome.unwrap();
    }

    #[test]
    fn chunks_cover_every_row_once_in_batches_of_25() {
        let tenants = ["acme", "globex"];
        let all: Vec<_> = chunks(Kind::Orders, &tenants, 103).collect();
        assert_eq!(all.len(), 2 * 5);
        assert!(all
            .iter()
            .all(|c| c.end - c.start <= BATCH_SIZE && c.end > c.start));
        let acme: u64 = all
            .iter()
            .filter(|c| c.tenant == "acme")
            .map(|c| c.end - c.start)
            .sum();
        assert_eq!(acme, 103);
        assert_eq!(chunks(Kind::Customers, &tenants, 0).count(), 0);
        assert_eq!(customer_count(5), 1);
        assert_eq!(customer_count(20_000), 2_000);
    }
}
