//! File encoders (CSV, csv.gz, XLSX, NDJSON): rows in, bytes out, memory bounded by one page of rows plus one upload part.
//!
//! The worker feeds rows page by page. Once enough bytes are buffered it asks the encoder to
//! [`Encoder::cut`] a part: the encoder hands out every byte so far and the state a fresh encoder
//! needs to continue the file from there ([`EncoderState`], kept in the job's checkpoint). Every
//! format is written so that continuing from a cut in another invocation gives the same bytes as
//! going on in the same one: compressed formats end each part's deflate segment with a full flush
//! and start the next part with a fresh compressor, resumed or not.

use chrono::{DateTime, Utc};

use crate::domain::Column;
use crate::domain::{EncoderState, ExportSpec, Format, Row};

pub mod csv;
pub mod deflate;
pub mod ndjson;
pub mod text;
pub mod xlsx;
pub mod zipstream;

/// Part of every cache key: bump it when an encoder changes the bytes it writes.
pub const ENCODER_VERSION: &str = "3";

/// Excel's hard limit is 1,048,576 rows per sheet, header included.
pub const XLSX_MAX_ROWS_PER_SHEET: u32 = 1_048_576;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("writing the file failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the spreadsheet writer failed: {0}")]
    Xlsx(String),
    /// The checkpoint's state does not fit this encoder (another format, or a corrupt record).
    #[error("cannot resume: {0}")]
    Resume(String),
}

/// Knobs that are not part of the request (and so not of the cache key).
#[derive(Debug, Clone)]
pub struct EncodeSettings {
    /// Rows per sheet including the header; tests lower it to see the rollover.
    pub xlsx_rows_per_sheet: u32,
    pub xlsx_zip_level: u8,
    pub gzip_level: u32,
}

impl Default for EncodeSettings {
    fn default() -> Self {
        Self {
            xlsx_rows_per_sheet: XLSX_MAX_ROWS_PER_SHEET,
            xlsx_zip_level: 1,
            // Level 4: within about 1% of level 6's size (27.3 vs 27.0 MB for 1M `orders` rows,
            // level 1 makes 41.4 MB) at 0.9-1M rows/s, three times the 300k rows/s target, where
            // level 6 drops to 0.6-0.7M (`cargo bench -p shared --bench encoders`).
            gzip_level: 4,
        }
    }
}

/// A part's bytes and where the file continues after them.
#[derive(Debug)]
pub struct Cut {
    pub bytes: Vec<u8>,
    pub state: EncoderState,
}

#[derive(Debug)]
pub struct Finished {
    /// The bytes after the last cut, to the end of the file.
    pub tail: Vec<u8>,
    pub sheets: u32,
    pub truncated_cells: u64,
}

pub trait Encoder: Send {
    fn write_rows(&mut self, rows: &[Row]) -> Result<(), EncodeError>;
    /// Bytes produced since the last cut (compressed where the format compresses); the worker
    /// cuts a part once this reaches the part size.
    fn buffered(&self) -> usize;
    /// Ends a part here, at a row boundary: the bytes since the last cut, and the state from
    /// which [`encoder_for`] continues the file exactly as this encoder goes on to.
    fn cut(&mut self) -> Result<Cut, EncodeError>;
    fn finish(self: Box<Self>) -> Result<Finished, EncodeError>;
}

/// A format that writes each row on its own and nothing at the end, so the bytes so far are
/// always a prefix of the file (CSV, NDJSON).
pub trait RowWriter: Send {
    fn write_row(&self, out: &mut Vec<u8>, row: &Row);
}

/// The encoder of a [`RowWriter`] format: rows into one buffer, cut between any two of them;
/// a continuation is a fresh one without the head ([`EncoderState::Plain`]).
pub struct RowsEncoder<W> {
    buf: Vec<u8>,
    rows: W,
}

