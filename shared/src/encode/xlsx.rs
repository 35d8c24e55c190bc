//! XLSX through `rust_xlsxwriter` in constant-memory mode: each row goes to the worksheet's temp
//! file as soon as the next one starts, so memory does not grow with the row count; the zip is
//! built at [`Encoder::finish`] into another temp file that the caller streams out.
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
//!   beyond Excel's 32,767 characters is cut with a visible marker and counted.
//!
//! Temp files are anonymous (`O_TMPFILE` or created-then-unlinked): the kernel frees them when the
//! last handle closes, so no path leaks on success, on error, on a dropped encoder or a crash.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use rust_xlsxwriter::{ColNum, Format, RowNum, Workbook, Worksheet, XlsxError};

use super::text::{needs_neutralising, push_date, push_timestamp, NEUTRALISING_PREFIX};
use super::{EncodeError, EncodeSettings, Encoder, Finished, XLSX_MAX_ROWS_PER_SHEET};
use crate::catalog::{Column, ColumnType};
use crate::domain::{Row, Value};

/// An export does not start with less free temporary space than this.
pub const MIN_FREE_TMP_BYTES: u64 = 64 << 20;
/// While rows are written, the encoder stops before the disk is this full: the spreadsheet writer
/// panics on a failed write, so it must not get there.
const RUNNING_RESERVE_BYTES: u64 = 16 << 20;
/// Excel's cell text limit, in UTF-16 units.
pub const MAX_CELL_CHARS: usize = 32_767;
pub const TRUNCATION_MARKER: &str = "…[truncated]";
/// Excel shows 15 significant digits; beyond that a number would change silently.
const MAX_NUMBER_DIGITS: usize = 15;
const MAX_SHEET_NAME: usize = 31;

/// Staged sheet XML per cell and per row: about 45 bytes of markup a cell plus its text, so 684
/// bytes a row for 12 filled `orders` columns (the bench's rows, with most notes and a quarter of
/// ship dates empty, stage 547 MB per million). The zipped output is written at the end while the
/// staged sheets still exist; zip level 1 makes it about a fifth of the XML, so a quarter is kept.
const STAGED_BYTES_PER_CELL: u64 = 52;
const STAGED_BYTES_PER_ROW: u64 = 60;
const ZIPPED_FRACTION_DIVISOR: u64 = 4;
const FIXED_OVERHEAD_BYTES: u64 = 1 << 20;

/// Temporary space an XLSX export of `rows` rows by `columns` columns needs at its peak (the
/// staged sheets plus the zipped file), about 680 MB staged per million `orders` rows. The worker
/// compares it with the free space to refuse an export that cannot fit.
pub fn estimate_tmp_bytes(rows: u64, columns: usize) -> u64 {
    let per_row = STAGED_BYTES_PER_ROW + STAGED_BYTES_PER_CELL * columns as u64;
    let staged = rows.saturating_mul(per_row);
    staged
        .saturating_add(staged / ZIPPED_FRACTION_DIVISOR)
        .saturating_add(FIXED_OVERHEAD_BYTES)
}

/// Free bytes for an unprivileged writer in `dir`; `None` when it cannot be told.
pub fn free_tmp_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::fs::statvfs(dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// How a column's cells are shown; the column format carries the number format so cells of the
/// expected type are written without a per-cell format lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Integer,
    Money,
    Decimal,
    Boolean,
    Timestamp,
    Date,
}

impl Kind {
    fn of(c: &Column) -> Self {
        match c.ty {
            ColumnType::String => Self::Text,
            ColumnType::Integer if c.money => Self::Money,
            ColumnType::Integer => Self::Integer,
            ColumnType::Decimal if c.money => Self::Money,
            ColumnType::Decimal => Self::Decimal,
            ColumnType::Boolean => Self::Boolean,
            ColumnType::Timestamp => Self::Timestamp,
            ColumnType::Date => Self::Date,
        }
    }

