//! An export request, from raw query or JSON input to a [`ResolvedExport`]: the normalised
//! [`ExportSpec`] with its dataset, typed columns and time zone, and from there its cache key.
//!
//! Normalisation is what makes the cache work: two requests that produce the same bytes must
//! produce the same key (column order, filter order, spelling of booleans, time-zone offsets of
//! `from`/`to` do not matter), and anything that changes the bytes must change the key.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::catalog::{Catalog, Column, ColumnType, Dataset};
use super::key::{CacheKey, Owner};

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Format {
    #[serde(rename = "csv")]
    Csv,
    #[serde(rename = "xlsx")]
    Xlsx,
    #[serde(rename = "csv.gz")]
    CsvGz,
    #[serde(rename = "ndjson")]
    Ndjson,
}

impl Format {
    /// Every format, in the order the API lists them.
    pub const ALL: [Self; 4] = [Self::Csv, Self::CsvGz, Self::Xlsx, Self::Ndjson];
    pub const ALLOWED: &'static str = "csv, csv.gz, xlsx, ndjson";

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "csv" => Some(Self::Csv),
            "xlsx" => Some(Self::Xlsx),
            "csv.gz" | "csvgz" | "csv-gz" => Some(Self::CsvGz),
            "ndjson" => Some(Self::Ndjson),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Xlsx => "xlsx",
            Self::CsvGz => "csv.gz",
            Self::Ndjson => "ndjson",
        }
    }

    /// File name extension, also used in S3 keys.
    pub fn extension(self) -> &'static str {
        self.as_str()
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Xlsx => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            Self::CsvGz => "application/gzip",
            Self::Ndjson => "application/x-ndjson",
        }
    }

    pub fn is_csv(self) -> bool {
        matches!(self, Self::Csv | Self::CsvGz)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Delimiter {
    #[default]
    Comma,
    Semicolon,
    Tab,
}

impl Delimiter {
    pub const ALLOWED: &'static str = "comma, semicolon, tab";

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "comma" | "," => Some(Self::Comma),
            "semicolon" | ";" => Some(Self::Semicolon),
            "tab" | "\t" => Some(Self::Tab),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Comma => b',',
            Self::Semicolon => b';',
            Self::Tab => b'\t',
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Comma => "comma",
            Self::Semicolon => "semicolon",
            Self::Tab => "tab",
        }
    }

    fn is_comma(&self) -> bool {
        *self == Self::Comma
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Everything that decides the bytes of a file, normalised. Stored in jobs and cache entries so a
/// refresh rebuilds exactly the same request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSpec {
    pub dataset: String,
    pub format: Format,
    /// Selected columns, always in catalog order: the file's column order is the catalog's.
    pub columns: Vec<String>,
    /// Filter column -> normalised value.
    #[serde(default)]
    pub filters: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<DateTime<Utc>>,
    /// Zone for timestamps in the file.
    #[serde(default, skip_serializing_if = "TimeZone::is_utc")]
    pub tz: TimeZone,
    #[serde(default, skip_serializing_if = "is_false")]
    pub bom: bool,
    #[serde(default, skip_serializing_if = "Delimiter::is_comma")]
    pub delimiter: Delimiter,
}

/// An IANA time zone, stored as its name. Parsing is strict both from callers and from stored
/// records: an unknown name is an error, never a silent UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TimeZone(chrono_tz::Tz);

impl TimeZone {
    pub const UTC: Self = Self(chrono_tz::UTC);

    /// UTC under any of its names is the one UTC, so `tz=Etc/UTC` shares a key with no `tz`.
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().parse::<chrono_tz::Tz>().ok()? {
            chrono_tz::UTC | chrono_tz::Etc::UTC => Some(Self::UTC),
            zone => Some(Self(zone)),
        }
    }

    pub fn tz(self) -> chrono_tz::Tz {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }

    pub fn is_utc(&self) -> bool {
        *self == Self::UTC
    }
}

impl From<chrono_tz::Tz> for TimeZone {
    fn from(tz: chrono_tz::Tz) -> Self {
        Self(tz)
    }
}

impl Serialize for TimeZone {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for TimeZone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!("`{name}` is not an IANA time zone name"))
        })
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    /// `field` may be caller input (an unknown parameter name): it is bounded like a quote.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        Self {
            field: if field.len() <= QUOTE_CHARS && !field.contains(char::is_control) {
                field
            } else {
                bounded(&field)
            },
            message: message.into(),
        }
    }
}

