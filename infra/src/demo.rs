//! The demo client `make up` runs against the local stack: a miss that starts a job, the job's
//! progress, the download, then the same request again answered from the cache with the same bytes.

use crate::token::{dev_token, DEMO_SCOPES};
use anyhow::{anyhow, bail, Context};
use reqwest::{header, Client, Response, StatusCode};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

pub const DEFAULT_API: &str = "http://127.0.0.1:9000/lambda-url/export-api";

#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// API base, e.g. `http://127.0.0.1:9000/lambda-url/export-api`.
    pub api: String,
    /// `LOCAL_JWT_SECRET` of the running API.
    pub secret: String,
    pub tenant: String,
    pub user: String,
    pub dataset: String,
    pub format: String,
    pub poll_every: Duration,
    /// Give up waiting for the job after this long (the first run compiles the worker).
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
            format: "csv".to_owned(),
            poll_every: Duration::from_millis(500),
            timeout: Duration::from_secs(20 * 60),
        }
    }

    fn export_url(&self) -> String {
        format!(
            "{}/exports/{}?format={}",
            self.api, self.dataset, self.format
        )
    }

    fn cache_url(&self) -> String {
        format!(
            "{}/exports/cache/{}?format={}",
            self.api, self.dataset, self.format
        )
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

#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub job_id: String,
    pub miss_ms: u128,
    /// From the 202 to the client seeing `succeeded`.
    pub job_observed: Duration,
    /// `finished_at - started_at` as recorded by the worker, when both are present.
    pub job_worker: Option<Duration>,
    pub rows: Option<u64>,
    pub rows_written: Option<u64>,
    pub bytes: u64,
    pub sha256: String,
    pub hit_ms: u128,
    pub download_ms: u128,
}

impl DemoSummary {
    pub fn rows_per_sec(&self) -> Option<f64> {
        let rows = self.rows_written.or(self.rows)? as f64;
        let secs = self.job_worker.unwrap_or(self.job_observed).as_secs_f64();
        (secs > 0.0).then(|| rows / secs)
    }
}

/// Counts CSV records (RFC 4180: quoted fields may contain newlines) across chunk boundaries.
#[derive(Debug, Default, Clone)]
pub struct CsvRecordCounter {
    in_quotes: bool,
    records: u64,
    open_record: bool,
}

impl CsvRecordCounter {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'"' => {
                    self.in_quotes = !self.in_quotes;
                    self.open_record = true;
                }
                b'\n' if !self.in_quotes => {
                    self.records += 1;
                    self.open_record = false;
                }
                b'\r' if !self.in_quotes => {}
                _ => self.open_record = true,
            }
        }
    }

    /// Records seen, the header included; a last record without a line break counts.
    pub fn records(&self) -> u64 {
        self.records + u64::from(self.open_record)
    }
}

