//! The parts of the workbook that rust_xlsxwriter writes: styles, workbook, content types,
//! relationships, document properties, theme, and the XML around each sheet's rows.
//!
//! The encoder streams only the rows. Everything else comes from a "twin": a workbook built with
//! rust_xlsxwriter with the same sheet names, formats, widths, frozen header row and autofilters
//! as the export, but no rows. At the start, a two-sheet twin gives the XML before and after the
//! rows of a first and of a later sheet, and the style ids of the formats; at the end, a twin with
//! the real sheets and row counts gives every other part, copied as rust_xlsxwriter compressed it.
//!
//! Style ids are read from the twin rather than assumed: the first sheet of every twin starts
//! with one blank cell per format, in a fixed order, in row 2 (its XML is never used), and the `s`
//! attribute of each is that format's id. The final twin is checked to give the same ids.
//!
//! Every twin is a pure function of the layout and row counts (the creation time is the job's,
//! the ZIP times are fixed), so a resumed run builds the same bytes.

use std::io::{Cursor, Read};

use chrono::{DateTime, Datelike, Timelike, Utc};
use rust_xlsxwriter::utility::{cell_range, column_number_to_name};
use rust_xlsxwriter::{ColNum, DocProperties, ExcelDateTime, Format, RowNum, Workbook, XlsxError};
use zip::{CompressionMethod, ZipArchive};

use super::cells::{Kind, MAX_NUMBER_DIGITS};
use crate::encode::EncodeError;

/// The row of the first twin sheet where each format is used once, to read its id.
const REGISTRATION_ROW: RowNum = 1;
const SHEETS_DIR: &str = "xl/worksheets/";

/// What the twin needs to look like the export.
pub struct Layout {
    pub base_name: String,
    /// Kind and width of each column.
    pub columns: Vec<(Kind, f64)>,
    pub created_at: DateTime<Utc>,
    pub zip_level: u8,
}

/// Style ids (`s="N"`) of the formats the cells use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StyleIds {
    pub header: u32,
    pub money: u32,
    pub timestamp: u32,
    pub date: u32,
    /// `0.0`, `0.00`, ... up to 15 places.
    pub places: Vec<u32>,
}

struct Formats {
    header: Format,
    money: Format,
    timestamp: Format,
    date: Format,
    places: Vec<Format>,
}

impl Formats {
    fn new() -> Self {
        Self {
            header: Format::new().set_bold(),
            money: Format::new().set_num_format("#,##0.00"),
            timestamp: Format::new().set_num_format("yyyy-mm-dd hh:mm:ss"),
            date: Format::new().set_num_format("yyyy-mm-dd"),
            places: (1..=MAX_NUMBER_DIGITS)
                .map(|n| Format::new().set_num_format(format!("0.{}", "0".repeat(n))))
                .collect(),
        }
    }

    /// The registration order, which [`StyleIds::from_ids`] reads back.
    fn in_order(&self) -> Vec<&Format> {
        let mut all = vec![&self.header, &self.money, &self.timestamp, &self.date];
        all.extend(&self.places);
        all
    }

    /// The format a column carries (what Excel applies to cells typed into it later).
    fn column(&self, kind: Kind) -> Option<&Format> {
        match kind {
            Kind::Money => Some(&self.money),
            Kind::Timestamp => Some(&self.timestamp),
            Kind::Date => Some(&self.date),
            _ => None,
        }
    }
}

impl StyleIds {
    fn from_ids(ids: &[u32]) -> Option<Self> {
        let (first, places) = ids.split_first_chunk::<4>()?;
        let [header, money, timestamp, date] = *first;
        Some(Self {
            header,
            money,
            timestamp,
            date,
            places: places.to_vec(),
        })
    }

