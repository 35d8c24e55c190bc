//! The worker's whole path at scale: DynamoDB Query pages in the wire format, read through the
//! real SDK by the project's `DynamoSource` with either source decoder (`sdk`: the SDK parses each
//! page, then its items are converted to rows; `fast`: the SDK's call with its body kept, decoded
//! straight into rows), encoded, and uploaded as multipart parts through the project's `S3Files`
//! into the emulator's S3.
//!
//! `make bench-worker` (starts moto, then `cargo bench -p shared --bench worker -- 1000000`), or
//! with `AWS_ENDPOINT_URL` set to a running emulator: `cargo bench -p shared --bench worker --
//! [ROWS...]`. `BENCH_CASES` picks the cases, `format/decoder` (default
//! `csv/sdk,csv/fast,xlsx/sdk,xlsx/fast`, run in that order for each row count, so the two
//! decoders of a format meet the same machine load); a case without a decoder is `fast`.
//!
//! The pages come from a canned endpoint on its own thread: 1 MB pages of 4,000 synthetic orders
//! (the bench generator shared with the encoders bench, as DynamoDB JSON under the catalog's
//! source attributes), pre-rendered once and served in turn with a `LastEvaluatedKey` that counts
//! rows, so source latency and the endpoint's own work are out of the measurement. Each case runs
//! in a child process (this binary re-executed) on a current-thread runtime, so the SDK, the
//! encoder and the uploads all run on the measured thread: CPU time per phase is that thread's
//! (`/proc/thread-self/schedstat`), peak RSS is the child's `VmHWM`, and "disk writes" its
//! `write_bytes`. Upload time is this process's side only (request signing, checksums, the
//! copy to the socket); the emulator's work runs in its own process. "parse" is the Query call
//! (HTTP, the SDK's orchestration and, for `sdk`, its parse of the page; for `fast` the SDK
//! parses `{}`), "convert" what turns its answer into rows (`page_of`, or the fast decoder's
//! whole read of the page's JSON).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::BehaviorVersion;
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value as Json};
use shared::adapters::dynamodb::DynamoSource;
use shared::adapters::s3::S3Files;
use shared::config::SourceDecoder;
use shared::domain::request::normalise;
use shared::domain::{Catalog, Column, RawExportRequest, Row, UploadedPart, Value};
use shared::encode::{encoder_for, EncodeSettings, FileInfo};
use shared::ports::{ObjectStore, SourceQuery};
use shared::services::process::source_query;

#[allow(dead_code)]
mod common;
use common::{
    cases, disk_write_bytes, group, invocation, peak_rss_kib, run_case, size, Invocation, Orders,
    Res,
};

/// Rows per canned page: 4,000 orders make about 1 MB of DynamoDB JSON, DynamoDB's page limit.
const PAGE_ROWS: u64 = 4_000;
/// Distinct pre-rendered pages served in turn.
const DISTINCT_PAGES: u64 = 4;
/// The worker's default part size.
const PART_SIZE: usize = 8 << 20;
const DEFAULT_ROWS: [u64; 1] = [1_000_000];
const DEFAULT_CASES: [&str; 4] = ["csv/sdk", "csv/fast", "xlsx/sdk", "xlsx/fast"];
const PHASES: [&str; 4] = ["parse", "convert", "encode", "upload"];