/// Longest filter value accepted, in bytes (docs/contract.md, "Limits").
pub const MAX_FILTER_VALUE_BYTES: usize = 1024;
/// Field errors in one answer; the rest are summed up in one more entry so a hostile request
/// cannot grow the error body.
pub const MAX_FIELD_ERRORS: usize = 10;
/// Characters of caller input an error message may quote.
const QUOTE_CHARS: usize = 40;

/// Caller input as an error message may show it: back-quoted, at most a few dozen characters,
/// control characters escaped. Errors must never echo huge or binary input back.
pub fn quoted(value: &str) -> String {
    format!("`{}`", bounded(value))
}

fn bounded(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(QUOTE_CHARS)
        .flat_map(|c| {
            let escape = c.is_control() || c == '`';
            let mut buf = Vec::new();
            if escape {
                buf.extend(c.escape_default());
            } else {
                buf.push(c);
            }
            buf
        })
        .collect();
    if value.chars().nth(QUOTE_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// One error per field (the first), at most [`MAX_FIELD_ERRORS`] of them.
fn bounded_errors(errors: Vec<FieldError>) -> Vec<FieldError> {
    let mut out: Vec<FieldError> = Vec::new();
    let mut dropped = 0usize;
    for e in errors {
        if out.iter().any(|o| o.field == e.field) {
            continue;
        }
        if out.len() < MAX_FIELD_ERRORS {
            out.push(e);
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        out.push(FieldError::new(
            "request",
            format!("{dropped} more fields have problems; fix the ones above first"),
        ));
    }
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("unknown dataset `{name}`")]
    UnknownDataset { name: String, allowed: Vec<String> },
    #[error("invalid export request")]
    Invalid(Vec<FieldError>),
}

/// Fields of the JSON body of `POST /exports`.
pub const JSON_FIELDS: [&str; 10] = [
    "dataset",
    "format",
    "columns",
    "filters",
    "from",
    "to",
    "max_stale",
    "tz",
    "bom",
    "delimiter",
];

/// What the caller sent, before any validation. Built from a query string or a JSON body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawExportRequest {
    pub dataset: String,
    pub format: Option<String>,
    pub columns: Option<Vec<String>>,
    /// In arrival order, duplicates kept so they can be refused.
    pub filters: Vec<(String, String)>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub max_stale: Option<String>,
    pub tz: Option<String>,
    pub bom: Option<String>,
    pub delimiter: Option<String>,
    /// Problems found while reading the raw input itself (repeated or mistyped parameters).
    pub input_errors: Vec<FieldError>,
}

/// Query parameters of `GET /exports/{dataset}` that are options; every other one is a filter.
pub const QUERY_OPTIONS: [&str; 8] = [
    "format",
    "columns",
    "from",
    "to",
    "max_stale",
    "tz",
    "bom",
    "delimiter",
];

impl RawExportRequest {
    /// `GET /exports/{dataset}?...`: every parameter that is not an option is a filter.
    pub fn from_query(dataset: &str, pairs: Vec<(String, String)>) -> Self {
        let mut raw = Self {
            dataset: dataset.to_string(),
            ..Self::default()
        };
        let mut seen: Vec<String> = Vec::new();
        for (k, v) in pairs {
            if QUERY_OPTIONS.contains(&k.as_str()) {
                if seen.contains(&k) {
                    raw.input_errors
                        .push(FieldError::new(&k, "given more than once; give it once"));
                    continue;
                }
                seen.push(k.clone());
                match k.as_str() {
                    "columns" => raw.columns = Some(split_list(&v)),
                    "format" => raw.format = Some(v),
                    "from" => raw.from = Some(v),
                    "to" => raw.to = Some(v),
                    "max_stale" => raw.max_stale = Some(v),
                    "tz" => raw.tz = Some(v),
                    "bom" => raw.bom = Some(v),
                    "delimiter" => raw.delimiter = Some(v),
                    // QUERY_OPTIONS names exactly the arms above.
                    _ => {}
                }
            } else {
                raw.filters.push((k, v));
            }
        }
        raw
    }

    /// `POST /exports` with `{dataset, format, columns, filters: {}, from, to, max_stale, ...}`.
    pub fn from_json(body: &serde_json::Value) -> Self {
        let mut raw = Self::default();
        let Some(obj) = body.as_object() else {
            raw.input_errors.push(FieldError::new(
                "body",
                "must be a JSON object like {\"dataset\": \"orders\", \"format\": \"csv\"}",
            ));
            return raw;
        };
        let mut listed = false;
        for key in obj.keys().filter(|k| !JSON_FIELDS.contains(&k.as_str())) {
            let message = if listed {
                "unknown field".to_string()
            } else {
                format!("unknown field; allowed: {}", JSON_FIELDS.join(", "))
            };
            listed = true;
            raw.input_errors.push(FieldError::new(key, message));
        }
        match obj.get("dataset") {
            Some(serde_json::Value::String(s)) => raw.dataset = s.clone(),
            Some(_) => raw
                .input_errors
                .push(FieldError::new("dataset", "must be a string")),
            None => raw
                .input_errors
                .push(FieldError::new("dataset", "is required")),
        }
        let mut scalar = |name: &str| -> Option<String> {
            match obj.get(name) {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => match scalar_text(v) {
                    Some(s) => Some(s),
                    None => {
                        raw.input_errors
                            .push(FieldError::new(name, "must be a string, number or boolean"));
                        None
                    }
                },
            }
        };
        let format = scalar("format");
        let from = scalar("from");
        let to = scalar("to");
        let max_stale = scalar("max_stale");
        let tz = scalar("tz");
        let bom = scalar("bom");
        let delimiter = scalar("delimiter");
        raw.format = format;
        raw.from = from;
        raw.to = to;
        raw.max_stale = max_stale;
        raw.tz = tz;
        raw.bom = bom;
        raw.delimiter = delimiter;
        match obj.get("columns") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(s)) => raw.columns = Some(split_list(s)),
            Some(serde_json::Value::Array(items)) => {
                let cols: Option<Vec<String>> = items
                    .iter()
                    .map(|i| i.as_str().map(|s| s.trim().to_string()))
                    .collect();
                match cols {
                    Some(cols) => raw.columns = Some(cols),
                    None => raw.input_errors.push(FieldError::new(
                        "columns",
                        "must be an array of column names",
                    )),
                }
            }
            Some(_) => raw.input_errors.push(FieldError::new(
                "columns",
                "must be an array of column names or a comma list",
            )),
        }
        match obj.get("filters") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Object(map)) => {
                for (k, v) in map {
                    match scalar_text(v) {
                        Some(s) => raw.filters.push((k.clone(), s)),
                        None => raw.input_errors.push(FieldError::new(
                            format!("filters.{k}"),
                            "must be a string, number or boolean",
                        )),
                    }
                }
            }
            Some(_) => raw.input_errors.push(FieldError::new(
                "filters",
                "must be an object of column -> value",
            )),
        }
        raw
    }
}

