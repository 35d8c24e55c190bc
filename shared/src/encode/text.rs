//! Cell text shared by the encoders: formula-injection neutralisation and fast date formatting.

use chrono::{DateTime, Datelike, NaiveDate, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// A text cell starting with one of these would be read as a formula (or a DDE payload) by a
/// spreadsheet. OWASP's advice: make it inert text by prefixing a single quote.
pub fn needs_neutralising(s: &str) -> bool {
    matches!(
        s.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    )
}

pub const NEUTRALISING_PREFIX: char = '\'';

fn push2(out: &mut Vec<u8>, v: u32) {
    out.push(b'0' + (v / 10) as u8);
    out.push(b'0' + (v % 10) as u8);
}

fn push_year(out: &mut Vec<u8>, y: i32) {
    if (0..=9999).contains(&y) {
        let y = y as u32;
        push2(out, y / 100);
        push2(out, y % 100);
    } else {
        out.extend_from_slice(y.to_string().as_bytes());
    }
}

pub fn push_date(out: &mut Vec<u8>, d: NaiveDate) {
    push_year(out, d.year());
    out.push(b'-');
    push2(out, d.month());
    out.push(b'-');
    push2(out, d.day());
}

/// RFC 3339 in `tz`: `Z` for UTC, `±hh:mm` otherwise; fractional seconds only when present.
pub fn push_timestamp(out: &mut Vec<u8>, t: DateTime<Utc>, tz: Tz) {
    let (local, offset_secs) = if tz == chrono_tz::UTC {
        (t.naive_utc(), None)
    } else {
        let off = tz.offset_from_utc_datetime(&t.naive_utc()).fix();
        (t.naive_utc() + off, Some(off.local_minus_utc()))
    };
    push_date(out, local.date());
    out.push(b'T');
    push2(out, local.hour());
    out.push(b':');
    push2(out, local.minute());
    out.push(b':');
    push2(out, local.second());
    let nanos = local.nanosecond() % 1_000_000_000;
    if nanos != 0 {
        let (digits, value) = if nanos % 1_000_000 == 0 {
            (3, nanos / 1_000_000)
        } else if nanos % 1_000 == 0 {
            (6, nanos / 1_000)
        } else {
            (9, nanos)
        };
        out.push(b'.');
        out.extend_from_slice(format!("{value:0digits$}").as_bytes());
    }
    match offset_secs {
        None => out.push(b'Z'),
        Some(secs) => {
            out.push(if secs < 0 { b'-' } else { b'+' });
            let m = secs.unsigned_abs() / 60;
            push2(out, m / 60);
            out.push(b':');
            push2(out, m % 60);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::SecondsFormat;

    #[test]
    fn timestamps_match_chrono_rfc3339() {
        let samples = [
            "2024-01-01T00:00:00Z",
            "1999-12-31T23:59:59.5Z",
            "2024-07-01T12:34:56.123456Z",
            "2024-03-31T01:30:00.000000001Z",
        ];
        for tz in [
            chrono_tz::UTC,
            chrono_tz::Europe::Paris,
            chrono_tz::America::St_Johns,
        ] {
            for s in samples {
                let t = DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
                let mut out = Vec::new();
                push_timestamp(&mut out, t, tz);
                let expected = t
                    .with_timezone(&tz)
                    .to_rfc3339_opts(SecondsFormat::AutoSi, true);
                assert_eq!(String::from_utf8(out).unwrap(), expected, "{s} in {tz}");
            }
        }
    }

    #[test]
    fn formula_starts_are_detected() {
        for s in ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"] {
            assert!(needs_neutralising(s), "{s:?}");
        }
        for s in ["", "a=1", "1", " =1", "'=1"] {
            assert!(!needs_neutralising(s), "{s:?}");
        }
    }
}