fn main() -> Res<()> {
    let rows = match invocation(&DEFAULT_ROWS)? {
        Invocation::Child { case, rows } => return child(&case, rows),
        Invocation::Parent { rows } => rows,
    };
    if std::env::var_os("AWS_ENDPOINT_URL").is_none() {
        return Err("set AWS_ENDPOINT_URL to an S3 emulator (make bench-worker starts one)".into());
    }
    let cases = cases(&DEFAULT_CASES);
    println!(
        "| format | decoder | rows | seconds | rows/s | CPU µs/row: parse | convert | encode | upload | rows/s of CPU | output | parts | peak RSS | disk writes |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut cpu: Vec<(String, u64, f64)> = Vec::new();
    for &n in &rows {
        for case in &cases {
            let (format, decoder) = split_case(case)?;
            let stdout = run_case(case, n)?;
            let m = parse_measurement(&stdout)?;
            let secs = m["wall_ns"] as f64 / 1e9;
            let per_row = |phase: &str| m[&format!("{phase}_ns")] as f64 / 1e3 / n as f64;
            let cpu_s: f64 = PHASES
                .iter()
                .map(|p| m[&format!("{p}_ns")] as f64)
                .sum::<f64>()
                / 1e9;
            cpu.push((case.clone(), n, cpu_s));
            println!(
                "| {format} | {} | {} | {secs:.2} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {:.1} MiB | {} B |",
                decoder_name(decoder),
                group(n),
                group((n as f64 / secs) as u64),
                per_row("parse"),
                per_row("convert"),
                per_row("encode"),
                per_row("upload"),
                group((n as f64 / cpu_s) as u64),
                size(m["bytes"]),
                m["parts"],
                m["peak_rss_kib"] as f64 / 1024.0,
                group(m["disk_bytes"]),
            );
        }
    }
    // The machine is shared: compare decoders within one run, case against case.
    for (case, n, fast) in &cpu {
        let Some(format) = case.strip_suffix("/fast") else {
            continue;
        };
        let sdk = cpu
            .iter()
            .find(|(c, m, _)| m == n && c == &format!("{format}/sdk"));
        if let Some((_, _, sdk)) = sdk {
            println!(
                "{format}, {} rows: the fast decoder takes {:.2}x the CPU of the SDK's ({:.2}x as many rows/s of CPU)",
                group(*n),
                fast / sdk,
                sdk / fast
            );
        }
    }
    Ok(())
}

/// `csv/fast` -> ("csv", Fast); a case without a decoder is the default one.
fn split_case(case: &str) -> Res<(&str, SourceDecoder)> {
    let (format, decoder) = case.split_once('/').unwrap_or((case, "fast"));
    let decoder = match decoder {
        "fast" => SourceDecoder::Fast,
        "sdk" => SourceDecoder::Sdk,
        other => return Err(format!("unknown decoder {other} (fast or sdk)").into()),
    };
    Ok((format, decoder))
}

fn decoder_name(d: SourceDecoder) -> &'static str {
    match d {
        SourceDecoder::Fast => "fast",
        SourceDecoder::Sdk => "sdk",
    }
}

fn parse_measurement(s: &str) -> Res<BTreeMap<String, u64>> {
    let kv: BTreeMap<String, u64> = s
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    for key in ["wall_ns", "bytes", "parts", "peak_rss_kib", "disk_bytes"] {
        if !kv.contains_key(key) {
            return Err(format!("child printed no {key}: {s}").into());
        }
    }
    Ok(kv)
}

/// CPU time this thread has run, in nanoseconds.
fn thread_cpu_ns() -> Res<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let first = text.split_whitespace().next().ok_or("empty schedstat")?;
    Ok(first.parse()?)
}

/// CPU nanoseconds per phase, added up as the run goes.
#[derive(Default)]
struct Phases([u64; 4]);

impl Phases {
    /// Runs `f` and charges this thread's CPU time to `phase`.
    async fn time<T, F: std::future::Future<Output = T>>(&mut self, phase: usize, f: F) -> Res<T> {
        let start = thread_cpu_ns()?;
        let out = f.await;
        self.0[phase] += thread_cpu_ns()? - start;
        Ok(out)
    }
}

