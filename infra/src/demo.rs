//! The demo client `make up` runs against the local stack. For each format (CSV, XLSX, csv.gz by
//! default): a miss that starts a job, the job's progress, the download, then the same request
//! again answered from the cache with the same bytes. Every file is saved (under `target/demo`,
//! for CI's independent readers) and checked here: row count and header for CSV and csv.gz (whose
//! decompressed bytes must be the CSV export's), zip integrity and calamine's reading for XLSX,
//! and the same rows in every format.

use crate::filecheck::{check_file, FileCheck};
use crate::token::{dev_token, DEMO_SCOPES};
use anyhow::{anyhow, bail, Context};
use reqwest::{header, Client, Response, StatusCode};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const DEFAULT_API: &str = "http://127.0.0.1:9000/lambda-url/export-api";
/// CSV first: the other formats are compared with it.
pub const DEFAULT_FORMATS: &[&str] = &["csv", "xlsx", "csv.gz"];

#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// API base, e.g. `http://127.0.0.1:9000/lambda-url/export-api`.
    pub api: String,
    /// `LOCAL_JWT_SECRET` of the running API.
    pub secret: String,
    pub tenant: String,
    pub user: String,
    pub dataset: String,
    /// Exported in this order, each a miss then a hit.
    pub formats: Vec<String>,
    /// Where the downloaded files are kept (`{dataset}.{format}`).
    pub out_dir: PathBuf,
    pub poll_every: Duration,
    /// Give up waiting for a job after this long (the first run compiles the worker).
    pub timeout: Duration,
}

impl DemoConfig {
    pub fn new(api: impl Into<String>, secret: impl Into<String>) -> Self {
        DemoConfig {
            api: api.into().trim_end_matches('/').to_owned(),
            secret: secret.into(),
            tenant: "acme".to_owned(),
            user: "alice".to_owned(),
            dataset: "orders".to_owned(),
            formats: DEFAULT_FORMATS.iter().map(|f| (*f).to_owned()).collect(),
            out_dir: PathBuf::from("target/demo"),
            poll_every: Duration::from_millis(500),
            timeout: Duration::from_secs(20 * 60),
        }
    }

    fn export_url(&self, format: &str) -> String {
        format!("{}/exports/{}?format={format}", self.api, self.dataset)
    }

    fn cache_url(&self, format: &str) -> String {
        format!(
            "{}/exports/cache/{}?format={format}",
            self.api, self.dataset
        )
    }

    /// Where the file of `format` is saved.
    pub fn file_path(&self, format: &str) -> PathBuf {
        self.out_dir.join(format!("{}.{format}", self.dataset))
    }

    /// A path from the API (`/exports/jobs/...`) as a full URL.
    fn resolve(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_owned()
        } else {
            format!("{}{location}", self.api)
        }
    }
}

/// One format's round: miss, job, download, hit, check.
#[derive(Debug, Clone)]
pub struct FormatRun {
    pub format: String,
    pub job_id: String,
    pub miss_ms: u128,
    /// From the 202 to the client seeing `succeeded`.
    pub job_observed: Duration,
    /// `finished_at - started_at` as recorded by the worker, when both are present.
    pub job_worker: Option<Duration>,
    pub rows_written: Option<u64>,
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub download_ms: u128,
    pub hit_ms: u128,
    pub check: FileCheck,
}

impl FormatRun {
    pub fn rows_per_sec(&self) -> Option<f64> {
        let rows = self.rows_written.unwrap_or(self.check.rows) as f64;
        let secs = self.job_worker.unwrap_or(self.job_observed).as_secs_f64();
        (secs > 0.0).then(|| rows / secs)
    }

    /// Rows of the file per second of its first download (the presigned GET, start to end).
    pub fn download_rows_per_sec(&self) -> Option<f64> {
        let secs = self.download_ms as f64 / 1000.0;
        (self.download_ms > 0).then(|| self.check.rows as f64 / secs)
    }
}

#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub runs: Vec<FormatRun>,
    /// What was compared across formats.
    pub agreement: Vec<String>,
}

struct Download {
    bytes: u64,
    sha256: String,
    ms: u128,
}

struct Demo<'a> {
    cfg: &'a DemoConfig,
    http: Client,
    token: String,
}

