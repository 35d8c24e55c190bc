//! Reading one file as several key ranges at once: in one worker (parallel ranges) or across
//! invocations (fan-out segments), into reserved part numbers of one multipart upload.
//!
//! The ranges split the order the sequential read would follow (the Query's sort key), so the
//! rows of range 0, then range 1, ... are exactly the rows of the sequential read, in its order.
//! Each range is encoded on its own and uploads its own block of part numbers. S3 wants every
//! part but the last to be at least 5 MiB, which a range's first and last pieces need not be: they
//! are held back as temporary objects and stitched into full parts when the last range is done.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::job::{EncoderState, Lease, UploadedPart};

/// S3's limit of parts per upload, shared out between the ranges.
pub const MAX_PARTS: i32 = 10_000;

/// DynamoDB's limit on a sort key value, in bytes of UTF-8.
pub const MAX_SORT_KEY_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub object_key: String,
    pub upload_id: String,
    /// The sort key the ranges split (of the table, or of the range index when the export has a
    /// time range).
    pub attribute: String,
    /// Invocations the ranges are shared between: 1 = every range in the planning worker.
    pub segments: u32,
    pub runs: Vec<RunState>,
    /// Every part of the file, once the held pieces are stitched: the upload is being completed.
    #[serde(default)]
    pub final_parts: Vec<UploadedPart>,
}

/// A held-back piece of a range's output (its first or last bytes), stored as its own object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub key: String,
    pub size: u64,
}

/// One key range of the file and how far it got, checkpointed at each part it cuts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Inclusive lower bound; `None` = from the first key.
    pub lower: Option<String>,
    /// Exclusive upper bound; `None` = to the last key.
    pub upper: Option<String>,
    /// The run's block of part numbers, `first_part..=last_part`. `first_part` itself is kept for
    /// the stitched part that precedes the run's own parts.
    pub first_part: i32,
    pub last_part: i32,
    /// Source cursor after the last row checkpointed.
    pub cursor: Option<String>,
    pub done: bool,
    pub head: Option<Piece>,
    pub tail: Option<Piece>,
    pub parts: Vec<UploadedPart>,
    /// The encoder's state after the last cut (`None` before run 0's first cut: a new file).
    pub encoder: Option<EncoderState>,
    pub rows: u64,
    pub pages: u64,
    pub read_capacity: f64,
    /// Rows read so far, checkpointed or not: progress only.
    pub rows_seen: u64,
    pub lease: Option<Lease>,
}

impl RunState {
    pub fn bytes(&self) -> u64 {
        let held = |p: &Option<Piece>| p.as_ref().map_or(0, |p| p.size);
        self.parts.iter().map(|p| p.size).sum::<u64>() + held(&self.head) + held(&self.tail)
    }

    /// Whether another worker holds the run at `now`.
    pub fn leased_by_other(&self, owner: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.lease
            .as_ref()
            .filter(|l| l.until > now && l.owner != owner)
            .map(|l| l.until)
    }
}

impl Plan {
    /// Lays out `splits.len() + 1` ranges over the key space, each with its block of part numbers.
    /// `continued` is the encoder state every range after the first starts from (its text goes
    /// after someone else's header).
    pub fn new(
        object_key: String,
        upload_id: String,
        attribute: String,
        segments: u32,
        splits: &[String],
        continued: EncoderState,
    ) -> Self {
        let n = splits.len() + 1;
        let block = MAX_PARTS / n as i32;
        let runs = (0..n)
            .map(|k| RunState {
                lower: k.checked_sub(1).map(|i| splits[i].clone()),
                upper: splits.get(k).cloned(),
                first_part: k as i32 * block + 1,
                last_part: (k as i32 + 1) * block,
                cursor: None,
                done: false,
                head: None,
                tail: None,
                parts: Vec::new(),
                encoder: (k > 0).then(|| continued.clone()),
                rows: 0,
                pages: 0,
                read_capacity: 0.0,
                rows_seen: 0,
                lease: None,
            })
            .collect();
        Self {
            object_key,
            upload_id,
            attribute,
            segments: segments.clamp(1, n as u32),
            runs,
            final_parts: Vec::new(),
        }
    }

    /// The runs segment `segment` processes: a contiguous slice, so each segment reads one span
    /// of the key space.
    pub fn runs_of(&self, segment: u32) -> Vec<usize> {
        let (n, s) = (self.runs.len(), self.segments.max(1) as usize);
        (0..n).filter(|k| k * s / n == segment as usize).collect()
    }

