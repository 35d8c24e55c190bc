//! The fast decoder against the SDK: generated Query answers (every attribute type, escapes,
//! unicode, missing and repeated attributes, cursors, capacity, shapes the SDK refuses) read
//! through both paths of the real `DynamoSource`, the SDK's answered by the SDK's own parse and
//! `page_of`; and what a broken or streamed body does to the fast path.

#![allow(clippy::unwrap_used)]

use aws_smithy_types::retry::RetryConfig;
use base64::Engine;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::json;

use super::*;
use crate::adapters::dynamodb::DynamoSource;
use crate::adapters::testkit::{answer, answering, dynamodb, error};
use crate::config::SourceDecoder;
use crate::domain::catalog::ColumnType;
use crate::domain::Value;
use crate::ports::RowSource;

// ---------------------------------------------------------------------------------------------
// Generated answers

/// A JSON document as the generator builds it; [`write`] spells it out with random escapes and
/// spacing, so both decoders read the same, unusual, text.
#[derive(Debug, Clone)]
enum J {
    Obj(Vec<(String, J)>),
    Arr(Vec<J>),
    Str(String),
    /// A string written with only the escapes JSON requires (base64, as DynamoDB writes it:
    /// the SDK reads `B` as written, so an optional escape makes it refuse the value).
    Plain(String),
    /// A number, `true`, `false` or `null`, as written.
    Raw(String),
}

fn obj(members: Vec<(&str, J)>) -> J {
    J::Obj(
        members
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn one(kind: &str, value: J) -> J {
    obj(vec![(kind, value)])
}

fn raw(text: impl ToString) -> J {
    J::Raw(text.to_string())
}

/// xorshift: the writer's choices, from a seed proptest shrinks like any number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.next() % n == 0
    }
}

fn space(rng: &mut Rng, out: &mut String) {
    while rng.one_in(6) {
        out.push([' ', '\t', '\n', '\r'][(rng.next() % 4) as usize]);
    }
}

fn write_str(s: &str, optional: bool, rng: &mut Rng, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        let short = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            '\u{8}' => Some("\\b"),
            '\u{c}' => Some("\\f"),
            '/' if optional && rng.one_in(2) => Some("\\/"),
            _ => None,
        };
        let must = c < ' ' || c == '"' || c == '\\';
        if let (Some(e), true) = (short, must || (optional && rng.one_in(2))) {
            out.push_str(e);
        } else if must || (optional && rng.one_in(8)) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                if rng.one_in(2) {
                    out.push_str(&format!("\\u{u:04x}"));
                } else {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        } else {
            out.push(c);
        }
    }
    out.push('"');
}

fn write(j: &J, rng: &mut Rng, out: &mut String) {
    space(rng, out);
    match j {
        J::Obj(members) => {
            out.push('{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                space(rng, out);
                write_str(k, true, rng, out);
                space(rng, out);
                out.push(':');
                write(v, rng, out);
            }
            space(rng, out);
            out.push('}');
        }
        J::Arr(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(v, rng, out);
            }
            space(rng, out);
            out.push(']');
        }
        J::Str(s) => write_str(s, true, rng, out),
        J::Plain(s) => write_str(s, false, rng, out),
        J::Raw(t) => out.push_str(t),
    }
    space(rng, out);
}

/// Text with what JSON must escape, what it may, and what needs more than one UTF-16 unit.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z0-9 ]{0,8}",
        "\\PC{0,5}",
        proptest::collection::vec(
            select(vec![
                'a', 'Z', ' ', '"', '\\', '/', '\n', '\t', '\r', '\u{0}', '\u{1f}', '\u{7f}', 'é',
                '€', '\u{2028}', '😀', '𝄞', '=', ',', '.', '-', '0', '9', 'T', ':',
            ]),
            0..8
        )
        .prop_map(String::from_iter),
    ]
    .boxed()
}