fn scalar_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(|c| c.trim().to_string()).collect()
}

/// A validated request, resolved against the catalog: the spec that decides the bytes with the
/// dataset and typed columns it names, plus how stale a file the caller takes. Callers' requests
/// ([`normalise`]), catalog pins and stored jobs ([`Catalog::resolve`]) all become one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedExport {
    pub dataset: Arc<Dataset>,
    /// The stored form, kept in jobs and entries so a refresh rebuilds exactly the same file.
    pub spec: ExportSpec,
    /// The selected columns, typed, in catalog (= file) order.
    pub columns: Vec<Column>,
    /// Seconds of staleness accepted; `None` means whatever the dataset's stale window allows.
    pub max_stale: Option<u64>,
}

impl ResolvedExport {
    /// The key of the file this request names for `owner`. Only user-scoped datasets key by
    /// user; `encoder_version` moves every key when the encoders change their bytes.
    pub fn cache_key(&self, owner: Owner<'_>, encoder_version: &str) -> CacheKey {
        CacheKey::derive(self.scoped(owner), &self.spec, encoder_version)
    }

    /// The key of the rows behind the file, whatever their format (see [`super::key::rows_key`]).
    pub fn rows_key(&self, owner: Owner<'_>) -> String {
        super::key::rows_key(self.scoped(owner), &self.spec)
    }

    /// How old past its fresh deadline a file the caller takes: never past the dataset's stale
    /// window, so a larger `max_stale` (up to u64::MAX from the query) means the window.
    pub fn accepted_staleness(&self) -> u64 {
        self.max_stale.map_or(self.dataset.stale_seconds, |s| {
            s.min(self.dataset.stale_seconds)
        })
    }

    fn scoped<'a>(&self, owner: Owner<'a>) -> (&'a str, Option<&'a str>) {
        (owner.tenant, self.dataset.user_scoped.then_some(owner.user))
    }
}