struct Download {
    bytes: u64,
    sha256: String,
    rows: Option<u64>,
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

impl Demo<'_> {
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
    async fn request_miss(&self) -> anyhow::Result<(Response, u128)> {
        let url = self.cfg.export_url();
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
                    let del = self
                        .http
                        .delete(self.cfg.cache_url())
                        .bearer_auth(&self.token)
                        .send()
                        .await
                        .context("DELETE the cache entry")?;
                    if del.status() != StatusCode::NO_CONTENT {
                        bail!(
                            "DELETE {} answered {}",
                            self.cfg.cache_url(),
                            problem(del).await
                        );
                    }
                }
                _ => bail!("GET {url} expected 202, got {}", problem(resp).await),
            }
        }
        bail!("GET {url} still answered from the cache after invalidating it")
    }

    async fn wait_for_job(&self, job_url: &str, job_id: &str) -> anyhow::Result<serde_json::Value> {
        let started = Instant::now();
        let mut last_line = String::new();
        let mut told_about_compile = false;
        loop {
            let resp = self.get(job_url).await?;
            if resp.status() != StatusCode::OK {
                bail!("GET {job_url} expected 200, got {}", problem(resp).await);
            }
            let job = Self::json(resp).await?;
            let status = job["status"].as_str().unwrap_or("?").to_owned();
            let line = match (job["rows_written"].as_u64(), job["rows_total"].as_u64()) {
                (Some(w), Some(t)) => format!(
                    "  {status:<9} {w:>9}/{t} rows  {:>5.1}%",
                    job["progress"].as_f64().unwrap_or(0.0) * 100.0
                ),
                (Some(w), None) => format!("  {status:<9} {w:>9} rows"),
                _ => format!("  {status}"),
            };
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

    /// Follows a 303 to the presigned URL and downloads it (no Authorization header: the
    /// signature is in the URL).
    async fn download(&self, presigned: &str) -> anyhow::Result<Download> {
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
        let mut hasher = Sha256::new();
        let mut counter = CsvRecordCounter::default();
        let mut bytes = 0u64;
        while let Some(chunk) = resp.chunk().await.context("reading the download")? {
            hasher.update(&chunk);
            counter.feed(&chunk);
            bytes += chunk.len() as u64;
        }
        let rows = (self.cfg.format == "csv").then(|| counter.records().saturating_sub(1));
        Ok(Download {
            bytes,
            sha256: hex::encode(hasher.finalize()),
            rows,
            ms: started.elapsed().as_millis(),
        })
    }

    fn see_other_location(resp: &Response, what: &str) -> anyhow::Result<String> {
        header_str(resp, header::LOCATION.as_str())
            .ok_or_else(|| anyhow!("{what}: 303 without a Location header"))
    }
}

/// Runs the demo and prints what happens; returns the measurements.
pub async fn run(cfg: &DemoConfig) -> anyhow::Result<DemoSummary> {
    let token = dev_token(&cfg.secret, &cfg.tenant, &cfg.user, DEMO_SCOPES, 3_600)?;
    let http = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")?;
    let demo = Demo { cfg, http, token };

    println!(
        "▶ GET {}  (tenant {}, user {})",
        cfg.export_url(),
        cfg.tenant,
        cfg.user
    );
    let (resp, miss_ms) = demo.request_miss().await?;
    let location = header_str(&resp, header::LOCATION.as_str())
        .ok_or_else(|| anyhow!("202 without a Location header"))?;
    let retry_after = header_str(&resp, header::RETRY_AFTER.as_str())
        .ok_or_else(|| anyhow!("202 without a Retry-After header"))?;
    let cache = header_str(&resp, "x-export-cache").unwrap_or_else(|| "(none)".to_owned());
    let job = Demo::json(resp).await?;
    let job_id = job["job_id"]
        .as_str()
        .ok_or_else(|| anyhow!("202 body has no job_id: {job}"))?
        .to_owned();
    println!(
        "  202 Accepted in {miss_ms} ms: job {job_id}, status {}, Location {location}, Retry-After {retry_after}, X-Export-Cache {cache}",
        job["status"].as_str().unwrap_or("?")
    );

    let job_url = cfg.resolve(&location);
    println!("▶ polling GET {job_url}");
    let job_started = Instant::now();
    let job = demo.wait_for_job(&job_url, &job_id).await?;
    let job_observed = job_started.elapsed();
    let job_worker = match (
        parse_time(&job["started_at"]),
        parse_time(&job["finished_at"]),
    ) {
        (Some(s), Some(f)) => (f - s).to_std().ok(),
        _ => None,
    };
    let rows_written = job["rows_written"].as_u64();

    let download_url = format!("{job_url}/download");
    println!("▶ GET {download_url}");
    let resp = demo.get(&download_url).await?;
    if resp.status() != StatusCode::SEE_OTHER {
        bail!(
            "GET {download_url} expected 303, got {}",
            problem(resp).await
        );
    }
    let presigned = Demo::see_other_location(&resp, &download_url)?;
    let first = demo.download(&presigned).await?;
    println!(
        "  303 -> presigned URL; downloaded {} bytes{} in {} ms, sha256 {}",
        first.bytes,
        first
            .rows
            .map(|r| format!(", {r} rows"))
            .unwrap_or_default(),
        first.ms,
        first.sha256
    );
    if let (Some(rows), Some(written)) = (first.rows, rows_written) {
        if rows != written {
            println!(
                "  WARNING: the file has {rows} rows but the job reports rows_written {written}"
            );
        }
    }

    println!("▶ GET {} again", cfg.export_url());
    let started = Instant::now();
    let resp = demo.get(&cfg.export_url()).await?;
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
    let presigned = Demo::see_other_location(&resp, "cache hit")?;
    let second = demo.download(&presigned).await?;
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

    Ok(DemoSummary {
        job_id,
        miss_ms,
        job_observed,
        job_worker,
        rows: first.rows,
        rows_written,
        bytes: first.bytes,
        sha256: first.sha256,
        hit_ms,
        download_ms: first.ms,
    })
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

/// The closing report: timings, then how to call the API by hand.
pub fn print_summary(cfg: &DemoConfig, s: &DemoSummary) -> anyhow::Result<()> {
    let rows = s
        .rows_written
        .or(s.rows)
        .map(|r| r.to_string())
        .unwrap_or_else(|| "?".to_owned());
    let rate = s
        .rows_per_sec()
        .map(|r| format!("{r:.0} rows/s"))
        .unwrap_or_else(|| "n/a".to_owned());
    let worker = s
        .job_worker
        .map(|d| format!(", worker {:.2} s", d.as_secs_f64()))
        .unwrap_or_default();
    println!();
    println!(
        "== export-cache demo: {} {} for tenant {} ==",
        cfg.dataset, cfg.format, cfg.tenant
    );
    println!(
        "  miss answered    202 in {} ms (job {})",
        s.miss_ms, s.job_id
    );
    println!(
        "  job              {:.2} s until succeeded{worker}; {rows} rows, {rate}",
        s.job_observed.as_secs_f64()
    );
    println!(
        "  download         {} in {} ms, sha256 {}",
        human_bytes(s.bytes),
        s.download_ms,
        s.sha256
    );
    println!("  hit answered     303 in {} ms, identical bytes", s.hit_ms);
    println!();
    let token = dev_token(&cfg.secret, &cfg.tenant, &cfg.user, DEMO_SCOPES, 12 * 3_600)?;
    println!("API base URL: {}", cfg.api);
    println!("Try it (token valid 12 h):");
    println!("  export TOKEN='{token}'");
    println!(
        "  curl -si -H \"Authorization: Bearer $TOKEN\" '{}'",
        cfg.export_url()
    );
    println!(
        "  curl -s -H \"Authorization: Bearer $TOKEN\" '{}/exports/cache/stats'",
        cfg.api
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(chunks: &[&[u8]]) -> u64 {
        let mut c = CsvRecordCounter::default();
        for chunk in chunks {
            c.feed(chunk);
        }
        c.records()
    }

    #[test]
    fn counts_records_not_lines() {
        let csv = b"id,name\r\n1,\"Smith, Jo\"\r\n2,\"multi\nline \"\"quoted\"\"\"\r\n3,plain\r\n";
        assert_eq!(count(&[csv]), 4);
    }

    #[test]
    fn counts_across_chunk_boundaries() {
        let csv = b"id,name\n1,\"a\nb\"\n2,c\n";
        for split in 0..csv.len() {
            let (a, b) = csv.split_at(split);
            assert_eq!(count(&[a, b]), 3, "split at {split}");
        }
    }

    #[test]
    fn last_record_without_line_break_counts() {
        assert_eq!(count(&[b"h\n1\n2"]), 3);
        assert_eq!(count(&[b""]), 0);
    }

    #[test]
    fn job_locations_resolve_against_the_api_base() {
        let cfg = DemoConfig::new(format!("{DEFAULT_API}/"), "s");
        assert_eq!(
            cfg.resolve("/exports/jobs/j1"),
            "http://127.0.0.1:9000/lambda-url/export-api/exports/jobs/j1"
        );
        assert_eq!(cfg.resolve("http://x/y"), "http://x/y");
        assert_eq!(
            cfg.export_url(),
            "http://127.0.0.1:9000/lambda-url/export-api/exports/orders?format=csv"
        );
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(2 * 1024 * 1024 + 512 * 1024), "2.50 MiB");
    }
}