    /// Width in characters: enough for the label (plus the filter button) and a typical value.
    fn width(self, label: &str) -> f64 {
        let value = match self {
            Self::Text => 16,
            Self::Integer => 10,
            Self::Money | Self::Decimal => 14,
            Self::Boolean => 8,
            Self::Timestamp => 20,
            Self::Date => 12,
        };
        let label = label.chars().count() + 4;
        label.max(value).min(60) as f64
    }
}

/// The formats of a workbook, created once.
struct Formats {
    header: Format,
    /// Overrides a column format for a value that does not match its column.
    general: Format,
    money: Format,
    timestamp: Format,
    date: Format,
    /// `0.0`, `0.00`, ... by number of decimal places, for non-money decimals.
    places: Vec<Format>,
}

impl Formats {
    fn new() -> Self {
        Self {
            header: Format::new().set_bold(),
            general: Format::new().set_num_format("General"),
            money: Format::new().set_num_format("#,##0.00"),
            timestamp: Format::new().set_num_format("yyyy-mm-dd hh:mm:ss"),
            date: Format::new().set_num_format("yyyy-mm-dd"),
            places: (1..=MAX_NUMBER_DIGITS)
                .map(|n| Format::new().set_num_format(format!("0.{}", "0".repeat(n))))
                .collect(),
        }
    }

    fn column(&self, kind: Kind) -> Option<&Format> {
        match kind {
            Kind::Money => Some(&self.money),
            Kind::Timestamp => Some(&self.timestamp),
            Kind::Date => Some(&self.date),
            _ => None,
        }
    }
}

/// Everything a row needs besides the worksheet, so both can be borrowed at once.
struct Cells {
    kinds: Vec<Kind>,
    tz: Tz,
    formats: Formats,
    truncated: u64,
}

impl Cells {
    fn write_row(&mut self, ws: &mut Worksheet, r: RowNum, row: &Row) -> Result<(), XlsxError> {
        for (i, v) in row.iter().enumerate() {
            let c = i as ColNum;
            let kind = self.kinds.get(i).copied().unwrap_or(Kind::Text);
            match v {
                Value::Null => {}
                Value::Str(s) => {
                    let (text, cut) = cell_text(s);
                    self.truncated += u64::from(cut);
                    ws.write_string(r, c, text)?;
                }
                Value::Int(n) => {
                    if n.unsigned_abs() < 10u64.pow(MAX_NUMBER_DIGITS as u32) {
                        self.number(ws, r, c, kind, Kind::Integer, *n as f64)?;
                    } else {
                        ws.write_string(r, c, n.to_string())?;
                    }
                }
                Value::Dec(s) => match decimal(s) {
                    Some((x, places)) if kind == Kind::Decimal && places > 0 => {
                        ws.write_number_with_format(r, c, x, &self.formats.places[places - 1])?;
                    }
                    Some((x, _)) => self.number(ws, r, c, kind, Kind::Decimal, x)?,
                    None => {
                        ws.write_string(r, c, s.as_str())?;
                    }
                },
                Value::Bool(b) => {
                    ws.write_boolean(r, c, *b)?;
                }
                Value::Ts(t) => match timestamp_serial(*t, self.tz) {
                    Some(x) => self.number(ws, r, c, kind, Kind::Timestamp, x)?,
                    None => {
                        let mut out = Vec::with_capacity(32);
                        push_timestamp(&mut out, *t, self.tz);
                        ws.write_string(r, c, String::from_utf8_lossy(&out))?;
                    }
                },
                Value::Date(d) => match date_serial(*d) {
                    Some(x) => self.number(ws, r, c, kind, Kind::Date, f64::from(x))?,
                    None => {
                        let mut out = Vec::with_capacity(16);
                        push_date(&mut out, *d);
                        ws.write_string(r, c, String::from_utf8_lossy(&out))?;
                    }
                },
            }
        }
        Ok(())
    }