fn timestamp_text() -> BoxedStrategy<String> {
    prop_oneof![
        20 => (1970u32..2100, 1u32..13, 1u32..29, 0u32..24, 0u32..60, 0u32..60)
            .prop_map(|(y, mo, d, h, mi, s)| format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")),
        1 => Just("2024-02-30T00:00:00Z".to_string()),
        2 => Just("2024-05-01T09:30:00.123456+02:00".to_string()),
        1 => Just("2024-05-01t09:30:00z".to_string()),
        1 => Just("2016-12-31T23:59:60Z".to_string()),
        1 => Just("yesterday".to_string()),
    ]
    .boxed()
}

fn date_text() -> BoxedStrategy<String> {
    prop_oneof![
        20 => (0u32..10_000, 1u32..13, 1u32..29).prop_map(|(y, m, d)| format!("{y:04}-{m:02}-{d:02}")),
        2 => (0u32..10_000, 0u32..14, 0u32..33).prop_map(|(y, m, d)| format!("{y:04}-{m:02}-{d:02}")),
        1 => Just("2024-1-5".to_string()),
        1 => Just("+2024-01-05".to_string()),
    ]
    .boxed()
}

fn number_text() -> BoxedStrategy<String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (-10_000i64..10_000, 0u32..1000).prop_map(|(i, f)| format!("{i}.{f:03}")),
        select(vec![
            "0",
            "-0",
            "9223372036854775808",
            "1e5",
            "1.",
            ".5",
            "-",
            "12.50",
            "0.001",
            "1700000000",
            "1700000000.75",
            "-1.5",
            "1e20",
            "NaN",
            "inf",
            "",
        ])
        .prop_map(str::to_string),
    ]
    .boxed()
}

fn bool_text() -> BoxedStrategy<String> {
    select(vec!["true", "false", "1", "0", "yes", "TRUE"])
        .prop_map(str::to_string)
        .boxed()
}

/// Base64 as DynamoDB writes it, and now and then with escapes the SDK refuses.
fn base64_of(bytes: &[u8]) -> J {
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    if bytes.first().is_some_and(|b| b % 16 == 0) {
        J::Str(text)
    } else {
        J::Plain(text)
    }
}

/// Attribute names: plain, escaped, non-ASCII, and the columns' own.
const NAMES: [&str; 10] = [
    "id", "name", "amount", "ts", "day", "ok", "a\"q", "é/ü", "x\\y", "😀",
];

fn name() -> BoxedStrategy<String> {
    select(NAMES.to_vec()).prop_map(str::to_string).boxed()
}

/// Any well-formed attribute value, nested up to three levels, with the union's null members
/// and `__type` sprinkled in.
fn attribute() -> BoxedStrategy<J> {
    let leaf = prop_oneof![
        text().prop_map(|t| one("S", J::Str(t))),
        number_text().prop_map(|t| one("N", J::Str(t))),
        any::<bool>().prop_map(|b| one("BOOL", raw(b))),
        any::<bool>().prop_map(|b| one("NULL", raw(b))),
        proptest::collection::vec(any::<u8>(), 0..6).prop_map(|b| one("B", base64_of(&b))),
        proptest::collection::vec(text(), 0..3)
            .prop_map(|v| one("SS", J::Arr(v.into_iter().map(J::Str).collect()))),
        proptest::collection::vec(number_text(), 0..3)
            .prop_map(|v| one("NS", J::Arr(v.into_iter().map(J::Str).collect()))),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..4), 0..3)
            .prop_map(|v| one("BS", J::Arr(v.iter().map(|b| base64_of(b)).collect()))),
        Just(one(
            "FUTURE",
            obj(vec![("x", J::Arr(vec![raw(1), raw("null")]))])
        )),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            proptest::collection::vec((name(), inner.clone()), 0..3)
                .prop_map(|m| one("M", J::Obj(m))),
            proptest::collection::vec(inner, 0..3).prop_map(|l| one("L", J::Arr(l))),
        ]
    })
    .prop_flat_map(decorated)
    .boxed()
}

