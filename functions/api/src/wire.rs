//! The bodies the API sends and takes, as types: the handlers serialise these, and the OpenAPI
//! document (`GET /openapi.json`) describes them from the same definitions.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use shared::domain::{ColumnType, Dataset, FieldError, Format, Job, JobError, JobKind, JobStatus};
use shared::services::status;

/// Job status (docs/contract.md, "HTTP API"). Fields without a value are `null`, never absent.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobStatusBody {
    pub job_id: String,
    pub dataset: String,
    pub format: Format,
    /// `export` for a caller's miss, `refresh` for a stale hit or the warmer.
    pub kind: JobKind,
    pub status: JobStatus,
    pub rows_written: u64,
    /// Exact when an earlier file of the same rows exists, else null until the job ends.
    #[schema(required)]
    pub rows_total: Option<u64>,
    /// 0..1; null while `rows_total` is unknown; never above 1, never going back.
    #[schema(required)]
    pub progress: Option<f64>,
    #[schema(required)]
    pub rows_per_second: Option<f64>,
    #[schema(required)]
    pub eta_seconds: Option<u64>,
    pub bytes_written: u64,
    pub pages_read: u64,
    /// Latest timestamp in the exported rows so far.
    #[schema(required)]
    pub watermark: Option<DateTime<Utc>>,
    /// DynamoDB read capacity units the source reads consumed.
    pub read_capacity: f64,
    /// Sheets of an XLSX file; null for other formats.
    #[schema(required)]
    pub sheets: Option<u32>,
    /// XLSX cells cut at Excel's 32,767 characters.
    pub truncated_cells: u64,
    #[schema(required)]
    pub sha256: Option<String>,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    #[schema(required)]
    pub started_at: Option<DateTime<Utc>>,
    #[schema(required)]
    pub finished_at: Option<DateTime<Utc>>,
    /// A code and a fixed sentence; never the underlying cause.
    #[schema(required)]
    pub error: Option<JobError>,
    /// `/exports/jobs/{job_id}/download` once the job succeeded.
    #[schema(required)]
    pub download_url: Option<String>,
}

impl From<&Job> for JobStatusBody {
    fn from(job: &Job) -> Self {
        let succeeded = job.status == JobStatus::Succeeded;
        Self {
            job_id: job.job_id.clone(),
            dataset: job.spec.dataset.clone(),
            format: job.spec.format,
            kind: job.kind,
            status: job.status,
            rows_written: job.rows_written,
            rows_total: job.rows_total,
            progress: job.progress(),
            rows_per_second: job.rows_per_second().map(|r| r.round()),
            eta_seconds: job.eta_seconds(),
            bytes_written: job.bytes_written,
            pages_read: job.pages_read,
            watermark: job.watermark,
            read_capacity: job.read_capacity,
            sheets: (job.sheets > 0).then_some(job.sheets),
            truncated_cells: job.truncated_cells,
            sha256: job.sha256.clone(),
            attempts: job.attempts,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            error: job.error.as_ref().map(status::public_error),
            download_url: succeeded.then(|| format!("/exports/jobs/{}/download", job.job_id)),
        }
    }
}

/// The body of a `303` to a cached file (the `Location` header holds the same URL).
#[derive(Debug, Serialize, ToSchema)]
pub struct CachedFileBody {
    /// `hit` or `stale`.
    pub cache: &'static str,
    pub stale: bool,
    pub export_id: String,
    /// Presigned URL, valid for at most 15 minutes.
    pub download_url: String,
    pub file_name: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    pub fresh_until: DateTime<Utc>,
}

/// `GET /exports/datasets`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DatasetList {
    pub datasets: Vec<DatasetBody>,
}

