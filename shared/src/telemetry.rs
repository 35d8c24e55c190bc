//! Structured logs: JSON in Lambda (CloudWatch), text locally. The Lambda runtime's span carries
//! the request id; the services add tenant, dataset, cache result and job id as fields.
//! Metrics: CloudWatch Embedded Metric Format lines, see [`Metrics`].

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::domain::{HitKind, Job};

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    // try_init: a second call (tests, local runs) keeps the first subscriber instead of panicking.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .without_time()
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

// ---------------------------------------------------------------------------------------------
// Metrics in CloudWatch Embedded Metric Format (EMF)
//
// One JSON document per event (an export request, a finished job, a warm-up run), written as a
// single line the moment the event happens. CloudWatch Logs turns each line into metrics in the
// `ExportCache` namespace; locally the same lines show up between the logs.
//
// Why not `metrics_cloudwatch_embedded` (the maintained crate for this): it is a recorder behind
// the `metrics` facade, installed once per process with `set_global_recorder`, that aggregates
// everything recorded until a flush and puts one set of properties on the whole flushed document.
// Here that means (a) every test in a test binary shares one recorder, so a test's flush drains
// the values of tests running beside it (order-dependent, flaky assertions), (b) a worker batch of
// several jobs would flush one document whose `job_id` property names only one of them, and
// (c) the API would need the crate's own `run_http` in place of `lambda_http::run` for its
// per-invocation flush. Writing a document per event needs no flush model, keeps each job's and
// request's properties on its own document, and lets tests inject the writer through `Deps`.
// ---------------------------------------------------------------------------------------------

/// The CloudWatch namespace of every metric the functions emit.
pub const NAMESPACE: &str = "ExportCache";

/// CloudWatch units used here (a subset of `MetricDatum.Unit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
    Bytes,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Count => "Count",
            Self::Milliseconds => "Milliseconds",
            Self::Bytes => "Bytes",
        }
    }
}

/// Where EMF lines go: stdout in the functions (Lambda ships it to CloudWatch Logs), a buffer in
/// tests. Cheap to clone; built once per cold start as part of `Deps`.
#[derive(Clone)]
pub struct Metrics {
    out: Arc<Mutex<dyn Write + Send>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn stdout() -> Self {
        Self::to_writer(std::io::stdout())
    }

    pub fn to_writer(w: impl Write + Send + 'static) -> Self {
        Self {
            out: Arc::new(Mutex::new(w)),
        }
    }

    /// Metrics written into a buffer that can be read back (tests, local tools).
    pub fn buffered() -> (Self, MetricsBuffer) {
        let buffer = MetricsBuffer::default();
        (Self::to_writer(buffer.clone()), buffer)
    }

    /// One export request answered from the cache or queued: its result and latency.
    pub fn export_request(&self, now: DateTime<Utc>, request: ExportMetric<'_>) {
        let mut doc = Emf::new(now);
        doc.dimension("dataset", request.dataset)
            .dimension("format", request.format)
            .dimension("result", request.result.as_str())
            .metric("ExportRequests", Unit::Count, 1.0)
            .metric("ExportLatency", Unit::Milliseconds, millis(request.latency))
            .property("tenant", request.tenant)
            .property("export_id", request.export_id);
        self.emit(&doc);
    }

    /// A job that reached its end (`succeeded` or `failed`): how long it ran, what it wrote and
    /// what reading the source cost. Call it after the job's end is recorded.
    pub fn job_finished(&self, now: DateTime<Utc>, job: &Job) {
        let outcome = match &job.error {
            None => "succeeded",
            Some(_) => "failed",
        };
        // From the first start to the end, continuations included; a job that failed before it
        // ever started counts from its creation.
        let began = job.started_at.unwrap_or(job.created_at);
        let duration = (job.finished_at.unwrap_or(now) - began)
            .to_std()
            .unwrap_or_default();
        let mut doc = Emf::new(now);
        doc.dimension("dataset", &job.spec.dataset)
            .dimension("format", job.spec.format.as_str())
            .dimension("outcome", outcome)
            .metric("JobDuration", Unit::Milliseconds, millis(duration))
            .metric("JobRows", Unit::Count, job.rows_written as f64)
            .metric("JobBytes", Unit::Bytes, job.bytes_written as f64)
            .metric("SourcePagesRead", Unit::Count, job.pages_read as f64)
            // Consumed read capacity units; CloudWatch has no unit for them.
            .metric("SourceReadCapacity", Unit::Count, job.read_capacity)
            .property("tenant", job.tenant.as_str())
            .property("job_id", job.job_id.as_str())
            .property("attempts", job.attempts)
            .property("continuations", job.continuations);
        if let Some(e) = &job.error {
            doc.property("error_code", e.code.as_str());
        }
        self.emit(&doc);
    }