    /// A number shown the way `wanted` says: through the column format when the column is of that
    /// kind (no per-cell format lookup), with its own format when the value does not match it.
    fn number(
        &self,
        ws: &mut Worksheet,
        r: RowNum,
        c: ColNum,
        kind: Kind,
        wanted: Kind,
        x: f64,
    ) -> Result<(), XlsxError> {
        let numeric = |k| matches!(k, Kind::Integer | Kind::Decimal | Kind::Money);
        let fits_column = kind == wanted || (numeric(kind) && numeric(wanted));
        let column_format = self.formats.column(kind);
        if fits_column || column_format.is_none() && self.formats.column(wanted).is_none() {
            ws.write_number(r, c, x)?;
        } else {
            let f = self.formats.column(wanted).unwrap_or(&self.formats.general);
            ws.write_number_with_format(r, c, x, f)?;
        }
        Ok(())
    }
}

/// Text as it goes into a cell: neutralised, and cut to Excel's limit with a visible marker.
/// The flag says whether it was cut.
fn cell_text(s: &str) -> (Cow<'_, str>, bool) {
    let neutralise = needs_neutralising(s);
    let extra = usize::from(neutralise);
    // UTF-16 never needs more units than UTF-8 has bytes, so short text needs no counting.
    if s.len() + extra <= MAX_CELL_CHARS || utf16_len(s) + extra <= MAX_CELL_CHARS {
        return if neutralise {
            let mut t = String::with_capacity(s.len() + 1);
            t.push(NEUTRALISING_PREFIX);
            t.push_str(s);
            (Cow::Owned(t), false)
        } else {
            (Cow::Borrowed(s), false)
        };
    }
    let budget = MAX_CELL_CHARS - extra - utf16_len(TRUNCATION_MARKER);
    let mut used = 0;
    let mut end = 0;
    for (i, ch) in s.char_indices() {
        if used + ch.len_utf16() > budget {
            break;
        }
        used += ch.len_utf16();
        end = i + ch.len_utf8();
    }
    let mut t = String::with_capacity(end + extra + TRUNCATION_MARKER.len());
    if neutralise {
        t.push(NEUTRALISING_PREFIX);
    }
    t.push_str(&s[..end]);
    t.push_str(TRUNCATION_MARKER);
    (Cow::Owned(t), true)
}

fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// The value of decimal text and its number of decimal places, or `None` when it is not plain
/// decimal text or has more significant digits than Excel keeps.
fn decimal(s: &str) -> Option<(f64, usize)> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let int = int.trim_start_matches('0');
    let significant = if int.is_empty() {
        frac.trim_start_matches('0').trim_end_matches('0').len()
    } else {
        int.len() + frac.trim_end_matches('0').len()
    };
    if significant > MAX_NUMBER_DIGITS {
        return None;
    }
    let x: f64 = s.parse().ok()?;
    x.is_finite()
        .then_some((x, frac.len().min(MAX_NUMBER_DIGITS)))
}

/// Days from 0001-01-01 to 1899-12-30, the day Excel's serial 0 falls on for dates from March 1900.
const EXCEL_EPOCH_DAYS_FROM_CE: i32 = 693_594;
/// Serial of 10000-01-01: Excel's calendar ends the day before.
const EXCEL_END_SERIAL: i32 = 2_958_466;

/// Excel's serial day of `d` (1900 date system), `None` outside Excel's calendar.
fn date_serial(d: NaiveDate) -> Option<i32> {
    let serial = d.num_days_from_ce() - EXCEL_EPOCH_DAYS_FROM_CE;
    match serial {
        // Excel counts the 29th of February 1900 that never was, so earlier days are one less.
        2..=60 => Some(serial - 1),
        61.. if serial < EXCEL_END_SERIAL => Some(serial),
        _ => None,
    }
}

fn timestamp_serial(t: DateTime<Utc>, tz: Tz) -> Option<f64> {
    let local: NaiveDateTime = if tz == chrono_tz::UTC {
        t.naive_utc()
    } else {
        t.naive_utc() + tz.offset_from_utc_datetime(&t.naive_utc()).fix()
    };
    let day = date_serial(local.date())?;
    let secs = f64::from(local.num_seconds_from_midnight())
        + f64::from(local.nanosecond() % 1_000_000_000) / 1e9;
    Some(f64::from(day) + secs / 86_400.0)
}