impl<W: RowWriter> RowsEncoder<W> {
    /// Starts the file with `head` (a header, or nothing).
    pub fn with_head(rows: W, head: Vec<u8>) -> Self {
        Self { buf: head, rows }
    }

    /// The bytes so far, leaving an empty buffer of the usual size.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.buf, Vec::with_capacity(1 << 20))
    }
}

impl<W: RowWriter> Encoder for RowsEncoder<W> {
    fn write_rows(&mut self, rows: &[Row]) -> Result<(), EncodeError> {
        for r in rows {
            self.rows.write_row(&mut self.buf, r);
        }
        Ok(())
    }

    fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn cut(&mut self) -> Result<Cut, EncodeError> {
        Ok(Cut {
            bytes: self.take(),
            state: EncoderState::Plain,
        })
    }

    fn finish(self: Box<Self>) -> Result<Finished, EncodeError> {
        Ok(Finished {
            tail: self.buf,
            sheets: 0,
            truncated_cells: 0,
        })
    }
}

/// What is fixed for the whole file, whichever invocation writes which part of it.
#[derive(Debug, Clone, Copy)]
pub struct FileInfo<'a> {
    pub spec: &'a ExportSpec,
    /// When the job was created: the workbook's creation time, so every run writes the same bytes.
    pub created_at: DateTime<Utc>,
}

/// Builds the encoder for `file`: a new file when `resume` is `None`, else the continuation of
/// one whose parts so far ended with that state.
pub fn encoder_for(
    file: FileInfo<'_>,
    columns: Vec<Column>,
    settings: &EncodeSettings,
    resume: Option<&EncoderState>,
) -> Result<Box<dyn Encoder>, EncodeError> {
    let spec = file.spec;
    let opts = csv::CsvOptions {
        delimiter: spec.delimiter.byte(),
        bom: spec.bom,
        tz: spec.tz.tz(),
    };
    let mismatch = |state: &EncoderState| {
        EncodeError::Resume(format!(
            "a {} file cannot continue from a {} checkpoint",
            spec.format.as_str(),
            state_name(state)
        ))
    };
    Ok(match (spec.format, resume) {
        (Format::Csv, None) => Box::new(csv::CsvEncoder::new(columns, opts, true)),
        (Format::Csv, Some(EncoderState::Plain)) => {
            Box::new(csv::CsvEncoder::new(columns, opts, false))
        }
        (Format::CsvGz, None) => {
            Box::new(csv::GzCsvEncoder::new(columns, opts, settings.gzip_level)?)
        }
        (Format::CsvGz, Some(EncoderState::Gzip { crc32, length })) => Box::new(
            csv::GzCsvEncoder::resume(columns, opts, settings.gzip_level, *crc32, *length),
        ),
        (Format::Xlsx, None) => Box::new(xlsx::XlsxEncoder::new(file, columns, settings)?),
        (Format::Xlsx, Some(EncoderState::Xlsx(state))) => {
            Box::new(xlsx::XlsxEncoder::resume(file, columns, settings, state)?)
        }
        (Format::Ndjson, None | Some(EncoderState::Plain)) => {
            Box::new(ndjson::NdjsonEncoder::new(&columns, opts.tz))
        }
        (_, Some(state)) => return Err(mismatch(state)),
    })
}

fn state_name(state: &EncoderState) -> &'static str {
    match state {
        EncoderState::Plain => "plain text",
        EncoderState::Gzip { .. } => "gzip",
        EncoderState::Xlsx(_) => "xlsx",
    }
}

/// Columns for the encoders' tests.
#[cfg(test)]
pub(crate) mod testkit {
    use crate::domain::{Column, ColumnType};

    /// A column named `name`, read from the attribute of that name, labelled `{name} label`.
    pub fn col(name: &str, ty: ColumnType) -> Column {
        Column {
            name: name.into(),
            ty,
            label: format!("{name} label"),
            source: name.into(),
            money: false,
        }
    }
}