/// A stored spec that the catalog no longer offers as it was.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("the dataset `{0}` is no longer offered")]
    UnknownDataset(String),
    #[error("the column `{column}` of `{dataset}` is no longer offered")]
    UnknownColumn { dataset: String, column: String },
}

impl Catalog {
    /// Resolves a spec stored in a job or entry. It was valid when stored; the catalog may have
    /// changed since, and then the file cannot be built as its key promises.
    pub fn resolve(&self, spec: &ExportSpec) -> Result<ResolvedExport, ResolveError> {
        let dataset = self
            .get(&spec.dataset)
            .ok_or_else(|| ResolveError::UnknownDataset(spec.dataset.clone()))?;
        let unknown = |column: &str| ResolveError::UnknownColumn {
            dataset: spec.dataset.clone(),
            column: column.to_string(),
        };
        if let Some(missing) = spec.columns.iter().find(|c| dataset.column(c).is_none()) {
            return Err(unknown(missing));
        }
        if let Some(missing) = spec.filters.keys().find(|c| dataset.column(c).is_none()) {
            return Err(unknown(missing));
        }
        Ok(ResolvedExport {
            columns: selected(dataset, &spec.columns),
            dataset: dataset.clone(),
            spec: spec.clone(),
            max_stale: None,
        })
    }
}

/// The dataset's columns that `names` selects, in catalog order.
fn selected(ds: &Dataset, names: &[String]) -> Vec<Column> {
    ds.columns
        .iter()
        .filter(|c| names.contains(&c.name))
        .cloned()
        .collect()
}

pub fn normalise(
    catalog: &Catalog,
    raw: &RawExportRequest,
) -> Result<ResolvedExport, RequestError> {
    let Some(ds) = catalog.get(raw.dataset.trim()) else {
        // A malformed body that also lacks a dataset is a 400, not a 404.
        if !raw.input_errors.is_empty() {
            return Err(RequestError::Invalid(bounded_errors(
                raw.input_errors.clone(),
            )));
        }
        return Err(RequestError::UnknownDataset {
            name: bounded(&raw.dataset),
            allowed: catalog.names().iter().map(|s| s.to_string()).collect(),
        });
    };
    let mut errors = raw.input_errors.clone();

    let format = match raw.format.as_deref() {
        None => Format::Csv,
        Some(f) => Format::parse(f).unwrap_or_else(|| {
            errors.push(FieldError::new(
                "format",
                format!(
                    "{} is not a format; allowed: {}",
                    quoted(f),
                    Format::ALLOWED
                ),
            ));
            Format::Csv
        }),
    };

    let columns = normalise_columns(ds, raw.columns.as_deref(), &mut errors);
    let filters = normalise_filters(ds, &raw.filters, &mut errors);

    let from = parse_instant("from", raw.from.as_deref(), ds, &mut errors);
    let to = parse_instant("to", raw.to.as_deref(), ds, &mut errors);
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            errors.push(FieldError::new("to", "must not be before `from`"));
        }
    }

    let max_stale = raw.max_stale.as_deref().and_then(|s| {
        s.trim().parse::<u64>().ok().or_else(|| {
            errors.push(FieldError::new(
                "max_stale",
                format!(
                    "{} is not a number of seconds (0 = must be fresh)",
                    quoted(s)
                ),
            ));
            None
        })
    });

    let tz = raw.tz.as_deref().map_or(TimeZone::UTC, |t| {
        TimeZone::parse(t).unwrap_or_else(|| {
            errors.push(FieldError::new(
                "tz",
                format!(
                    "{} is not an IANA time zone name (e.g. UTC, Europe/Paris, America/New_York)",
                    quoted(t)
                ),
            ));
            TimeZone::UTC
        })
    });

    let csv_only = |name: &str, errors: &mut Vec<FieldError>| {
        if !format.is_csv() {
            errors.push(FieldError::new(
                name,
                format!("applies to csv and csv.gz only, not {}", format.as_str()),
            ));
        }
    };
    let bom = match raw.bom.as_deref() {
        None => false,
        Some(b) => {
            csv_only("bom", &mut errors);
            parse_bool(b).unwrap_or_else(|| {
                errors.push(FieldError::new("bom", "must be true or false"));
                false
            })
        }
    };
    let delimiter = match raw.delimiter.as_deref() {
        None => Delimiter::Comma,
        Some(d) => {
            csv_only("delimiter", &mut errors);
            Delimiter::parse(d).unwrap_or_else(|| {
                errors.push(FieldError::new(
                    "delimiter",
                    format!(
                        "{} is not a delimiter; allowed: {}",
                        quoted(d),
                        Delimiter::ALLOWED
                    ),
                ));
                Delimiter::Comma
            })
        }
    };

    if !errors.is_empty() {
        return Err(RequestError::Invalid(bounded_errors(errors)));
    }
    Ok(ResolvedExport {
        columns: selected(ds, &columns),
        dataset: ds.clone(),
        spec: ExportSpec {
            dataset: ds.name.clone(),
            format,
            columns,
            filters,
            from,
            to,
            tz,
            bom,
            delimiter,
        },
        max_stale,
    })
}

