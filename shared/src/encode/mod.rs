//! File encoders: rows in, bytes out, memory bounded by one page of rows plus one upload part.
//!
//! The worker feeds rows page by page, takes whatever bytes are ready once they make a part, and at
//! the end reads the tail from [`Finished::tail`] (a buffer for CSV, a temp file for XLSX).

use std::io::Read;
use std::path::PathBuf;

use crate::catalog::Column;
use crate::domain::{ExportSpec, Format, Row};

pub mod csv;
pub mod text;
pub mod xlsx;

/// Part of every cache key: bump it when an encoder changes the bytes it writes.
pub const ENCODER_VERSION: &str = "1";

/// Excel's hard limit is 1,048,576 rows per sheet, header included.
pub const XLSX_MAX_ROWS_PER_SHEET: u32 = 1_048_576;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("writing the file failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the spreadsheet writer failed: {0}")]
    Xlsx(String),
    #[error("not enough temporary space: {0}")]
    NoSpace(String),
}

/// Knobs that are not part of the request (and so not of the cache key).
#[derive(Debug, Clone)]
pub struct EncodeSettings {
    /// Rows per sheet including the header; tests lower it to see the rollover.
    pub xlsx_rows_per_sheet: u32,
    pub xlsx_zip_level: u8,
    pub tmp_dir: PathBuf,
    pub gzip_level: u32,
}

impl Default for EncodeSettings {
    fn default() -> Self {
        Self {
            xlsx_rows_per_sheet: XLSX_MAX_ROWS_PER_SHEET,
            xlsx_zip_level: 1,
            tmp_dir: std::env::temp_dir(),
            // Level 4: within about 1% of level 6's size (27.3 vs 27.0 MB for 1M `orders` rows,
            // level 1 makes 41.4 MB) at 0.9-1M rows/s, three times the 300k rows/s target, where
            // level 6 drops to 0.6-0.7M (`cargo bench -p shared --bench encoders`).
            gzip_level: 4,
        }
    }
}

pub struct Finished {
    /// The bytes not yet taken with [`Encoder::take_buffered`].
    pub tail: Box<dyn Read + Send>,
    pub sheets: u32,
    pub truncated_cells: u64,
}

pub trait Encoder: Send {
    fn write_rows(&mut self, rows: &[Row]) -> Result<(), EncodeError>;
    /// Bytes that could be uploaded now.
    fn buffered(&self) -> usize;
    fn take_buffered(&mut self) -> Vec<u8>;
    /// Whether the bytes handed out so far are a plain prefix of the file that a fresh encoder can
    /// continue (CSV), so a job may resume from a part boundary in another invocation.
    fn resumable(&self) -> bool;
    fn finish(self: Box<Self>) -> Result<Finished, EncodeError>;
}

/// Builds the encoder for `spec`. `with_header` is false when resuming a job whose first part,
/// header included, is already uploaded.
pub fn encoder_for(
    spec: &ExportSpec,
    columns: Vec<Column>,
    settings: &EncodeSettings,
    with_header: bool,
) -> Result<Box<dyn Encoder>, EncodeError> {
    let tz = spec.time_zone();
    Ok(match spec.format {
        Format::Csv => Box::new(csv::CsvEncoder::new(
            columns,
            csv::CsvOptions {
                delimiter: spec.delimiter.byte(),
                bom: spec.bom,
                tz,
            },
            with_header,
        )),
        Format::CsvGz => Box::new(csv::GzCsvEncoder::new(
            columns,
            csv::CsvOptions {
                delimiter: spec.delimiter.byte(),
                bom: spec.bom,
                tz,
            },
            settings.gzip_level,
        )),
        Format::Xlsx => Box::new(xlsx::XlsxEncoder::new(
            &spec.dataset,
            columns,
            tz,
            settings,
        )?),
    })
}