/// A sheet name Excel accepts: forbidden characters replaced, room left for ` 999`.
fn sheet_base_name(dataset: &str) -> String {
    let cleaned: String = dataset
        .chars()
        .map(|c| match c {
            '*' | '?' | ':' | '[' | ']' | '\\' | '/' => '_',
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
    if name.trim().is_empty() {
        "Sheet".into()
    } else {
        name
    }
}

/// Refuses to start an export in a temp directory with less than [`MIN_FREE_TMP_BYTES`] free.
fn require_free(dir: &Path, free: Option<u64>) -> Result<(), EncodeError> {
    match free {
        Some(free) if free < MIN_FREE_TMP_BYTES => Err(EncodeError::NoSpace(format!(
            "{} has {} MiB free, an XLSX export needs at least {} MiB",
            dir.display(),
            free >> 20,
            MIN_FREE_TMP_BYTES >> 20
        ))),
        _ => Ok(()),
    }
}

fn xlsx_error(e: XlsxError) -> EncodeError {
    match e {
        XlsxError::IoError(io) | XlsxError::TempFileError(_, io) => io_error(io),
        other => EncodeError::Xlsx(other.to_string()),
    }
}

fn io_error(e: std::io::Error) -> EncodeError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        EncodeError::NoSpace(format!("temporary directory is full: {e}"))
    } else {
        EncodeError::Io(e)
    }
}

pub struct XlsxEncoder {
    workbook: Workbook,
    cells: Cells,
    headers: Vec<String>,
    base_name: String,
    tmp_dir: PathBuf,
    rows_per_sheet: u32,
    /// Sheets created so far; the last one is being written.
    sheets: u32,
    /// Next row of the current sheet (0 is its header).
    row: RowNum,
    /// Set once the writer failed: its state is unknown, so nothing more is written.
    broken: bool,
}

impl XlsxEncoder {
    /// Stopgap until the streaming writer lands: cannot cut or resume.
    pub fn resume(
        _file: super::FileInfo<'_>,
        _columns: Vec<Column>,
        _settings: &EncodeSettings,
        _state: &crate::domain::XlsxState,
    ) -> Result<Self, EncodeError> {
        Err(EncodeError::Resume("xlsx cannot resume yet".into()))
    }

    pub fn new(
        file: super::FileInfo<'_>,
        columns: Vec<Column>,
        settings: &EncodeSettings,
    ) -> Result<Self, EncodeError> {
        let dataset = file.spec.dataset.as_str();
        let tz = file.spec.time_zone();
        let tmp_dir = std::env::temp_dir();
        if columns.is_empty() || columns.len() > usize::from(ColNum::MAX) {
            return Err(EncodeError::Xlsx(format!(
                "cannot write {} columns to a sheet",
                columns.len()
            )));
        }
        require_free(&tmp_dir, free_tmp_bytes(&tmp_dir))?;
        let mut workbook = Workbook::new();
        workbook
            .set_tempdir(&tmp_dir)
            .map_err(xlsx_error)?;
        workbook.set_zip_compression_level(settings.xlsx_zip_level.clamp(1, 9));
        let mut enc = Self {
            workbook,
            cells: Cells {
                kinds: columns.iter().map(Kind::of).collect(),
                tz,
                formats: Formats::new(),
                truncated: 0,
            },
            headers: columns
                .iter()
                .map(|c| cell_text(&c.label).0.into_owned())
                .collect(),
            base_name: sheet_base_name(dataset),
            tmp_dir,
            rows_per_sheet: settings
                .xlsx_rows_per_sheet
                .clamp(2, XLSX_MAX_ROWS_PER_SHEET),
            sheets: 0,
            row: 0,
            broken: false,
        };
        enc.add_sheet().map_err(xlsx_error)?;
        Ok(enc)
    }