    /// The ids of the registration cells in the first twin sheet's XML.
    fn read(sheet_xml: &str) -> Result<Self, EncodeError> {
        let count = Formats::new().in_order().len();
        let ids = (0..count)
            .map(|i| {
                let cell = format!(
                    "<c r=\"{}{}\"",
                    column_number_to_name(i as ColNum),
                    REGISTRATION_ROW + 1
                );
                let at = sheet_xml
                    .find(&cell)
                    .ok_or_else(|| twin_error(format!("no registration cell {cell}")))?;
                let tag = &sheet_xml[at..];
                let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
                // No `s` is the default style, 0.
                let Some(s) = tag.split_once(" s=\"").map(|(_, s)| s) else {
                    return Ok(0);
                };
                s.split('"')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| twin_error(format!("unreadable style in {tag}")))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        Self::from_ids(&ids).ok_or_else(|| twin_error("too few formats".into()))
    }
}

/// The sheet XML around the rows, and the style ids, from a two-sheet twin.
pub struct Template {
    pub styles: StyleIds,
    /// Up to and including `<sheetData>`: the first sheet (selected tab) and later ones.
    pub first_prefix: Vec<u8>,
    pub next_prefix: Vec<u8>,
    /// From `</sheetData>` to the end, around the autofilter range.
    suffix_head: Vec<u8>,
    suffix_tail: Vec<u8>,
    last_col: ColNum,
}

impl Template {
    pub fn new(layout: &Layout) -> Result<Self, EncodeError> {
        let mut twin = open(build(layout, &[1, 1])?)?;
        let first = read_text(&mut twin, &sheet_entry_name(1))?;
        let next = read_text(&mut twin, &sheet_entry_name(2))?;
        let (first_prefix, _) = split_sheet(&first)?;
        let (next_prefix, suffix) = split_sheet(&next)?;
        // The autofilter is the one thing after the rows that depends on them.
        let marker = "<autoFilter ref=\"";
        let (head, rest) = suffix
            .split_once(marker)
            .ok_or_else(|| twin_error("no autofilter after the rows".into()))?;
        let (_, tail) = rest
            .split_once('"')
            .ok_or_else(|| twin_error("unterminated autofilter".into()))?;
        Ok(Self {
            styles: StyleIds::read(&first)?,
            first_prefix: first_prefix.into_bytes(),
            next_prefix: next_prefix.into_bytes(),
            suffix_head: format!("{head}{marker}").into_bytes(),
            suffix_tail: format!("\"{tail}").into_bytes(),
            last_col: last_col(layout),
        })
    }

    /// The XML after the rows of a sheet of `rows` rows (header included).
    pub fn push_suffix(&self, out: &mut Vec<u8>, rows: u32) {
        out.extend_from_slice(&self.suffix_head);
        let range = cell_range(0, 0, rows.saturating_sub(1), self.last_col);
        out.extend_from_slice(range.as_bytes());
        out.extend_from_slice(&self.suffix_tail);
    }

