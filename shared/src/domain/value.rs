//! A cell value, typed by the catalog column it belongs to.

use chrono::{DateTime, NaiveDate, Utc};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Str(String),
    Int(i64),
    /// Kept as validated decimal text so no precision is lost on the way to CSV.
    Dec(String),
    Bool(bool),
    Ts(DateTime<Utc>),
    Date(NaiveDate),
}

pub type Row = Vec<Value>;

/// `-12.50`, `3`, `0.001`: an optional sign, digits, an optional fraction. No exponent, so the text
/// is already what a spreadsheet or a CSV reader expects.
pub fn is_decimal_text(s: &str) -> bool {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_text_accepts_plain_numbers_only() {
        for ok in ["0", "12", "-12.50", "0.001", "1234567890123456789.12"] {
            assert!(is_decimal_text(ok), "{ok}");
        }
        for bad in [
            "", "-", ".5", "5.", "1e3", "1,5", " 1", "+1", "NaN", "1.2.3",
        ] {
            assert!(!is_decimal_text(bad), "{bad}");
        }
    }
}
