//! Rows to SpreadsheetML `<row>` elements, written straight into the sheet's XML buffer.
//!
//! Rows and cells carry no `r` attribute: cells follow one another in column order, so a row's
//! XML does not depend on where it lands and no references are formatted per cell. A null leaves
//! a gap, and the next cell of that row then names its column with `r` (an empty `<c/>` would
//! keep the count too, but calamine skips empty elements without counting them).
//!
//! Text is inline (`t="inlineStr"`), so nothing is kept per string across rows. It is escaped as
//! rust_xlsxwriter escapes it, which is what Excel writes: `&`, `<`, `>` as entities; control
//! characters, which XML 1.0 forbids (or, for CR, folds into LF), and the non-characters U+FFFE and
//! U+FFFF as `_xHHHH_`; and a literal `_xHHHH_` in the text with its `_` escaped as `_x005F`.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use super::super::text::{needs_neutralising, push_date, push_timestamp, NEUTRALISING_PREFIX};
use super::twin::StyleIds;
use crate::domain::value::is_decimal_text;
use crate::domain::{Column, ColumnType};
use crate::domain::{Row, Value};

/// Excel's cell text limit, in UTF-16 units.
pub const MAX_CELL_CHARS: usize = 32_767;
pub const TRUNCATION_MARKER: &str = "…[truncated]";
/// Excel keeps 15 significant digits; beyond that a number would change silently.
pub const MAX_NUMBER_DIGITS: usize = 15;

/// How a column's cells are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Integer,
    Money,
    Decimal,
    Boolean,
    Timestamp,
    Date,
}

impl Kind {
    pub fn of(c: &Column) -> Self {
        match c.ty {
            ColumnType::String => Self::Text,
            ColumnType::Integer | ColumnType::Decimal if c.money => Self::Money,
            ColumnType::Integer => Self::Integer,
            ColumnType::Decimal => Self::Decimal,
            ColumnType::Boolean => Self::Boolean,
            ColumnType::Timestamp => Self::Timestamp,
            ColumnType::Date => Self::Date,
        }
    }