    /// Starts the next sheet: name, widths and column formats first (constant-memory mode cannot
    /// change them once rows are out), then the frozen bold header.
    fn add_sheet(&mut self) -> Result<(), XlsxError> {
        let name = match self.sheets {
            0 => self.base_name.clone(),
            n => format!("{} {}", self.base_name, n + 1),
        };
        let ws = self.workbook.add_worksheet_with_constant_memory()?;
        ws.set_name(name)?;
        for (i, (kind, label)) in self.cells.kinds.iter().zip(&self.headers).enumerate() {
            let c = i as ColNum;
            ws.set_column_width(c, kind.width(label))?;
            if let Some(f) = self.cells.formats.column(*kind) {
                ws.set_column_format(c, f)?;
            }
            ws.write_string_with_format(0, c, label.as_str(), &self.cells.formats.header)?;
        }
        ws.set_freeze_panes(1, 0)?;
        self.sheets += 1;
        self.row = 1;
        Ok(())
    }

    /// Filters over the header and the rows of the current sheet, now that they are known.
    fn close_sheet(&mut self) -> Result<(), XlsxError> {
        let last_col = (self.cells.kinds.len() - 1) as ColNum;
        let last_row = self.row.saturating_sub(1);
        self.current_sheet()?.autofilter(0, 0, last_row, last_col)?;
        Ok(())
    }

    fn current_sheet(&mut self) -> Result<&mut Worksheet, XlsxError> {
        self.workbook
            .worksheet_from_index(self.sheets.saturating_sub(1) as usize)
    }

    fn write_all(&mut self, mut rows: &[Row]) -> Result<(), XlsxError> {
        while !rows.is_empty() {
            if self.row >= self.rows_per_sheet {
                self.close_sheet()?;
                self.add_sheet()?;
            }
            let room = (self.rows_per_sheet - self.row) as usize;
            let (now, later) = rows.split_at(room.min(rows.len()));
            let ws = self
                .workbook
                .worksheet_from_index(self.sheets.saturating_sub(1) as usize)?;
            for row in now {
                self.cells.write_row(ws, self.row, row)?;
                self.row += 1;
            }
            rows = later;
        }
        Ok(())
    }

    fn save(&mut self) -> Result<File, EncodeError> {
        self.close_sheet().map_err(xlsx_error)?;
        // Anonymous: removed by the kernel when the reader handed out is dropped.
        let mut file = tempfile::tempfile_in(&self.tmp_dir).map_err(io_error)?;
        {
            let mut out = BufWriter::with_capacity(1 << 16, &mut file);
            self.workbook.save_to_writer(&mut out).map_err(xlsx_error)?;
            out.flush().map_err(io_error)?;
        }
        file.rewind().map_err(io_error)?;
        Ok(file)
    }

    /// Runs `f` on the writer, turning its panics (it panics when a temp file write fails) into
    /// errors, and refusing to go on once it failed.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, EncodeError>,
    ) -> Result<T, EncodeError> {
        if self.broken {
            return Err(EncodeError::Xlsx(
                "the spreadsheet writer failed earlier".into(),
            ));
        }
        let result = match panic::catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(r) => r,
            Err(payload) => {
                let why = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown reason".into());
                Err(self.no_space_or(EncodeError::Xlsx(format!(
                    "the spreadsheet writer stopped: {why}"
                ))))
            }
        };
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn no_space_or(&self, other: EncodeError) -> EncodeError {
        match free_tmp_bytes(&self.tmp_dir) {
            Some(free) if free < RUNNING_RESERVE_BYTES => EncodeError::NoSpace(format!(
                "{} ran out of space while writing the spreadsheet ({} MiB left)",
                self.tmp_dir.display(),
                free >> 20
            )),
            _ => other,
        }
    }
}

impl Encoder for XlsxEncoder {
    fn write_rows(&mut self, rows: &[Row]) -> Result<(), EncodeError> {
        self.guarded(|enc| {
            if let Some(free) = free_tmp_bytes(&enc.tmp_dir) {
                if free < RUNNING_RESERVE_BYTES {
                    return Err(EncodeError::NoSpace(format!(
                        "{} has only {} MiB left for the spreadsheet",
                        enc.tmp_dir.display(),
                        free >> 20
                    )));
                }
            }
            enc.write_all(rows).map_err(xlsx_error)
        })
    }

    fn buffered(&self) -> usize {
        0
    }

