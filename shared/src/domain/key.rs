//! Cache keys and rows keys: what identifies a file, and what identifies the rows behind it.
//!
//! A key is a SHA-256 over an explicit canonical form (docs/contract.md, "Cache key"), not over
//! any serialisation of the spec: adding a field to the stored spec must not move every key on
//! deploy. Keys move only when [`KEY_FORM`] or the encoder version passed in changes, and the
//! golden test below pins a few of them.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::request::ExportSpec;

/// The version of the canonical form. Bumping it moves every key on purpose.
pub const KEY_FORM: &str = "export-cache/key/1";

/// Who a file is built for: the tenant always, the user only where the dataset is user-scoped
/// (the resolved request decides that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner<'a> {
    pub tenant: &'a str,
    pub user: &'a str,
}

/// Identifies one cached file: a hex SHA-256 over everything that changes its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CacheKey(pub String);

impl CacheKey {
    /// `scope` is the tenant and, for user-scoped datasets only, the user.
    pub(super) fn derive(
        scope: (&str, Option<&str>),
        spec: &ExportSpec,
        encoder_version: &str,
    ) -> Self {
        Self(hash(&canonical_form(scope, spec, encoder_version)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The named fields a key hashes, in this order. Every field is always present (empty when not
/// set), so no value can stand in for an absent neighbour.
pub fn canonical_form(
    (tenant, user): (&str, Option<&str>),
    spec: &ExportSpec,
    encoder_version: &str,
) -> Vec<(String, String)> {
    let instant = |t: Option<DateTime<Utc>>| {
        t.map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
            .unwrap_or_default()
    };
    let mut fields = vec![
        ("form", KEY_FORM.to_string()),
        ("encoder", encoder_version.to_string()),
        ("tenant", tenant.to_string()),
        ("user", user.unwrap_or("").to_string()),
        ("dataset", spec.dataset.clone()),
        ("format", spec.format.as_str().to_string()),
        // Column names are identifiers (no commas), already in catalog order.
        ("columns", spec.columns.join(",")),
        ("from", instant(spec.from)),
        ("to", instant(spec.to)),
        ("tz", spec.tz.name().to_string()),
        ("bom", spec.bom.to_string()),
        ("delimiter", spec.delimiter.as_str().to_string()),
        ("filters", spec.filters.len().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect::<Vec<_>>();
    // In name order (a BTreeMap), after their count: a filter cannot pose as another field.
    fields.extend(
        spec.filters
            .iter()
            .map(|(name, value)| (format!("filter:{name}"), value.clone())),
    );
    fields
}

/// Identifies a set of rows however they are written: tenant, user (user-scoped datasets only),
/// dataset, filters and range, but not format, columns or time zone. A row count learnt from one
/// file of these rows is the exact total for any other, so a job can show honest progress from
/// its first row.
pub(super) fn rows_key((tenant, user): (&str, Option<&str>), spec: &ExportSpec) -> String {
    let iso = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
    let mut parts = vec![
        "export-rows".to_string(),
        tenant.to_string(),
        user.unwrap_or("").to_string(),
        spec.dataset.clone(),
        iso(spec.from),
        iso(spec.to),
    ];
    for (name, value) in &spec.filters {
        parts.push(name.clone());
        parts.push(value.clone());
    }
    let mut h = Sha256::new();
    for part in &parts {
        length_prefixed(&mut h, part);
    }
    hex::encode(h.finalize())
}

fn hash(fields: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (name, value) in fields {
        length_prefixed(&mut h, name);
        length_prefixed(&mut h, value);
    }
    hex::encode(h.finalize())
}

/// 8-byte big-endian length, then the bytes: no value can be shifted into its neighbour.
fn length_prefixed(h: &mut Sha256, part: &str) {
    h.update((part.len() as u64).to_be_bytes());
    h.update(part.as_bytes());
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone as _;

    use super::*;
    use crate::domain::request::{Delimiter, Format, TimeZone};

    fn spec() -> ExportSpec {
        ExportSpec {
            dataset: "orders".into(),
            format: Format::Csv,
            columns: vec!["order_id".into(), "amount".into()],
            filters: BTreeMap::new(),
            from: None,
            to: None,
            tz: TimeZone::UTC,
            bom: false,
            delimiter: Delimiter::Comma,
        }
    }

    fn full() -> ExportSpec {
        ExportSpec {
            format: Format::Xlsx,
            filters: BTreeMap::from([
                ("status".to_string(), "paid".to_string()),
                ("paid".to_string(), "true".to_string()),
            ]),
            from: Some(Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap()),
            to: Some(Utc.with_ymd_and_hms(2024, 6, 30, 23, 59, 59).unwrap()),
            tz: TimeZone::parse("Europe/Paris").unwrap(),
            ..spec()
        }
    }

    /// These keys are what deployed caches hold; they were computed independently from the form
    /// in docs/contract.md (Python's hashlib) when pinned. If this test fails, every cached file
    /// is about to be rebuilt: bump KEY_FORM (or the encoder version) on purpose and update the
    /// pins, or undo the change that moved them.
    #[test]
    fn golden_keys_do_not_move() {
        let csv_gz = ExportSpec {
            format: Format::CsvGz,
            bom: true,
            delimiter: Delimiter::Semicolon,
            ..spec()
        };
        for (scope, spec, version, pinned) in [
            (
                ("acme", None),
                spec(),
                "3",
                "ad8008fe27dac217f5bc314203b6339bc2707064caf6d4bcf2957a1d209724cb",
            ),
            (
                ("acme", Some("alice")),
                full(),
                "3",
                "8c04e8341921647e12ec22cd9d2cbb25f146ff1be79ed04c3f25a9d67f518535",
            ),
            (
                ("globex", None),
                csv_gz,
                "3",
                "a4a8caffa9f50923a94e30e4b5e287e0b3d4dcf8242da0e325899ea50329db69",
            ),
        ] {
            assert_eq!(
                CacheKey::derive(scope, &spec, version).as_str(),
                pinned,
                "{scope:?} {spec:?}"
            );
        }
    }

    #[test]
    fn canonical_form_is_the_documented_one() {
        let form = canonical_form(("acme", Some("alice")), &full(), "3");
        let text: Vec<String> = form.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            text,
            [
                "form=export-cache/key/1",
                "encoder=3",
                "tenant=acme",
                "user=alice",
                "dataset=orders",
                "format=xlsx",
                "columns=order_id,amount",
                "from=2024-01-01T00:00:00Z",
                "to=2024-06-30T23:59:59Z",
                "tz=Europe/Paris",
                "bom=false",
                "delimiter=comma",
                "filters=2",
                "filter:paid=true",
                "filter:status=paid",
            ]
        );
    }

    /// The stored spec may grow fields; only the canonical form decides the key.
    #[test]
    fn the_key_does_not_hash_the_stored_form() {
        let mut json = serde_json::to_value(full()).unwrap();
        json["a_field_added_later"] = serde_json::json!(true);
        let spec: ExportSpec = serde_json::from_value(json).unwrap();
        assert_eq!(
            CacheKey::derive(("acme", None), &spec, "3"),
            CacheKey::derive(("acme", None), &full(), "3")
        );
    }

    #[test]
    fn a_filter_cannot_pose_as_another_field() {
        let mut posing = spec();
        posing
            .filters
            .insert("x".into(), "y\u{0}tz=Asia/Tokyo".into());
        let mut plain = spec();
        plain.filters.insert("x".into(), "y".into());
        plain.tz = TimeZone::parse("Asia/Tokyo").unwrap();
        assert_ne!(
            CacheKey::derive(("acme", None), &posing, "3"),
            CacheKey::derive(("acme", None), &plain, "3")
        );
    }
}