    /// Width in characters: enough for the label (plus the filter button) and a typical value.
    pub fn width(self, label: &str) -> f64 {
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

/// ` s="N"` for each style a cell may carry, ready to copy.
struct StyleAttrs {
    money: Vec<u8>,
    timestamp: Vec<u8>,
    date: Vec<u8>,
    /// `0.0`, `0.00`, ... by number of decimal places.
    places: Vec<Vec<u8>>,
}

impl StyleAttrs {
    fn new(ids: &StyleIds) -> Self {
        let attr = |id: u32| format!(" s=\"{id}\"").into_bytes();
        Self {
            money: attr(ids.money),
            timestamp: attr(ids.timestamp),
            date: attr(ids.date),
            places: ids.places.iter().map(|&id| attr(id)).collect(),
        }
    }
}

pub struct Cells {
    kinds: Vec<Kind>,
    /// Column letters, for the `r` of a cell after a gap.
    letters: Vec<String>,
    tz: Tz,
    styles: StyleAttrs,
    /// Text cells cut at Excel's limit so far.
    pub truncated: u64,
}

impl Cells {
    pub fn new(columns: &[Column], tz: Tz, ids: &StyleIds) -> Self {
        Self {
            kinds: columns.iter().map(Kind::of).collect(),
            letters: (0..columns.len())
                .map(|i| rust_xlsxwriter::utility::column_number_to_name(i as u16))
                .collect(),
            tz,
            styles: StyleAttrs::new(ids),
            truncated: 0,
        }
    }

    /// The header row: labels as bold text (neutralised and cut like any text, not counted).
    pub fn header(columns: &[Column], header_style: u32) -> Vec<u8> {
        let mut out = b"<row>".to_vec();
        let style = format!(" s=\"{header_style}\"");
        for c in columns {
            out.extend_from_slice(b"<c");
            out.extend_from_slice(style.as_bytes());
            push_text_cell(&mut out, &c.label, true);
        }
        out.extend_from_slice(b"</row>");
        out
    }

    /// Appends row number `number` (1-based, in its sheet) to `out`.
    pub fn write_row(&mut self, out: &mut Vec<u8>, row: &Row, number: u32) {
        out.extend_from_slice(b"<row>");
        let mut gap = false;
        // Rows are built per column; a value beyond them would have no cell to go to.
        for (i, v) in row.iter().enumerate().take(self.kinds.len()) {
            let kind = self.kinds.get(i).copied().unwrap_or(Kind::Text);
            if matches!(v, Value::Null) || matches!(v, Value::Str(s) if s.is_empty()) {
                // A sheet has no empty text cell short of a formula: empty text is no cell.
                gap = true;
                continue;
            }
            out.extend_from_slice(b"<c");
            if gap {
                out.extend_from_slice(b" r=\"");
                if let Some(l) = self.letters.get(i) {
                    out.extend_from_slice(l.as_bytes());
                }
                out.extend_from_slice(itoa::Buffer::new().format(number).as_bytes());
                out.push(b'"');
                gap = false;
            }
            match v {
                Value::Null => {}
                Value::Str(s) => {
                    if push_text_cell(out, s, true) {
                        self.truncated += 1;
                    }
                }
                Value::Int(n) => {
                    if n.unsigned_abs() < 10u64.pow(MAX_NUMBER_DIGITS as u32) {
                        if kind == Kind::Money {
                            out.extend_from_slice(&self.styles.money);
                        }
                        push_number(out, itoa::Buffer::new().format(*n));
                    } else {
                        push_text_cell(out, itoa::Buffer::new().format(*n), false);
                    }
                }
                Value::Dec(s) => self.decimal(out, s, kind),
                Value::Bool(b) => {
                    out.extend_from_slice(if *b {
                        b" t=\"b\"><v>1</v></c>"
                    } else {
                        b" t=\"b\"><v>0</v></c>"
                    });
                }
                Value::Ts(t) => match timestamp_serial(*t, self.tz) {
                    Some(x) => {
                        out.extend_from_slice(&self.styles.timestamp);
                        push_number(out, zmij::Buffer::new().format_finite(x));
                    }
                    None => {
                        let mut text = Vec::with_capacity(40);
                        push_timestamp(&mut text, *t, self.tz);
                        push_text_cell(out, &String::from_utf8_lossy(&text), false);
                    }
                },
                Value::Date(d) => match date_serial(*d) {
                    Some(x) => {
                        out.extend_from_slice(&self.styles.date);
                        push_number(out, itoa::Buffer::new().format(x));
                    }
                    None => {
                        let mut text = Vec::with_capacity(16);
                        push_date(&mut text, *d);
                        push_text_cell(out, &String::from_utf8_lossy(&text), false);
                    }
                },
            }
        }
        out.extend_from_slice(b"</row>");
    }

    /// A decimal: money columns show `#,##0.00`, decimal columns the places the text had, other
    /// columns General. Plain decimal text is already a valid `xsd:double` and goes in as it is.
    fn decimal(&self, out: &mut Vec<u8>, s: &str, kind: Kind) {
        let Some(d) = decimal(s) else {
            push_text_cell(out, s, false);
            return;
        };
        match kind {
            Kind::Money => out.extend_from_slice(&self.styles.money),
            Kind::Decimal if d.places > 0 => {
                if let Some(style) = self.styles.places.get(d.places - 1) {
                    out.extend_from_slice(style);
                }
            }
            _ => {}
        }
        match d.value {
            None => push_number(out, s),
            Some(x) => push_number(out, zmij::Buffer::new().format_finite(x)),
        }
    }
}

/// The rest of a number cell after `<c` and its attributes.
fn push_number(out: &mut Vec<u8>, digits: &str) {
    out.extend_from_slice(b"><v>");
    out.extend_from_slice(digits.as_bytes());
    out.extend_from_slice(b"</v></c>");
}

/// The rest of an inline text cell after `<c` and its attributes; `neutralise` guards a formula
/// start with `'`. Text beyond Excel's limit is cut with a visible marker; returns whether it was.
pub fn push_text_cell(out: &mut Vec<u8>, s: &str, neutralise: bool) -> bool {
    let prefix = neutralise && needs_neutralising(s);
    let extra = usize::from(prefix);
    // UTF-16 never needs more units than UTF-8 has bytes, so short text needs no counting.
    let fits = s.len() + extra <= MAX_CELL_CHARS || utf16_len(s) + extra <= MAX_CELL_CHARS;
    let body = if fits {
        s
    } else {
        cut_to_units(s, MAX_CELL_CHARS - extra - utf16_len(TRUNCATION_MARKER))
    };
    // Readers drop leading and trailing XML whitespace unless told to keep it.
    let is_space = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t' | b'\n'));
    let preserve = (!prefix && is_space(body.as_bytes().first()))
        || (fits && is_space(body.as_bytes().last()));
    out.extend_from_slice(if preserve {
        b" t=\"inlineStr\"><is><t xml:space=\"preserve\">".as_slice()
    } else {
        b" t=\"inlineStr\"><is><t>".as_slice()
    });
    if prefix {
        out.push(NEUTRALISING_PREFIX as u8);
    }
    push_escaped(out, body);
    if !fits {
        out.extend_from_slice(TRUNCATION_MARKER.as_bytes());
    }
    out.extend_from_slice(b"</t></is></c>");
    !fits
}

/// The longest prefix of `s` of at most `units` UTF-16 units.
fn cut_to_units(s: &str, units: usize) -> &str {
    let mut used = 0;
    for (i, ch) in s.char_indices() {
        if used + ch.len_utf16() > units {
            return &s[..i];
        }
        used += ch.len_utf16();
    }
    s
}

pub fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// Bytes that may need escaping: `&`, `<`, `>`, control characters other than tab and LF, `_`
/// (start of a literal `_xHHHH_`) and 0xEF (first byte of U+FFFE and U+FFFF).
const SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = b != 0x09 && b != 0x0A;
        b += 1;
    }
    t[b'&' as usize] = true;
    t[b'<' as usize] = true;
    t[b'>' as usize] = true;
    t[b'_' as usize] = true;
    t[0xEF] = true;
    t
};