fn header_str(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn problem(resp: Response) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let body: String = body.chars().take(500).collect();
    format!("{status}: {body}")
}

fn parse_time(v: &serde_json::Value) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
}

/// One line of job progress. `progress` null means the total is not known yet ("counting");
/// `rows_per_second` and `eta_seconds` print `-` when absent or null.
pub fn progress_line(job: &serde_json::Value) -> String {
    let status = job["status"].as_str().unwrap_or("?");
    let rows = match (job["rows_written"].as_u64(), job["rows_total"].as_u64()) {
        (Some(w), Some(t)) => format!("{w}/{t}"),
        (Some(w), None) => format!("{w}/?"),
        _ => "-".to_owned(),
    };
    let progress = match job["progress"].as_f64() {
        Some(p) => format!("{:.1}%", p * 100.0),
        None => "counting".to_owned(),
    };
    let number = |key: &str, unit: &str| {
        job[key]
            .as_f64()
            .map(|v| format!("{v:.0}{unit}"))
            .unwrap_or_else(|| "-".to_owned())
    };
    format!(
        "  {status:<9} rows {rows:>15}  progress {progress:>8}  rows_per_second {:>7}  eta_seconds {}",
        number("rows_per_second", ""),
        number("eta_seconds", "")
    )
}

impl<'a> Demo<'a> {
    fn new(cfg: &'a DemoConfig) -> anyhow::Result<Self> {
        let token = dev_token(&cfg.secret, &cfg.tenant, &cfg.user, DEMO_SCOPES, 3_600)?;
        let http = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .build()
            .context("building the HTTP client")?;
        Ok(Demo { cfg, http, token })
    }