/// The same value with members the SDK skips: null ones and `__type`, before or after it.
fn decorated(value: J) -> BoxedStrategy<J> {
    let J::Obj(members) = value else {
        return Just(value).boxed();
    };
    (
        select(vec![
            None,
            Some("S"),
            Some("NULL"),
            Some("M"),
            Some("FUTURE"),
        ]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(move |(null, type_tag, after)| {
            let mut m = members.clone();
            let mut extra = Vec::new();
            if let Some(kind) = null {
                extra.push((kind.to_string(), raw("null")));
            }
            if type_tag {
                extra.push(("__type".to_string(), J::Str("x".into())));
            }
            if after {
                m.extend(extra);
            } else {
                extra.extend(m);
                m = extra;
            }
            J::Obj(m)
        })
        .boxed()
}

/// A value for a column of this type: mostly one it converts (and some near misses it does not).
fn cell(ty: ColumnType) -> BoxedStrategy<J> {
    let s = |st: BoxedStrategy<String>| st.prop_map(|t| one("S", J::Str(t))).boxed();
    let n = |st: BoxedStrategy<String>| st.prop_map(|t| one("N", J::Str(t))).boxed();
    let boolean = any::<bool>().prop_map(|b| one("BOOL", raw(b))).boxed();
    match ty {
        ColumnType::String => {
            prop_oneof![8 => s(text()), 1 => n(number_text()), 1 => boolean].boxed()
        }
        ColumnType::Integer => {
            let ints = any::<i64>().prop_map(|i| i.to_string()).boxed();
            prop_oneof![12 => n(ints.clone()), 2 => s(ints), 1 => n(number_text())].boxed()
        }
        ColumnType::Decimal => {
            let decimals = (-100_000i64..100_000, 0u32..100)
                .prop_map(|(i, f)| format!("{i}.{f:02}"))
                .boxed();
            prop_oneof![12 => n(decimals.clone()), 2 => s(decimals), 1 => n(number_text())].boxed()
        }
        ColumnType::Boolean => prop_oneof![8 => boolean, 3 => s(bool_text())].boxed(),
        ColumnType::Timestamp => {
            let epoch = (0i64..4_000_000_000, 0u32..1000)
                .prop_map(|(s, ms)| format!("{s}.{ms:03}"))
                .boxed();
            prop_oneof![12 => s(timestamp_text()), 3 => n(epoch), 1 => n(number_text())].boxed()
        }
        ColumnType::Date => prop_oneof![12 => s(date_text()), 1 => s(text())].boxed(),
    }
}

/// Attribute values the SDK refuses: the page must be an error either way.
fn broken_attribute() -> BoxedStrategy<J> {
    prop_oneof![
        Just(obj(vec![
            ("S", J::Str("a".into())),
            ("N", J::Str("1".into()))
        ])),
        Just(obj(vec![])),
        Just(obj(vec![("S", raw("null"))])),
        Just(obj(vec![("__type", J::Str("x".into()))])),
        Just(raw("null")),
        Just(raw("\"S\"")),
        Just(one("S", raw(5))),
        Just(one("N", raw(5))),
        Just(one("BOOL", J::Str("true".into()))),
        Just(one("NULL", raw(1))),
        Just(one("SS", J::Arr(vec![raw("null")]))),
        Just(one("SS", J::Str("a".into()))),
        Just(one("B", J::Str("!!".into()))),
        Just(one("B", J::Str("QUJD\\u003d".into()))),
        Just(one("M", J::Arr(vec![]))),
        Just(one("M", obj(vec![("k", raw("null"))]))),
        Just(one("L", J::Arr(vec![raw("null")]))),
        Just(one("L", J::Arr(vec![obj(vec![])]))),
    ]
    .boxed()
}

type Columns = Vec<(String, ColumnType)>;

fn columns() -> BoxedStrategy<Columns> {
    let ty = select(vec![
        ColumnType::String,
        ColumnType::Integer,
        ColumnType::Decimal,
        ColumnType::Boolean,
        ColumnType::Timestamp,
        ColumnType::Date,
    ]);
    proptest::collection::vec((name(), ty), 1..6).boxed()
}

/// One item: each column missing, NULL, or holding a value for its type, rarely something else;
/// plus attributes of no column, and now and then an attribute twice.
fn item(columns: Columns, broken: bool) -> BoxedStrategy<J> {
    let per_column: Vec<BoxedStrategy<Option<(String, J)>>> = columns
        .iter()
        .map(|(attr, ty)| {
            let attr = attr.clone();
            let value = prop_oneof![
                30 => cell(*ty),
                2 => Just(one("NULL", raw(true))),
                1 => attribute(),
            ];
            prop_oneof![1 => Just(None), 5 => value.prop_map(move |v| Some((attr.clone(), v)))]
                .boxed()
        })
        .collect();
    // Mostly of no column; now and then a column's attribute a second time.
    let extra_name = prop_oneof![
        8 => select(vec!["tenant_id", "sk", "note\n", "Ω"]).prop_map(str::to_string),
        1 => name(),
    ];
    let extra = proptest::collection::vec((extra_name, attribute()), 0..3);
    let broken = if broken {
        proptest::option::weighted(0.3, (name(), broken_attribute())).boxed()
    } else {
        Just(None).boxed()
    };
    (per_column, extra, broken, any::<u64>())
        .prop_map(|(cells, extra, broken, seed)| {
            let mut members: Vec<(String, J)> = cells.into_iter().flatten().collect();
            members.extend(extra);
            members.extend(broken);
            let mut rng = Rng(seed | 1);
            for i in (1..members.len()).rev() {
                members.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            J::Obj(members)
        })
        .boxed()
}

fn last_evaluated_key() -> BoxedStrategy<Option<J>> {
    let key_value = prop_oneof![
        4 => text().prop_map(|t| one("S", J::Str(t))),
        2 => number_text().prop_map(|t| one("N", J::Str(t))),
    ];
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(raw("null"))),
        1 => Just(Some(obj(vec![]))),
        6 => proptest::collection::vec((name(), key_value), 1..4).prop_map(|m| Some(J::Obj(m))),
        // One attribute of a kind a cursor cannot carry.
        1 => (text(), attribute())
            .prop_map(|(t, v)| Some(obj(vec![("id", one("S", J::Str(t))), ("bad", v)]))),
    ]
    .boxed()
}

fn capacity_units() -> BoxedStrategy<J> {
    prop_oneof![
        4 => (0u32..10_000).prop_map(raw),
        4 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(raw),
        2 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| raw(format!("{f:e}"))),
        1 => select(vec!["NaN", "Infinity", "-Infinity", "inf", "12"]).prop_map(|s| J::Str(s.into())),
        1 => Just(raw("null")),
        1 => Just(raw("-0")),
    ]
    .boxed()
}

