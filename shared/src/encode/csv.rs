//! RFC 4180 CSV, written by hand straight into the part buffer.
//!
//! Hand-rolled rather than through the `csv` crate's writer: cells are already typed, so numbers,
//! dates and booleans never need quoting checks, and writing into the buffer the upload takes
//! avoids a copy per row (see the bench table in README). The `csv` crate reads the output back in
//! the tests.

use chrono_tz::Tz;

use super::deflate::Deflater;
use super::text::{needs_neutralising, push_date, push_timestamp, NEUTRALISING_PREFIX};
use super::{Cut, EncodeError, Encoder, Finished, RowWriter, RowsEncoder};
use crate::domain::Column;
use crate::domain::{EncoderState, Row, Value};

const BOM: &[u8] = b"\xEF\xBB\xBF";
const EOL: &[u8] = b"\r\n";

#[derive(Debug, Clone, Copy)]
pub struct CsvOptions {
    pub delimiter: u8,
    pub bom: bool,
    pub tz: Tz,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            delimiter: b',',
            bom: false,
            tz: chrono_tz::UTC,
        }
    }
}

/// CSV rows with their options; the encoder is [`CsvEncoder`].
pub struct CsvRows {
    opts: CsvOptions,
    columns: usize,
}

/// Plain CSV: the bytes so far are a prefix of the file.
pub type CsvEncoder = RowsEncoder<CsvRows>;

impl CsvEncoder {
    pub fn new(columns: Vec<Column>, opts: CsvOptions, with_header: bool) -> Self {
        let mut head = Vec::with_capacity(1 << 20);
        if with_header {
            if opts.bom {
                head.extend_from_slice(BOM);
            }
            for (i, c) in columns.iter().enumerate() {
                if i > 0 {
                    head.push(opts.delimiter);
                }
                push_text(&mut head, &c.label, opts.delimiter);
            }
            head.extend_from_slice(EOL);
        }
        let rows = CsvRows {
            opts,
            columns: columns.len(),
        };
        RowsEncoder::with_head(rows, head)
    }
}