    async fn get(&self, url: &str) -> anyhow::Result<Response> {
        self.http
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))
    }

    async fn json(resp: Response) -> anyhow::Result<serde_json::Value> {
        let bytes = resp.bytes().await.context("reading the answer")?;
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "answer is not JSON: {}",
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(300)
                    .collect::<String>()
            )
        })
    }

    /// Asks for the export until it is answered with a 202 (dropping a warm entry once).
    async fn request_miss(&self, format: &str) -> anyhow::Result<(Response, u128)> {
        let url = self.cfg.export_url(format);
        for attempt in 0..2 {
            let started = Instant::now();
            let resp = self.get(&url).await?;
            let ms = started.elapsed().as_millis();
            match resp.status() {
                StatusCode::ACCEPTED => return Ok((resp, ms)),
                StatusCode::SEE_OTHER if attempt == 0 => {
                    let cache = header_str(&resp, "x-export-cache").unwrap_or_default();
                    println!(
                        "  already cached ({cache}); dropping the cache entry so the demo starts with a miss"
                    );
                    let cache_url = self.cfg.cache_url(format);
                    let del = self
                        .http
                        .delete(&cache_url)
                        .bearer_auth(&self.token)
                        .send()
                        .await
                        .context("DELETE the cache entry")?;
                    if del.status() != StatusCode::NO_CONTENT {
                        bail!("DELETE {cache_url} answered {}", problem(del).await);
                    }
                }
                _ => bail!("GET {url} expected 202, got {}", problem(resp).await),
            }
        }
        bail!("GET {url} still answered from the cache after invalidating it")
    }

    /// The job's status.
    async fn job(&self, job_url: &str) -> anyhow::Result<serde_json::Value> {
        let resp = self.get(job_url).await?;
        if resp.status() != StatusCode::OK {
            bail!("GET {job_url} expected 200, got {}", problem(resp).await);
        }
        Self::json(resp).await
    }

    async fn wait_for_job(&self, job_url: &str, job_id: &str) -> anyhow::Result<serde_json::Value> {
        let started = Instant::now();
        let mut last_line = String::new();
        let mut told_about_compile = false;
        loop {
            let job = self.job(job_url).await?;
            let status = job["status"].as_str().unwrap_or("?").to_owned();
            let line = progress_line(&job);
            if line != last_line {
                println!("{line}");
                last_line = line;
            }
            match status.as_str() {
                "succeeded" => return Ok(job),
                "failed" => {
                    let code = job["error"]["code"].as_str().unwrap_or("unknown");
                    let message = job["error"]["message"].as_str().unwrap_or("(no message)");
                    bail!("job {job_id} failed: {code}: {message}");
                }
                "queued" if !told_about_compile && started.elapsed() > Duration::from_secs(5) => {
                    println!("  (still queued: the first delivery compiles export-worker under cargo lambda watch; see the bridge log)");
                    told_about_compile = true;
                }
                _ => {}
            }
            if started.elapsed() > self.cfg.timeout {
                bail!(
                    "job {job_id} not finished after {:?} (last status {status})",
                    self.cfg.timeout
                );
            }
            tokio::time::sleep(self.cfg.poll_every).await;
        }
    }

    /// Downloads a presigned URL (no Authorization header: the signature is in the URL), hashing
    /// it and, when `save_to` is given, writing it there.
    async fn download(&self, presigned: &str, save_to: Option<&Path>) -> anyhow::Result<Download> {
        let started = Instant::now();
        let mut resp = self
            .http
            .get(presigned)
            .timeout(Duration::from_secs(30 * 60))
            .send()
            .await
            .context("GET the presigned URL")?;
        if resp.status() != StatusCode::OK {
            bail!("presigned download answered {}", problem(resp).await);
        }
        let mut file = match save_to {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            )),
            None => None,
        };
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = resp.chunk().await.context("reading the download")? {
            hasher.update(&chunk);
            if let Some(f) = file.as_mut() {
                f.write_all(&chunk).context("writing the download")?;
            }
            bytes += chunk.len() as u64;
        }
        if let Some(f) = file.as_mut() {
            f.flush().context("writing the download")?;
        }
        Ok(Download {
            bytes,
            sha256: hex::encode(hasher.finalize()),
            ms: started.elapsed().as_millis(),
        })
    }

    fn see_other_location(resp: &Response, what: &str) -> anyhow::Result<String> {
        header_str(resp, header::LOCATION.as_str())
            .ok_or_else(|| anyhow!("{what}: 303 without a Location header"))
    }

    /// Asks for the export (a miss, dropping a warm entry first) and returns the job's id, its
    /// URL and how long the 202 took.
    async fn start_job(&self, format: &str) -> anyhow::Result<(String, String, u128)> {
        let cfg = self.cfg;
        println!();
        println!(
            "▶ GET {}  (tenant {}, user {})",
            cfg.export_url(format),
            cfg.tenant,
            cfg.user
        );
        let (resp, miss_ms) = self.request_miss(format).await?;
        let location = header_str(&resp, header::LOCATION.as_str())
            .ok_or_else(|| anyhow!("202 without a Location header"))?;
        let retry_after = header_str(&resp, header::RETRY_AFTER.as_str())
            .ok_or_else(|| anyhow!("202 without a Retry-After header"))?;
        let cache = header_str(&resp, "x-export-cache").unwrap_or_else(|| "(none)".to_owned());
        let job = Self::json(resp).await?;
        let job_id = job["job_id"]
            .as_str()
            .ok_or_else(|| anyhow!("202 body has no job_id: {job}"))?
            .to_owned();
        println!(
            "  202 Accepted in {miss_ms} ms: job {job_id}, status {}, Location {location}, Retry-After {retry_after}, X-Export-Cache {cache}",
            job["status"].as_str().unwrap_or("?")
        );
        Ok((job_id, cfg.resolve(&location), miss_ms))
    }

    /// Follows the job's stable download link to the file.
    async fn download_job(
        &self,
        job_url: &str,
        save_to: Option<&Path>,
    ) -> anyhow::Result<Download> {
        let download_url = format!("{job_url}/download");
        println!("▶ GET {download_url}");
        let resp = self.get(&download_url).await?;
        if resp.status() != StatusCode::SEE_OTHER {
            bail!(
                "GET {download_url} expected 303, got {}",
                problem(resp).await
            );
        }
        let presigned = Self::see_other_location(&resp, &download_url)?;
        let file = self.download(&presigned, save_to).await?;
        println!(
            "  303 -> presigned URL; downloaded {} bytes in {} ms{}, sha256 {}",
            file.bytes,
            file.ms,
            save_to
                .map(|p| format!(" to {}", p.display()))
                .unwrap_or_default(),
            file.sha256
        );
        Ok(file)
    }

    /// Miss, job, download (saved and checked), hit with the same bytes.
    async fn export(&self, format: &str) -> anyhow::Result<FormatRun> {
        let cfg = self.cfg;
        let export_url = cfg.export_url(format);
        let (job_id, job_url, miss_ms) = self.start_job(format).await?;
        println!("▶ polling GET {job_url}");
        let job_started = Instant::now();
        let job = self.wait_for_job(&job_url, &job_id).await?;
        let job_observed = job_started.elapsed();
        let job_worker = match (
            parse_time(&job["started_at"]),
            parse_time(&job["finished_at"]),
        ) {
            (Some(s), Some(f)) => (f - s).to_std().ok(),
            _ => None,
        };
        let rows_written = job["rows_written"].as_u64();
        let path = cfg.file_path(format);
        let first = self.download_job(&job_url, Some(&path)).await?;

        println!("▶ GET {export_url} again");
        let started = Instant::now();
        let resp = self.get(&export_url).await?;
        let hit_ms = started.elapsed().as_millis();
        if resp.status() != StatusCode::SEE_OTHER {
            bail!(
                "second request expected 303 from the cache, got {}",
                problem(resp).await
            );
        }
        let cache = header_str(&resp, "x-export-cache").unwrap_or_default();
        if cache != "hit" {
            bail!("second request: expected X-Export-Cache: hit, got {cache:?}");
        }
        let export_id = header_str(&resp, "x-export-id").unwrap_or_default();
        let age = header_str(&resp, header::AGE.as_str()).unwrap_or_default();
        let presigned = Self::see_other_location(&resp, "cache hit")?;
        let second = self.download(&presigned, None).await?;
        println!(
            "  303 in {hit_ms} ms: X-Export-Cache hit, X-Export-Id {export_id}, Age {age}; downloaded {} bytes, sha256 {}",
            second.bytes, second.sha256
        );
        if second.sha256 != first.sha256 || second.bytes != first.bytes {
            bail!(
                "the cached file differs from the job's file ({} bytes {} vs {} bytes {})",
                second.bytes,
                second.sha256,
                first.bytes,
                first.sha256
            );
        }

        let check = check_file(format, &path)
            .with_context(|| format!("checking the {format} file {}", path.display()))?;
        println!(
            "  check: {} data rows, header of {} labels; {}",
            check.rows,
            check.header.len(),
            check.detail
        );
        Ok(FormatRun {
            format: format.to_owned(),
            job_id,
            miss_ms,
            job_observed,
            job_worker,
            rows_written,
            path,
            bytes: first.bytes,
            sha256: first.sha256,
            download_ms: first.ms,
            hit_ms,
            check,
        })
    }
}