    /// One warm-up run: refreshes it queued, joined to running jobs, or could not queue. A run
    /// spans datasets, so these carry no dimension (an empty dimension set, which EMF allows).
    pub fn warm_run(&self, now: DateTime<Utc>, run: WarmRun) {
        let mut doc = Emf::new(now);
        doc.metric("RefreshesQueued", Unit::Count, run.queued as f64)
            .metric("RefreshesJoined", Unit::Count, run.joined as f64)
            .metric("PinnedRefreshes", Unit::Count, run.pinned as f64)
            .metric("RefreshesFailed", Unit::Count, run.failed as f64)
            .metric("RefreshesOverBudget", Unit::Count, run.over_budget as f64)
            .metric("WarmCandidates", Unit::Count, run.candidates as f64);
        self.emit(&doc);
    }

    /// Writes one document as one line. A metric that cannot be written is logged, never an
    /// error of the request or job it describes.
    pub fn emit(&self, doc: &Emf) {
        let mut line = match serde_json::to_vec(&doc.to_json()) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "could not encode a metrics document");
                return;
            }
        };
        line.push(b'\n');
        // One write_all per line: stdout's lock keeps it whole between the log lines.
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "could not write a metrics document");
        }
    }
}

/// One export request, for [`Metrics::export_request`].
#[derive(Debug, Clone, Copy)]
pub struct ExportMetric<'a> {
    pub dataset: &'a str,
    pub format: &'a str,
    pub result: HitKind,
    /// From the request reaching the export handler to its answer (a `Prefer: wait` included).
    pub latency: std::time::Duration,
    pub tenant: &'a str,
    /// The job behind the answer: the file's job on a hit, the running job on a miss.
    pub export_id: &'a str,
}

/// What one warm-up run did, for [`Metrics::warm_run`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WarmRun {
    pub candidates: usize,
    /// Refreshes of recently hit entries newly queued.
    pub queued: usize,
    /// ... joined to a job already running.
    pub joined: usize,
    /// Pinned exports (catalog) queued or joined.
    pub pinned: usize,
    pub failed: usize,
    pub over_budget: usize,
}

fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One EMF document: dimensions, metrics and properties, all in the `ExportCache` namespace.
///
/// Dimensions are only low-cardinality values (dataset, format, a result or outcome from a
/// small fixed set): CloudWatch creates and bills one metric per distinct combination of
/// dimension values, so a tenant or job id as a dimension would create a metric per tenant or
/// per job. Those go in as properties instead: kept in the log event, searchable with Logs
/// Insights, never a metric of their own.
#[derive(Debug, Clone)]
pub struct Emf {
    timestamp_ms: i64,
    dimensions: Vec<(&'static str, String)>,
    metrics: Vec<(&'static str, Unit, f64)>,
    properties: Map<String, Value>,
}

impl Emf {
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            timestamp_ms: now.timestamp_millis(),
            dimensions: Vec::new(),
            metrics: Vec::new(),
            properties: Map::new(),
        }
    }

    pub fn dimension(&mut self, key: &'static str, value: &str) -> &mut Self {
        self.dimensions.push((key, value.to_string()));
        self
    }

    pub fn metric(&mut self, name: &'static str, unit: Unit, value: f64) -> &mut Self {
        self.metrics.push((name, unit, value));
        self
    }

    pub fn property(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        self.properties.insert(key.to_string(), value.into());
        self
    }

    pub fn to_json(&self) -> Value {
        let mut root = self.properties.clone();
        for (key, value) in &self.dimensions {
            root.insert((*key).to_string(), Value::from(value.as_str()));
        }
        for (name, _, value) in &self.metrics {
            // A non-finite value cannot be written as JSON; 0 keeps the document valid.
            let value = if value.is_finite() { *value } else { 0.0 };
            root.insert((*name).to_string(), Value::from(value));
        }
        let keys: Vec<&str> = self.dimensions.iter().map(|(k, _)| *k).collect();
        let metrics: Vec<Value> = self
            .metrics
            .iter()
            .map(|(name, unit, _)| serde_json::json!({ "Name": name, "Unit": unit.as_str() }))
            .collect();
        root.insert(
            "_aws".into(),
            serde_json::json!({
                "Timestamp": self.timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [keys],
                    "Metrics": metrics,
                }],
            }),
        );
        Value::Object(root)
    }
}

/// A shared in-memory writer for [`Metrics::buffered`].
#[derive(Debug, Clone, Default)]
pub struct MetricsBuffer(Arc<Mutex<Vec<u8>>>);

