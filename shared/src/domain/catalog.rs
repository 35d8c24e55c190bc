//! The dataset catalog: what can be exported, from where, with which columns and rules.
//!
//! Parsed from TOML text into raw structs, then validated into [`Catalog`]; a bad catalog fails
//! cold start with an error naming the dataset and the field, never a panic later on a request.
//! Pins are resolved here too, once, into the same [`ResolvedExport`] a caller's request becomes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;

use super::request::{normalise, RawExportRequest, RequestError, ResolvedExport};

/// The catalog compiled into every function, so a deployment cannot run without one.
pub const BUILTIN_CATALOG: &str = include_str!("../../catalog.toml");

/// How long job records and in-flight markers are kept (DynamoDB TTL); files under `exports/`
/// expire after the same time through the bucket's lifecycle rule. A dataset's fresh and stale
/// windows must fit in it.
pub const KEEP_RECORDS_FOR_DAYS: i64 = 7;

/// Names a dataset cannot take: a fixed path of the API would hide it (`GET /exports/datasets`
/// is the list, `/exports/cache/stats` the statistics).
pub const RESERVED_NAMES: [&str; 2] = ["datasets", "stats"];

/// Debounce window of invalidation on source writes when a dataset names none: a burst of
/// writes costs a bump or two a minute, and a change shows within a minute.
pub const DEFAULT_INVALIDATE_AFTER_SECONDS: u64 = 60;

/// Upper bound for a dataset's row limit: beyond this a single export is not the right tool.
pub const MAX_ROW_LIMIT: u64 = 100_000_000;

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    String,
    Integer,
    Decimal,
    Boolean,
    Timestamp,
    Date,
}

impl ColumnType {
    pub const ALLOWED: &'static str = "string, integer, decimal, boolean, timestamp, date";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "string" => Self::String,
            "integer" => Self::Integer,
            "decimal" => Self::Decimal,
            "boolean" => Self::Boolean,
            "timestamp" => Self::Timestamp,
            "date" => Self::Date,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Integer => "integer",
            Self::Decimal => "decimal",
            Self::Boolean => "boolean",
            Self::Timestamp => "timestamp",
            Self::Date => "date",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    pub label: String,
    /// Attribute name in the source item.
    pub source: String,
    /// Shown with a currency number format in spreadsheets.
    pub money: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSpec {
    /// Index of the timestamp column in [`Dataset::columns`].
    pub column: usize,
    /// Index (GSI/LSI) whose partition key is the tenant attribute and sort key the column.
    pub index: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub name: String,
    pub description: String,
    pub table: String,
    pub tenant_attribute: String,
    pub sort_attribute: String,
    pub columns: Vec<Column>,
    /// Indexes into `columns` of the columns that accept an equality filter.
    pub filters: Vec<usize>,
    pub range: Option<RangeSpec>,
    pub ttl_seconds: u64,
    pub stale_seconds: u64,
    pub row_limit: u64,
    /// The file depends on the caller, so the user is part of the cache key.
    pub user_scoped: bool,
    /// Rows are only ever added, each with a sort key above every earlier one: a refresh may
    /// extend the previous file with the rows past its last key instead of reading everything.
    /// Index into `columns` of the watermark column (the sort key's).
    pub append_only: Option<usize>,
    /// Debounce window of invalidation on source writes (see `domain::invalidation`); 0: writes
    /// are ignored and entries live out their `ttl_seconds`.
    pub invalidate_after_seconds: u64,
}

/// An export the warmer keeps fresh for `tenants` whether or not anyone asked lately, resolved
/// at load exactly as the same query from a caller would be.
#[derive(Debug, Clone)]
pub struct Pin {
    pub tenants: Vec<String>,
    pub export: ResolvedExport,
}

impl Dataset {
    pub fn column(&self, name: &str) -> Option<(usize, &Column)> {
        self.columns
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == name)
    }

    pub fn filter_names(&self) -> Vec<&str> {
        self.filters
            .iter()
            .map(|&i| self.columns[i].name.as_str())
            .collect()
    }

    pub fn column_names(&self) -> Vec<&str> {
        self.columns.iter().map(|c| c.name.as_str()).collect()
    }

    pub fn range_column(&self) -> Option<&Column> {
        self.range.as_ref().map(|r| &self.columns[r.column])
    }
}