/// What [`crash_check`] saw.
#[derive(Debug, Clone)]
pub struct CrashReport {
    pub format: String,
    pub job_id: String,
    pub killed_pid: u32,
    /// `rows_written` when the worker was killed.
    pub rows_at_kill: u64,
    /// From the kill to the client seeing `succeeded`.
    pub recovered: Duration,
    pub attempts: Option<u64>,
    pub sha256: String,
}

/// [`crash_check`] kills the worker once the job shows rows written or has run this long.
const KILL_AFTER_RUNNING: Duration = Duration::from_secs(2);

/// The worker's process under the `cargo lambda watch` on `port`.
async fn worker_pid(port: u16) -> anyhow::Result<Option<u32>> {
    let table = crate::supervise::process_table().await?;
    let Some(watch) = crate::supervise::watch_on_port(&table, port) else {
        bail!("no cargo lambda watch listens on port {port} (the bridge's --worker-port)");
    };
    Ok(
        crate::supervise::function_process(&table, watch, crate::bridge::WORKER_FUNCTION)
            .filter(|(_, role)| *role == crate::supervise::Role::Function)
            .map(|(pid, _)| pid),
    )
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| {
        format!(
            "opening {} (the demo's file of this format, run the demo first)",
            path.display()
        )
    })?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// A worker killed mid-export (issue 6, item 4), end to end: starts the export of `format`