    fn cut(&mut self) -> Result<super::Cut, EncodeError> {
        Err(EncodeError::Resume("xlsx cannot cut yet".into()))
    }

    fn finish(mut self: Box<Self>) -> Result<Finished, EncodeError> {
        let mut file = self.guarded(Self::save)?;
        let mut tail = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut tail)?;
        Ok(Finished {
            tail,
            sheets: self.sheets,
            truncated_cells: self.cells.truncated,
        })
    }
}

// Disabled while the streaming writer replaces this encoder (its tests come back with it).
#[cfg(any())]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use calamine::{open_workbook_from_rs, Data, Reader, Xlsx};
    use std::io::{Cursor, Read};

    fn col(name: &str, ty: ColumnType, money: bool) -> Column {
        Column {
            name: name.into(),
            ty,
            label: format!("{name} label"),
            source: name.into(),
            money,
        }
    }

    fn settings(dir: &Path, rows_per_sheet: u32) -> EncodeSettings {
        EncodeSettings {
            xlsx_rows_per_sheet: rows_per_sheet,
            tmp_dir: dir.to_path_buf(),
            ..EncodeSettings::default()
        }
    }

    struct Book {
        sheets: Vec<(String, Vec<Vec<Data>>)>,
        formulas: usize,
        finished_sheets: u32,
        truncated: u64,
    }

    fn encode(columns: Vec<Column>, pages: &[Vec<Row>], tz: Tz, settings: &EncodeSettings) -> Book {
        let mut e: Box<dyn Encoder> =
            Box::new(XlsxEncoder::new("things", columns, tz, settings).unwrap());
        assert!(!e.resumable());
        for page in pages {
            e.write_rows(page).unwrap();
            assert_eq!(e.buffered(), 0);
            assert!(e.take_buffered().is_empty());
        }
        let finished = e.finish().unwrap();
        let mut bytes = Vec::new();
        let mut tail = finished.tail;
        tail.read_to_end(&mut bytes).unwrap();
        let mut book: Xlsx<_> = open_workbook_from_rs(Cursor::new(bytes)).unwrap();
        let mut sheets = Vec::new();
        let mut formulas = 0;
        for name in book.sheet_names() {
            let range = book.worksheet_range(&name).unwrap();
            assert_eq!(range.start(), Some((0, 0)));
            let rows = range.rows().map(<[Data]>::to_vec).collect();
            formulas += book
                .worksheet_formula(&name)
                .unwrap()
                .used_cells()
                .filter(|(_, _, f)| !f.is_empty())
                .count();
            sheets.push((name, rows));
        }
        Book {
            sheets,
            formulas,
            finished_sheets: finished.sheets,
            truncated: finished.truncated_cells,
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn ymd(y: i32, m: u32, d: u32) -> NaiveDate {
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

    #[test]
    fn every_type_reads_back_as_its_excel_type_in_the_time_zone() {
        let dir = tempfile::tempdir().unwrap();
        let cols = vec![
            col("s", ColumnType::String, false),
            col("i", ColumnType::Integer, false),
            col("amount", ColumnType::Decimal, true),
            col("ratio", ColumnType::Decimal, false),
            col("b", ColumnType::Boolean, false),
            col("t", ColumnType::Timestamp, false),
            col("dt", ColumnType::Date, false),
        ];
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
        let book = encode(
            cols,
            &[rows],
            chrono_tz::Europe::Paris,
            &settings(dir.path(), 100),
        );
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
    fn timestamps_in_utc_and_far_dates_keep_their_value() {
        let dir = tempfile::tempdir().unwrap();
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
        let book = encode(cols, &[rows], chrono_tz::UTC, &settings(dir.path(), 100));
        let cells = &book.sheets[0].1;
        assert_eq!(datetime_parts(&cells[1][0]), (1999, 12, 31, 23, 59, 59, 0));
        assert_eq!(datetime_parts(&cells[1][1]), (1900, 1, 1, 0, 0, 0, 0));
        assert_eq!(datetime_parts(&cells[2][0]), (2038, 1, 19, 3, 14, 7, 0));
        assert_eq!(datetime_parts(&cells[2][1]), (9999, 12, 31, 0, 0, 0, 0));
    }

    #[test]
    fn formula_starts_are_text_with_the_quote_prefix_and_numbers_are_not_touched() {
        let dir = tempfile::tempdir().unwrap();
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
        let book = encode(cols, &[rows], chrono_tz::UTC, &settings(dir.path(), 100));
        assert_eq!(book.formulas, 0);
        let cells = &book.sheets[0].1;
        for (row, original) in cells[1..].iter().zip(starts) {
            assert_eq!(row[0], Data::String(format!("'{original}")));
            assert_eq!(row[1], Data::Float(-1.0));
        }
    }

    #[test]
    fn rows_roll_over_to_numbered_sheets_each_with_its_header() {
        let dir = tempfile::tempdir().unwrap();
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
        let book = encode(
            cols.clone(),
            &[rows(3)],
            chrono_tz::UTC,
            &settings(dir.path(), 4),
        );
        assert_eq!(book.finished_sheets, 1);
        assert_eq!(book.sheets.len(), 1);
        assert_eq!(book.sheets[0].0, "things");
        assert_eq!(book.sheets[0].1.len(), 4);

        // One more row starts a second sheet, also when it comes in another page.
        for pages in [vec![rows(4)], vec![rows(3), rows(4)[3..].to_vec()]] {
            let book = encode(
                cols.clone(),
                &pages,
                chrono_tz::UTC,
                &settings(dir.path(), 4),
            );
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
        let book = encode(cols, &[rows(7)], chrono_tz::UTC, &settings(dir.path(), 4));
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
        let dir = tempfile::tempdir().unwrap();
        let cols = vec![col("n", ColumnType::Integer, false)];
        let book = encode(cols, &[], chrono_tz::UTC, &settings(dir.path(), 4));
        assert_eq!(book.finished_sheets, 1);
        assert_eq!(book.sheets[0].1, vec![vec![Data::String("n label".into())]]);
    }

    #[test]
    fn text_beyond_excels_limit_is_cut_with_a_marker_and_counted() {
        let dir = tempfile::tempdir().unwrap();
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
        let book = encode(cols, &[rows], chrono_tz::UTC, &settings(dir.path(), 100));
        assert_eq!(book.truncated, 3);
        let cells = &book.sheets[0].1;
        for (row, first) in cells[1..4].iter().zip(["a", "😀", "'="]) {
            let Data::String(s) = &row[0] else {
                panic!("not text: {:?}", row[0]);
            };
            assert!(s.starts_with(first), "{}", &s[..10]);
            assert!(s.ends_with(TRUNCATION_MARKER));
            let units = utf16_len(s);
            assert!(
                (MAX_CELL_CHARS - 1..=MAX_CELL_CHARS).contains(&units),
                "{units}"
            );
        }
        assert_eq!(cells[4][0], Data::String(fits));
    }

    /// Open handles of this process into `dir` (anonymous temp files show as `dir/... (deleted)`).
    fn open_handles_into(dir: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.starts_with(dir))
            .count()
    }

    #[test]
    fn temp_files_are_gone_after_finish_and_after_a_drop_without_finish() {
        let dir = tempfile::tempdir().unwrap();
        let orders = Catalog::builtin().unwrap().get("orders").unwrap().clone();
        let row: Row = orders
            .columns
            .iter()
            .map(|c| match c.ty {
                ColumnType::Integer => Value::Int(3),
                ColumnType::Decimal => Value::Dec("9.99".into()),
                ColumnType::Boolean => Value::Bool(true),
                ColumnType::Timestamp => Value::Ts(utc("2024-01-01T00:00:00Z")),
                ColumnType::Date => Value::Date(ymd(2024, 1, 2)),
                ColumnType::String => Value::Str("x".into()),
            })
            .collect();
        let rows = vec![row; 2500];
        let s = settings(dir.path(), 1000);
        let empty = |p: &Path| std::fs::read_dir(p).unwrap().count() == 0;

        let mut e: Box<dyn Encoder> = Box::new(
            XlsxEncoder::new("orders", orders.columns.clone(), chrono_tz::UTC, &s).unwrap(),
        );
        e.write_rows(&rows).unwrap();
        assert!(
            open_handles_into(dir.path()) >= 3,
            "one staged file per sheet"
        );
        assert!(empty(dir.path()), "staged sheets have no name to leak");
        let finished = e.finish().unwrap();
        assert_eq!(finished.sheets, 3);
        assert_eq!(open_handles_into(dir.path()), 1, "only the output is left");
        drop(finished);
        assert_eq!(open_handles_into(dir.path()), 0);
        assert!(empty(dir.path()));

        let mut e: Box<dyn Encoder> =
            Box::new(XlsxEncoder::new("orders", orders.columns, chrono_tz::UTC, &s).unwrap());
        e.write_rows(&rows).unwrap();
        drop(e);
        assert_eq!(open_handles_into(dir.path()), 0);
        assert!(empty(dir.path()));
    }

    #[test]
    fn a_missing_temp_dir_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("missing");
        let r = XlsxEncoder::new(
            "things",
            vec![col("s", ColumnType::String, false)],
            chrono_tz::UTC,
            &settings(&gone, 100),
        );
        assert!(r.is_err());
    }

    #[test]
    fn too_little_free_space_is_refused_up_front() {
        let err = require_free(Path::new("/tmp"), Some(MIN_FREE_TMP_BYTES - 1)).unwrap_err();
        assert!(matches!(err, EncodeError::NoSpace(_)));
        assert!(err.to_string().contains("at least 64 MiB"), "{err}");
        assert!(require_free(Path::new("/tmp"), Some(MIN_FREE_TMP_BYTES)).is_ok());
        assert!(require_free(Path::new("/tmp"), None).is_ok());
    }

    #[test]
    fn tmp_estimate_covers_a_million_orders() {
        let one_m = estimate_tmp_bytes(1_000_000, 12);
        assert!((700_000_000..1_000_000_000).contains(&one_m), "{one_m}");
        assert!(estimate_tmp_bytes(2_000_000, 12) > one_m);
        assert!(estimate_tmp_bytes(0, 12) > 0);
        assert_eq!(estimate_tmp_bytes(u64::MAX, 12), u64::MAX);
    }

    #[test]
    fn serial_dates_follow_excels_1900_system() {
        assert_eq!(date_serial(ymd(1900, 1, 1)), Some(1));
        assert_eq!(date_serial(ymd(1900, 2, 28)), Some(59));
        assert_eq!(date_serial(ymd(1900, 3, 1)), Some(61));
        assert_eq!(date_serial(ymd(2024, 1, 1)), Some(45292));
        assert_eq!(date_serial(ymd(9999, 12, 31)), Some(2_958_465));
        assert_eq!(date_serial(ymd(1899, 12, 31)), None);
        let t = timestamp_serial(utc("2024-01-01T12:00:00Z"), chrono_tz::UTC).unwrap();
        assert_eq!(t, 45292.5);
    }

    #[test]
    fn decimals_keep_their_places_and_refuse_silent_rounding() {
        assert_eq!(decimal("12.50"), Some((12.5, 2)));
        assert_eq!(decimal("-0.001"), Some((-0.001, 3)));
        assert_eq!(decimal("7"), Some((7.0, 0)));
        assert_eq!(decimal("999999999999999"), Some((999_999_999_999_999.0, 0)));
        assert_eq!(decimal("0.000000000000000000123"), Some((1.23e-19, 15)));
        assert_eq!(decimal("1000000000000000"), None);
        assert_eq!(decimal("1.234567890123456"), None);
    }

    #[test]
    fn sheet_names_are_made_acceptable_to_excel() {
        assert_eq!(sheet_base_name("orders"), "orders");
        assert_eq!(sheet_base_name("a/b[c]"), "a_b_c_");
        assert_eq!(sheet_base_name("'x'"), "x");
        assert_eq!(sheet_base_name(""), "Sheet");
        assert_eq!(sheet_base_name(&"n".repeat(40)).len(), 27);
    }
}