    /// An upper bound of [`Self::push_suffix`]'s length.
    pub fn suffix_len(&self) -> usize {
        self.suffix_head.len() + self.suffix_tail.len() + "A1:XFD1048576".len()
    }
}

/// A non-sheet part of the final twin, deflated as rust_xlsxwriter wrote it.
pub struct Part {
    pub name: String,
    pub crc32: u32,
    pub size: u64,
    pub deflated: Vec<u8>,
}

/// Every part of the workbook but its sheets, for sheets of `sheet_rows` rows each, checked to
/// use the style ids the rows were written with.
pub fn parts(
    layout: &Layout,
    sheet_rows: &[u32],
    styles: &StyleIds,
) -> Result<Vec<Part>, EncodeError> {
    let mut twin = open(build(layout, sheet_rows)?)?;
    let first = read_text(&mut twin, &sheet_entry_name(1))?;
    if StyleIds::read(&first)? != *styles {
        return Err(twin_error(
            "the final workbook numbers its styles differently from the sheets".into(),
        ));
    }
    let mut parts = Vec::new();
    for i in 0..twin.len() {
        let mut f = twin.by_index_raw(i).map_err(zip_error)?;
        let name = f.name().map_err(zip_error)?.into_owned();
        if name.starts_with(SHEETS_DIR) {
            continue;
        }
        if f.compression() != CompressionMethod::Deflated {
            return Err(twin_error(format!("{name} is not deflated")));
        }
        let mut deflated = Vec::new();
        f.read_to_end(&mut deflated)?;
        parts.push(Part {
            name,
            crc32: f.crc32(),
            size: f.size(),
            deflated,
        });
    }
    Ok(parts)
}

pub fn sheet_entry_name(number: usize) -> String {
    format!("{SHEETS_DIR}sheet{number}.xml")
}

/// Sheet `index` (from 0) of a workbook whose first sheet is `base`: `base`, `base 2`, ...
pub fn sheet_name(base: &str, index: usize) -> String {
    match index {
        0 => base.to_string(),
        n => format!("{base} {}", n + 1),
    }
}

fn last_col(layout: &Layout) -> ColNum {
    layout.columns.len().saturating_sub(1) as ColNum
}

/// The twin workbook's bytes, with a sheet of `rows` rows for each entry of `sheet_rows`.
pub(super) fn build(layout: &Layout, sheet_rows: &[u32]) -> Result<Vec<u8>, EncodeError> {
    build_workbook(layout, sheet_rows).map_err(xlsx_error)
}

fn build_workbook(layout: &Layout, sheet_rows: &[u32]) -> Result<Vec<u8>, XlsxError> {
    let formats = Formats::new();
    let mut workbook = Workbook::new();
    let t = layout.created_at;
    let created = ExcelDateTime::from_ymd(t.year() as u16, t.month() as u8, t.day() as u8)?
        .and_hms(t.hour() as u16, t.minute() as u8, t.second())?;
    workbook.set_properties(&DocProperties::new().set_creation_datetime(&created));
    workbook.set_zip_compression_level(layout.zip_level);
    let last_col = last_col(layout);
    for (index, &rows) in sheet_rows.iter().enumerate() {
        let ws = workbook.add_worksheet();
        ws.set_name(sheet_name(&layout.base_name, index))?;
        if index == 0 {
            // First, so that the ids do not depend on the columns.
            for (i, f) in formats.in_order().into_iter().enumerate() {
                ws.write_blank(REGISTRATION_ROW, i as ColNum, f)?;
            }
        }
        for (i, &(kind, width)) in layout.columns.iter().enumerate() {
            let c = i as ColNum;
            ws.set_column_width(c, width)?;
            if let Some(f) = formats.column(kind) {
                ws.set_column_format(c, f)?;
            }
        }
        ws.set_freeze_panes(1, 0)?;
        ws.autofilter(0, 0, rows.saturating_sub(1), last_col)?;
    }
    workbook.save_to_buffer()
}

/// Splits a twin sheet's XML around its rows: the part before them without `<dimension>` (the
/// streamed sheet's extent is not known when its start is written, and the element is optional),
/// ending with `<sheetData>`, and the part after them, starting with `</sheetData>`.
pub(super) fn split_sheet(xml: &str) -> Result<(String, String), EncodeError> {
    let missing = || twin_error("a sheet without sheetData".into());
    let (head, rest) = xml.split_once("<sheetData").ok_or_else(missing)?;
    let after = match rest.strip_prefix("/>") {
        Some(after) => after,
        None => rest.split_once("</sheetData>").ok_or_else(missing)?.1,
    };
    let head = match head.split_once("<dimension ") {
        Some((before, dim)) => {
            let (_, after_dim) = dim
                .split_once("/>")
                .ok_or_else(|| twin_error("unterminated dimension".into()))?;
            format!("{before}{after_dim}")
        }
        None => head.to_string(),
    };
    Ok((format!("{head}<sheetData>"), format!("</sheetData>{after}")))
}

fn open(bytes: Vec<u8>) -> Result<ZipArchive<Cursor<Vec<u8>>>, EncodeError> {
    ZipArchive::new(Cursor::new(bytes)).map_err(zip_error)
}

fn read_text(twin: &mut ZipArchive<Cursor<Vec<u8>>>, name: &str) -> Result<String, EncodeError> {
    let mut text = String::new();
    twin.by_name(name)
        .map_err(zip_error)?
        .read_to_string(&mut text)?;
    Ok(text)
}

fn twin_error(why: String) -> EncodeError {
    EncodeError::Xlsx(format!("the workbook template is not as expected: {why}"))
}

fn zip_error(e: zip::result::ZipError) -> EncodeError {
    twin_error(e.to_string())
}

fn xlsx_error(e: XlsxError) -> EncodeError {
    EncodeError::Xlsx(e.to_string())
}