fn push_escaped(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // Bytes before this index are in `out`.
    let mut copied = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !SPECIAL[b as usize] {
            continue;
        }
        let rest = &bytes[i..];
        // What replaces `bytes[i..resume]`.
        let (replacement, resume): (&[u8], usize) = match b {
            b'&' => (b"&amp;", i + 1),
            b'<' => (b"&lt;", i + 1),
            b'>' => (b"&gt;", i + 1),
            // Only the underscore is escaped; the rest of the sequence follows as it is.
            b'_' if is_excel_escape(rest) => (b"_x005F_", i + 1),
            0xEF if rest.starts_with(&[0xEF, 0xBF, 0xBE]) => (b"_xFFFE_", i + 3),
            0xEF if rest.starts_with(&[0xEF, 0xBF, 0xBF]) => (b"_xFFFF_", i + 3),
            b'_' | 0xEF => continue,
            control => {
                out.extend_from_slice(&bytes[copied..i]);
                push_control_escape(out, control);
                copied = i + 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[copied..i]);
        out.extend_from_slice(replacement);
        copied = resume;
    }
    out.extend_from_slice(&bytes[copied..]);
}

/// `_xHHHH_`: what a reader would decode as an escaped character.
fn is_excel_escape(s: &[u8]) -> bool {
    s.len() >= 7 && s[1] == b'x' && s[2..6].iter().all(u8::is_ascii_hexdigit) && s[6] == b'_'
}

fn push_control_escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(b"_x00");
    out.push(HEX[usize::from(b >> 4)]);
    out.push(HEX[usize::from(b & 0xF)]);
    out.push(b'_');
}

/// A decimal cell's value: `value` is `None` when the text itself can be written (plain decimal
/// text), else the parsed number.
#[derive(Debug, PartialEq)]
struct Decimal {
    value: Option<f64>,
    places: usize,
}

/// How decimal text goes into a number cell, or `None` when it should stay text: not a finite
/// number, or more significant digits than Excel keeps.
fn decimal(s: &str) -> Option<Decimal> {
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
    let places = frac.len().min(MAX_NUMBER_DIGITS);
    if is_decimal_text(s) {
        return Some(Decimal {
            value: None,
            places,
        });
    }
    let x: f64 = s.parse().ok()?;
    x.is_finite().then_some(Decimal {
        value: Some(x),
        places,
    })
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

#[cfg(test)]
mod tests {
    use super::super::tests::{utc, ymd};
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = Vec::new();
        push_escaped(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn text_is_escaped_as_excel_escapes_it() {
        assert_eq!(escaped("plain text"), "plain text");
        assert_eq!(escaped("a<b & c>d"), "a&lt;b &amp; c&gt;d");
        assert_eq!(escaped("tab\tand\nline"), "tab\tand\nline");
        assert_eq!(escaped("cr\r\0\u{1f}"), "cr_x000D__x0000__x001F_");
        assert_eq!(escaped("\u{FFFE}x\u{FFFF}"), "_xFFFE_x_xFFFF_");
        assert_eq!(escaped("_x0041_ and _x12_ _"), "_x005F_x0041_ and _x12_ _");
        assert_eq!(escaped("é\u{FEFF}"), "é\u{FEFF}", "other U+Fxxx stay");
    }

    #[test]
    fn decimals_keep_their_places_and_refuse_silent_rounding() {
        let plain = |places| {
            Some(Decimal {
                value: None,
                places,
            })
        };
        assert_eq!(decimal("12.50"), plain(2));
        assert_eq!(decimal("-0.001"), plain(3));
        assert_eq!(decimal("7"), plain(0));
        assert_eq!(decimal("999999999999999"), plain(0));
        assert_eq!(decimal("0.000000000000000000123"), plain(15));
        assert_eq!(decimal("1000000000000000"), None);
        assert_eq!(decimal("1.234567890123456"), None);
        // Not plain text: written through its value.
        assert_eq!(
            decimal("1e3"),
            Some(Decimal {
                value: Some(1000.0),
                places: 0
            })
        );
        assert_eq!(decimal(".5").and_then(|d| d.value), Some(0.5));
        assert_eq!(decimal("5.").and_then(|d| d.value), Some(5.0));
        assert_eq!(decimal("1e400"), None);
        assert_eq!(decimal("NaN"), None);
        assert_eq!(decimal("12,5"), None);
    }

    #[test]
    fn serial_dates_follow_excels_1900_system() {
        assert_eq!(date_serial(ymd(1900, 1, 1)), Some(1));
        assert_eq!(date_serial(ymd(1900, 2, 28)), Some(59));
        assert_eq!(date_serial(ymd(1900, 3, 1)), Some(61));
        assert_eq!(date_serial(ymd(2024, 1, 1)), Some(45292));
        assert_eq!(date_serial(ymd(9999, 12, 31)), Some(2_958_465));
        assert_eq!(date_serial(ymd(1899, 12, 31)), None);
        let noon = utc("2024-01-01T12:00:00Z");
        assert_eq!(timestamp_serial(noon, chrono_tz::UTC), Some(45292.5));
    }
}