fn normalise_columns(
    ds: &Dataset,
    requested: Option<&[String]>,
    errors: &mut Vec<FieldError>,
) -> Vec<String> {
    let all = || ds.columns.iter().map(|c| c.name.clone()).collect();
    let Some(requested) = requested else {
        return all();
    };
    if requested.len() > ds.columns.len() {
        errors.push(FieldError::new(
            "columns",
            format!(
                "names {} columns; `{}` has {}: {}",
                requested.len(),
                ds.name,
                ds.columns.len(),
                ds.column_names().join(", ")
            ),
        ));
        return all();
    }
    let mut wanted = vec![false; ds.columns.len()];
    let mut unknown: Vec<&str> = Vec::new();
    let mut problem: Option<String> = None;
    for name in requested {
        match ds.column(name) {
            _ if name.is_empty() => {
                problem.get_or_insert_with(|| {
                    "contains an empty column name; give a comma list of column names".into()
                });
            }
            Some((i, _)) if wanted[i] => {
                problem.get_or_insert_with(|| format!("names {} more than once", quoted(name)));
            }
            Some((i, _)) => wanted[i] = true,
            None => unknown.push(name),
        }
    }
    if let Some(first) = unknown.first() {
        let more = match unknown.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        problem = Some(format!(
            "{}{more} is not a column of `{}`; allowed: {}",
            quoted(first),
            ds.name,
            ds.column_names().join(", ")
        ));
    }
    match problem {
        Some(message) => errors.push(FieldError::new("columns", message)),
        None if !wanted.contains(&true) => {
            errors.push(FieldError::new("columns", "select at least one column"))
        }
        None => {}
    }
    ds.columns
        .iter()
        .zip(wanted)
        .filter(|(_, w)| *w)
        .map(|(c, _)| c.name.clone())
        .collect()
}

fn normalise_filters(
    ds: &Dataset,
    given: &[(String, String)],
    errors: &mut Vec<FieldError>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut allowed_listed = false;
    for (name, value) in given {
        let Some(col) = ds
            .filters
            .iter()
            .map(|&i| &ds.columns[i])
            .find(|c| &c.name == name)
        else {
            let allowed = ds.filter_names();
            // The allowed list once per answer, however many unknown filters were sent.
            let message = if allowed_listed {
                format!("is not a filter of `{}` either", ds.name)
            } else if allowed.is_empty() {
                format!("`{}` takes no filters", ds.name)
            } else {
                format!(
                    "is not a filter of `{}`; allowed filters: {} (and from/to on {})",
                    ds.name,
                    allowed.join(", "),
                    ds.range_column().map_or("nothing", |c| c.name.as_str())
                )
            };
            allowed_listed = true;
            errors.push(FieldError::new(name, message));
            continue;
        };
        if out.contains_key(name) {
            errors.push(FieldError::new(
                name,
                "given more than once; one value per filter",
            ));
            continue;
        }
        if value.len() > MAX_FILTER_VALUE_BYTES || value.contains(char::is_control) {
            errors.push(FieldError::new(
                name,
                format!(
                    "must be at most {MAX_FILTER_VALUE_BYTES} bytes of printable text (no control characters)"
                ),
            ));
            continue;
        }
        match normalise_value(col.ty, value) {
            Ok(v) => {
                out.insert(name.clone(), v);
            }
            Err(m) => errors.push(FieldError::new(name, m)),
        }
    }
    out
}