impl MetricsBuffer {
    /// The lines written so far.
    pub fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Write for MetricsBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};
    use serde_json::json;

    use super::*;
    use crate::testing::{orders_job, parse_emf};

    fn at() -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_717_000_000_123).unwrap()
    }

    fn one_line(buffer: &MetricsBuffer) -> String {
        let lines = buffer.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        lines[0].clone()
    }

    #[test]
    fn an_export_request_is_one_emf_line_with_ids_as_properties_only() {
        let (metrics, buffer) = Metrics::buffered();
        metrics.export_request(
            at(),
            ExportMetric {
                dataset: "orders",
                format: "xlsx",
                result: HitKind::Stale,
                latency: std::time::Duration::from_micros(12_500),
                tenant: "acme",
                export_id: "job-1",
            },
        );
        let doc = parse_emf(&one_line(&buffer), &["acme", "job-1"]).unwrap();
        assert_eq!(doc["_aws"]["Timestamp"], json!(1_717_000_000_123_i64));
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "ExportCache");
        assert_eq!(
            directive["Dimensions"],
            json!([["dataset", "format", "result"]])
        );
        assert_eq!(
            directive["Metrics"],
            json!([{"Name": "ExportRequests", "Unit": "Count"},
                {"Name": "ExportLatency", "Unit": "Milliseconds"}])
        );
        assert_eq!(
            (&doc["dataset"], &doc["format"], &doc["result"]),
            (&json!("orders"), &json!("xlsx"), &json!("stale"))
        );
        assert_eq!(doc["ExportRequests"], json!(1.0));
        assert_eq!(doc["ExportLatency"], json!(12.5));
        assert_eq!(
            (&doc["tenant"], &doc["export_id"]),
            (&json!("acme"), &json!("job-1"))
        );
    }

    #[test]
    fn a_finished_job_reports_duration_output_and_source_cost() {
        let (metrics, buffer) = Metrics::buffered();
        let mut job = orders_job("acme", "job-7", at());
        job.started_at = Some(at() + Duration::seconds(2));
        job.rows_written = 1200;
        job.bytes_written = 64_000;
        job.pages_read = 3;
        job.read_capacity = 41.5;
        job.fail(
            "row_limit_exceeded",
            "too many rows",
            at() + Duration::milliseconds(5_250),
        );
        metrics.job_finished(at() + Duration::seconds(9), &job);
        let doc = parse_emf(&one_line(&buffer), &["acme", "job-7"]).unwrap();
        assert_eq!(
            doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["dataset", "format", "outcome"]])
        );
        assert_eq!(doc["outcome"], "failed");
        // From the start to the recorded end, not to when the metric was written.
        assert_eq!(doc["JobDuration"], json!(3250.0));
        assert_eq!(doc["JobRows"], json!(1200.0));
        assert_eq!(doc["JobBytes"], json!(64000.0));
        assert_eq!(doc["SourcePagesRead"], json!(3.0));
        assert_eq!(doc["SourceReadCapacity"], json!(41.5));
        assert_eq!(doc["error_code"], "row_limit_exceeded");
        assert_eq!(
            (&doc["tenant"], &doc["job_id"]),
            (&json!("acme"), &json!("job-7"))
        );
    }

    #[test]
    fn a_warm_run_has_an_empty_dimension_set() {
        let (metrics, buffer) = Metrics::buffered();
        let run = WarmRun {
            candidates: 5,
            queued: 3,
            joined: 1,
            pinned: 2,
            failed: 0,
            over_budget: 1,
        };
        metrics.warm_run(at(), run);
        let doc = parse_emf(&one_line(&buffer), &[]).unwrap();
        assert_eq!(
            doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([[]])
        );
        assert_eq!(doc["RefreshesQueued"], json!(3.0));
        assert_eq!(doc["PinnedRefreshes"], json!(2.0));
        assert_eq!(doc["RefreshesOverBudget"], json!(1.0));
    }

    type Breaks = Box<dyn Fn(&mut serde_json::Value)>;

    #[test]
    fn the_emf_check_rejects_what_the_specification_forbids() {
        let good = || {
            json!({"_aws": {"Timestamp": 1_717_000_000_123_i64, "CloudWatchMetrics": [{
                "Namespace": "ExportCache", "Dimensions": [["dataset"]],
                "Metrics": [{"Name": "JobRows", "Unit": "Count"}]}]},
                "dataset": "orders", "JobRows": 3, "tenant": "acme"})
        };
        assert!(parse_emf(&good().to_string(), &["acme"]).is_ok());
        let broken: Vec<(&str, Breaks)> = vec![
            (
                "seconds",
                Box::new(|d| d["_aws"]["Timestamp"] = json!(1_717_000_000)),
            ),
            (
                "float time",
                Box::new(|d| d["_aws"]["Timestamp"] = json!(1.7e12)),
            ),
            ("no value", Box::new(|d| d["JobRows"] = json!(null))),
            ("text value", Box::new(|d| d["JobRows"] = json!("3"))),
            ("no dimension", Box::new(|d| d["dataset"] = json!(null))),
            ("number dimension", Box::new(|d| d["dataset"] = json!(7))),
            (
                "bad unit",
                Box::new(|d| {
                    d["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"] = json!("Rows")
                }),
            ),
            ("tenant value", Box::new(|d| d["dataset"] = json!("acme"))),
            (
                "tenant key",
                Box::new(|d| {
                    d["_aws"]["CloudWatchMetrics"][0]["Dimensions"] = json!([["tenant"]]);
                }),
            ),
            (
                "no namespace",
                Box::new(|d| d["_aws"]["CloudWatchMetrics"][0]["Namespace"] = json!(null)),
            ),
        ];
        for (what, breaks) in broken {
            let mut doc = good();
            breaks(&mut doc);
            assert!(
                parse_emf(&doc.to_string(), &["acme"]).is_err(),
                "{what} passed"
            );
        }
        assert!(parse_emf("not json", &[]).is_err());
    }
}
