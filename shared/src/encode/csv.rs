//! RFC 4180 CSV, written by hand straight into the part buffer.
//!
//! Hand-rolled rather than through the `csv` crate's writer: cells are already typed, so numbers,
//! dates and booleans never need quoting checks, and writing into the buffer the upload takes
//! avoids a copy per row (see the bench table in README). The `csv` crate reads the output back in
//! the tests.

use std::io::{Cursor, Write};

use chrono_tz::Tz;
use flate2::write::GzEncoder;
use flate2::Compression;

use super::text::{needs_neutralising, push_date, push_timestamp, NEUTRALISING_PREFIX};
use super::{EncodeError, Encoder, Finished};
use crate::catalog::Column;
use crate::domain::{Row, Value};

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

pub struct CsvEncoder {
    buf: Vec<u8>,
    opts: CsvOptions,
    columns: usize,
}

impl CsvEncoder {
    pub fn new(columns: Vec<Column>, opts: CsvOptions, with_header: bool) -> Self {
        let mut enc = Self {
            buf: Vec::with_capacity(1 << 20),
            opts,
            columns: columns.len(),
        };
        if with_header {
            if opts.bom {
                enc.buf.extend_from_slice(BOM);
            }
            for (i, c) in columns.iter().enumerate() {
                if i > 0 {
                    enc.buf.push(opts.delimiter);
                }
                push_text(&mut enc.buf, &c.label, opts.delimiter);
            }
            enc.buf.extend_from_slice(EOL);
        }
        enc
    }

    /// Appends one row to `out`.
    pub fn encode_row(&self, out: &mut Vec<u8>, row: &Row) {
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

/// A text cell: neutralised if it could be read as a formula, quoted if it holds the delimiter, a
/// quote or a line break (quotes doubled).
pub fn push_text(out: &mut Vec<u8>, s: &str, delimiter: u8) {
    if s.is_empty() {
        // `""` keeps empty text apart from a missing value (an empty field), and keeps a
        // one-column row from turning into a blank line that readers skip.
        out.extend_from_slice(b"\"\"");
        return;
    }
    let neutralise = needs_neutralising(s);
    let quote = s
        .bytes()
        .any(|b| b == delimiter || b == b'"' || b == b'\n' || b == b'\r');
    if !quote {
        if neutralise {
            out.push(NEUTRALISING_PREFIX as u8);
        }
        out.extend_from_slice(s.as_bytes());
        return;
    }
    out.push(b'"');
    if neutralise {
        out.push(NEUTRALISING_PREFIX as u8);
    }
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' {
            out.extend_from_slice(&bytes[start..=i]);
            out.push(b'"');
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

impl Encoder for CsvEncoder {
    fn write_rows(&mut self, rows: &[Row]) -> Result<(), EncodeError> {
        let mut buf = std::mem::take(&mut self.buf);
        for r in rows {
            self.encode_row(&mut buf, r);
        }
        self.buf = buf;
        Ok(())
    }

    fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.buf, Vec::with_capacity(1 << 20))
    }

    fn resumable(&self) -> bool {
        true
    }

    fn finish(self: Box<Self>) -> Result<Finished, EncodeError> {
        Ok(Finished {
            tail: Box::new(Cursor::new(self.buf)),
            sheets: 0,
            truncated_cells: 0,
        })
    }
}

/// CSV through gzip. Not resumable: the compressor's state cannot be carried to another
/// invocation, so such a job restarts from scratch instead.
pub struct GzCsvEncoder {
    csv: CsvEncoder,
    gz: GzEncoder<Vec<u8>>,
}

impl GzCsvEncoder {
    pub fn new(columns: Vec<Column>, opts: CsvOptions, level: u32) -> Self {
        let mut csv = CsvEncoder::new(columns, opts, true);
        let header = csv.take_buffered();
        let mut gz = GzEncoder::new(Vec::with_capacity(1 << 20), Compression::new(level));
        // Writing into a Vec cannot fail.
        let _ = gz.write_all(&header);
        Self { csv, gz }
    }
}

impl Encoder for GzCsvEncoder {
    fn write_rows(&mut self, rows: &[Row]) -> Result<(), EncodeError> {
        self.csv.write_rows(rows)?;
        let chunk = self.csv.take_buffered();
        self.gz.write_all(&chunk)?;
        Ok(())
    }

    fn buffered(&self) -> usize {
        self.gz.get_ref().len()
    }

    fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(self.gz.get_mut())
    }

    fn resumable(&self) -> bool {
        false
    }

    fn finish(self: Box<Self>) -> Result<Finished, EncodeError> {
        let tail = self.gz.finish()?;
        Ok(Finished {
            tail: Box::new(Cursor::new(tail)),
            sheets: 0,
            truncated_cells: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, ColumnType};
    use chrono::{DateTime, NaiveDate, Utc};
    use proptest::prelude::*;
    use std::io::Read;

    fn col(name: &str, ty: ColumnType) -> Column {
        Column {
            name: name.into(),
            ty,
            label: format!("{name} label"),
            source: name.into(),
            money: false,
        }
    }

    fn encode(columns: Vec<Column>, rows: &[Row], opts: CsvOptions) -> Vec<u8> {
        let mut e: Box<dyn Encoder> = Box::new(CsvEncoder::new(columns, opts, true));
        e.write_rows(rows).unwrap();
        let mut out = e.take_buffered();
        e.finish().unwrap().tail.read_to_end(&mut out).unwrap();
        out
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

    #[test]
    fn gzip_round_trips_to_the_same_csv() {
        let orders = Catalog::builtin().unwrap().get("orders").unwrap().clone();
        let rows: Vec<Row> = (0..5000)
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
        let plain = encode(orders.columns.clone(), &rows, CsvOptions::default());
        let mut gz: Box<dyn Encoder> = Box::new(GzCsvEncoder::new(
            orders.columns.clone(),
            CsvOptions::default(),
            1,
        ));
        let mut compressed = Vec::new();
        for chunk in rows.chunks(700) {
            gz.write_rows(chunk).unwrap();
            compressed.extend(gz.take_buffered());
        }
        gz.finish()
            .unwrap()
            .tail
            .read_to_end(&mut compressed)
            .unwrap();
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut unzipped)
            .unwrap();
        assert_eq!(unzipped, plain);
        assert!(compressed.len() < plain.len() / 3);
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
                let expected = if needs_neutralising(want) { format!("'{want}") } else { want.clone() };
                prop_assert_eq!(got, &expected);
            }
        }
    }
}