impl RowWriter for CsvRows {
    fn write_row(&self, out: &mut Vec<u8>, row: &Row) {
        debug_assert_eq!(row.len(), self.columns);
        let d = self.opts.delimiter;
        for (i, v) in row.iter().enumerate() {
            if i > 0 {
                out.push(d);
            }
            match v {
                Value::Null => {}
                Value::Str(s) => push_text(out, s, d),
                Value::Int(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
                Value::Dec(s) => out.extend_from_slice(s.as_bytes()),
                Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
                Value::Ts(t) => push_timestamp(out, *t, self.opts.tz),
                Value::Date(dt) => push_date(out, *dt),
            }
        }
        out.extend_from_slice(EOL);
    }
}

/// Bytes some reader may split a line on: every character a spreadsheet takes as the list
/// separator (`,` `;` tab `|`), whatever delimiter this file uses, and line breaks. A comma file
/// opened where `;` separates lists splits `Acme;=cmd|...` into a field that starts with `=`.
fn is_break(b: u8, delimiter: u8) -> bool {
    matches!(b, b',' | b';' | b'\t' | b'|' | b'\r' | b'\n') || b == delimiter
}

/// Starts of a formula in a field that begins after a break inside the text.
fn is_formula_start(b: u8) -> bool {
    matches!(b, b'=' | b'+' | b'-' | b'@')
}

/// Whether a field a reader splits off at this point would start a formula: quotes there open a
/// quoted field (or close one at once), so what follows them counts.
fn piece_starts_formula(rest: &[u8]) -> bool {
    rest.iter()
        .find(|&&b| b != b'"')
        .copied()
        .is_some_and(is_formula_start)
}

/// A text cell, safe under any delimiter a spreadsheet might read the file with: quoted when it
/// holds a quote or a break (quotes doubled); neutralised with `'` where it, or any piece of it a
/// reader could split off, would start a formula. Quoting alone does not protect a piece split
/// off by a reader whose delimiter is not this file's: to such a reader the quote is mid-field.
pub fn push_text(out: &mut Vec<u8>, s: &str, delimiter: u8) {
    if s.is_empty() {
        // `""` keeps empty text apart from a missing value (an empty field), and keeps a
        // one-column row from turning into a blank line that readers skip.
        out.extend_from_slice(b"\"\"");
        return;
    }
    let bytes = s.as_bytes();
    let quote = bytes.iter().any(|&b| b == b'"' || is_break(b, delimiter));
    if quote {
        out.push(b'"');
    }
    if needs_neutralising(s) {
        out.push(NEUTRALISING_PREFIX as u8);
    }
    if !quote {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' {
            out.extend_from_slice(&bytes[start..=i]);
            out.push(b'"');
            start = i + 1;
        } else if is_break(b, delimiter) && piece_starts_formula(&bytes[i + 1..]) {
            out.extend_from_slice(&bytes[start..=i]);
            out.push(NEUTRALISING_PREFIX as u8);
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The fixed gzip member header (RFC 1952): deflate, no name, no time, unknown OS. Written by hand
/// because the body is a series of raw deflate segments (see [`Deflater`]) and the trailer comes
/// from the CRC-32 and length carried across invocations.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// CSV through gzip, resumable at every cut.
pub struct GzCsvEncoder {
    csv: CsvEncoder,
    deflate: Deflater,
    /// The gzip header, until the first cut takes it.
    head: Vec<u8>,
}

impl GzCsvEncoder {
    pub fn new(columns: Vec<Column>, opts: CsvOptions, level: u32) -> Result<Self, EncodeError> {
        let mut csv = CsvEncoder::new(columns, opts, true);
        let header = csv.take();
        let mut enc = Self {
            csv,
            deflate: Deflater::new(level, 0, 0),
            head: GZIP_HEADER.to_vec(),
        };
        enc.compress(header)?;
        Ok(enc)
    }

    /// Continues a member whose text so far has this CRC-32 and length.
    pub fn resume(
        columns: Vec<Column>,
        opts: CsvOptions,
        level: u32,
        crc32: u32,
        length: u64,
    ) -> Self {
        Self {
            csv: CsvEncoder::new(columns, opts, false),
            deflate: Deflater::new(level, crc32, length),
            head: Vec::new(),
        }
    }

    fn compress(&mut self, text: Vec<u8>) -> Result<(), EncodeError> {
        self.deflate.write(&text)
    }

    fn bytes_with_head(&mut self, body: Vec<u8>) -> Vec<u8> {
        if self.head.is_empty() {
            return body;
        }
        let mut out = std::mem::take(&mut self.head);
        out.extend_from_slice(&body);
        out
    }
}

impl Encoder for GzCsvEncoder {
    fn write_rows(&mut self, rows: &[Row]) -> Result<(), EncodeError> {
        self.csv.write_rows(rows)?;
        let text = self.csv.take();
        self.compress(text)
    }

    fn buffered(&self) -> usize {
        self.head.len() + self.deflate.buffered()
    }

    fn cut(&mut self) -> Result<Cut, EncodeError> {
        let body = self.deflate.cut()?;
        Ok(Cut {
            bytes: self.bytes_with_head(body),
            state: EncoderState::Gzip {
                crc32: self.deflate.crc32(),
                length: self.deflate.length(),
            },
        })
    }

    fn finish(mut self: Box<Self>) -> Result<Finished, EncodeError> {
        let crc = self.deflate.crc32();
        // ISIZE is the length modulo 2^32 (RFC 1952).
        let isize = self.deflate.length() as u32;
        let deflate = std::mem::replace(&mut self.deflate, Deflater::new(0, 0, 0));
        let body = deflate.finish()?;
        let mut tail = self.bytes_with_head(body);
        tail.extend_from_slice(&crc.to_le_bytes());
        tail.extend_from_slice(&isize.to_le_bytes());
        Ok(Finished {
            tail,
            sheets: 0,
            truncated_cells: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Catalog, ColumnType};
    use crate::encode::testkit::col;
    use chrono::{DateTime, NaiveDate, Utc};
    use proptest::prelude::*;
    use std::io::Read;

    fn encode(columns: Vec<Column>, rows: &[Row], opts: CsvOptions) -> Vec<u8> {
        let mut e: Box<dyn Encoder> = Box::new(CsvEncoder::new(columns, opts, true));
        e.write_rows(rows).unwrap();
        let mut out = e.cut().unwrap().bytes;
        out.extend(e.finish().unwrap().tail);
        out
    }

    /// What a text cell reads back as: `'` before a formula start at the beginning and after
    /// every break inside it.
    fn neutralised(s: &str, delimiter: u8) -> String {
        let mut out = Vec::new();
        if needs_neutralising(s) {
            out.push(b'\'');
        }
        let bytes = s.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            out.push(b);
            if is_break(b, delimiter) && piece_starts_formula(&bytes[i + 1..]) {
                out.push(b'\'');
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn read_back(bytes: &[u8], delimiter: u8) -> Vec<Vec<String>> {
        let mut r = ::csv::ReaderBuilder::new()
            .has_headers(false)
            .delimiter(delimiter)
            .from_reader(bytes);
        r.records()
            .map(|rec| rec.unwrap().iter().map(str::to_string).collect())
            .collect()
    }

    #[test]
    fn typed_cells_follow_rfc_4180_with_header_labels() {
        let ts = DateTime::parse_from_rfc3339("2024-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        let cols = vec![
            col("s", ColumnType::String),
            col("i", ColumnType::Integer),
            col("d", ColumnType::Decimal),
            col("b", ColumnType::Boolean),
            col("t", ColumnType::Timestamp),
            col("dt", ColumnType::Date),
        ];
        let rows = vec![
            vec![
                Value::Str("a,\"b\"\nc".into()),
                Value::Int(-42),
                Value::Dec("12.50".into()),
                Value::Bool(true),
                Value::Ts(ts),
                Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()),
            ],
            vec![Value::Null; 6],
        ];
        let out = encode(cols, &rows, CsvOptions::default());
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            text,
            "s label,i label,d label,b label,t label,dt label\r\n\"a,\"\"b\"\"\nc\",-42,12.50,true,2024-01-02T03:04:05Z,2024-02-29\r\n,,,,,\r\n"
        );
        let back = read_back(&out, b',');
        assert_eq!(back[1][0], "a,\"b\"\nc");
    }

    #[test]
    fn formula_starts_are_neutralised_in_text_but_numbers_are_not() {
        let cols = vec![col("s", ColumnType::String), col("i", ColumnType::Integer)];
        let rows: Vec<Row> = ["=HYPERLINK(\"x\")", "+1", "-1", "@A1", "\tx", "\rx"]
            .iter()
            .map(|s| vec![Value::Str(s.to_string()), Value::Int(-1)])
            .collect();
        let out = encode(cols, &rows, CsvOptions::default());
        let back = read_back(&out, b',');
        for (rec, original) in
            back[1..]
                .iter()
                .zip(["=HYPERLINK(\"x\")", "+1", "-1", "@A1", "\tx", "\rx"])
        {
            assert_eq!(rec[0], format!("'{original}"));
            assert_eq!(rec[1], "-1", "typed numbers are never touched");
        }
    }

    #[test]
    fn bom_delimiter_and_time_zone_options() {
        let ts = DateTime::parse_from_rfc3339("2024-07-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let cols = vec![
            col("s", ColumnType::String),
            col("t", ColumnType::Timestamp),
        ];
        let rows = vec![vec![Value::Str("a;b".into()), Value::Ts(ts)]];
        let out = encode(
            cols,
            &rows,
            CsvOptions {
                delimiter: b';',
                bom: true,
                tz: chrono_tz::Europe::Paris,
            },
        );
        assert!(out.starts_with(BOM));
        let back = read_back(&out[3..], b';');
        assert_eq!(back[1], vec!["a;b", "2024-07-01T12:00:00+02:00"]);
    }

    fn orders_rows(n: i64) -> (Vec<Column>, Vec<Row>) {
        let orders = Catalog::builtin().unwrap().get("orders").unwrap().clone();
        let rows = (0..n)
            .map(|i| {
                orders
                    .columns
                    .iter()
                    .map(|c| match c.ty {
                        ColumnType::Integer => Value::Int(i),
                        _ => Value::Str(format!("v{i}")),
                    })
                    .collect()
            })
            .collect();
        (orders.columns.clone(), rows)
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// Encodes `rows` in pages of 700, cutting after every `cut_every` pages; returns the file and
    /// the state after each cut with the file length there.
    fn gzip_with_cuts(
        columns: &[Column],
        rows: &[Row],
        cut_every: usize,
        resume: Option<(usize, u32, u64)>,
    ) -> (Vec<u8>, Vec<(usize, u32, u64)>) {
        let opts = CsvOptions::default();
        let (mut e, skip): (Box<dyn Encoder>, usize) = match resume {
            None => (
                Box::new(GzCsvEncoder::new(columns.to_vec(), opts, 4).unwrap()),
                0,
            ),
            Some((page, crc, len)) => (
                Box::new(GzCsvEncoder::resume(columns.to_vec(), opts, 4, crc, len)),
                page + 1,
            ),
        };
        let mut out = Vec::new();
        let mut cuts = Vec::new();
        for (i, page) in rows.chunks(700).enumerate().skip(skip) {
            e.write_rows(page).unwrap();
            if i % cut_every == cut_every - 1 {
                let cut = e.cut().unwrap();
                out.extend(cut.bytes);
                let EncoderState::Gzip { crc32, length } = cut.state else {
                    panic!("not a gzip state: {:?}", cut.state);
                };
                cuts.push((i, crc32, length));
            }
        }
        out.extend(e.finish().unwrap().tail);
        (out, cuts)
    }

    #[test]
    fn gzip_round_trips_to_the_same_csv() {
        let (columns, rows) = orders_rows(5000);
        let plain = encode(columns.clone(), &rows, CsvOptions::default());
        let (compressed, _) = gzip_with_cuts(&columns, &rows, 2, None);
        assert_eq!(gunzip(&compressed), plain);
        assert!(compressed.len() < plain.len() / 3);
    }

    #[test]
    fn gzip_resumed_from_any_cut_is_byte_identical() {
        let (columns, rows) = orders_rows(6000);
        let (whole, cuts) = gzip_with_cuts(&columns, &rows, 2, None);
        assert!(cuts.len() >= 3);
        let mut offsets = Vec::new();
        // The file length at each cut, from a run that keeps the pieces apart.
        {
            let opts = CsvOptions::default();
            let mut e = GzCsvEncoder::new(columns.clone(), opts, 4).unwrap();
            let mut len = 0;
            for (i, page) in rows.chunks(700).enumerate() {
                e.write_rows(page).unwrap();
                if i % 2 == 1 {
                    len += e.cut().unwrap().bytes.len();
                    offsets.push(len);
                }
            }
        }
        for (cut, at) in cuts.into_iter().zip(offsets) {
            let (rest, _) = gzip_with_cuts(&columns, &rows, 2, Some(cut));
            let mut resumed = whole[..at].to_vec();
            resumed.extend(rest);
            assert_eq!(resumed, whole, "resumed after page {}", cut.0);
        }
        assert_eq!(
            gunzip(&whole),
            encode(columns, &rows, CsvOptions::default())
        );
    }

    #[test]
    fn an_empty_gzip_export_is_a_header_only_member() {
        let (columns, _) = orders_rows(0);
        let (bytes, _) = gzip_with_cuts(&columns, &[], 1, None);
        let text = String::from_utf8(gunzip(&bytes)).unwrap();
        assert_eq!(text.lines().count(), 1);
    }

    #[test]
    fn csv_cut_hands_out_a_prefix_and_resumes_without_a_header() {
        let (columns, rows) = orders_rows(100);
        let whole = encode(columns.clone(), &rows, CsvOptions::default());
        let mut first = CsvEncoder::new(columns.clone(), CsvOptions::default(), true);
        first.write_rows(&rows[..40]).unwrap();
        let cut = first.cut().unwrap();
        assert_eq!(cut.state, EncoderState::Plain);
        let mut rest = CsvEncoder::new(columns, CsvOptions::default(), false);
        rest.write_rows(&rows[40..]).unwrap();
        let mut joined = cut.bytes;
        joined.extend(Box::new(rest).finish().unwrap().tail);
        assert_eq!(joined, whole);
    }

    proptest! {
        #[test]
        fn any_text_round_trips_through_a_csv_reader(
            cells in proptest::collection::vec(".{0,30}", 1..6),
            delim in prop_oneof![Just(b','), Just(b';'), Just(b'\t')],
        ) {
            let cols: Vec<Column> = (0..cells.len()).map(|i| col(&format!("c{i}"), ColumnType::String)).collect();
            let row: Row = cells.iter().map(|c| Value::Str(c.clone())).collect();
            let out = encode(cols, &[row], CsvOptions { delimiter: delim, ..CsvOptions::default() });
            let back = read_back(&out, delim);
            prop_assert_eq!(back.len(), 2);
            for (got, want) in back[1].iter().zip(&cells) {
                prop_assert_eq!(got, &neutralised(want, delim));
            }
        }

        /// A spreadsheet whose list separator is not the file's delimiter reads quoted text as
        /// plain: whatever piece it splits off must still not start a formula.
        #[test]
        fn no_field_starts_a_formula_under_any_reader_delimiter(
            rows in proptest::collection::vec(
                proptest::collection::vec("[a=+@,;|\t\r\n\" -]{0,10}", 1..5), 1..4),
            delim in prop_oneof![Just(b','), Just(b';'), Just(b'\t'), Just(b'|')],
        ) {
            let width = rows.iter().map(Vec::len).max().unwrap_or(1);
            let cols: Vec<Column> = (0..width).map(|i| col(&format!("c{i}"), ColumnType::String)).collect();
            let rows: Vec<Row> = rows
                .into_iter()
                .map(|r| (0..width).map(|i| r.get(i).map_or(Value::Null, |c| Value::Str(c.clone()))).collect())
                .collect();
            let out = encode(cols, &rows, CsvOptions { delimiter: delim, ..CsvOptions::default() });
            for reader in [b',', b';', b'\t', b'|'] {
                let mut r = ::csv::ReaderBuilder::new()
                    .has_headers(false)
                    .flexible(true)
                    .delimiter(reader)
                    .from_reader(&out[..]);
                for rec in r.byte_records() {
                    let rec = rec.unwrap();
                    for field in rec.iter() {
                        prop_assert!(
                            !field.first().copied().is_some_and(is_formula_start),
                            "field {:?} read with {:?} from {:?}",
                            String::from_utf8_lossy(field), reader as char, String::from_utf8_lossy(&out)
                        );
                    }
                }
            }
        }
    }
}
