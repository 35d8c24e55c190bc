//! Invalidation on data changes: which datasets a source write touches, and the debounce that
//! turns a burst of writes into few generation bumps.
//!
//! A dataset generation is bumped at the first change of a window and at most once more, when
//! the window ends, for every change seen inside it ("trailing"): a burst of writes costs one
//! write at its start and one pending flag, and no change stays hidden for longer than the
//! window. The pending bump is not written when the window ends: readers compute it
//! ([`DatasetGeneration::effective`]), so nothing has to run at the window's end.

use chrono::{DateTime, Duration, Utc};

use super::catalog::{Catalog, Dataset};

/// A tenant+dataset generation record as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatasetGeneration {
    pub gen: u64,
    /// End of the window opened by the last immediate bump.
    pub window_until: DateTime<Utc>,
    /// A change arrived inside the window: one more bump takes effect at `window_until`.
    pub trailing: bool,
    /// Compare-and-set counter of the stored record (0: never written).
    pub version: u64,
    /// The first generation under which every change other than an insert is visible: a file
    /// built under an older one may hold rows changed or removed since, so an append-only
    /// dataset's next file is read in full rather than extending it (`services::append`).
    pub rewritten: u64,
}

impl DatasetGeneration {
    /// The generation entries are judged by at `now`, a pending trailing bump included.
    pub fn effective(&self, now: DateTime<Utc>) -> u64 {
        if self.trailing && now >= self.window_until {
            self.gen + 1
        } else {
            self.gen
        }
    }

    /// The record after a change seen at `at`, debounced over `window`; `None` when it already
    /// says what the change needs (a trailing bump is pending in the current window). `rewrite`:
    /// the change was not an insert.
    pub fn after_change(&self, at: DateTime<Utc>, window: Duration, rewrite: bool) -> Option<Self> {
        let next = if at >= self.window_until {
            Self {
                gen: self.effective(at) + 1,
                window_until: at + window,
                trailing: false,
                ..*self
            }
        } else {
            Self {
                trailing: true,
                ..*self
            }
        };
        // Visible from the generation that makes the change visible: this bump, or the pending one.
        let visible_at = if next.trailing {
            next.gen + 1
        } else {
            next.gen
        };
        let next = Self {
            rewritten: if rewrite {
                self.rewritten.max(visible_at)
            } else {
                self.rewritten
            },
            version: self.version + 1,
            ..next
        };
        (next.gen != self.gen || next.trailing != self.trailing || next.rewritten != self.rewritten)
            .then_some(next)
    }
}

/// The table name in a DynamoDB stream ARN (`arn:...:table/NAME/stream/LABEL`).
pub fn table_of_stream_arn(arn: &str) -> Option<&str> {
    let (_, rest) = arn.split_once(":table/")?;
    let (table, _) = rest.split_once("/stream/")?;
    (!table.is_empty()).then_some(table)
}

/// A tenant+dataset to bump for a write, with the dataset's debounce window.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Touched {
    pub tenant: String,
    pub dataset: String,
    pub window_seconds: u64,
}