    pub fn all_done(&self) -> bool {
        self.runs.iter().all(|r| r.done)
    }

    pub fn rows(&self) -> u64 {
        self.runs.iter().map(|r| r.rows).sum()
    }

    /// The part list of the finished file: the runs' own parts, and where each stitched part
    /// (the held pieces between two runs' own parts, in order) goes. Every stitched part but the
    /// last holds a run's head, a full part's worth, so it clears S3's minimum.
    pub fn layout(&self) -> Vec<Slot> {
        let mut out = Vec::new();
        let mut pending: Vec<Piece> = Vec::new();
        for run in &self.runs {
            pending.extend(run.head.clone());
            if !run.parts.is_empty() {
                if !pending.is_empty() {
                    out.push(Slot::Stitch {
                        number: run.first_part,
                        pieces: std::mem::take(&mut pending),
                    });
                }
                out.extend(run.parts.iter().cloned().map(Slot::Uploaded));
            }
            pending.extend(run.tail.clone());
        }
        let last = self.runs.last().map_or(MAX_PARTS, |r| r.last_part);
        if !pending.is_empty() || out.is_empty() {
            out.push(Slot::Stitch {
                number: last,
                pieces: pending,
            });
        }
        out
    }

    pub fn pieces(&self) -> impl Iterator<Item = &Piece> {
        self.runs
            .iter()
            .flat_map(|r| r.head.iter().chain(r.tail.iter()))
    }
}

/// One part of the finished file.
#[derive(Debug, Clone, PartialEq)]
pub enum Slot {
    Uploaded(UploadedPart),
    /// Held pieces, concatenated in this order, uploaded as part `number`.
    Stitch {
        number: i32,
        pieces: Vec<Piece>,
    },
}

/// The least string that sorts after `key` (UTF-8 byte order): `key` and a NUL, so `BETWEEN
/// key_after(k) AND ...` reads exactly the keys past `k`. `None` when that would exceed
/// [`MAX_SORT_KEY_BYTES`].
pub fn key_after(key: &str) -> Option<String> {
    (key.len() < MAX_SORT_KEY_BYTES).then(|| format!("{key}\0"))
}

/// The greatest string DynamoDB can hold as a sort key that sorts before `upper` (UTF-8 byte
/// order, at most [`MAX_SORT_KEY_BYTES`]), so `BETWEEN lower AND key_before(upper)` reads exactly
/// the half-open range `[lower, upper)` with one key condition. `None` when no key sorts before
/// `upper`.
pub fn key_before(upper: &str) -> Option<String> {
    let mut s: String = upper.to_string();
    let last = s.pop()?;
    if last == '\0' {
        // A key is a prefix of every longer key, and a shorter one sorts first.
        return (!s.is_empty()).then_some(s);
    }
    let prev = match last as u32 {
        0xE000 => '\u{D7FF}',
        c => char::from_u32(c - 1)?,
    };
    s.push(prev);
    // Everything between `s` and `upper` starts with `s`: pad with the greatest characters that
    // fit, so no key longer than `s` is left out.
    for (max, width) in [
        ('\u{10FFFF}', 4),
        ('\u{FFFF}', 3),
        ('\u{7FF}', 2),
        ('\u{7F}', 1),
    ] {
        while s.len() + width <= MAX_SORT_KEY_BYTES {
            s.push(max);
        }
    }
    Some(s)
}