/// again, `kill -9`s the worker process of the bridge's watch on `worker_port` while the job
/// runs, and checks that the job still succeeds, with the same bytes as the demo's uninterrupted
/// file of that format.
pub async fn crash_check(
    cfg: &DemoConfig,
    format: &str,
    worker_port: u16,
) -> anyhow::Result<CrashReport> {
    let reference = sha256_file(&cfg.file_path(format))?;
    let demo = Demo::new(cfg)?;
    let (job_id, job_url, _) = demo.start_job(format).await?;
    let waiting = Instant::now();
    let mut running_since: Option<Instant> = None;
    let (killed_pid, rows_at_kill) = loop {
        let job = demo.job(&job_url).await?;
        let status = job["status"].as_str().unwrap_or("?");
        let rows = job["rows_written"].as_u64().unwrap_or(0);
        if status == "running" {
            // Mid-export: rows on record, or pages being read for a while already.
            let since = *running_since.get_or_insert_with(Instant::now);
            if rows > 0 || since.elapsed() >= KILL_AFTER_RUNNING {
                if let Some(pid) = worker_pid(worker_port).await? {
                    break (pid, rows);
                }
            }
        }
        if matches!(status, "succeeded" | "failed") {
            bail!("job {job_id} was {status} before the worker could be killed: export more rows");
        }
        if waiting.elapsed() > cfg.timeout {
            bail!("job {job_id} never ran (last status {status})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let killed = std::process::Command::new("kill")
        .args(["-9", &killed_pid.to_string()])
        .status()
        .context("running kill")?;
    if !killed.success() {
        bail!("kill -9 {killed_pid} failed");
    }
    let kill_time = Instant::now();
    println!(
        "  kill -9 {killed_pid} (export-worker, mid-export: job running, {rows_at_kill} rows on record)"
    );
    let job = demo.wait_for_job(&job_url, &job_id).await?;
    let recovered = kill_time.elapsed();
    let dir = cfg.out_dir.join("after-kill");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.{format}", cfg.dataset));
    let file = demo.download_job(&job_url, Some(&path)).await?;
    let same = if file.sha256 == reference {
        "identical to the uninterrupted export".to_owned()
    } else if format == "xlsx" {
        // Another job than the demo's: the workbook's creation stamp is its own.
        crate::filecheck::same_workbook(&cfg.file_path(format), &path).with_context(|| {
            format!(
                "after the kill the xlsx file {} is not the uninterrupted one",
                path.display()
            )
        })?;
        "the uninterrupted export's workbook, entry for entry (but its creation time)".to_owned()
    } else {
        bail!(
            "after the kill the {format} file has sha256 {}, the uninterrupted one {reference}",
            file.sha256
        );
    };
    println!(
        "  succeeded {:.1} s after the kill (attempts {}); the file is {same}",
        recovered.as_secs_f64(),
        job["attempts"]
            .as_u64()
            .map_or("?".to_owned(), |a| a.to_string())
    );
    Ok(CrashReport {
        format: format.to_owned(),
        job_id,
        killed_pid,
        rows_at_kill,
        recovered,
        attempts: job["attempts"].as_u64(),
        sha256: file.sha256,
    })
}

/// The labels of `dataset` in the catalog compiled into the functions (the header every format
/// must start with), when the dataset is there.
fn catalog_labels(dataset: &str) -> Option<Vec<String>> {
    let catalog = shared::domain::catalog::Catalog::builtin().ok()?;
    let ds = catalog.get(dataset)?;
    Some(ds.columns.iter().map(|c| c.label.clone()).collect())
}

/// What every format must agree on: the job's row count, the catalog's labels as header, the
/// same number of rows, and csv.gz holding exactly the CSV export's bytes. Returns what was
/// verified, one line each.
pub fn agreement(runs: &[FormatRun], labels: Option<&[String]>) -> anyhow::Result<Vec<String>> {
    let mut verified = Vec::new();
    for run in runs {
        if let Some(written) = run.rows_written {
            if written != run.check.rows {
                bail!(
                    "{}: the file has {} rows, the job reports rows_written {written}",
                    run.format,
                    run.check.rows
                );
            }
        }
        if let Some(labels) = labels {
            if run.check.header != labels {
                bail!(
                    "{}: header {:?}, the catalog's labels are {labels:?}",
                    run.format,
                    run.check.header
                );
            }
        }
    }
    if labels.is_some() && !runs.is_empty() {
        verified.push("every header is the catalog's labels".to_owned());
    }
    if let Some((first, rest)) = runs.split_first() {
        if let Some(other) = rest.iter().find(|r| r.check.rows != first.check.rows) {
            bail!(
                "{} has {} rows but {} has {}",
                first.format,
                first.check.rows,
                other.format,
                other.check.rows
            );
        }
        verified.push(format!(
            "{} rows in every format, as the jobs report",
            first.check.rows
        ));
    }
    let by_format = |f: &str| runs.iter().find(|r| r.format == f);
    if let (Some(csv), Some(gz)) = (by_format("csv"), by_format("csv.gz")) {
        if gz.check.inner_sha256.as_deref() != Some(csv.sha256.as_str()) {
            bail!(
                "csv.gz decompressed (sha256 {}) is not the CSV export (sha256 {})",
                gz.check.inner_sha256.as_deref().unwrap_or("?"),
                csv.sha256
            );
        }
        verified.push("csv.gz decompressed is the CSV export byte for byte".to_owned());
    }
    Ok(verified)
}

/// Runs the demo and prints what happens; returns the measurements.
pub async fn run(cfg: &DemoConfig) -> anyhow::Result<DemoSummary> {
    std::fs::create_dir_all(&cfg.out_dir)
        .with_context(|| format!("creating {}", cfg.out_dir.display()))?;
    let demo = Demo::new(cfg)?;
    let mut runs = Vec::new();
    for format in &cfg.formats {
        let run = demo
            .export(format)
            .await
            .with_context(|| format!("{} {format}", cfg.dataset))?;
        runs.push(run);
    }
    let labels = catalog_labels(&cfg.dataset);
    let agreement = agreement(&runs, labels.as_deref())?;
    Ok(DemoSummary { runs, agreement })
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// The closing report: timings per format, what was checked, then how to call the API by hand.
pub fn print_summary(cfg: &DemoConfig, s: &DemoSummary) -> anyhow::Result<()> {
    println!();
    println!(
        "== export-cache demo: {} for tenant {} ==",
        cfg.dataset, cfg.tenant
    );
    println!(
        "  {:<7} {:>9} {:>9} {:>8} {:>9} {:>10} {:>9} {:>10} {:>9}  file",
        "format", "miss", "job", "rows", "rows/s", "size", "download", "rows/s", "hit"
    );
    for r in &s.runs {
        let job = match r.job_worker {
            Some(w) => format!("{:.1} s", w.as_secs_f64()),
            None => format!("~{:.1} s", r.job_observed.as_secs_f64()),
        };
        let rate = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        println!(
            "  {:<7} {:>9} {:>9} {:>8} {:>9} {:>10} {:>9} {:>10} {:>9}  {}",
            r.format,
            format!("{} ms", r.miss_ms),
            job,
            r.check.rows,
            rate(r.rows_per_sec()),
            human_bytes(r.bytes),
            format!("{} ms", r.download_ms),
            rate(r.download_rows_per_sec()),
            format!("{} ms", r.hit_ms),
            r.path.display()
        );
    }
    println!("  (miss: 202 answered; job: worker start to finish, its rows/s the export's; download: the job's file through its presigned URL; hit: 303 answered, same bytes downloaded)");
    for line in &s.agreement {
        println!("  checked: {line}");
    }
    for r in &s.runs {
        println!("  checked: {} {}", r.format, r.check.detail);
    }
    println!();
    let token = dev_token(&cfg.secret, &cfg.tenant, &cfg.user, DEMO_SCOPES, 12 * 3_600)?;
    println!("API base URL: {}", cfg.api);
    println!("Try it (token valid 12 h):");
    println!("  export TOKEN='{token}'");
    for format in &cfg.formats {
        println!(
            "  curl -si -H \"Authorization: Bearer $TOKEN\" '{}'",
            cfg.export_url(format)
        );
    }
    if !cfg.formats.iter().any(|f| f == "ndjson") {
        // Not in the demo (its checks compare headers of labels), but a format to try.
        println!(
            "  curl -si -H \"Authorization: Bearer $TOKEN\" '{}'",
            cfg.export_url("ndjson")
        );
    }
    println!(
        "  curl -s -H \"Authorization: Bearer $TOKEN\" '{}/exports/cache/stats'",
        cfg.api
    );
    println!(
        "  curl -s -H \"Authorization: Bearer $TOKEN\" '{}/exports/datasets'",
        cfg.api
    );
    println!("  curl -s '{}/openapi.json'   # no token needed", cfg.api);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn job_locations_resolve_against_the_api_base() {
        let cfg = DemoConfig::new(format!("{DEFAULT_API}/"), "s");
        assert_eq!(
            cfg.resolve("/exports/jobs/j1"),
            "http://127.0.0.1:9000/lambda-url/export-api/exports/jobs/j1"
        );
        assert_eq!(cfg.resolve("http://x/y"), "http://x/y");
        assert_eq!(
            cfg.export_url("csv.gz"),
            "http://127.0.0.1:9000/lambda-url/export-api/exports/orders?format=csv.gz"
        );
        assert_eq!(
            cfg.file_path("csv.gz"),
            Path::new("target/demo/orders.csv.gz")
        );
        assert_eq!(cfg.formats, ["csv", "xlsx", "csv.gz"]);
    }

    #[test]
    fn progress_lines_show_rate_and_eta() {
        let line = progress_line(&json!({
            "status": "running", "rows_written": 4000, "rows_total": 20000, "progress": 0.2,
            "rows_per_second": 812.4, "eta_seconds": 19.7
        }));
        assert!(line.contains("running"), "{line}");
        assert!(line.contains("4000/20000"), "{line}");
        assert!(line.contains("20.0%"), "{line}");
        assert!(line.contains("rows_per_second     812"), "{line}");
        assert!(line.ends_with("eta_seconds 20"), "{line}");
    }

    #[test]
    fn unknown_progress_reads_counting_and_missing_numbers_a_dash() {
        let line = progress_line(&json!({
            "status": "running", "rows_written": 1500, "rows_total": null, "progress": null,
            "rows_per_second": null
        }));
        assert!(line.contains("1500/?"), "{line}");
        assert!(line.contains("progress counting"), "{line}");
        assert!(line.contains("rows_per_second       -"), "{line}");
        assert!(line.ends_with("eta_seconds -"), "{line}");
        let queued = progress_line(&json!({"status": "queued"}));
        assert!(queued.contains("rows               -"), "{queued}");
    }

    fn run(format: &str, rows: u64, header: &[&str], sha: &str, inner: Option<&str>) -> FormatRun {
        FormatRun {
            format: format.to_owned(),
            job_id: "j".to_owned(),
            miss_ms: 1,
            job_observed: Duration::from_secs(1),
            job_worker: None,
            rows_written: Some(rows),
            path: PathBuf::from(format!("x.{format}")),
            bytes: 1,
            sha256: sha.to_owned(),
            download_ms: 1,
            hit_ms: 1,
            check: FileCheck {
                rows,
                header: header.iter().map(|h| (*h).to_owned()).collect(),
                inner_sha256: inner.map(str::to_owned),
                detail: String::new(),
            },
        }
    }

    #[test]
    fn formats_must_agree_on_rows_header_and_bytes() {
        let labels = vec!["Order ID".to_owned(), "Note".to_owned()];
        let h = ["Order ID", "Note"];
        let good = [
            run("csv", 3, &h, "aa", None),
            run("xlsx", 3, &h, "bb", None),
            run("csv.gz", 3, &h, "cc", Some("aa")),
        ];
        let verified = agreement(&good, Some(&labels)).unwrap();
        assert_eq!(verified.len(), 3, "{verified:?}");

        let wrong_bytes = [
            run("csv", 3, &h, "aa", None),
            run("csv.gz", 3, &h, "cc", Some("ab")),
        ];
        assert!(agreement(&wrong_bytes, Some(&labels)).is_err());
        let wrong_rows = [
            run("csv", 3, &h, "aa", None),
            run("xlsx", 2, &h, "bb", None),
        ];
        assert!(agreement(&wrong_rows, None).is_err());
        let wrong_header = [run("xlsx", 3, &["Order", "Note"], "bb", None)];
        assert!(agreement(&wrong_header, Some(&labels)).is_err());
        let mut lying_job = run("csv", 3, &h, "aa", None);
        lying_job.rows_written = Some(4);
        assert!(agreement(&[lying_job], None).is_err());
    }

    #[test]
    fn the_builtin_catalog_gives_the_orders_labels() {
        let labels = catalog_labels("orders").expect("orders is in the catalog");
        assert_eq!(labels[..2], ["Order ID", "Created at"]);
        assert_eq!(catalog_labels("nope"), None);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(2 * 1024 * 1024 + 512 * 1024), "2.50 MiB");
    }
}
