//! NDJSON: one JSON object per line, keyed by column name, with typed values (docs/contract.md,
//! "Files"). For programs, not spreadsheets, so text is never neutralised.
//!
//! Written by hand into the part buffer like CSV: the keys are escaped once, values need no
//! serializer, and decimals go out as their validated text (a JSON number written from the exact
//! digits, never through a float). serde_json reads the output back in the tests.
//!
//! No header, so a continuation is a fresh encoder: the bytes so far are a prefix of the file
//! ([`EncoderState::Plain`](crate::domain::EncoderState::Plain)).

use chrono_tz::Tz;

use super::text::{push_date, push_timestamp};
use super::{RowWriter, RowsEncoder};
use crate::domain::value::is_decimal_text;
use crate::domain::Column;
use crate::domain::{Row, Value};

/// NDJSON rows: the keys and the zone for timestamps; the encoder is [`NdjsonEncoder`].
pub struct NdjsonRows {
    /// `{"name":` for the first column, `,"name":` for the others: escaped once per file.
    keys: Vec<Vec<u8>>,
    tz: Tz,
}

pub type NdjsonEncoder = RowsEncoder<NdjsonRows>;

impl NdjsonEncoder {
    /// A new file and the continuation of one are the same: there is no header.
    pub fn new(columns: &[Column], tz: Tz) -> Self {
        let keys = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut key = vec![if i == 0 { b'{' } else { b',' }];
                push_string(&mut key, &c.name);
                key.push(b':');
                key
            })
            .collect();
        RowsEncoder::with_head(NdjsonRows { keys, tz }, Vec::with_capacity(1 << 20))
    }
}

