//! Throughput and peak memory of the file encoders on synthetic `orders` rows.
//!
//! `cargo bench -p shared --bench encoders [ROWS...]` (or `BENCH_ROWS=100000,1000000`;
//! `BENCH_CASES=csv,csv.gz@1,xlsx@1` picks the cases, `format@level` setting the gzip or zip
//! level; `XLSX_ROWS_PER_SHEET` as for the worker). Each measurement runs in a child process (this
//! binary re-executed with `--case`) so its peak RSS (`VmHWM`) is the encoder's alone. The child makes rows lazily, one 1,000-row page
//! at a time, from a deterministic generator; only the encoder calls are timed (page generation
//! is not), and the bytes go to a sink that counts them, as the worker's part upload would take
//! them: a part cut once 8 MiB are buffered after a page, then the tail.
//!
//! "disk writes" is what the child caused to be written to storage (`write_bytes` of
//! `/proc/self/io`, which counts page-cache writes when they are made): every encoder streams, so
//! it is 0 unless `BENCH_KEEP` keeps the files.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use shared::domain::{Catalog, Column};
use shared::domain::{ExportSpec, Format, Row};
use shared::encode::{encoder_for, EncodeSettings, FileInfo};

mod common;
use common::{
    cases, disk_write_bytes, group, invocation, peak_rss_kib, run_case, size, Invocation, Orders,
    Res,
};

const PAGE: usize = 1000;
/// The worker's default part size.
const PART_SIZE: usize = 8 << 20;
const DEFAULT_ROWS: [u64; 2] = [100_000, 1_000_000];
const DEFAULT_CASES: [&str; 4] = ["csv", "csv.gz", "xlsx@1", "xlsx@6"];

fn main() -> Res<()> {
    let rows = match invocation(&DEFAULT_ROWS)? {
        Invocation::Child { case, rows } => return child(&case, rows),
        Invocation::Parent { rows } => rows,
    };
    let cases = cases(&DEFAULT_CASES);
    println!(
        "| format | rows | seconds | rows/s | MB/s | output | peak RSS | of which finish | disk writes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &rows {
        for case in &cases {
            let stdout = run_case(case, n)?;
            let m = Measurement::parse(&stdout)?;
            let secs = m.elapsed.as_secs_f64();
            println!(
                "| {} | {} | {:.2} | {} | {:.1} | {} | {:.1} MiB | {:.2} s | {} B |",
                case_label(case),
                group(n),
                secs,
                group((n as f64 / secs) as u64),
                m.bytes as f64 / secs / 1e6,
                size(m.bytes),
                m.peak_rss_kib as f64 / 1024.0,
                m.finish.as_secs_f64(),
                group(m.disk_bytes),
            );
        }
    }
    Ok(())
}

fn case_label(case: &str) -> String {
    let settings = EncodeSettings::default();
    match case.split_once('@') {
        Some(("xlsx", l)) => format!("xlsx (zip level {l})"),
        Some((f, l)) => format!("{f} (level {l})"),
        None if case == "csv.gz" => format!("csv.gz (level {})", settings.gzip_level),
        None if case == "xlsx" => format!("xlsx (zip level {})", settings.xlsx_zip_level),
        None => case.to_string(),
    }
}

struct Measurement {
    elapsed: Duration,
    /// The part spent in `finish` (for XLSX: the end of the last sheet, the rest of the
    /// workbook, the central directory).
    finish: Duration,
    bytes: u64,
    peak_rss_kib: u64,
    disk_bytes: u64,
}

impl Measurement {
    fn print(&self) {
        println!(
            "elapsed_ns={} finish_ns={} bytes={} peak_rss_kib={} disk_bytes={}",
            self.elapsed.as_nanos(),
            self.finish.as_nanos(),
            self.bytes,
            self.peak_rss_kib,
            self.disk_bytes
        );
    }

