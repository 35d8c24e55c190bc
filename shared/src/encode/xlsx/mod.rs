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
use super::{Cut, EncodeError, EncodeSettings, Encoder, FileInfo, Finished, XLSX_MAX_ROWS_PER_SHEET};
use crate::catalog::Column;
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
        let tz: Tz = file.spec.time_zone();
        Ok(Self {
            cells: Cells::new(columns, tz, &template.styles),
            header: Cells::header(columns, template.styles.header),
            template,
            layout,
            rows_per_sheet: settings.xlsx_rows_per_sheet.clamp(2, XLSX_MAX_ROWS_PER_SHEET),
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
        self.zip.write(&last);
        let number = self.finished_rows.len() + 1;
        self.zip.end_entry(
            &sheet_entry_name(number),
            self.open.offset,
            crc32,
            self.open.compressed + last.len() as u64,
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
            self.zip.write(&p.deflated);
            self.zip.end_entry(&p.name, offset, p.crc32, p.deflated.len() as u64, p.size)?;
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