impl RowWriter for NdjsonRows {
    fn write_row(&self, out: &mut Vec<u8>, row: &Row) {
        debug_assert_eq!(row.len(), self.keys.len());
        if self.keys.is_empty() {
            out.push(b'{');
        }
        for (key, v) in self.keys.iter().zip(row) {
            out.extend_from_slice(key);
            match v {
                Value::Null => out.extend_from_slice(b"null"),
                Value::Str(s) => push_string(out, s),
                Value::Int(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
                Value::Dec(s) => push_decimal(out, s),
                Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
                Value::Ts(t) => {
                    out.push(b'"');
                    push_timestamp(out, *t, self.tz);
                    out.push(b'"');
                }
                Value::Date(d) => {
                    out.push(b'"');
                    push_date(out, *d);
                    out.push(b'"');
                }
            }
        }
        out.extend_from_slice(b"}\n");
    }
}

/// A JSON string (RFC 8259 section 7): quote, backslash and control characters escaped, the rest
/// as UTF-8.
pub fn push_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A decimal's own text as a JSON number: the digits as stored (`12.50` stays `12.50`), only
/// leading zeros of the integer part dropped, which JSON forbids (`007.5` -> `7.5`). Text that is
/// not plain decimal text (the source adapter refuses it, so this is defence only) goes out as a
/// string rather than as a broken line.
fn push_decimal(out: &mut Vec<u8>, s: &str) {
    if !is_decimal_text(s) {
        push_string(out, s);
        return;
    }
    let (sign, body) = match s.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", s),
    };
    let trimmed = body.trim_start_matches('0');
    out.extend_from_slice(sign.as_bytes());
    if trimmed.is_empty() || trimmed.starts_with('.') {
        out.push(b'0');
    }
    out.extend_from_slice(trimmed.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ColumnType;
    use crate::domain::EncoderState;
    use crate::encode::testkit::col;
    use crate::encode::Encoder;
    use chrono::{DateTime, NaiveDate, Utc};
    use proptest::prelude::*;
    use serde_json::{json, Value as Json};

    fn encode(columns: &[Column], rows: &[Row], tz: Tz) -> Vec<u8> {
        let mut e: Box<dyn Encoder> = Box::new(NdjsonEncoder::new(columns, tz));
        e.write_rows(rows).unwrap();
        let mut out = e.cut().unwrap().bytes;
        out.extend(e.finish().unwrap().tail);
        out
    }

    /// Each line parsed by serde_json on its own, numbers kept as their text.
    fn lines(bytes: &[u8]) -> Vec<serde_json::Map<String, Json>> {
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
        text.lines()
            .map(|l| match serde_json::from_str(l).unwrap() {
                Json::Object(m) => m,
                other => panic!("not an object: {other}"),
            })
            .collect()
    }

    fn every_type() -> Vec<Column> {
        vec![
            col("s", ColumnType::String),
            col("i", ColumnType::Integer),
            col("d", ColumnType::Decimal),
            col("b", ColumnType::Boolean),
            col("t", ColumnType::Timestamp),
            col("dt", ColumnType::Date),
        ]
    }

    #[test]
    fn values_are_typed_and_keyed_by_column_name() {
        let ts = DateTime::parse_from_rfc3339("2024-01-02T03:04:05.250Z")
            .unwrap()
            .with_timezone(&Utc);
        let rows = vec![
            vec![
                Value::Str("a \"b\"\n\\c".into()),
                Value::Int(-42),
                Value::Dec("12.50".into()),
                Value::Bool(true),
                Value::Ts(ts),
                Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()),
            ],
            vec![Value::Null; 6],
        ];
        let out = encode(&every_type(), &rows, chrono_tz::UTC);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            concat!(
                r#"{"s":"a \"b\"\n\\c","i":-42,"d":12.50,"b":true,"t":"2024-01-02T03:04:05.250Z","dt":"2024-02-29"}"#,
                "\n",
                r#"{"s":null,"i":null,"d":null,"b":null,"t":null,"dt":null}"#,
                "\n"
            )
        );
        let back = lines(&out);
        assert_eq!(back[0]["s"], json!("a \"b\"\n\\c"));
        assert_eq!(back[0]["i"], json!(-42));
        assert!(back[0]["d"].is_number());
        assert_eq!(back[0]["b"], json!(true));
        assert!(back[1].values().all(Json::is_null));
    }

    #[test]
    fn formula_starts_are_left_as_they_are() {
        let cols = vec![col("s", ColumnType::String)];
        let cells = ["=HYPERLINK(\"x\")", "+1", "-1", "@A1", "\tx", "\rx"];
        let rows: Vec<Row> = cells
            .iter()
            .map(|s| vec![Value::Str(s.to_string())])
            .collect();
        let back = lines(&encode(&cols, &rows, chrono_tz::UTC));
        for (line, cell) in back.iter().zip(cells) {
            assert_eq!(line["s"], json!(cell), "JSON is not a spreadsheet");
        }
    }

    #[test]
    fn decimals_keep_their_digits_beyond_a_float() {
        let cols = vec![col("d", ColumnType::Decimal)];
        let cases = [
            (
                "12345678901234567890.123456789012345678",
                "12345678901234567890.123456789012345678",
            ),
            ("0.10", "0.10"),
            ("-0.001", "-0.001"),
            ("007.5", "7.5"),
            ("-00", "-0"),
            ("000", "0"),
            ("-000.25", "-0.25"),
        ];
        let rows: Vec<Row> = cases
            .iter()
            .map(|(d, _)| vec![Value::Dec(d.to_string())])
            .collect();
        let out = encode(&cols, &rows, chrono_tz::UTC);
        let text = String::from_utf8(out).unwrap();
        for (line, (_, want)) in text.lines().zip(cases) {
            assert_eq!(line, format!(r#"{{"d":{want}}}"#));
            // Valid JSON whose number is the exact text (serde_json would round it to an f64).
            let parsed: Json = serde_json::from_str(line).unwrap();
            assert!(parsed["d"].is_number(), "{line}");
        }
        // Not decimal text: a string, never an invalid line.
        let odd = encode(&cols, &[vec![Value::Dec("1e5".into())]], chrono_tz::UTC);
        assert_eq!(lines(&odd)[0]["d"], json!("1e5"));
    }

    #[test]
    fn timestamps_follow_the_requested_zone() {
        let cols = vec![col("t", ColumnType::Timestamp)];
        let ts = DateTime::parse_from_rfc3339("2024-07-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let out = encode(&cols, &[vec![Value::Ts(ts)]], chrono_tz::Europe::Paris);
        assert_eq!(lines(&out)[0]["t"], json!("2024-07-01T12:00:00+02:00"));
    }

    #[test]
    fn an_empty_export_is_an_empty_file() {
        assert!(encode(&every_type(), &[], chrono_tz::UTC).is_empty());
    }

    #[test]
    fn a_continuation_from_any_cut_writes_the_same_bytes() {
        let cols = every_type();
        let rows: Vec<Row> = (0..100)
            .map(|i| {
                vec![
                    Value::Str(format!("row {i}")),
                    Value::Int(i),
                    Value::Dec(format!("{i}.{:02}", i % 100)),
                    Value::Bool(i % 2 == 0),
                    Value::Null,
                    Value::Date(NaiveDate::from_ymd_opt(2024, 1, 1 + (i % 28) as u32).unwrap()),
                ]
            })
            .collect();
        let whole = encode(&cols, &rows, chrono_tz::UTC);
        for at in [0, 1, 37, 99, 100] {
            let mut first = NdjsonEncoder::new(&cols, chrono_tz::UTC);
            first.write_rows(&rows[..at]).unwrap();
            let cut = first.cut().unwrap();
            assert_eq!(cut.state, EncoderState::Plain);
            let mut rest = NdjsonEncoder::new(&cols, chrono_tz::UTC);
            rest.write_rows(&rows[at..]).unwrap();
            let mut joined = cut.bytes;
            joined.extend(Box::new(rest).finish().unwrap().tail);
            assert_eq!(joined, whole, "cut after {at} rows");
        }
    }

    proptest! {
        #[test]
        fn any_text_and_any_column_name_round_trip_through_serde_json(
            names in proptest::collection::btree_set("\\PC{0,12}|[\"\\\\\u{0}-\u{1f}]{1,4}", 1..5),
            cells in proptest::collection::vec("(?s).{0,30}", 5),
        ) {
            let cols: Vec<Column> = names.iter().map(|n| col(n, ColumnType::String)).collect();
            let row: Row = cols.iter().zip(&cells).map(|(_, c)| Value::Str(c.clone())).collect();
            let out = encode(&cols, &[row], chrono_tz::UTC);
            let back = lines(&out);
            prop_assert_eq!(back.len(), 1);
            let keys: Vec<&String> = back[0].keys().collect();
            let want: Vec<&String> = names.iter().collect();
            prop_assert_eq!(keys.len(), want.len());
            for (name, cell) in names.iter().zip(&cells) {
                prop_assert_eq!(&back[0][name], &json!(cell));
            }
        }

        #[test]
        fn any_decimal_text_is_a_json_number_of_the_same_value(
            neg in any::<bool>(), int in "[0-9]{1,30}", frac in proptest::option::of("[0-9]{1,30}"),
        ) {
            let text = format!("{}{int}{}", if neg { "-" } else { "" },
                frac.as_ref().map(|f| format!(".{f}")).unwrap_or_default());
            let cols = vec![col("d", ColumnType::Decimal)];
            let out = encode(&cols, &[vec![Value::Dec(text.clone())]], chrono_tz::UTC);
            let line = String::from_utf8(out).unwrap();
            let parsed: Json = serde_json::from_str(line.trim_end()).unwrap();
            prop_assert!(parsed["d"].is_number(), "{}", line);
            let written = line.trim_end().strip_prefix(r#"{"d":"#).unwrap().strip_suffix('}').unwrap();
            // serde_json took it as a JSON number, so its grammar holds; the same value means the
            // same sign and the same digits once the integer part's leading zeros are gone.
            let digits = |s: &str| s.trim_start_matches('-').trim_start_matches('0').to_string();
            prop_assert_eq!(written.starts_with('-'), neg);
            prop_assert_eq!(digits(written), digits(&text));
        }
    }
}