fn consumed_capacity() -> BoxedStrategy<Option<J>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(raw("null"))),
        6 => (capacity_units(), any::<bool>(), proptest::option::weighted(0.2, capacity_units()))
            .prop_map(|(units, table, again)| {
                let mut m = vec![("TableName", J::Str("orders".into())), ("CapacityUnits", units)];
                if table {
                    m.push(("Table", obj(vec![("CapacityUnits", raw(1))])));
                }
                // The last one counts.
                m.extend(again.map(|u| ("CapacityUnits", u)));
                Some(obj(m))
            }),
    ]
    .boxed()
}

fn count() -> BoxedStrategy<Option<J>> {
    prop_oneof![
        3 => Just(None),
        3 => (0u32..5000).prop_map(|n| Some(raw(n))),
        1 => Just(Some(raw("3.0"))),
        1 => Just(Some(raw("null"))),
    ]
    .boxed()
}

/// A whole Query answer and the columns it is read for, written out.
#[derive(Debug, Clone)]
struct Case {
    columns: Columns,
    body: String,
}

fn case(broken: bool) -> BoxedStrategy<Case> {
    columns()
        .prop_flat_map(move |columns| {
            let items = prop_oneof![
                1 => Just(None),
                1 => Just(Some(raw("null"))),
                8 => proptest::collection::vec(item(columns.clone(), broken), 0..8)
                    .prop_map(|items| Some(J::Arr(items))),
            ];
            (
                Just(columns),
                items,
                last_evaluated_key(),
                consumed_capacity(),
                count(),
                any::<bool>(),
                any::<u64>(),
            )
        })
        .prop_map(|(columns, items, key, capacity, count, unknown, seed)| {
            // A member twice now and then: the last one counts, as in the SDK.
            let again = match seed % 16 {
                0 => Some(("Items", raw("null"))),
                1 => Some(("ConsumedCapacity", obj(vec![("CapacityUnits", raw(7))]))),
                2 => Some(("LastEvaluatedKey", raw("null"))),
                _ => None,
            };
            let mut members: Vec<(String, J)> = Vec::new();
            let mut add = |k: &str, v: Option<J>| {
                if let Some(v) = v {
                    members.push((k.to_string(), v));
                }
            };
            add("Items", items);
            add("LastEvaluatedKey", key);
            add("ConsumedCapacity", capacity);
            add("Count", count.clone());
            add("ScannedCount", count);
            if unknown {
                add(
                    "ResponseMetadata",
                    Some(obj(vec![("x", J::Arr(vec![raw(1.5)]))])),
                );
            }
            if let Some((k, v)) = again {
                add(k, Some(v));
            }
            let mut rng = Rng(seed | 1);
            for i in (1..members.len()).rev() {
                members.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let mut body = String::new();
            write(&J::Obj(members), &mut rng, &mut body);
            Case { columns, body }
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Reading an answer both ways

fn query(columns: &[(String, ColumnType)]) -> SourceQuery {
    SourceQuery {
        table: "t".into(),
        tenant_attribute: "tenant_id".into(),
        tenant: "acme".into(),
        range: None,
        filters: vec![],
        columns: columns.to_vec(),
        page_size: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn answer_of(body: &[u8]) -> http::Response<SdkBody> {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/x-amz-json-1.0")
        .body(SdkBody::from(body.to_vec()))
        .unwrap()
}

/// The page the real reader makes of this answer with `decoder`.
async fn read_with(
    decoder: SourceDecoder,
    q: &SourceQuery,
    answer: http::Response<SdkBody>,
) -> PortResult<Page> {
    let http = answering(vec![answer]);
    DynamoSource::new(dynamodb(&http), decoder)
        .read_page(q, None)
        .await
}

/// A result with what must agree: pages exactly (capacity as a number: NaN is NaN), data errors
/// to the letter, other errors by operation and retryability (their text is each parser's own).
#[derive(Debug)]
enum Seen {
    Page(Page),
    Data(String),
    Failed(String, bool),
    Conflict,
}

impl PartialEq for Seen {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Seen::Page(a), Seen::Page(b)) => {
                a.rows == b.rows
                    && a.next == b.next
                    && (a.read_capacity == b.read_capacity
                        || (a.read_capacity.is_nan() && b.read_capacity.is_nan()))
            }
            (Seen::Data(a), Seen::Data(b)) => a == b,
            (Seen::Failed(a, x), Seen::Failed(b, y)) => a == b && x == y,
            (Seen::Conflict, Seen::Conflict) => true,
            _ => false,
        }
    }
}

fn seen(r: PortResult<Page>) -> Seen {
    match r {
        Ok(page) => Seen::Page(page),
        Err(PortError::Data(m)) => Seen::Data(m),
        Err(PortError::Failed { op, retryable, .. }) => Seen::Failed(op, retryable),
        Err(PortError::Conflict(_)) => Seen::Conflict,
    }
}

/// Both ways of reading `body`, and the fast decoder called on it directly.
fn both(rt: &tokio::runtime::Runtime, q: &SourceQuery, body: &[u8]) -> (Seen, Seen, Seen) {
    let sdk = rt.block_on(read_with(SourceDecoder::Sdk, q, answer_of(body)));
    let fast = rt.block_on(read_with(SourceDecoder::Fast, q, answer_of(body)));
    (seen(sdk), seen(fast), seen(decode_page(q, body)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Well-formed answers: the fast decoder makes the page the SDK's parse and page_of make,
    /// row by row, the same cursor text, the same capacity, and the same data errors.
    #[test]
    fn fast_decoder_reads_every_answer_as_the_sdk_does(case in case(false)) {
        let rt = runtime();
        let q = query(&case.columns);
        let (sdk, fast, direct) = both(&rt, &q, case.body.as_bytes());
        prop_assert_eq!(&fast, &sdk, "{}", case.body);
        prop_assert_eq!(&direct, &sdk, "{}", case.body);
    }

    /// Answers with attribute values the SDK refuses (mixed or empty unions, nulls where none may
    /// be, wrong JSON types, bad base64): refused the same way, and the rest read the same.
    #[test]
    fn fast_decoder_refuses_what_the_sdk_refuses(case in case(true)) {
        let rt = runtime();
        let q = query(&case.columns);
        let (sdk, fast, direct) = both(&rt, &q, case.body.as_bytes());
        prop_assert_eq!(&fast, &sdk, "{}", case.body);
        prop_assert_eq!(&direct, &sdk, "{}", case.body);
    }

    /// Broken JSON (cut, a byte dropped, changed or added, invalid UTF-8): never a panic, and
    /// never a page the SDK would not make of the same bytes.
    #[test]
    fn broken_json_is_an_error_never_a_panic_or_another_page(
        case in case(false),
        at in any::<prop::sample::Index>(),
        how in 0u8..4,
        byte in select(vec![b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'x', b'0', 1, 0xff, 0xc3]),
    ) {
        let mut body = case.body.into_bytes();
        let i = at.index(body.len() + 1);
        match how {
            0 => body.truncate(i),
            1 if i < body.len() => { body.remove(i); }
            2 if i < body.len() => body[i] = byte,
            _ => body.insert(i, byte),
        }
        let rt = runtime();
        let q = query(&case.columns);
        let (sdk, fast, direct) = both(&rt, &q, &body);
        prop_assert_eq!(&fast, &direct);
        // Where the SDK's tokenizer is lenient (an escape it never unescapes, a number like
        // `0.`), this decoder refuses: an error, never a different page.
        if let (Seen::Page(_), Err(e)) = (&sdk, decode_page(&q, &body)) {
            let m = e.to_string();
            prop_assert!(m.contains("invalid escape") || m.contains("invalid number"), "{}", m);
        }
        if let Seen::Page(_) = fast {
            prop_assert_eq!(&fast, &sdk, "{}", String::from_utf8_lossy(&body));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The call around the decoder

fn orders_columns() -> Columns {
    vec![
        ("id".into(), ColumnType::String),
        ("amount".into(), ColumnType::Decimal),
        ("ts".into(), ColumnType::Timestamp),
        ("ok".into(), ColumnType::Boolean),
    ]
}

const PAGE: &str = r#"{"Count":2,"ScannedCount":2,
    "Items":[
        {"id":{"S":"ORD-1 \"Zoë\" \u00e9\ud83d\ude00"},"amount":{"N":"12.50"},"ts":{"S":"2024-05-01T09:30:00Z"},"ok":{"BOOL":true},"tenant_id":{"S":"acme"}},
        {"ts":{"N":"1700000000.5"},"id":{"S":"ORD-2"},"ok":{"S":"0"},"amount":{"NULL":true}}
    ],
    "LastEvaluatedKey":{"tenant_id":{"S":"acme"},"id":{"S":"ORD-\/2"}},
    "ConsumedCapacity":{"TableName":"orders","CapacityUnits":2.5}}"#;

#[test]
fn a_page_reads_into_rows_with_its_cursor_in_the_sdk_paths_form() {
    let page = decode_page(&query(&orders_columns()), PAGE.as_bytes()).unwrap();
    let ts = |s: &str| Value::Ts(chrono::DateTime::parse_from_rfc3339(s).unwrap().into());
    assert_eq!(
        page.rows,
        vec![
            vec![
                Value::Str("ORD-1 \"Zoë\" é😀".into()),
                Value::Dec("12.50".into()),
                ts("2024-05-01T09:30:00Z"),
                Value::Bool(true),
            ],
            vec![
                Value::Str("ORD-2".into()),
                Value::Null,
                ts("2023-11-14T22:13:20.5Z"),
                Value::Bool(false),
            ],
        ]
    );
    assert_eq!(
        page.next.as_deref(),
        Some(r#"{"id":{"S":"ORD-/2"},"tenant_id":{"S":"acme"}}"#)
    );
    assert_eq!(page.read_capacity, 2.5);
    let rt = runtime();
    let q = query(&orders_columns());
    let (sdk, fast, _) = both(&rt, &q, PAGE.as_bytes());
    assert_eq!(fast, sdk);
    assert_eq!(fast, Seen::Page(page));
}

#[test]
fn an_empty_body_is_an_empty_page_as_in_the_sdk() {
    let rt = runtime();
    let q = query(&orders_columns());
    let (sdk, fast, direct) = both(&rt, &q, b"");
    assert_eq!(sdk, fast);
    assert_eq!(direct, fast);
    let Seen::Page(page) = fast else {
        panic!("{fast:?}")
    };
    assert!(page.rows.is_empty() && page.next.is_none());
}

/// The body as the HTTP client hands it over: a stream, here in pieces cut anywhere (inside a
/// UTF-8 sequence too), optionally ending in a read error.
fn streamed(body: &[u8], cuts: &[usize], fails: bool) -> http::Response<SdkBody> {
    let mut pieces: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().chain([&body.len()]) {
        let cut = cut.clamp(at, body.len());
        pieces.push(Ok(http_body::Frame::data(Bytes::copy_from_slice(
            &body[at..cut],
        ))));
        at = cut;
    }
    if fails {
        pieces.push(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset by the test",
        )));
    }
    let stream = http_body_util::StreamBody::new(futures::stream::iter(pieces));
    http::Response::builder()
        .status(200)
        .header("content-length", body.len().to_string())
        .body(SdkBody::from_body_1_x(stream))
        .unwrap()
}

#[tokio::test]
async fn a_streamed_body_is_read_whole_then_decoded() {
    let q = query(&orders_columns());
    let body = PAGE.as_bytes();
    // Inside "Zoë": the piece ends in the middle of the ë.
    let mid_char = PAGE.find('ë').unwrap() + 1;
    let cuts = [1, 17, mid_char, 300, 301];
    let sdk = read_with(SourceDecoder::Sdk, &q, streamed(body, &cuts, false)).await;
    let fast = read_with(SourceDecoder::Fast, &q, streamed(body, &cuts, false)).await;
    assert_eq!(seen(fast), seen(sdk));
    let direct = decode_page(&q, body);
    let fast = read_with(SourceDecoder::Fast, &q, streamed(body, &cuts, false)).await;
    assert_eq!(seen(fast), seen(direct));
}

#[tokio::test]
async fn a_body_cut_off_by_the_network_is_a_retryable_error_either_way() {
    let q = query(&orders_columns());
    let body = &PAGE.as_bytes()[..200];
    let sdk = read_with(SourceDecoder::Sdk, &q, streamed(body, &[50], true)).await;
    let fast = read_with(SourceDecoder::Fast, &q, streamed(body, &[50], true)).await;
    assert!(
        fast.as_ref().is_err_and(PortError::is_retryable),
        "{fast:?}"
    );
    assert_eq!(fast.unwrap_err(), sdk.unwrap_err());
}

#[tokio::test]
async fn error_answers_are_parsed_by_the_sdk_as_before() {
    let q = query(&orders_columns());
    for (kind, retryable) in [
        ("ResourceNotFoundException", false),
        ("ProvisionedThroughputExceededException", true),
    ] {
        let sdk = read_with(SourceDecoder::Sdk, &q, error(kind, json!({}))).await;
        let fast = read_with(SourceDecoder::Fast, &q, error(kind, json!({}))).await;
        let fast = fast.unwrap_err();
        assert_eq!(fast.is_retryable(), retryable, "{fast:?}");
        assert!(fast.to_string().contains(kind), "{fast}");
        assert_eq!(fast, sdk.unwrap_err());
    }
}

#[tokio::test]
async fn a_success_other_than_200_is_left_to_the_sdk() {
    let q = query(&orders_columns());
    let other = || answer(203, &[("content-type", "application/x-amz-json-1.0")], PAGE);
    let sdk = read_with(SourceDecoder::Sdk, &q, other()).await;
    let fast = read_with(SourceDecoder::Fast, &q, other()).await;
    assert!(fast.is_ok(), "{fast:?}");
    assert_eq!(seen(fast), seen(sdk));
}

#[tokio::test]
async fn a_retried_call_reads_the_page_of_the_attempt_that_succeeded() {
    let q = query(&orders_columns());
    let other_page = PAGE.replace("ORD-1", "ORD-9");
    let failed = json!({
        "__type": "com.amazonaws.dynamodb.v20120810#InternalServerError",
        "message": "try again",
    });
    let http = answering(vec![
        answer(500, &[], &failed.to_string()),
        answer(200, &[], &other_page),
    ]);
    let client = aws_sdk_dynamodb::Client::from_conf(
        dynamodb(&http)
            .config()
            .to_builder()
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(3)
                    .with_initial_backoff(std::time::Duration::from_millis(1)),
            )
            .build(),
    );
    let page = DynamoSource::new(client, SourceDecoder::Fast)
        .read_page(&q, None)
        .await
        .unwrap();
    assert_eq!(http.actual_requests().count(), 2);
    assert_eq!(
        Seen::Page(page),
        seen(decode_page(&q, other_page.as_bytes()))
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let rt = runtime();
    let q = query(&orders_columns());
    let nested = |depth: usize| {
        format!(
            r#"{{"Items":[{{"id":{}{{"S":"x"}}{}}}]}}"#,
            r#"{"L":["#.repeat(depth),
            "]}".repeat(depth)
        )
    };
    // DynamoDB nests up to 32 levels: read (the column says what it holds).
    let (sdk, fast, direct) = both(&rt, &q, nested(30).as_bytes());
    assert_eq!(fast, sdk);
    assert_eq!(direct, sdk);
    assert!(
        matches!(&fast, Seen::Data(m) if m.ends_with("holds L")),
        "{fast:?}"
    );
    // Far past both parsers' limits: refused by both.
    let (sdk, fast, _) = both(&rt, &q, nested(100_000).as_bytes());
    assert_eq!(fast, Seen::Failed("source query".into(), false));
    assert_eq!(fast, sdk);
}

#[test]
fn a_cell_that_does_not_convert_names_its_attribute_as_the_sdk_path_does() {
    let rt = runtime();
    let q = query(&orders_columns());
    for (cell, holds) in [
        (r#"{"S":"12,50"}"#, r#"S("12,50")"#),
        (r#"{"BOOL":false}"#, "Bool(false)"),
        (r#"{"SS":["1"]}"#, "SS"),
        (r#"{"M":{}}"#, "M"),
        (r#"{"NEW":1}"#, super::UNKNOWN_KIND),
    ] {
        let body = format!(r#"{{"Items":[{{"id":{{"S":"a"}},"amount":{cell}}}]}}"#);
        let (sdk, fast, _) = both(&rt, &q, body.as_bytes());
        assert_eq!(
            fast,
            Seen::Data(format!(
                "attribute `amount` should hold a decimal but holds {holds}"
            ))
        );
        assert_eq!(fast, sdk);
    }
}