#[derive(Debug, Clone)]
pub struct Catalog {
    datasets: BTreeMap<String, Arc<Dataset>>,
    pins: Vec<Pin>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CatalogError {
    #[error("catalog is not valid TOML: {0}")]
    Syntax(String),
    #[error("catalog: dataset `{dataset}`, field `{field}`: {message}")]
    Invalid {
        dataset: String,
        field: String,
        message: String,
    },
    #[error("catalog file {path}: {message}")]
    Io { path: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    datasets: Vec<RawDataset>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    name: String,
    #[serde(default)]
    description: String,
    table: String,
    tenant_attribute: String,
    sort_attribute: String,
    #[serde(default)]
    filters: Vec<String>,
    range: Option<RawRange>,
    ttl_seconds: u64,
    stale_seconds: u64,
    row_limit: u64,
    #[serde(default)]
    user_scoped: bool,
    #[serde(default)]
    append_only: bool,
    watermark: Option<String>,
    invalidate_after_seconds: Option<u64>,
    columns: Vec<RawColumn>,
    #[serde(default)]
    pins: Vec<RawPin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPin {
    tenants: Vec<String>,
    #[serde(default)]
    query: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    column: String,
    index: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    label: String,
    source: Option<String>,
    #[serde(default)]
    money: bool,
}

/// Names end up in URLs, cache keys and S3 keys: keep them boring.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Catalog {
    pub fn builtin() -> Result<Self, CatalogError> {
        Self::from_toml(BUILTIN_CATALOG)
    }

    pub fn from_toml(text: &str) -> Result<Self, CatalogError> {
        let raw: RawCatalog =
            toml::from_str(text).map_err(|e| CatalogError::Syntax(e.to_string()))?;
        if raw.datasets.is_empty() {
            return Err(invalid("*", "datasets", "the catalog declares no dataset"));
        }
        let mut datasets = BTreeMap::new();
        let mut raw_pins = Vec::new();
        for mut rd in raw.datasets {
            let pins = std::mem::take(&mut rd.pins);
            let ds = validate_dataset(rd)?;
            if datasets.contains_key(&ds.name) {
                return Err(invalid(&ds.name, "name", "declared twice"));
            }
            raw_pins.push((ds.name.clone(), pins));
            datasets.insert(ds.name.clone(), Arc::new(ds));
        }
        let mut catalog = Self {
            datasets,
            pins: Vec::new(),
        };
        for (dataset, pins) in raw_pins {
            for (i, pin) in pins.into_iter().enumerate() {
                let pin = catalog.resolve_pin(&dataset, i, pin)?;
                catalog.pins.push(pin);
            }
        }
        Ok(catalog)
    }

    /// A pin must be a request the API would accept, for tenants named plainly, on a dataset
    /// that is not user-scoped (a pin has no user).
    fn resolve_pin(&self, dataset: &str, i: usize, pin: RawPin) -> Result<Pin, CatalogError> {
        let field = format!("pins[{i}]");
        if self.datasets[dataset].user_scoped {
            return Err(invalid(
                dataset,
                &field,
                "a user-scoped dataset cannot be pinned",
            ));
        }
        if pin.tenants.is_empty() || pin.tenants.iter().any(|t| t.trim().is_empty()) {
            return Err(invalid(
                dataset,
                &format!("{field}.tenants"),
                "name at least one tenant",
            ));
        }
        let pairs = form_urlencoded::parse(pin.query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let export =
            normalise(self, &RawExportRequest::from_query(dataset, pairs)).map_err(|e| {
                let why = match e {
                    RequestError::Invalid(errors) => errors
                        .iter()
                        .map(|e| format!("{}: {}", e.field, e.message))
                        .collect::<Vec<_>>()
                        .join("; "),
                    other => other.to_string(),
                };
                invalid(dataset, &format!("{field}.query"), why)
            })?;
        Ok(Pin {
            tenants: pin.tenants,
            export,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Dataset>> {
        self.datasets.get(name)
    }

    /// Every pinned export, in catalog order.
    pub fn pins(&self) -> &[Pin] {
        &self.pins
    }

    pub fn names(&self) -> Vec<&str> {
        self.datasets.keys().map(String::as_str).collect()
    }

    pub fn datasets(&self) -> impl Iterator<Item = &Dataset> {
        self.datasets.values().map(|d| d.as_ref())
    }
}

fn invalid(dataset: &str, field: &str, message: impl Into<String>) -> CatalogError {
    CatalogError::Invalid {
        dataset: dataset.to_string(),
        field: field.to_string(),
        message: message.into(),
    }
}

fn validate_dataset(rd: RawDataset) -> Result<Dataset, CatalogError> {
    let name = rd.name.clone();
    let err = |field: &str, msg: String| invalid(&name, field, msg);
    if !is_identifier(&rd.name) {
        return Err(err(
            "name",
            "must be 1-64 characters of a-z, 0-9 and _, starting with a letter".into(),
        ));
    }
    if RESERVED_NAMES.contains(&rd.name.as_str()) {
        return Err(err(
            "name",
            format!(
                "`{}` is a path of the API; reserved: {}",
                rd.name,
                RESERVED_NAMES.join(", ")
            ),
        ));
    }
    for (field, value) in [
        ("table", &rd.table),
        ("tenant_attribute", &rd.tenant_attribute),
        ("sort_attribute", &rd.sort_attribute),
    ] {
        if value.trim().is_empty() {
            return Err(err(field, "must not be empty".into()));
        }
    }
    if rd.columns.is_empty() {
        return Err(err("columns", "at least one column is required".into()));
    }
    let mut columns = Vec::with_capacity(rd.columns.len());
    let mut seen = HashSet::new();
    for (i, rc) in rd.columns.into_iter().enumerate() {
        let field = format!("columns[{i}]");
        if !is_identifier(&rc.name) {
            return Err(err(
                &format!("{field}.name"),
                format!(
                    "`{}` must be 1-64 characters of a-z, 0-9 and _, starting with a letter",
                    rc.name
                ),
            ));
        }
        if !seen.insert(rc.name.clone()) {
            return Err(err(
                &format!("{field}.name"),
                format!("column `{}` is declared twice", rc.name),
            ));
        }
        let ty = ColumnType::parse(&rc.ty).ok_or_else(|| {
            err(
                &format!("{field}.type"),
                format!(
                    "unknown type `{}` for column `{}` (allowed: {})",
                    rc.ty,
                    rc.name,
                    ColumnType::ALLOWED
                ),
            )
        })?;
        if rc.label.trim().is_empty() {
            return Err(err(
                &format!("{field}.label"),
                format!("column `{}` needs a header label", rc.name),
            ));
        }
        if rc.money && ty != ColumnType::Decimal && ty != ColumnType::Integer {
            return Err(err(
                &format!("{field}.money"),
                format!(
                    "column `{}` is {}; only numbers can be money",
                    rc.name,
                    ty.as_str()
                ),
            ));
        }
        let source = rc.source.unwrap_or_else(|| rc.name.clone());
        if source.trim().is_empty() {
            return Err(err(&format!("{field}.source"), "must not be empty".into()));
        }
        columns.push(Column {
            name: rc.name,
            ty,
            label: rc.label,
            source,
            money: rc.money,
        });
    }
    let find = |n: &str| columns.iter().position(|c| c.name == n);
    let mut filters = Vec::new();
    for f in &rd.filters {
        let idx = find(f).ok_or_else(|| {
            err(
                "filters",
                format!("`{f}` is not a column of the dataset (columns: {})", {
                    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                    names.join(", ")
                }),
            )
        })?;
        if matches!(columns[idx].ty, ColumnType::Decimal | ColumnType::Timestamp) {
            return Err(err(
                "filters",
                format!(
                    "`{f}` is a {} column; equality filters take string, integer, boolean or date columns (use `range` for timestamps)",
                    columns[idx].ty.as_str()
                ),
            ));
        }
        if filters.contains(&idx) {
            return Err(err("filters", format!("`{f}` is listed twice")));
        }
        filters.push(idx);
    }
    let range = match rd.range {
        None => None,
        Some(r) => {
            let idx = find(&r.column).ok_or_else(|| {
                err(
                    "range.column",
                    format!("`{}` is not a column of the dataset", r.column),
                )
            })?;
            if columns[idx].ty != ColumnType::Timestamp {
                return Err(err(
                    "range.column",
                    format!(
                        "`{}` is a {} column; the range needs a timestamp column",
                        r.column,
                        columns[idx].ty.as_str()
                    ),
                ));
            }
            if r.index.trim().is_empty() {
                return Err(err("range.index", "must name the index to query".into()));
            }
            Some(RangeSpec {
                column: idx,
                index: r.index,
            })
        }
    };
    if rd.ttl_seconds == 0 {
        return Err(err(
            "ttl_seconds",
            "must be > 0 (how long a file is fresh)".into(),
        ));
    }
    // Records and files are kept KEEP_RECORDS_FOR_DAYS: a file cannot be served longer, and the
    // bound keeps every deadline computed from these numbers in range.
    let keep = KEEP_RECORDS_FOR_DAYS as u64 * 86_400;
    if rd.ttl_seconds.saturating_add(rd.stale_seconds) > keep {
        return Err(err(
            "stale_seconds",
            format!("ttl_seconds + stale_seconds must be at most {keep} (how long files are kept)"),
        ));
    }
    let invalidate_after_seconds = rd
        .invalidate_after_seconds
        .unwrap_or(DEFAULT_INVALIDATE_AFTER_SECONDS);
    // A change may stay hidden for one window: longer than the fresh time, TTL alone does better.
    if invalidate_after_seconds > rd.ttl_seconds {
        return Err(err(
            "invalidate_after_seconds",
            format!(
                "must be at most ttl_seconds ({}); 0 ignores source writes",
                rd.ttl_seconds
            ),
        ));
    }
    if rd.row_limit == 0 || rd.row_limit > MAX_ROW_LIMIT {
        return Err(err(
            "row_limit",
            format!("must be between 1 and {MAX_ROW_LIMIT}"),
        ));
    }
    let append_only = append_watermark(
        rd.append_only,
        rd.watermark.as_deref(),
        &rd.sort_attribute,
        &columns,
    )
    .map_err(|(f, m)| err(f, m))?;
    Ok(Dataset {
        name: rd.name,
        description: rd.description,
        table: rd.table,
        tenant_attribute: rd.tenant_attribute,
        sort_attribute: rd.sort_attribute,
        columns,
        filters,
        range,
        ttl_seconds: rd.ttl_seconds,
        stale_seconds: rd.stale_seconds,
        row_limit: rd.row_limit,
        user_scoped: rd.user_scoped,
        append_only,
        invalidate_after_seconds,
    })
}

/// The watermark of an append-only dataset: its sort key, as a text column. Only then do the
/// rows past the previous file's last key come after all of its rows in the file (rows are read
/// in sort-key order), so the file extended with them is the file a full read makes.
fn append_watermark(
    append_only: bool,
    watermark: Option<&str>,
    sort_attribute: &str,
    columns: &[Column],
) -> Result<Option<usize>, (&'static str, String)> {
    match (append_only, watermark) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err((
            "watermark",
            "only an append_only dataset has a watermark".into(),
        )),
        (true, None) => Err((
            "watermark",
            "an append_only dataset names its watermark column (the sort key's)".into(),
        )),
        (true, Some(w)) => {
            let (idx, column) = columns
                .iter()
                .enumerate()
                .find(|(_, c)| c.name == w)
                .ok_or_else(|| ("watermark", format!("`{w}` is not a column of the dataset")))?;
            if column.source != sort_attribute || column.ty != ColumnType::String {
                return Err((
                    "watermark",
                    format!(
                        "`{w}` must be the text column of the sort key `{}`: rows are read in its order, so only rows past it extend a file at its end",
                        sort_attribute
                    ),
                ));
            }
            Ok(Some(idx))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[datasets]]
name = "things"
table = "things"
tenant_attribute = "tenant"
sort_attribute = "id"
ttl_seconds = 60
stale_seconds = 0
row_limit = 10
filters = ["kind"]
range = { column = "at", index = "by_at" }
columns = [
  { name = "id", type = "string", label = "ID" },
  { name = "kind", type = "string", label = "Kind" },
  { name = "at", type = "timestamp", label = "At" },
]
"#;

    fn with(replace: &str, by: &str) -> Result<Catalog, CatalogError> {
        assert!(MINIMAL.contains(replace), "fixture lacks {replace}");
        Catalog::from_toml(&MINIMAL.replacen(replace, by, 1))
    }

    fn field_of(e: CatalogError) -> (String, String) {
        match e {
            CatalogError::Invalid { dataset, field, .. } => (dataset, field),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn builtin_catalog_is_valid_and_has_the_demo_datasets() {
        let c = Catalog::builtin().unwrap();
        assert_eq!(c.names(), vec!["contacts", "customers", "orders"]);
        let orders = c.get("orders").unwrap();
        assert_eq!(orders.columns.len(), 12);
        assert_eq!(orders.range_column().unwrap().name, "created_at");
        assert_eq!(orders.filter_names(), vec!["status", "currency", "paid"]);
    }

    #[test]
    fn minimal_catalog_parses() {
        let c = Catalog::from_toml(MINIMAL).unwrap();
        let d = c.get("things").unwrap();
        assert_eq!(d.columns[0].source, "id", "source defaults to the name");
        assert_eq!(d.range.as_ref().unwrap().column, 2);
    }

    #[test]
    fn unknown_type_names_dataset_column_and_allowed_types() {
        let e = with(r#"type = "timestamp""#, r#"type = "datetime""#).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("dataset `things`"), "{msg}");
        assert!(msg.contains("columns[2].type"), "{msg}");
        assert!(
            msg.contains("datetime") && msg.contains("allowed: string"),
            "{msg}"
        );
    }

    #[test]
    fn filter_on_unknown_column_is_rejected() {
        let e = with(r#"filters = ["kind"]"#, r#"filters = ["colour"]"#).unwrap_err();
        assert_eq!(field_of(e), ("things".into(), "filters".into()));
    }

    #[test]
    fn range_needs_a_timestamp_column() {
        let e = with(r#"column = "at""#, r#"column = "kind""#).unwrap_err();
        assert_eq!(field_of(e), ("things".into(), "range.column".into()));
    }

    #[test]
    fn duplicate_column_and_bad_limits_are_rejected() {
        let e = with(r#"name = "kind""#, r#"name = "id""#).unwrap_err();
        assert_eq!(field_of(e).1, "columns[1].name");
        assert_eq!(
            field_of(with("ttl_seconds = 60", "ttl_seconds = 0").unwrap_err()).1,
            "ttl_seconds"
        );
        assert_eq!(
            field_of(with("row_limit = 10", "row_limit = 0").unwrap_err()).1,
            "row_limit"
        );
    }

    #[test]
    fn invalidation_window_defaults_and_is_bounded_by_the_fresh_time() {
        let ds = |c: &Catalog| c.get("things").unwrap().invalidate_after_seconds;
        assert_eq!(
            ds(&Catalog::from_toml(MINIMAL).unwrap()),
            DEFAULT_INVALIDATE_AFTER_SECONDS
        );
        let opted_out = with(
            "row_limit = 10",
            "row_limit = 10\ninvalidate_after_seconds = 0",
        );
        assert_eq!(ds(&opted_out.unwrap()), 0);
        let too_long = with(
            "row_limit = 10",
            "row_limit = 10\ninvalidate_after_seconds = 61",
        );
        assert_eq!(
            field_of(too_long.unwrap_err()).1,
            "invalidate_after_seconds"
        );
    }

    #[test]
    fn bad_names_and_unknown_fields_are_rejected() {
        assert_eq!(
            field_of(with(r#"name = "things""#, r#"name = "Things!""#).unwrap_err()).1,
            "name"
        );
        assert!(matches!(
            with("row_limit = 10", "row_limit = 10\ncolour = 1").unwrap_err(),
            CatalogError::Syntax(_)
        ));
        assert!(Catalog::from_toml("").is_err());
        for reserved in RESERVED_NAMES {
            let e = with(r#"name = "things""#, &format!("name = \"{reserved}\"")).unwrap_err();
            assert_eq!(field_of(e), (reserved.to_string(), "name".to_string()));
        }
    }

    #[test]
    fn pins_are_validated_like_requests() {
        let pinned = format!(
            "{MINIMAL}\n[[datasets.pins]]\ntenants = [\"acme\"]\nquery = \"kind=a&format=xlsx\"\n"
        );
        let c = Catalog::from_toml(&pinned).unwrap();
        let pin = &c.pins()[0];
        assert_eq!(pin.tenants, ["acme"]);
        assert_eq!(pin.export.spec.format, crate::domain::Format::Xlsx);
        assert_eq!(pin.export.spec.filters["kind"], "a");
        assert_eq!(pin.export.dataset.name, "things");
        let bad = pinned.replace("kind=a", "colour=red");
        let e = Catalog::from_toml(&bad).unwrap_err();
        assert_eq!(field_of(e.clone()).1, "pins[0].query");
        assert!(e.to_string().contains("colour"), "{e}");
        let nobody = pinned.replace("tenants = [\"acme\"]", "tenants = []");
        assert_eq!(
            field_of(Catalog::from_toml(&nobody).unwrap_err()).1,
            "pins[0].tenants"
        );
    }

    #[test]
    fn duplicate_dataset_is_rejected() {
        let twice = format!("{MINIMAL}\n{MINIMAL}");
        assert_eq!(field_of(Catalog::from_toml(&twice).unwrap_err()).1, "name");
    }
}