/// One measurement: `rows` orders through the worker's path, as `case` says.
fn child(case: &str, rows: u64) -> Res<()> {
    let (format, decoder) = split_case(case)?;
    let catalog = Catalog::builtin()?;
    let export = normalise(
        &catalog,
        &RawExportRequest::from_query("orders", vec![("format".into(), format.into())]),
    )
    .map_err(|e| format!("{e:?}"))?;
    let query = source_query(&export, "acme", "", None);
    let endpoint = serve_pages(&export.columns, &query, rows)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let sdk = aws_config::load_defaults(BehaviorVersion::latest()).await;
        let ddb = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(&sdk)
                .endpoint_url(&endpoint)
                .build(),
        );
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(true)
                .build(),
        );
        let bucket = format!("bench-{}", std::process::id());
        s3.create_bucket().bucket(&bucket).send().await?;
        let source = DynamoSource::new(ddb, decoder);
        let files = S3Files::new(s3, &bucket);
        let key = format!(
            "exports/acme/orders/bench.{}",
            export.spec.format.extension()
        );
        let settings = EncodeSettings::default();

        let wall = Instant::now();
        let mut phases = Phases::default();
        let upload_id = files
            .start_upload(&key, export.spec.format.content_type(), "bench")
            .await?;
        let file = FileInfo {
            spec: &export.spec,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
        };
        let mut encoder = encoder_for(file, export.columns.clone(), &settings, None)?;
        let mut parts: Vec<UploadedPart> = Vec::new();
        let mut bytes = 0u64;
        let mut read = 0u64;
        let mut cursor: Option<String> = None;
        loop {
            let answer = phases
                .time(0, source.send(&query, cursor.as_deref()))
                .await??;
            let page = phases.time(1, async { answer.into_page(&query) }).await??;
            read += page.rows.len() as u64;
            let cut = phases
                .time(2, async {
                    encoder.write_rows(&page.rows)?;
                    if encoder.buffered() >= PART_SIZE {
                        return Ok::<_, shared::encode::EncodeError>(Some(encoder.cut()?.bytes));
                    }
                    Ok(None)
                })
                .await??;
            if let Some(body) = cut {
                bytes += body.len() as u64;
                upload(&mut phases, &files, &key, &upload_id, &mut parts, body).await?;
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let tail = phases.time(2, async { encoder.finish() }).await??.tail;
        bytes += tail.len() as u64;
        upload(&mut phases, &files, &key, &upload_id, &mut parts, tail).await?;
        phases
            .time(3, files.complete_upload(&key, &upload_id, &parts))
            .await??;
        let wall = wall.elapsed();
        if read != rows {
            return Err(format!("read {read} rows, expected {rows}").into());
        }
        let (size, _) = files.digest(&key).await?;
        if size != bytes {
            return Err(format!("the object has {size} bytes, {bytes} were uploaded").into());
        }
        let mut line = format!(
            "wall_ns={} bytes={bytes} parts={} peak_rss_kib={} disk_bytes={}",
            wall.as_nanos(),
            parts.len(),
            peak_rss_kib()?,
            disk_write_bytes()?
        );
        for (name, ns) in PHASES.iter().zip(phases.0) {
            line.push_str(&format!(" {name}_ns={ns}"));
        }
        println!("{line}");
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

async fn upload(
    phases: &mut Phases,
    files: &S3Files,
    key: &str,
    upload_id: &str,
    parts: &mut Vec<UploadedPart>,
    body: Vec<u8>,
) -> Res<()> {
    let number = parts.len() as i32 + 1;
    let size = body.len() as u64;
    let etag = phases
        .time(3, files.upload_part(key, upload_id, number, body))
        .await??;
    parts.push(UploadedPart { number, etag, size });
    Ok(())
}

/// Serves `rows` orders as DynamoDB Query pages on a loopback port, from a thread of its own.
fn serve_pages(columns: &[Column], query: &SourceQuery, rows: u64) -> Res<String> {
    let mut gen = Orders::new(columns)?;
    let attrs: Vec<String> = query.columns.iter().map(|(a, _)| a.clone()).collect();
    let mut page: Vec<Row> = Vec::new();
    let items = |page: &[Row]| -> String {
        let items: Vec<Json> = page
            .iter()
            .map(|row| {
                let mut item = Map::new();
                item.insert(query.tenant_attribute.clone(), json!({"S": "acme"}));
                for (attr, value) in attrs.iter().zip(row) {
                    if let Some(v) = wire(value) {
                        item.insert(attr.clone(), v);
                    }
                }
                Json::Object(item)
            })
            .collect();
        serde_json::to_string(&items).unwrap_or_default()
    };
    let mut full: Vec<String> = Vec::new();
    for i in 0..DISTINCT_PAGES {
        gen.fill(&mut page, i * PAGE_ROWS, PAGE_ROWS as usize);
        full.push(items(&page));
    }
    gen.fill(&mut page, 0, (rows % PAGE_ROWS) as usize);
    let last = items(&page);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (full, last) = (full.clone(), last.clone());
            std::thread::spawn(move || {
                let _ = answer_queries(stream, &full, &last, rows);
            });
        }
    });
    Ok(url)
}

/// Answers the Query requests of one keep-alive connection.
fn answer_queries(mut stream: TcpStream, full: &[String], last: &str, rows: u64) -> Res<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let request: Json = serde_json::from_slice(&buf[head_end..head_end + length])?;
        buf.drain(..head_end + length);
        let offset: u64 = request["ExclusiveStartKey"]["order_id"]["S"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let count = (rows - offset).min(PAGE_ROWS);
        let items = if count == PAGE_ROWS {
            &full[((offset / PAGE_ROWS) % DISTINCT_PAGES) as usize]
        } else {
            last
        };
        let next = offset + count;
        let more = if next < rows {
            format!(
                r#","LastEvaluatedKey":{{"tenant_id":{{"S":"acme"}},"order_id":{{"S":"{next}"}}}}"#
            )
        } else {
            String::new()
        };
        let body = format!(
            r#"{{"Count":{count},"ScannedCount":{count},"ConsumedCapacity":{{"TableName":"orders","CapacityUnits":{}}},"Items":{items}{more}}}"#,
            (items.len() as f64 / 4096.0 / 2.0).ceil()
        );
        write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )?;
        stream.write_all(body.as_bytes())?;
    }
}

/// A cell as DynamoDB JSON, as the seeder writes it; `None` leaves the attribute out.
fn wire(value: &Value) -> Option<Json> {
    Some(match value {
        Value::Null => return None,
        Value::Str(s) => json!({ "S": s }),
        Value::Int(i) => json!({ "N": i.to_string() }),
        Value::Dec(d) => json!({ "N": d }),
        Value::Bool(b) => json!({ "BOOL": b }),
        Value::Ts(t) => json!({ "S": t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true) }),
        Value::Date(d) => json!({ "S": d.format("%Y-%m-%d").to_string() }),
    })
}