/// Up to `ranges - 1` split keys strictly between `min` and `max` (inclusive of `max`), spread
/// evenly as base-95 numbers over the printable ASCII after their common prefix. Only the order of
/// the keys matters for correctness; the spread is a guess at balance (exact for keys that are
/// evenly spaced, such as numbered ids or timestamps of steady traffic).
pub fn split_points(min: &str, max: &str, ranges: usize) -> Vec<String> {
    const DIGITS: usize = 8;
    const BASE: u128 = 95;
    let prefix: String = min
        .chars()
        .zip(max.chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a)
        .collect();
    let value = |s: &str| -> u128 {
        let mut rest = s[prefix.len()..].chars();
        (0..DIGITS).fold(0u128, |acc, _| {
            let d = rest
                .next()
                .map_or(0, |c| (c as u32).clamp(0x20, 0x7E) - 0x20);
            acc * BASE + d as u128
        })
    };
    let (lo, hi) = (value(min), value(max));
    let mut out: Vec<String> = Vec::new();
    if ranges < 2 || hi <= lo {
        return out;
    }
    for i in 1..ranges as u128 {
        let mut v = lo + (hi - lo) * i / ranges as u128;
        let mut digits = [' '; DIGITS];
        for d in digits.iter_mut().rev() {
            *d = char::from(0x20 + (v % BASE) as u8);
            v /= BASE;
        }
        let key = format!("{prefix}{}", String::from_iter(digits).trim_end());
        let above_last = out.last().map_or(key.as_str() > min, |l| key > *l);
        if above_last && key.as_str() <= max {
            out.push(key);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_before_is_just_below() {
        let k = key_before("b").unwrap();
        assert!(k.as_str() < "b" && k.as_str() > "a" && k.starts_with('a'));
        assert!(k.len() <= MAX_SORT_KEY_BYTES && k.len() > MAX_SORT_KEY_BYTES - 4);
        assert_eq!(key_before("a\0").as_deref(), Some("a"));
        assert_eq!(key_before(""), None);
        assert_eq!(key_before("\0"), None);
        assert!(key_before("\u{E000}").unwrap().starts_with('\u{D7FF}'));
    }

    #[test]
    fn splits_are_ordered_and_inside() {
        let min = "ORD-acme-00000000";
        let max = "ORD-acme-00999999";
        let s = split_points(min, max, 4);
        assert_eq!(s.len(), 3, "{s:?}");
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s.iter().all(|k| k.as_str() > min && k.as_str() <= max));
        // Evenly numbered ids split near the quarters.
        assert!(s[0].starts_with("ORD-acme-002"), "{s:?}");
        assert!(split_points("a", "a", 4).is_empty());
        assert!(split_points("a", "b", 1).is_empty());
    }

    #[test]
    fn plan_layout_stitches_held_pieces_between_own_parts() {
        let mut plan = Plan::new(
            "k".into(),
            "u".into(),
            "sk".into(),
            1,
            &["m".into(), "t".into()],
            EncoderState::Plain,
        );
        let part = |number| UploadedPart {
            number,
            etag: format!("e{number}"),
            size: 8,
        };
        let piece = |key: &str| {
            Some(Piece {
                key: key.into(),
                size: 1,
            })
        };
        plan.runs[0].parts = vec![part(2), part(3)];
        plan.runs[0].tail = piece("t0");
        plan.runs[1].tail = piece("t1"); // a small run: no head, no own parts
        plan.runs[2].head = piece("h2");
        plan.runs[2].parts = vec![part(plan.runs[2].first_part + 1)];
        plan.runs[2].tail = piece("t2");
        let numbers: Vec<(i32, usize)> = plan
            .layout()
            .iter()
            .map(|s| match s {
                Slot::Uploaded(p) => (p.number, 0),
                Slot::Stitch { number, pieces } => (*number, pieces.len()),
            })
            .collect();
        let (b2, last) = (plan.runs[2].first_part, plan.runs[2].last_part);
        assert_eq!(
            numbers,
            vec![(2, 0), (3, 0), (b2, 3), (b2 + 1, 0), (last, 1)]
        );
        assert_eq!(plan.runs_of(0), vec![0, 1, 2]);
    }

    #[test]
    fn segments_take_contiguous_runs() {
        let splits: Vec<String> = ["b", "c", "d", "e", "f"].map(String::from).to_vec();
        let plan = Plan::new(
            "k".into(),
            "u".into(),
            "sk".into(),
            3,
            &splits,
            EncoderState::Plain,
        );
        let all: Vec<Vec<usize>> = (0..3).map(|s| plan.runs_of(s)).collect();
        assert_eq!(all, vec![vec![0, 1], vec![2, 3], vec![4, 5]]);
    }

    proptest! {
        #[test]
        fn key_before_orders(a in "\\PC{0,12}", u in "\\PC{1,12}") {
            if let Some(k) = key_before(&u) {
                prop_assert!(k < u);
                prop_assert!(k.len() <= MAX_SORT_KEY_BYTES);
                // Every key below `upper` is at most `key_before(upper)`.
                if a < u { prop_assert!(a <= k); }
            } else {
                prop_assert!(a >= u || a.is_empty());
            }
        }

        #[test]
        fn splits_partition(a in "[ -~]{1,20}", b in "[ -~]{1,20}", n in 2usize..12) {
            let (min, max) = if a <= b { (a, b) } else { (b, a) };
            let s = split_points(&min, &max, n);
            prop_assert!(s.len() < n);
            prop_assert!(s.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(s.iter().all(|k| *k > min && *k <= max));
        }
    }
}