/// Every dataset that reads `table` (named as the stack names it: `prefix` + catalog table) and
/// has not opted out, for the tenant whose partition `attribute` gives. Datasets of one table may
/// name different tenant attributes, so the tenant is looked up per dataset.
pub fn touched<'a>(
    catalog: &Catalog,
    prefix: &str,
    table: &str,
    attribute: impl Fn(&str) -> Option<&'a str>,
) -> Vec<Touched> {
    let Some(table) = table.strip_prefix(prefix) else {
        return Vec::new();
    };
    catalog
        .datasets()
        .filter(|d: &&Dataset| d.table == table && d.invalidate_after_seconds > 0)
        .filter_map(|d| {
            let tenant = attribute(&d.tenant_attribute).filter(|t| !t.is_empty())?;
            Some(Touched {
                tenant: tenant.to_string(),
                dataset: d.name.clone(),
                window_seconds: d.invalidate_after_seconds,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::catalog::BUILTIN_CATALOG;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    /// Applies changes at the given seconds, counting stored writes.
    fn run(changes: &[i64], window: i64) -> (DatasetGeneration, usize) {
        let mut g = DatasetGeneration::default();
        let mut writes = 0;
        for &t in changes {
            if let Some(next) = g.after_change(at(t), Duration::seconds(window), false) {
                g = next;
                writes += 1;
            }
        }
        (g, writes)
    }

    #[test]
    fn a_change_other_than_an_insert_marks_the_generation_that_shows_it() {
        let w = Duration::seconds(60);
        let g = DatasetGeneration::default();
        // An insert opens a window: generation 1, nothing rewritten.
        let g = g.after_change(at(0), w, false).unwrap();
        assert_eq!((g.gen, g.rewritten), (1, 0));
        // An update inside the window shows at the trailing bump, generation 2.
        let g = g.after_change(at(10), w, true).unwrap();
        assert_eq!((g.gen, g.trailing, g.rewritten), (1, true, 2));
        // Another update in the same window needs no write; an insert neither.
        assert!(g.after_change(at(20), w, true).is_none());
        assert!(g.after_change(at(30), w, false).is_none());
        // A removal in a later window is visible at once, at its own bump.
        let g = g.after_change(at(100), w, true).unwrap();
        assert_eq!((g.gen, g.rewritten), (3, 3));
        // An insert then leaves it where it is.
        let g = g.after_change(at(200), w, false).unwrap();
        assert_eq!((g.gen, g.rewritten), (4, 3));
    }

    #[test]
    fn an_update_in_a_window_already_pending_an_insert_still_marks_it() {
        let w = Duration::seconds(60);
        let g = DatasetGeneration::default()
            .after_change(at(0), w, false)
            .unwrap()
            .after_change(at(5), w, false)
            .unwrap();
        assert!(g.trailing);
        let g = g
            .after_change(at(6), w, true)
            .expect("the rewrite must be recorded");
        assert_eq!((g.gen, g.rewritten), (1, 2));
    }

    #[test]
    fn a_burst_bumps_at_once_and_once_more_when_its_window_ends() {
        let (g, writes) = run(&[0, 1, 2, 30, 59], 60);
        assert_eq!(writes, 2, "one bump, one trailing flag");
        assert_eq!(g.effective(at(0)), 1, "the first change shows at once");
        assert_eq!(g.effective(at(59)), 1);
        assert_eq!(
            g.effective(at(60)),
            2,
            "the later ones when the window ends"
        );
    }

    #[test]
    fn a_single_change_bumps_once() {
        let (g, writes) = run(&[5], 60);
        assert_eq!(writes, 1);
        assert_eq!(g.effective(at(1000)), 1);
    }

    #[test]
    fn a_change_after_the_window_builds_on_the_trailing_bump() {
        let (pending, _) = run(&[0, 10], 60);
        assert_eq!(pending.effective(at(99)), 2);
        let (g, _) = run(&[0, 10, 100], 60);
        assert_eq!(
            g.effective(at(100)),
            3,
            "the trailing bump, then this change's own"
        );
        assert!(!g.trailing);
    }

    #[test]
    fn stream_arns_name_their_table() {
        let arn = "arn:aws:dynamodb:us-east-1:123456789012:table/export-cache-orders/stream/2026-12-07T00:00:00.000";
        assert_eq!(table_of_stream_arn(arn), Some("export-cache-orders"));
        assert_eq!(
            table_of_stream_arn("arn:aws:dynamodb:us-east-1:1:table/t"),
            None
        );
        assert_eq!(table_of_stream_arn("nonsense"), None);
    }

    #[test]
    fn a_write_touches_every_dataset_of_its_table_for_its_tenant() {
        let catalog = Catalog::builtin().unwrap();
        let tenant = |a: &str| (a == "tenant_id").then_some("acme");
        let mut names: Vec<String> = touched(&catalog, "stack-", "stack-customers", tenant)
            .into_iter()
            .map(|t| t.dataset)
            .collect();
        names.sort();
        assert_eq!(names, ["contacts", "customers"]);
        let orders = touched(&catalog, "stack-", "stack-orders", tenant);
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0].tenant, "acme");
        assert_eq!(orders[0].window_seconds, 60);
        assert!(touched(&catalog, "stack-", "other-orders", tenant).is_empty());
        assert!(touched(&catalog, "stack-", "stack-orders", |_| None).is_empty());
    }

    #[test]
    fn an_opted_out_dataset_is_never_touched() {
        let text = BUILTIN_CATALOG.replace(
            "invalidate_after_seconds = 60\n",
            "invalidate_after_seconds = 0\n",
        );
        let catalog = Catalog::from_toml(&text).unwrap();
        let touched = touched(&catalog, "", "orders", |_| Some("acme"));
        assert!(touched.is_empty(), "{touched:?}");
    }

    proptest! {
        /// Whatever the timing of the writes: at most two writes per window opened, every
        /// change is reflected within one window, and the effective generation never goes back.
        #[test]
        fn debounce_bounds_writes_and_staleness(
            gaps in proptest::collection::vec(0i64..200, 1..40),
            window in 1i64..120,
        ) {
            let mut t = 0;
            let mut g = DatasetGeneration::default();
            let mut writes = 0;
            let mut windows = 0;
            let mut last_seen = 0;
            for gap in gaps {
                t += gap;
                prop_assert!(g.effective(at(t)) >= last_seen);
                let before = g.effective(at(t));
                if let Some(next) = g.after_change(at(t), Duration::seconds(window), false) {
                    if next.gen != g.gen { windows += 1; }
                    g = next;
                    writes += 1;
                }
                // An entry built before this change (under `before`) is not current any more
                // once the window is over.
                prop_assert!(g.effective(at(t + window)) > before);
                last_seen = g.effective(at(t));
            }
            prop_assert!(writes <= 2 * windows);
        }
    }
}