    fn parse(s: &str) -> Res<Self> {
        let kv: BTreeMap<&str, u64> = s
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        let get = |k: &str| {
            kv.get(k)
                .copied()
                .ok_or(format!("child printed no {k}: {s}"))
        };
        Ok(Self {
            elapsed: Duration::from_nanos(get("elapsed_ns")?),
            finish: Duration::from_nanos(get("finish_ns")?),
            bytes: get("bytes")?,
            peak_rss_kib: get("peak_rss_kib")?,
            disk_bytes: get("disk_bytes")?,
        })
    }
}

/// One measurement: encode `rows` rows with the encoder `case` names, into a counting sink.
fn child(case: &str, rows: u64) -> Res<()> {
    let (format, level) = match case.split_once('@') {
        Some((f, l)) => (f, Some(l.parse::<u32>()?)),
        None => (case, None),
    };
    let format = Format::parse(format).ok_or(format!("unknown format {format}"))?;
    let mut settings = EncodeSettings::default();
    match (format, level) {
        (Format::CsvGz, Some(l)) => settings.gzip_level = l,
        (Format::Xlsx, Some(l)) => settings.xlsx_zip_level = u8::try_from(l)?,
        _ => {}
    }
    // As the worker reads it: smaller sheets make a kept file with several (to check rollover).
    if let Ok(rows) = std::env::var("XLSX_ROWS_PER_SHEET") {
        settings.xlsx_rows_per_sheet = rows.parse()?;
    }
    let catalog = Catalog::builtin()?;
    let orders = catalog.get("orders").ok_or("no orders dataset")?;
    let columns: Vec<Column> = orders.columns.clone();
    let spec = ExportSpec {
        dataset: orders.name.clone(),
        format,
        columns: columns.iter().map(|c| c.name.clone()).collect(),
        filters: BTreeMap::new(),
        from: None,
        to: None,
        tz: shared::domain::TimeZone::UTC,
        bom: false,
        delimiter: Default::default(),
    };
    let mut gen = Orders::new(&columns)?;
    let mut page: Vec<Row> = Vec::with_capacity(PAGE);
    let mut bytes = 0u64;
    let mut elapsed = Duration::ZERO;

    let start = Instant::now();
    let file = FileInfo {
        spec: &spec,
        created_at: DateTime::<Utc>::UNIX_EPOCH,
    };
    let mut encoder = encoder_for(file, columns, &settings, None)?;
    elapsed += start.elapsed();
    // BENCH_KEEP=DIR keeps the file for inspection (its writes are timed too, so not for numbers).
    let mut keep = match std::env::var_os("BENCH_KEEP") {
        Some(dir) => Some(std::fs::File::create(std::path::Path::new(&dir).join(
            match level {
                Some(l) => format!("orders-{rows}-level{l}.{}", format.extension()),
                None => format!("orders-{rows}.{}", format.extension()),
            },
        ))?),
        None => None,
    };
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(PAGE as u64);
        gen.fill(&mut page, done, n as usize);
        let start = Instant::now();
        encoder.write_rows(&page)?;
        // Parts are cut as the worker cuts them: once a part's worth is buffered.
        if encoder.buffered() >= PART_SIZE {
            let part = encoder.cut()?.bytes;
            bytes += part.len() as u64;
            if let Some(f) = keep.as_mut() {
                f.write_all(&part)?;
            }
        }
        elapsed += start.elapsed();
        done += n;
    }
    let start = Instant::now();
    let finish_start = elapsed;
    let tail = encoder.finish()?.tail;
    bytes += tail.len() as u64;
    if let Some(f) = keep.as_mut() {
        f.write_all(&tail)?;
    }
    drop(tail);
    elapsed += start.elapsed();

    Measurement {
        elapsed,
        finish: elapsed - finish_start,
        bytes,
        peak_rss_kib: peak_rss_kib()?,
        disk_bytes: disk_write_bytes()?,
    }
    .print();
    Ok(())
}