/// Filter values in their canonical spelling, so `paid=TRUE` and `paid=1` share a key.
pub fn normalise_value(ty: ColumnType, value: &str) -> Result<String, String> {
    match ty {
        ColumnType::String => {
            if value.is_empty() {
                Err("must not be empty".into())
            } else {
                Ok(value.to_string())
            }
        }
        ColumnType::Integer => value
            .trim()
            .parse::<i64>()
            .map(|i| i.to_string())
            .map_err(|_| format!("{} is not an integer", quoted(value))),
        ColumnType::Boolean => parse_bool(value)
            .map(|b| b.to_string())
            .ok_or_else(|| format!("{} is not a boolean; use true or false", quoted(value))),
        ColumnType::Date => NaiveDate::parse_from_str(value.trim(), "%Y-%m-%d")
            .map(|d| d.format("%Y-%m-%d").to_string())
            .map_err(|_| format!("{} is not a date; use YYYY-MM-DD", quoted(value))),
        ColumnType::Decimal | ColumnType::Timestamp => {
            Err("this column cannot be filtered by equality".into())
        }
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

fn parse_instant(
    field: &str,
    value: Option<&str>,
    ds: &Dataset,
    errors: &mut Vec<FieldError>,
) -> Option<DateTime<Utc>> {
    let value = value?;
    if ds.range.is_none() {
        errors.push(FieldError::new(
            field,
            format!("`{}` has no time range; from/to are not allowed", ds.name),
        ));
        return None;
    }
    match DateTime::parse_from_rfc3339(value.trim()) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(_) => {
            errors.push(FieldError::new(
                field,
                format!(
                    "{} is not an RFC 3339 timestamp (e.g. 2024-05-01T00:00:00Z)",
                    quoted(value)
                ),
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::CacheKey;
    use proptest::prelude::*;

    const ALICE: Owner<'static> = Owner {
        tenant: "acme",
        user: "alice",
    };

    fn catalog() -> Catalog {
        Catalog::builtin().unwrap()
    }

    fn q(dataset: &str, pairs: &[(&str, &str)]) -> RawExportRequest {
        RawExportRequest::from_query(
            dataset,
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn key(pairs: &[(&str, &str)]) -> CacheKey {
        let r = normalise(&catalog(), &q("orders", pairs)).unwrap();
        r.cache_key(ALICE, "3")
    }

    fn errors(pairs: &[(&str, &str)]) -> Vec<FieldError> {
        match normalise(&catalog(), &q("orders", pairs)) {
            Err(RequestError::Invalid(e)) => e,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_csv_with_all_columns_in_catalog_order() {
        let r = normalise(&catalog(), &q("orders", &[])).unwrap();
        assert_eq!(r.spec.format, Format::Csv);
        assert_eq!(r.spec.columns[0], "order_id");
        assert_eq!(r.spec.columns.len(), 12);
        assert_eq!(
            key(&[]),
            key(&[(
                "columns",
                &catalog().get("orders").unwrap().column_names().join(",")
            )]),
            "naming every column is the default"
        );
    }

    #[test]
    fn every_format_parses_from_its_name_and_the_allowed_list_names_them_all() {
        let names: Vec<&str> = Format::ALL.iter().map(|f| f.as_str()).collect();
        assert_eq!(names.join(", "), Format::ALLOWED);
        for f in Format::ALL {
            assert_eq!(Format::parse(f.as_str()), Some(f));
            let stored = serde_json::to_value(f).unwrap();
            assert_eq!(stored, f.as_str(), "stored as its name");
        }
        assert_eq!(Format::Ndjson.content_type(), "application/x-ndjson");
        assert_eq!(Format::Ndjson.extension(), "ndjson");
        // Options of CSV only are refused for NDJSON like for XLSX.
        let fields: Vec<String> = errors(&[("format", "ndjson"), ("bom", "true")])
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["bom"]);
    }

    #[test]
    fn column_order_and_filter_order_do_not_change_the_key() {
        let a = key(&[
            ("columns", "amount,order_id"),
            ("status", "paid"),
            ("currency", "EUR"),
        ]);
        let b = key(&[
            ("currency", "EUR"),
            ("columns", "order_id, amount"),
            ("status", "paid"),
        ]);
        assert_eq!(a, b);
    }

    #[test]
    fn equivalent_spellings_share_a_key() {
        assert_eq!(key(&[("paid", "TRUE")]), key(&[("paid", "1")]));
        assert_eq!(
            key(&[("from", "2024-01-01T01:00:00+01:00")]),
            key(&[("from", "2024-01-01T00:00:00Z")])
        );
        assert_eq!(key(&[("format", "CSV")]), key(&[]));
        assert_eq!(key(&[("tz", "UTC")]), key(&[]));
        assert_eq!(key(&[("delimiter", "comma"), ("bom", "false")]), key(&[]));
    }

    #[test]
    fn anything_that_changes_the_bytes_changes_the_key() {
        let base = key(&[]);
        for variant in [
            vec![("format", "xlsx")],
            vec![("format", "csv.gz")],
            vec![("format", "ndjson")],
            vec![("columns", "order_id")],
            vec![("status", "paid")],
            vec![("from", "2024-01-01T00:00:00Z")],
            vec![("to", "2024-01-01T00:00:00Z")],
            vec![("tz", "Europe/Paris")],
            vec![("bom", "true")],
            vec![("delimiter", "semicolon")],
        ] {
            assert_ne!(key(&variant), base, "{variant:?}");
        }
        let spec = normalise(&catalog(), &q("orders", &[])).unwrap().spec;
        assert_ne!(
            CacheKey::derive(("acme", None), &spec, "3"),
            CacheKey::derive(("globex", None), &spec, "3")
        );
        assert_ne!(
            CacheKey::derive(("acme", Some("u1")), &spec, "3"),
            CacheKey::derive(("acme", Some("u2")), &spec, "3")
        );
        assert_ne!(
            CacheKey::derive(("acme", None), &spec, "3"),
            CacheKey::derive(("acme", None), &spec, "4"),
            "a new encoder version moves the key"
        );
    }

    #[test]
    fn only_user_scoped_datasets_key_by_user() {
        let bob = Owner {
            tenant: "acme",
            user: "bob",
        };
        let orders = normalise(&catalog(), &q("orders", &[])).unwrap();
        assert_eq!(orders.cache_key(ALICE, "3"), orders.cache_key(bob, "3"));
        assert_eq!(orders.rows_key(ALICE), orders.rows_key(bob));
        let contacts = normalise(&catalog(), &q("contacts", &[])).unwrap();
        assert_ne!(contacts.cache_key(ALICE, "3"), contacts.cache_key(bob, "3"));
        assert_ne!(contacts.rows_key(ALICE), contacts.rows_key(bob));
    }

    #[test]
    fn resolving_a_stored_spec_gives_back_the_request() {
        let c = catalog();
        let r = normalise(
            &c,
            &q(
                "orders",
                &[("columns", "amount,order_id"), ("tz", "Europe/Paris")],
            ),
        )
        .unwrap();
        let stored: ExportSpec =
            serde_json::from_str(&serde_json::to_string(&r.spec).unwrap()).unwrap();
        let again = c.resolve(&stored).unwrap();
        assert_eq!(again.spec, r.spec);
        assert_eq!(again.columns, r.columns);
        assert_eq!(again.spec.tz.name(), "Europe/Paris");
        let names: Vec<&str> = again.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["order_id", "amount"], "catalog order, typed");

        let mut gone = stored.clone();
        gone.columns.push("colour".into());
        assert!(matches!(
            c.resolve(&gone),
            Err(ResolveError::UnknownColumn { .. })
        ));
        gone.dataset = "invoices".into();
        assert!(matches!(
            c.resolve(&gone),
            Err(ResolveError::UnknownDataset(_))
        ));
    }

    #[test]
    fn a_stored_unknown_time_zone_is_an_error_not_utc() {
        let c = catalog();
        let mut json =
            serde_json::to_value(normalise(&c, &q("orders", &[])).unwrap().spec).unwrap();
        json["tz"] = "Mars/Olympus_Mons".into();
        assert!(serde_json::from_value::<ExportSpec>(json.clone()).is_err());
        json["tz"] = "Asia/Tokyo".into();
        let spec: ExportSpec = serde_json::from_value(json).unwrap();
        assert_eq!(spec.tz.tz(), chrono_tz::Asia::Tokyo);
    }

    #[test]
    fn max_stale_does_not_change_the_key() {
        assert_eq!(key(&[("max_stale", "0")]), key(&[]));
    }

    #[test]
    fn unknown_dataset_lists_the_allowed_ones() {
        match normalise(&catalog(), &q("invoices", &[])) {
            Err(RequestError::UnknownDataset { name, allowed }) => {
                assert_eq!(name, "invoices");
                assert_eq!(allowed, vec!["contacts", "customers", "orders"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_inputs_name_the_field_and_what_is_allowed() {
        let e = errors(&[("format", "pdf")]);
        assert_eq!(e[0].field, "format");
        assert!(e[0].message.contains("csv, csv.gz, xlsx"));

        let e = errors(&[("columns", "order_id,colour")]);
        assert_eq!(e[0].field, "columns");
        assert!(e[0].message.contains("colour") && e[0].message.contains("order_id"));

        let e = errors(&[("colour", "red")]);
        assert_eq!(e[0].field, "colour");
        assert!(e[0].message.contains("status, currency, paid"));

        let e = errors(&[("from", "yesterday")]);
        assert_eq!(e[0].field, "from");
        assert!(e[0].message.contains("RFC 3339"));

        let e = errors(&[
            ("from", "2024-02-01T00:00:00Z"),
            ("to", "2024-01-01T00:00:00Z"),
        ]);
        assert_eq!(e[0].field, "to");

        assert_eq!(errors(&[("paid", "maybe")])[0].field, "paid");
        assert_eq!(errors(&[("tz", "Mars/Olympus")])[0].field, "tz");
        assert_eq!(errors(&[("max_stale", "-1")])[0].field, "max_stale");
        assert_eq!(
            errors(&[("status", "paid"), ("status", "shipped")])[0].field,
            "status"
        );
        assert_eq!(
            errors(&[("format", "xlsx"), ("bom", "true")])[0].field,
            "bom"
        );
        assert_eq!(errors(&[("delimiter", "pipe")])[0].field, "delimiter");
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let e = errors(&[("format", "pdf"), ("colour", "red"), ("from", "x")]);
        let fields: Vec<&str> = e.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, vec!["format", "colour", "from"]);
    }

    #[test]
    fn json_body_normalises_like_the_query() {
        let body = serde_json::json!({
            "dataset": "orders", "format": "csv", "columns": ["amount", "order_id"],
            "filters": {"status": "paid", "paid": true}, "from": "2024-01-01T00:00:00Z"
        });
        let from_json = normalise(&catalog(), &RawExportRequest::from_json(&body)).unwrap();
        let from_query = normalise(
            &catalog(),
            &q(
                "orders",
                &[
                    ("columns", "order_id,amount"),
                    ("paid", "true"),
                    ("status", "paid"),
                    ("from", "2024-01-01T00:00:00Z"),
                ],
            ),
        )
        .unwrap();
        assert_eq!(from_json, from_query);
    }

    #[test]
    fn json_body_errors_name_fields() {
        let raw = RawExportRequest::from_json(&serde_json::json!({"dataset": 3, "colour": 1}));
        match normalise(&catalog(), &raw) {
            Err(RequestError::Invalid(e)) => {
                let fields: Vec<&str> = e.iter().map(|f| f.field.as_str()).collect();
                assert!(
                    fields.contains(&"dataset") && fields.contains(&"colour"),
                    "{fields:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        let raw = RawExportRequest::from_json(&serde_json::json!([1, 2]));
        assert!(matches!(
            normalise(&catalog(), &raw),
            Err(RequestError::Invalid(_))
        ));
    }

    proptest! {
        #[test]
        fn key_ignores_column_and_filter_permutations(
            cols in proptest::sample::subsequence(
                vec!["order_id", "created_at", "customer_id", "status", "amount", "paid", "note"], 1..7),
            seed in any::<u64>(),
            status in "[a-z]{1,8}",
            paid in any::<bool>(),
        ) {
            let mut shuffled = cols.clone();
            // Deterministic shuffle from the seed.
            let n = shuffled.len();
            for i in (1..n).rev() {
                let j = (seed.rotate_left(i as u32) as usize) % (i + 1);
                shuffled.swap(i, j);
            }
            let paid_s = paid.to_string();
            let a = key(&[("columns", &cols.join(",")), ("status", &status), ("paid", &paid_s)]);
            let b = key(&[("paid", if paid { "1" } else { "0" }), ("columns", &shuffled.join(",")), ("status", &status)]);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn different_filter_values_never_collide(a in "[a-z]{1,12}", b in "[a-z]{1,12}") {
            prop_assume!(a != b);
            prop_assert_ne!(key(&[("status", &a)]), key(&[("status", &b)]));
        }

        #[test]
        fn arbitrary_query_input_never_panics(
            pairs in proptest::collection::vec(("[a-z_]{1,10}", ".{0,20}"), 0..8)
        ) {
            let raw = RawExportRequest::from_query("orders", pairs);
            let _ = normalise(&catalog(), &raw);
        }
    }
}
