//! XLSX written as a streaming ZIP straight into the upload's parts: nothing on disk, memory about
//! one part plus the encoder, and resumable at every part boundary.
//!
//! Each sheet is one ZIP entry (local header with a data descriptor, see [`super::zipstream`])
//! whose XML is produced row by row ([`cells`]) and deflated through [`Deflater`]. A cut ends the
//! deflate segment with a full flush, so a fresh compressor continues it in the next invocation;
//! the checkpoint ([`XlsxState`]) keeps the offsets, CRC-32 and sizes the container needs. A sheet
//! is closed when it is full (its XML tail with the autofilter, then its data descriptor) and the
//! next one starts. At the end, rust_xlsxwriter writes the rest of the workbook ([`twin`]) and the
//! central directory follows.
//!
//! Cells are typed:
//! - integers and decimals are numbers; money columns show `#,##0.00`, other decimals show the
//!   number of places their text had (`12.50` shows `12.50`), integers show General. A value with
//!   more than 15 significant digits would be silently rounded by Excel, so it is written as text.
//! - timestamps are Excel datetimes in the requested time zone (`yyyy-mm-dd hh:mm:ss`), dates are
//!   Excel dates (`yyyy-mm-dd`); values outside Excel's calendar (before 1900) are ISO text.
//! - booleans are booleans; nulls are empty cells, and so is empty text (a sheet has no empty
//!   text cell short of a formula).
//! - text is never a formula; text that would start one is neutralised with `'` as in CSV, and text
//!   beyond Excel's 32,767 characters is cut with a visible marker and counted. Control characters
//!   are escaped so the XML stays valid and they read back as they were.
//!
//! Sheets roll over to `name 2`, `name 3`, ... before `xlsx_rows_per_sheet` rows (header included),
//! and before a sheet's XML reaches 4 GB, so every ZIP entry fits 32-bit sizes; files beyond 4 GiB
//! get ZIP64 offsets in the central directory.

mod cells;
mod twin;

use chrono_tz::Tz;

use super::deflate::Deflater;
use super::zipstream::{EntryRecord, ZipWriter};
use super::{
    Cut, EncodeError, EncodeSettings, Encoder, FileInfo, Finished, XLSX_MAX_ROWS_PER_SHEET,
};
use crate::domain::Column;
use crate::domain::{EncoderState, Row, SheetEntry, XlsxState};
use cells::{Cells, Kind};
use twin::{sheet_entry_name, Layout, Template};

pub use cells::{MAX_CELL_CHARS, TRUNCATION_MARKER};

const MAX_SHEET_NAME: usize = 31;
/// Excel's column limit.
const MAX_COLUMNS: usize = 16_384;
/// A sheet's XML stays below this, so its entry's sizes fit the 32-bit fields (with room for
/// deflate's worst-case growth on incompressible text).
const MAX_SHEET_XML_BYTES: u64 = 4_000_000_000;
/// Sheet XML is handed to the compressor in pieces of about this size: large enough to keep calls
/// few, and fixed, so what the compressor sees depends on the rows only, not on the pages.
const XML_CHUNK: usize = 128 << 10;