/// One dataset as a caller may request it: catalog data, the same for every tenant.
#[derive(Debug, Serialize, ToSchema)]
pub struct DatasetBody {
    pub name: String,
    pub description: String,
    /// In file order; `columns=` selects among them by name.
    pub columns: Vec<ColumnBody>,
    /// Columns that take an equality filter, as a query parameter of their own name.
    pub filters: Vec<String>,
    /// Whether `from`/`to` is supported.
    pub range: bool,
    /// The timestamp column `from`/`to` apply to, when `range` is true.
    #[schema(required)]
    pub range_column: Option<String>,
    pub formats: Vec<Format>,
    /// Seconds a file stays fresh.
    pub ttl: u64,
    /// Seconds past `ttl` a file may still be served stale (`max_stale` caps it).
    pub stale: u64,
    /// Most rows one export may have.
    pub row_limit: u64,
    /// Each user's export is their own (other users of the tenant cannot see it).
    pub user_scoped: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ColumnBody {
    pub name: String,
    /// The header of the column in CSV and XLSX files.
    pub label: String,
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub ty: ColumnType,
}

impl From<&Dataset> for DatasetBody {
    fn from(ds: &Dataset) -> Self {
        Self {
            name: ds.name.clone(),
            description: ds.description.clone(),
            columns: ds
                .columns
                .iter()
                .map(|c| ColumnBody {
                    name: c.name.clone(),
                    label: c.label.clone(),
                    ty: c.ty,
                })
                .collect(),
            filters: ds.filter_names().iter().map(|s| s.to_string()).collect(),
            range: ds.range.is_some(),
            range_column: ds.range_column().map(|c| c.name.clone()),
            formats: Format::ALL.to_vec(),
            ttl: ds.ttl_seconds,
            stale: ds.stale_seconds,
            row_limit: ds.row_limit,
            user_scoped: ds.user_scoped,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthBody {
    /// Always `ok`: the function answers only once its configuration loaded.
    pub status: &'static str,
    pub datasets: Vec<String>,
}

/// An error (RFC 9457), sent as `application/problem+json`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `/problems/{slug}`, one slug per kind of error.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// For invalid input: one entry per field, naming what is allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// What a request says besides its dataset, columns and filters: the same in a query string and
/// in a JSON body.
#[derive(Debug, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportOptions {
    /// Default `csv`.
    pub format: Option<Format>,
    /// RFC 3339, inclusive; datasets with `range` only.
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339, inclusive; datasets with `range` only.
    pub to: Option<DateTime<Utc>>,
    /// Seconds past its fresh deadline a file may be (0 = must be fresh).
    pub max_stale: Option<u64>,
    /// IANA zone for timestamps in the file; default UTC.
    pub tz: Option<String>,
    /// CSV only: start with a UTF-8 byte order mark.
    pub bom: Option<bool>,
    /// CSV only: `comma` (default), `semicolon` or `tab`.
    pub delimiter: Option<String>,
}

/// The JSON body of `POST /exports`. Documentation only: the handler reads the body field by
/// field (`RawExportRequest::from_json`) so that each mistake is named; a test holds this type's
/// fields to that parser's.
#[derive(Debug, ToSchema)]
pub struct ExportRequest {
    /// A dataset of `GET /exports/datasets`.
    pub dataset: String,
    /// Column names (an array, or a comma list); default all, always written in catalog order.
    pub columns: Option<Vec<String>>,
    /// Column -> value, for the dataset's filter columns (equality).
    pub filters: Option<std::collections::BTreeMap<String, String>>,
    #[serde(flatten)]
    pub options: ExportOptions,
}

/// The query of `GET /exports/{dataset}` and `DELETE /exports/cache/{dataset}` besides
/// [`ExportOptions`]: the columns, and one parameter per filter column of the dataset
/// (`status=paid`). Documentation only, like [`ExportRequest`]: the handlers read the raw query.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// Comma list of column names; default all.
    pub columns: Option<String>,
    /// Equality filters: `{column}={value}` for the dataset's filter columns.
    #[param(style = Form, explode)]
    pub filters: Option<std::collections::BTreeMap<String, String>>,
}

/// The query of `DELETE /exports/cache` (documentation only).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ScopeQuery {
    /// `tenant` (needs `exports:admin`) or `user`.
    pub scope: String,
}