/// A sheet Excel accepts: forbidden characters replaced, room left for ` 999`.
fn sheet_base_name(dataset: &str) -> String {
    let cleaned: String = dataset
        .chars()
        .map(|c| match c {
            '*' | '?' | ':' | '[' | ']' | '\\' | '/' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    let trimmed = cleaned.trim_matches('\'');
    let mut name = String::new();
    let mut units = 0;
    for ch in trimmed.chars() {
        if units + ch.len_utf16() > MAX_SHEET_NAME - 4 {
            break;
        }
        units += ch.len_utf16();
        name.push(ch);
    }
    // Excel reserves "History" (any case) for change tracking.
    if name.trim().is_empty() || name.eq_ignore_ascii_case("history") {
        "Sheet".into()
    } else {
        name
    }
}

/// The sheet being written.
struct OpenSheet {
    /// Where its local header starts.
    offset: u64,
    /// Compressed bytes of its earlier deflate segments.
    compressed: u64,
    /// Rows so far, header included.
    rows: u32,
}

pub struct XlsxEncoder {
    cells: Cells,
    template: Template,
    layout: Layout,
    header: Vec<u8>,
    rows_per_sheet: u32,
    max_sheet_bytes: u64,
    level: u32,
    zip: ZipWriter,
    /// Rows of each finished sheet, header included; their entries are in `zip`.
    finished_rows: Vec<u32>,
    open: OpenSheet,
    deflate: Deflater,
    /// Sheet XML not yet given to the compressor.
    xml: Vec<u8>,
}

impl XlsxEncoder {
    pub fn new(
        file: FileInfo<'_>,
        columns: Vec<Column>,
        settings: &EncodeSettings,
    ) -> Result<Self, EncodeError> {
        let mut enc = Self::build(file, &columns, settings, ZipWriter::new(0, Vec::new()))?;
        enc.open.offset = enc.zip.start_entry(&sheet_entry_name(1))?;
        enc.xml.extend_from_slice(&enc.template.first_prefix);
        enc.xml.extend_from_slice(&enc.header);
        Ok(enc)
    }

    /// Continues a file whose parts so far ended with `state`.
    pub fn resume(
        file: FileInfo<'_>,
        columns: Vec<Column>,
        settings: &EncodeSettings,
        state: &XlsxState,
    ) -> Result<Self, EncodeError> {
        let open = state.open;
        if open.rows == 0 || open.offset > state.written {
            return Err(EncodeError::Resume(format!(
                "an XLSX checkpoint with an impossible open sheet: {open:?}"
            )));
        }
        let entries = state
            .sheets
            .iter()
            .enumerate()
            .map(|(i, s)| EntryRecord {
                name: sheet_entry_name(i + 1),
                offset: s.offset,
                crc32: s.crc32,
                compressed: s.compressed,
                size: s.size,
            })
            .collect();
        let mut enc = Self::build(
            file,
            &columns,
            settings,
            ZipWriter::new(state.written, entries),
        )?;
        enc.finished_rows = state.sheets.iter().map(|s| s.rows).collect();
        enc.open = OpenSheet {
            offset: open.offset,
            compressed: open.compressed,
            rows: open.rows,
        };
        enc.deflate = Deflater::new(enc.level, open.crc32, open.size);
        enc.cells.truncated = state.truncated_cells;
        Ok(enc)
    }

    /// Everything but the position in the file.
    fn build(
        file: FileInfo<'_>,
        columns: &[Column],
        settings: &EncodeSettings,
        zip: ZipWriter,
    ) -> Result<Self, EncodeError> {
        if columns.is_empty() || columns.len() > MAX_COLUMNS {
            return Err(EncodeError::Xlsx(format!(
                "cannot write {} columns to a sheet",
                columns.len()
            )));
        }
        let level = settings.xlsx_zip_level.clamp(1, 9);
        let layout = Layout {
            base_name: sheet_base_name(&file.spec.dataset),
            columns: columns
                .iter()
                .map(|c| (Kind::of(c), Kind::of(c).width(&c.label)))
                .collect(),
            created_at: file.created_at,
            zip_level: level,
        };
        let template = Template::new(&layout)?;
        let tz: Tz = file.spec.tz.tz();
        Ok(Self {
            cells: Cells::new(columns, tz, &template.styles),
            header: Cells::header(columns, template.styles.header),
            template,
            layout,
            rows_per_sheet: settings
                .xlsx_rows_per_sheet
                .clamp(2, XLSX_MAX_ROWS_PER_SHEET),
            max_sheet_bytes: MAX_SHEET_XML_BYTES,
            level: u32::from(level),
            zip,
            finished_rows: Vec::new(),
            open: OpenSheet {
                offset: 0,
                compressed: 0,
                rows: 1,
            },
            deflate: Deflater::new(u32::from(level), 0, 0),
            xml: Vec::with_capacity(XML_CHUNK + (64 << 10)),
        })
    }

    fn write_row(&mut self, row: &Row) -> Result<(), EncodeError> {
        if self.open.rows >= self.rows_per_sheet {
            self.next_sheet()?;
        }
        let start = self.xml.len();
        let truncated = self.cells.truncated;
        self.cells.write_row(&mut self.xml, row, self.open.rows + 1);
        let sheet_bytes = self.deflate.length() + self.xml.len() as u64;
        if self.open.rows > 1
            && sheet_bytes + self.template.suffix_len() as u64 > self.max_sheet_bytes
        {
            // Written again on the next sheet: a cell after a gap names its row.
            self.xml.truncate(start);
            self.cells.truncated = truncated;
            self.next_sheet()?;
            self.cells.write_row(&mut self.xml, row, self.open.rows + 1);
        }
        self.open.rows += 1;
        if self.xml.len() >= XML_CHUNK {
            self.compress_xml()?;
        }
        Ok(())
    }

    fn compress_xml(&mut self) -> Result<(), EncodeError> {
        if !self.xml.is_empty() {
            self.deflate.write(&self.xml)?;
            self.xml.clear();
        }
        Ok(())
    }

    /// Ends the open sheet: its XML tail, the end of its deflate stream, its data descriptor.
    fn close_sheet(&mut self) -> Result<(), EncodeError> {
        self.template.push_suffix(&mut self.xml, self.open.rows);
        self.compress_xml()?;
        let deflate = std::mem::replace(&mut self.deflate, Deflater::new(self.level, 0, 0));
        let (crc32, size) = (deflate.crc32(), deflate.length());
        let last = deflate.finish()?;
        let compressed = self.open.compressed + last.len() as u64;
        self.zip.write(last);
        let number = self.finished_rows.len() + 1;
        self.zip.end_entry(
            &sheet_entry_name(number),
            self.open.offset,
            crc32,
            compressed,
            size,
        )?;
        self.finished_rows.push(self.open.rows);
        Ok(())
    }

    fn next_sheet(&mut self) -> Result<(), EncodeError> {
        self.close_sheet()?;
        let number = self.finished_rows.len() + 1;
        self.open = OpenSheet {
            offset: self.zip.start_entry(&sheet_entry_name(number))?,
            compressed: 0,
            rows: 1,
        };
        self.xml.extend_from_slice(&self.template.next_prefix);
        self.xml.extend_from_slice(&self.header);
        Ok(())
    }

    fn state(&self) -> XlsxState {
        let sheets = self
            .zip
            .entries()
            .iter()
            .zip(&self.finished_rows)
            .map(|(e, &rows)| SheetEntry {
                offset: e.offset,
                crc32: e.crc32,
                compressed: e.compressed,
                size: e.size,
                rows,
            })
            .collect();
        XlsxState {
            written: self.zip.position(),
            sheets,
            open: SheetEntry {
                offset: self.open.offset,
                crc32: self.deflate.crc32(),
                compressed: self.open.compressed,
                size: self.deflate.length(),
                rows: self.open.rows,
            },
            truncated_cells: self.cells.truncated,
        }
    }
}

impl Encoder for XlsxEncoder {
    fn write_rows(&mut self, rows: &[Row]) -> Result<(), EncodeError> {
        rows.iter().try_for_each(|r| self.write_row(r))
    }

    fn buffered(&self) -> usize {
        self.zip.buffered() + self.deflate.buffered()
    }

    fn cut(&mut self) -> Result<Cut, EncodeError> {
        self.compress_xml()?;
        let segment = self.deflate.cut()?;
        self.open.compressed += segment.len() as u64;
        let bytes = self.zip.take_with(segment);
        Ok(Cut {
            bytes,
            state: EncoderState::Xlsx(self.state()),
        })
    }

    fn finish(mut self: Box<Self>) -> Result<Finished, EncodeError> {
        self.close_sheet()?;
        let parts = twin::parts(&self.layout, &self.finished_rows, &self.template.styles)?;
        for p in parts {
            let offset = self.zip.start_entry(&p.name)?;
            let compressed = p.deflated.len() as u64;
            self.zip.write(p.deflated);
            self.zip
                .end_entry(&p.name, offset, p.crc32, compressed, p.size)?;
        }
        let sheets = self.finished_rows.len() as u32;
        let truncated_cells = self.cells.truncated;
        Ok(Finished {
            tail: self.zip.finish()?,
            sheets,
            truncated_cells,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Catalog, ColumnType};
    use crate::domain::{ExportSpec, Format, TimeZone, Value};
    use crate::encode::zipstream::tests::read_all as zip_entries;
    use calamine::{open_workbook_from_rs, Data, Reader, Xlsx};
    use chrono::{DateTime, NaiveDate, Utc};
    use std::collections::BTreeMap;
    use std::io::Cursor;

    fn col(name: &str, ty: ColumnType, money: bool) -> Column {
        Column {
            name: name.into(),
            ty,
            label: format!("{name} label"),
            source: name.into(),
            money,
        }
    }

    fn spec(dataset: &str, tz: Option<&str>) -> ExportSpec {
        ExportSpec {
            dataset: dataset.into(),
            format: Format::Xlsx,
            columns: Vec::new(),
            filters: BTreeMap::new(),
            from: None,
            to: None,
            tz: tz.map_or(TimeZone::UTC, |t| TimeZone::parse(t).unwrap()),
            bom: false,
            delimiter: Default::default(),
        }
    }

    fn settings(rows_per_sheet: u32) -> EncodeSettings {
        EncodeSettings {
            xlsx_rows_per_sheet: rows_per_sheet,
            ..EncodeSettings::default()
        }
    }

    fn created() -> DateTime<Utc> {
        utc("2024-05-06T07:08:09.5Z")
    }

    /// One run over `pages`: a part is cut whenever `part` bytes are buffered after a page, as
    /// the worker does. Starts afresh or from `resume` (the state after page `.0`).
    struct Run {
        file: Vec<u8>,
        /// After each cut: the page it followed, the file length there, the state.
        cuts: Vec<(usize, usize, XlsxState)>,
        finished: Finished,
    }

    fn run(
        spec: &ExportSpec,
        columns: &[Column],
        settings: &EncodeSettings,
        pages: &[Vec<Row>],
        part: usize,
        resume: Option<&(usize, usize, XlsxState)>,
        max_sheet_bytes: u64,
    ) -> Run {
        let file = FileInfo {
            spec,
            created_at: created(),
        };
        let (mut e, first_page, mut len) = match resume {
            None => (
                XlsxEncoder::new(file, columns.to_vec(), settings).unwrap(),
                0,
                0,
            ),
            Some((page, at, state)) => (
                XlsxEncoder::resume(file, columns.to_vec(), settings, state).unwrap(),
                page + 1,
                *at,
            ),
        };
        e.max_sheet_bytes = max_sheet_bytes;
        let mut out = Vec::new();
        let mut cuts = Vec::new();
        for (i, page) in pages.iter().enumerate().skip(first_page) {
            e.write_rows(page).unwrap();
            if e.buffered() >= part {
                let cut = e.cut().unwrap();
                len += cut.bytes.len();
                out.extend(cut.bytes);
                let EncoderState::Xlsx(state) = cut.state else {
                    panic!("not an xlsx state: {:?}", cut.state);
                };
                cuts.push((i, len, state));
            }
        }
        let finished = Box::new(e).finish().unwrap();
        out.extend_from_slice(&finished.tail);
        Run {
            file: out,
            cuts,
            finished,
        }
    }

    struct Book {
        sheets: Vec<(String, Vec<Vec<Data>>)>,
        formulas: usize,
        finished_sheets: u32,
        truncated: u64,
    }

    fn read_book(bytes: &[u8]) -> Vec<(String, Vec<Vec<Data>>)> {
        let mut book: Xlsx<_> = open_workbook_from_rs(Cursor::new(bytes)).unwrap();
        book.sheet_names()
            .into_iter()
            .map(|name| {
                let range = book.worksheet_range(&name).unwrap();
                assert_eq!(range.start(), Some((0, 0)));
                let rows = range.rows().map(<[Data]>::to_vec).collect();
                (name, rows)
            })
            .collect()
    }

    fn encode(columns: Vec<Column>, pages: &[Vec<Row>], tz: Tz, rows_per_sheet: u32) -> Book {
        let spec = spec("things", Some(tz.name()));
        let r = run(
            &spec,
            &columns,
            &settings(rows_per_sheet),
            pages,
            usize::MAX,
            None,
            MAX_SHEET_XML_BYTES,
        );
        let sheets = read_book(&r.file);
        let mut book: Xlsx<_> = open_workbook_from_rs(Cursor::new(r.file)).unwrap();
        let formulas = sheets
            .iter()
            .map(|(name, _)| {
                book.worksheet_formula(name)
                    .unwrap()
                    .used_cells()
                    .filter(|(_, _, f)| !f.is_empty())
                    .count()
            })
            .sum();
        Book {
            sheets,
            formulas,
            finished_sheets: r.finished.sheets,
            truncated: r.finished.truncated_cells,
        }
    }

    pub(super) fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    pub(super) fn ymd(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn datetime_parts(cell: &Data) -> (u16, u8, u8, u8, u8, u8, u16) {
        match cell {
            Data::DateTime(dt) => {
                assert!(dt.is_datetime());
                dt.to_ymd_hms_milli()
            }
            other => panic!("not a datetime: {other:?}"),
        }
    }

    fn all_types() -> Vec<Column> {
        vec![
            col("s", ColumnType::String, false),
            col("i", ColumnType::Integer, false),
            col("amount", ColumnType::Decimal, true),
            col("ratio", ColumnType::Decimal, false),
            col("b", ColumnType::Boolean, false),
            col("t", ColumnType::Timestamp, false),
            col("dt", ColumnType::Date, false),
        ]
    }

    #[test]
    fn every_type_reads_back_as_its_excel_type_in_the_time_zone() {
        let rows = vec![
            vec![
                Value::Str("héllo, \"world\"\nline".into()),
                Value::Int(-42),
                Value::Dec("1234.50".into()),
                Value::Dec("0.125".into()),
                Value::Bool(true),
                Value::Ts(utc("2024-07-01T10:00:00.250Z")),
                Value::Date(ymd(2024, 2, 29)),
            ],
            vec![Value::Null; 7],
            vec![
                Value::Str("null".into()),
                Value::Int(1_234_567_890_123_456_789),
                Value::Dec("-0.01".into()),
                Value::Dec("12345678901234567.5".into()),
                Value::Bool(false),
                Value::Ts(utc("2024-01-15T23:30:00Z")),
                Value::Date(ymd(1899, 1, 1)),
            ],
        ];
        let book = encode(all_types(), &[rows], chrono_tz::Europe::Paris, 100);
        assert_eq!(book.finished_sheets, 1);
        assert_eq!(book.truncated, 0);
        assert_eq!(book.formulas, 0);
        let (name, cells) = &book.sheets[0];
        assert_eq!(name, "things");
        assert_eq!(cells.len(), 4);

        let header: Vec<Data> = ["s", "i", "amount", "ratio", "b", "t", "dt"]
            .iter()
            .map(|n| Data::String(format!("{n} label")))
            .collect();
        assert_eq!(cells[0], header);

        let r = &cells[1];
        assert_eq!(r[0], Data::String("héllo, \"world\"\nline".into()));
        assert_eq!(r[1], Data::Float(-42.0));
        assert_eq!(r[2], Data::Float(1234.5));
        assert_eq!(r[3], Data::Float(0.125));
        assert_eq!(r[4], Data::Bool(true));
        // 10:00 UTC is noon in Paris in summer.
        assert_eq!(datetime_parts(&r[5]), (2024, 7, 1, 12, 0, 0, 250));
        assert_eq!(datetime_parts(&r[6]), (2024, 2, 29, 0, 0, 0, 0));

        assert!(
            cells[2].iter().all(|c| *c == Data::Empty),
            "nulls are empty cells: {:?}",
            cells[2]
        );

        let r = &cells[3];
        assert_eq!(
            r[0],
            Data::String("null".into()),
            "only a real text says null"
        );
        // Beyond Excel's 15 digits numbers stay exact as text instead of being rounded.
        assert_eq!(r[1], Data::String("1234567890123456789".into()));
        assert_eq!(r[2], Data::Float(-0.01));
        assert_eq!(r[3], Data::String("12345678901234567.5".into()));
        assert_eq!(r[4], Data::Bool(false));
        // Winter: UTC+1, so the next day locally.
        assert_eq!(datetime_parts(&r[5]), (2024, 1, 16, 0, 30, 0, 0));
        // Before Excel's calendar: ISO text, as in CSV.
        assert_eq!(r[6], Data::String("1899-01-01".into()));
    }

    #[test]
    fn gaps_keep_every_cell_in_its_column() {
        let cols = vec![
            col("a", ColumnType::String, false),
            col("b", ColumnType::Integer, false),
            col("c", ColumnType::String, false),
            col("d", ColumnType::Integer, false),
        ];
        let s = |t: &str| Value::Str(t.into());
        let rows = vec![
            vec![Value::Null, Value::Int(1), Value::Null, Value::Int(2)],
            vec![s(""), Value::Null, s("x"), Value::Null],
            vec![s("a"), Value::Null, Value::Null, Value::Int(3)],
        ];
        let book = encode(cols, &[rows], chrono_tz::UTC, 100);
        let cells = &book.sheets[0].1;
        let e = Data::Empty;
        let f = Data::Float;
        let t = |v: &str| Data::String(v.into());
        assert_eq!(cells[1], vec![e.clone(), f(1.0), e.clone(), f(2.0)]);
        assert_eq!(cells[2], vec![e.clone(), e.clone(), t("x"), e.clone()]);
        assert_eq!(cells[3], vec![t("a"), e.clone(), e, f(3.0)]);
    }

    #[test]
    fn control_characters_markup_and_spaces_read_back_as_written() {
        let cols = vec![col("s", ColumnType::String, false)];
        let texts = [
            "a\u{0}b\u{1}c\u{8}d\u{b}e\u{c}f\u{1f}g",
            "x\ry",
            "<tag attr=\"v\">&amp;</tag>",
            "literal _x0041_ stays",
            "non-characters \u{FFFE} \u{FFFF}",
            "  leading and trailing  ",
            "\nline first",
            "tab last\t",
        ];
        let rows: Vec<Row> = texts
            .iter()
            .map(|t| vec![Value::Str(t.to_string())])
            .collect();
        let book = encode(cols, &[rows], chrono_tz::UTC, 100);
        let cells = &book.sheets[0].1;
        for (row, text) in cells[1..].iter().zip(texts) {
            assert_eq!(row[0], Data::String(text.to_string()), "{text:?}");
        }
    }

    #[test]
    fn timestamps_in_utc_and_far_dates_keep_their_value() {
        let cols = vec![
            col("t", ColumnType::Timestamp, false),
            col("d", ColumnType::Date, false),
        ];
        let rows = vec![
            vec![
                Value::Ts(utc("1999-12-31T23:59:59Z")),
                Value::Date(ymd(1900, 1, 1)),
            ],
            vec![
                Value::Ts(utc("2038-01-19T03:14:07Z")),
                Value::Date(ymd(9999, 12, 31)),
            ],
        ];
        let book = encode(cols, &[rows], chrono_tz::UTC, 100);
        let cells = &book.sheets[0].1;
        assert_eq!(datetime_parts(&cells[1][0]), (1999, 12, 31, 23, 59, 59, 0));
        assert_eq!(datetime_parts(&cells[1][1]), (1900, 1, 1, 0, 0, 0, 0));
        assert_eq!(datetime_parts(&cells[2][0]), (2038, 1, 19, 3, 14, 7, 0));
        assert_eq!(datetime_parts(&cells[2][1]), (9999, 12, 31, 0, 0, 0, 0));
    }

    #[test]
    fn formula_starts_are_text_with_the_quote_prefix_and_numbers_are_not_touched() {
        let cols = vec![
            col("s", ColumnType::String, false),
            col("i", ColumnType::Integer, false),
        ];
        let starts = [
            "=HYPERLINK(\"http://x\",\"y\")",
            "+1",
            "-1",
            "@SUM(A1)",
            "\tx",
            "\rx",
        ];
        let rows: Vec<Row> = starts
            .iter()
            .map(|s| vec![Value::Str(s.to_string()), Value::Int(-1)])
            .collect();
        let book = encode(cols, &[rows], chrono_tz::UTC, 100);
        assert_eq!(book.formulas, 0);
        let cells = &book.sheets[0].1;
        for (row, original) in cells[1..].iter().zip(starts) {
            assert_eq!(row[0], Data::String(format!("'{original}")));
            assert_eq!(row[1], Data::Float(-1.0));
        }
    }

    #[test]
    fn rows_roll_over_to_numbered_sheets_each_with_its_header() {
        let cols = vec![
            col("n", ColumnType::Integer, false),
            col("s", ColumnType::String, false),
        ];
        let header = vec![
            Data::String("n label".into()),
            Data::String("s label".into()),
        ];
        let rows = |n: i64| -> Vec<Row> {
            (0..n)
                .map(|i| vec![Value::Int(i), Value::Str(format!("r{i}"))])
                .collect()
        };
        // Header + 3 rows fill the sheet exactly.
        let book = encode(cols.clone(), &[rows(3)], chrono_tz::UTC, 4);
        assert_eq!(book.finished_sheets, 1);
        assert_eq!(book.sheets.len(), 1);
        assert_eq!(book.sheets[0].0, "things");
        assert_eq!(book.sheets[0].1.len(), 4);

        // One more row starts a second sheet, also when it comes in another page.
        for pages in [vec![rows(4)], vec![rows(3), rows(4)[3..].to_vec()]] {
            let book = encode(cols.clone(), &pages, chrono_tz::UTC, 4);
            assert_eq!(book.finished_sheets, 2);
            let names: Vec<&str> = book.sheets.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["things", "things 2"]);
            assert_eq!(book.sheets[0].1[0], header);
            assert_eq!(book.sheets[0].1[3][0], Data::Float(2.0));
            assert_eq!(
                book.sheets[1].1,
                vec![
                    header.clone(),
                    vec![Data::Float(3.0), Data::String("r3".into())]
                ]
            );
        }

        // A page spanning several sheets keeps the order.
        let book = encode(cols, &[rows(7)], chrono_tz::UTC, 4);
        assert_eq!(book.finished_sheets, 3);
        let firsts: Vec<&Data> = book.sheets.iter().map(|(_, r)| &r[1][0]).collect();
        assert_eq!(
            firsts,
            [&Data::Float(0.0), &Data::Float(3.0), &Data::Float(6.0)]
        );
        assert_eq!(book.sheets[2].0, "things 3");
    }

    #[test]
    fn an_empty_export_is_a_header_only_sheet() {
        let cols = vec![col("n", ColumnType::Integer, false)];
        let book = encode(cols, &[], chrono_tz::UTC, 4);
        assert_eq!(book.finished_sheets, 1);
        assert_eq!(book.sheets[0].1, vec![vec![Data::String("n label".into())]]);
    }

    #[test]
    fn text_beyond_excels_limit_is_cut_with_a_marker_and_counted() {
        let cols = vec![col("s", ColumnType::String, false)];
        let long = "a".repeat(40_000);
        // Emoji take two UTF-16 units each: the limit is in those units.
        let wide = "😀".repeat(20_000);
        let neutralised = format!("={}", "b".repeat(40_000));
        let fits = "c".repeat(MAX_CELL_CHARS);
        let rows = vec![
            vec![Value::Str(long)],
            vec![Value::Str(wide)],
            vec![Value::Str(neutralised)],
            vec![Value::Str(fits.clone())],
        ];
        let book = encode(cols, &[rows], chrono_tz::UTC, 100);
        assert_eq!(book.truncated, 3);
        let cells = &book.sheets[0].1;
        for (row, first) in cells[1..4].iter().zip(["a", "😀", "'="]) {
            let Data::String(s) = &row[0] else {
                panic!("not text: {:?}", row[0]);
            };
            assert!(s.starts_with(first), "{}", &s[..10]);
            assert!(s.ends_with(TRUNCATION_MARKER));
            let units = cells::utf16_len(s);
            assert!(
                (MAX_CELL_CHARS - 1..=MAX_CELL_CHARS).contains(&units),
                "{units}"
            );
        }
        assert_eq!(cells[4][0], Data::String(fits));
    }

    /// Deterministic `orders` rows with every type, nulls, text needing escapes and formula starts.
    fn orders_pages(rows: usize, page: usize) -> (Vec<Column>, Vec<Vec<Row>>) {
        let orders = Catalog::builtin().unwrap().get("orders").unwrap().clone();
        let start = utc("2024-03-30T22:00:00Z");
        let all: Vec<Row> = (0..rows)
            .map(|i| {
                orders
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(c, col)| match (col.ty, (i + c) % 7) {
                        (_, 6) => Value::Null,
                        (ColumnType::Integer, _) => Value::Int(i as i64 * 37 - 500),
                        (ColumnType::Decimal, _) => Value::Dec(format!("{}.{:02}", i, i % 100)),
                        (ColumnType::Boolean, _) => Value::Bool(i % 2 == 0),
                        (ColumnType::Timestamp, _) => {
                            Value::Ts(start + chrono::Duration::minutes(i as i64 * 13))
                        }
                        (ColumnType::Date, _) => {
                            Value::Date(ymd(2024, 1, 1) + chrono::Duration::days(i as i64 % 400))
                        }
                        (ColumnType::String, 0) => Value::Str(format!("=cmd|{i}")),
                        (ColumnType::String, 1) => Value::Str(format!("<b>&{i}</b>\r\n")),
                        (ColumnType::String, _) => Value::Str(format!("text {i} of {c}")),
                    })
                    .collect()
            })
            .collect();
        (
            orders.columns.clone(),
            all.chunks(page).map(<[Row]>::to_vec).collect(),
        )
    }

    /// Small parts, so that a few thousand rows make many.
    const PART: usize = 1500;

    fn data_rows(book: &[(String, Vec<Vec<Data>>)]) -> usize {
        book.iter().map(|(_, rows)| rows.len() - 1).sum()
    }

    fn assert_resumes_identically(rows_per_sheet: u32, max_sheet_bytes: u64) -> Run {
        let (columns, pages) = orders_pages(3000, 100);
        let spec = spec("orders", Some("Europe/Paris"));
        let s = settings(rows_per_sheet);
        let whole = run(&spec, &columns, &s, &pages, PART, None, max_sheet_bytes);
        assert!(whole.cuts.len() >= 6, "{} cuts", whole.cuts.len());
        for (n, cut) in whole.cuts.iter().enumerate() {
            // Through JSON, as the checkpoint stores it.
            let state: EncoderState = serde_json::from_str(
                &serde_json::to_string(&EncoderState::Xlsx(cut.2.clone())).unwrap(),
            )
            .unwrap();
            let EncoderState::Xlsx(state) = state else {
                panic!("{state:?}");
            };
            let from = (cut.0, cut.1, state);
            let rest = run(
                &spec,
                &columns,
                &s,
                &pages,
                PART,
                Some(&from),
                max_sheet_bytes,
            );
            assert_eq!(
                rest.cuts[..],
                whole.cuts[n + 1..],
                "cut points after cut {n}"
            );
            let mut joined = whole.file[..cut.1].to_vec();
            joined.extend(rest.file);
            assert!(
                joined == whole.file,
                "resumed after cut {n} (page {})",
                cut.0
            );
        }
        whole
    }

    #[test]
    fn resumed_from_every_cut_the_file_is_byte_identical_across_sheets() {
        let whole = assert_resumes_identically(700, MAX_SHEET_XML_BYTES);
        assert_eq!(whole.finished.sheets, 5);
        // Some cuts fall in later sheets, after finished ones.
        assert!(whole.cuts.iter().any(|c| c.2.sheets.len() >= 3));
        let book = read_book(&whole.file);
        let names: Vec<&str> = book.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["orders", "orders 2", "orders 3", "orders 4", "orders 5"]
        );
        assert_eq!(data_rows(&book), 3000);
    }

    #[test]
    fn a_sheet_rolls_over_before_its_xml_outgrows_a_zip_entry() {
        let whole = assert_resumes_identically(XLSX_MAX_ROWS_PER_SHEET, 200_000);
        assert!(whole.finished.sheets >= 4, "{}", whole.finished.sheets);
        let entries = zip_entries(&whole.file);
        for (name, data) in &entries {
            if name.starts_with("xl/worksheets/") {
                assert!(data.len() <= 200_000, "{name}: {}", data.len());
            }
        }
        assert_eq!(data_rows(&read_book(&whole.file)), 3000);
    }

    /// The text of entry `name` of a ZIP archive.
    fn entry_text(zip: &[u8], name: &str) -> String {
        let (_, data) = zip_entries(zip)
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap();
        String::from_utf8(data).unwrap()
    }

    /// 1,000 `orders` rows on sheets of 400 rows: three sheets, the last of 203.
    fn three_sheets(part: usize) -> (ExportSpec, Vec<Column>, Run) {
        let (columns, pages) = orders_pages(1000, 100);
        let spec = spec("orders", None);
        let r = run(
            &spec,
            &columns,
            &settings(400),
            &pages,
            part,
            None,
            MAX_SHEET_XML_BYTES,
        );
        (spec, columns, r)
    }

    #[test]
    fn the_zip_is_intact_and_holds_a_complete_workbook() {
        let (_, _, r) = three_sheets(2048);
        let names: Vec<String> = zip_entries(&r.file).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "xl/worksheets/sheet1.xml",
                "xl/worksheets/sheet2.xml",
                "xl/worksheets/sheet3.xml",
                "[Content_Types].xml",
                "_rels/.rels",
                "xl/_rels/workbook.xml.rels",
                "xl/theme/theme1.xml",
                "xl/styles.xml",
                "xl/workbook.xml",
                "docProps/core.xml",
                "docProps/app.xml",
            ]
        );
        let text = |name| entry_text(&r.file, name);
        // The job's creation time, to the second, and nothing from the clock.
        let core = text("docProps/core.xml");
        assert!(
            core.contains(">2024-05-06T07:08:09Z</dcterms:created>"),
            "{core}"
        );
        assert!(
            core.contains(">2024-05-06T07:08:09Z</dcterms:modified>"),
            "{core}"
        );
        let workbook = text("xl/workbook.xml");
        assert!(
            workbook.contains("'orders 3'!$A$1:$L$203</definedName>"),
            "{workbook}"
        );
        assert!(
            workbook.contains("orders!$A$1:$L$400</definedName>"),
            "{workbook}"
        );
        // Same bytes every run: nothing in the workbook depends on the clock.
        let (_, _, again) = three_sheets(2048);
        assert!(again.file == r.file);
    }

    /// `s="N"` -> (number format, bold) from styles.xml.
    fn cell_formats(styles: &str) -> Vec<(String, bool)> {
        let attr = |tag: &str, name: &str| -> Option<String> {
            let tag = format!(" {tag}");
            let (_, rest) = tag.split_once(&format!(" {name}=\""))?;
            Some(rest.split('"').next()?.to_string())
        };
        let section = |name: &str| {
            let start = styles.find(&format!("<{name}")).unwrap();
            let end = styles.find(&format!("</{name}>")).unwrap();
            &styles[start..end]
        };
        let codes: BTreeMap<String, String> = section("numFmts")
            .split("<numFmt ")
            .skip(1)
            .map(|t| (attr(t, "numFmtId").unwrap(), attr(t, "formatCode").unwrap()))
            .collect();
        let bold: Vec<bool> = section("fonts")
            .split("<font>")
            .skip(1)
            .map(|f| f.contains("<b/>"))
            .collect();
        section("cellXfs")
            .split("<xf ")
            .skip(1)
            .map(|t| {
                let id = attr(t, "numFmtId").unwrap();
                let code = codes
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| format!("builtin {id}"));
                let font: usize = attr(t, "fontId").unwrap().parse().unwrap();
                (code, bold[font])
            })
            .collect()
    }

    #[test]
    fn style_ids_in_the_sheet_are_the_formats_in_styles_xml() {
        let rows = vec![vec![
            Value::Str("x".into()),
            Value::Int(5),
            Value::Dec("1234.50".into()),
            Value::Dec("0.125".into()),
            Value::Bool(true),
            Value::Ts(utc("2024-07-01T10:00:00Z")),
            Value::Date(ymd(2024, 2, 29)),
        ]];
        let spec = spec("things", None);
        let r = run(
            &spec,
            &all_types(),
            &settings(100),
            &[rows],
            usize::MAX,
            None,
            MAX_SHEET_XML_BYTES,
        );
        let text = |name| entry_text(&r.file, name);
        let formats = cell_formats(&text("xl/styles.xml"));
        let sheet = text("xl/worksheets/sheet1.xml");
        let rows: Vec<&str> = sheet.split("<row>").skip(1).collect();
        let styles_of = |row: &str| -> Vec<Option<(String, bool)>> {
            row.split("<c")
                .skip(1)
                .map(|c| {
                    let tag = &c[..c.find('>').unwrap()];
                    tag.split_once(" s=\"").map(|(_, s)| {
                        let id: usize = s.split('"').next().unwrap().parse().unwrap();
                        formats[id].clone()
                    })
                })
                .collect()
        };
        assert!(styles_of(rows[0])
            .iter()
            .all(|s| s.as_ref().is_some_and(|(_, bold)| *bold)));
        let f = |code: &str| Some((code.to_string(), false));
        assert_eq!(
            styles_of(rows[1]),
            [
                None,
                None,
                f("#,##0.00"),
                f("0.000"),
                None,
                f("yyyy-mm-dd hh:mm:ss"),
                f("yyyy-mm-dd")
            ]
        );
    }

    /// The XML around the rows was taken from a two-sheet twin at the start; rust_xlsxwriter
    /// writes the same around the rows of the final workbook's sheets.
    #[test]
    fn sheet_xml_around_the_rows_is_what_rust_xlsxwriter_writes() {
        let (spec, columns, r) = three_sheets(usize::MAX);
        let e = XlsxEncoder::new(
            FileInfo {
                spec: &spec,
                created_at: created(),
            },
            columns,
            &settings(400),
        )
        .unwrap();
        let twin = twin::build(&e.layout, &[400, 400, 203]).unwrap();
        for n in 1..=3 {
            let name = twin::sheet_entry_name(n);
            let (prefix, suffix) = twin::split_sheet(&entry_text(&twin, &name)).unwrap();
            let sheet = entry_text(&r.file, &name);
            assert!(
                sheet.starts_with(&prefix),
                "{name}: {}",
                &sheet[..prefix.len()]
            );
            assert!(
                sheet.ends_with(&suffix),
                "{name}: {}",
                &sheet[sheet.len() - suffix.len()..]
            );
            assert!(!sheet.contains("<dimension"));
        }
    }

    #[test]
    fn sheet_names_are_made_acceptable_to_excel() {
        assert_eq!(sheet_base_name("orders"), "orders");
        assert_eq!(sheet_base_name("a/b[c]"), "a_b_c_");
        assert_eq!(sheet_base_name("'x'"), "x");
        assert_eq!(sheet_base_name(""), "Sheet");
        assert_eq!(sheet_base_name("History"), "Sheet");
        assert_eq!(sheet_base_name("tab\there"), "tab_here");
        assert_eq!(sheet_base_name(&"n".repeat(40)).len(), 27);
    }
}
