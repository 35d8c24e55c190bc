//! File formats through the real path (API -> SQS -> worker -> S3), read back with independent
//! readers: calamine for XLSX, the csv crate for CSV, flate2 for gzip; manifests checked against
//! the objects they describe.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::io::Read;

use aws_sdk_dynamodb::types::AttributeValue;
use calamine::{Data, DataType, Reader, Xlsx};
use chrono::{DateTime, NaiveDate, Utc};
use http::StatusCode;
use integration_tests::{neutralised, Stack};

fn sha256(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

fn s<'a>(item: &'a HashMap<String, AttributeValue>, k: &str) -> Option<&'a str> {
    match item.get(k) {
        Some(AttributeValue::S(v)) | Some(AttributeValue::N(v)) => Some(v.as_str()),
        _ => None,
    }
}

/// Exports `uri`, downloads the file through the job's link, and returns (bytes, file name,
/// job status, manifest).
async fn export(
    stack: &Stack,
    uri: &str,
) -> (Vec<u8>, String, serde_json::Value, serde_json::Value) {
    let token = stack.reader("acme");
    let job_id = stack.export_through_worker(uri, &token).await;
    let status = stack
        .get(&format!("/exports/jobs/{job_id}"), &token)
        .await
        .json();
    let dl = stack
        .get(&format!("/exports/jobs/{job_id}/download"), &token)
        .await;
    assert_eq!(dl.status, StatusCode::SEE_OTHER);
    let (_, headers, bytes) = stack.fetch(dl.header("location")).await;
    let disposition = headers["content-disposition"].to_str().unwrap().to_string();
    let name = disposition
        .split("filename=\"")
        .nth(1)
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    let manifest_key = stack
        .object_keys()
        .await
        .into_iter()
        .find(|k| k.contains(&job_id) && k.ends_with(".manifest.json"))
        .unwrap();
    let manifest = stack.read_object(&manifest_key).await;
    (
        bytes,
        name,
        status,
        serde_json::from_slice(&manifest).unwrap(),
    )
}

fn assert_manifest_describes(manifest: &serde_json::Value, file: &[u8], rows: u64, format: &str) {
    assert_eq!(manifest["sha256"], sha256(file), "{manifest}");
    assert_eq!(manifest["bytes"], file.len() as u64);
    assert_eq!(manifest["rows"], rows);
    assert_eq!(manifest["format"], format);
    assert_eq!(manifest["dataset"], "orders");
    assert_eq!(manifest["columns"][0]["name"], "order_id");
    assert_eq!(manifest["columns"][0]["label"], "Order ID");
    assert_eq!(manifest["columns"][6]["type"], "decimal");
    // The seed's latest created_at among the exported rows.
    let newest = infra::seed::created_at(rows - 1);
    assert_eq!(
        DateTime::parse_from_rfc3339(manifest["source"]["watermark"].as_str().unwrap()).unwrap(),
        DateTime::parse_from_rfc3339(&newest).unwrap(),
        "{manifest}"
    );
    for k in [
        "generated_at",
        "encoder_version",
        "filters",
        "range",
        "tz",
        "sheets",
    ] {
        assert!(manifest.get(k).is_some(), "manifest lacks {k}: {manifest}");
    }
}

#[tokio::test]
async fn xlsx_matches_the_source_cell_by_cell_and_type_by_type() {
    const ROWS: u64 = 120;
    // 50 rows per sheet (header included) so the rollover shows on a small export.
    let stack = Stack::new(ROWS, &[("XLSX_ROWS_PER_SHEET", "50")]).await;
    let (file, name, status, manifest) =
        export(&stack, "/exports/orders?format=xlsx&tz=Europe/Paris").await;
    assert!(
        name.starts_with("orders-") && name.ends_with(".xlsx"),
        "{name}"
    );
    assert_eq!(status["rows_written"], ROWS);
    assert_eq!(status["sheets"], 3);
    assert_manifest_describes(&manifest, &file, ROWS, "xlsx");
    assert_eq!(manifest["sheets"], 3);
    assert_eq!(manifest["tz"], "Europe/Paris");

    // CI opens the same file with openpyxl too (infra/scripts/check_xlsx.py).
    if let Ok(path) = std::env::var("XLSX_SAMPLE_OUT") {
        std::fs::write(path, &file).unwrap();
    }
    let mut book: Xlsx<_> = Xlsx::new(std::io::Cursor::new(file)).unwrap();
    assert_eq!(book.sheet_names(), vec!["orders", "orders 2", "orders 3"]);
    let paris = chrono_tz::Europe::Paris;
    let mut i = 0u64;
    for sheet in book.sheet_names() {
        let range = book.worksheet_range(&sheet).unwrap();
        let mut rows = range.rows();
        let header: Vec<String> = rows.next().unwrap().iter().map(|c| c.to_string()).collect();
        assert_eq!(header[0], "Order ID");
        assert_eq!(header[11], "Note");
        for row in rows {
            let item = infra::seed::order_item("acme", i);
            let ctx = format!("row {i} on {sheet}");
            assert_eq!(
                row[0],
                Data::String(s(&item, "order_id").unwrap().into()),
                "{ctx}"
            );
            let created = DateTime::parse_from_rfc3339(s(&item, "created_at").unwrap())
                .unwrap()
                .with_timezone(&Utc);
            assert_eq!(
                row[1].as_datetime().unwrap(),
                created.with_timezone(&paris).naive_local(),
                "{ctx}: timestamps are Excel dates in the requested zone"
            );
            assert_eq!(
                row[3],
                Data::String(neutralised(s(&item, "customer_name").unwrap())),
                "{ctx}"
            );
            let amount: f64 = s(&item, "amount").unwrap().parse().unwrap();
            assert_eq!(row[6], Data::Float(amount), "{ctx}: decimals are numbers");
            let items: f64 = s(&item, "items").unwrap().parse().unwrap();
            assert_eq!(row[8].as_f64(), Some(items), "{ctx}");
            assert!(
                !matches!(row[8], Data::String(_)),
                "{ctx}: integers are numbers"
            );
            let Some(AttributeValue::Bool(paid)) = item.get("paid") else {
                panic!()
            };
            assert_eq!(row[9], Data::Bool(*paid), "{ctx}");
            match s(&item, "ship_date") {
                Some(d) => assert_eq!(
                    row[10].as_datetime().unwrap().date(),
                    NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap(),
                    "{ctx}"
                ),
                None => assert_eq!(row[10], Data::Empty, "{ctx}: empty source -> empty cell"),
            }
            match s(&item, "note") {
                Some(n) => assert_eq!(row[11], Data::String(neutralised(n)), "{ctx}"),
                None => assert_eq!(
                    row.get(11).cloned().unwrap_or(Data::Empty),
                    Data::Empty,
                    "{ctx}"
                ),
            }
            i += 1;
        }
    }
    assert_eq!(i, ROWS, "every row on some sheet, none twice");
}

fn expected_csv_row(item: &HashMap<String, AttributeValue>, created: String) -> Vec<String> {
    let t = |k: &str| s(item, k).unwrap_or("").to_string();
    let paid = matches!(item.get("paid"), Some(AttributeValue::Bool(true)));
    vec![
        t("order_id"),
        created,
        t("customer_id"),
        neutralised(&t("customer_name")),
        t("status"),
        t("currency"),
        t("amount"),
        t("tax"),
        t("items"),
        paid.to_string(),
        t("ship_date"),
        neutralised(&t("note")),
    ]
}

fn read_csv(bytes: &[u8], delimiter: u8) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(true)
        .delimiter(delimiter)
        .from_reader(bytes)
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

#[tokio::test]
async fn csv_variants_round_trip_through_a_csv_reader() {
    const ROWS: u64 = 90;
    let stack = Stack::new(ROWS, &[]).await;

    // Excel profile: BOM + semicolons, timestamps in New York time.
    let (file, name, _, manifest) = export(
        &stack,
        "/exports/orders?bom=true&delimiter=semicolon&tz=America/New_York",
    )
    .await;
    assert!(name.ends_with(".csv"), "{name}");
    assert!(file.starts_with(b"\xEF\xBB\xBF"), "UTF-8 BOM first");
    assert_manifest_describes(&manifest, &file, ROWS, "csv");
    let rows = read_csv(&file[3..], b';');
    assert_eq!(rows.len() as u64, ROWS);
    let ny = chrono_tz::America::New_York;
    for (i, rec) in rows.iter().enumerate() {
        let item = infra::seed::order_item("acme", i as u64);
        let created = DateTime::parse_from_rfc3339(s(&item, "created_at").unwrap())
            .unwrap()
            .with_timezone(&ny)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        assert_eq!(rec, &expected_csv_row(&item, created), "row {i}");
    }

    // gzip: a .csv.gz that inflates to the default CSV.
    let (gz, name, _, manifest) = export(&stack, "/exports/orders?format=csv.gz").await;
    assert!(name.ends_with(".csv.gz"), "{name}");
    assert_manifest_describes(&manifest, &gz, ROWS, "csv.gz");
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut plain)
        .unwrap();
    let rows = read_csv(&plain, b',');
    assert_eq!(rows.len() as u64, ROWS);
    for (i, rec) in rows.iter().enumerate() {
        let item = infra::seed::order_item("acme", i as u64);
        let created = s(&item, "created_at").unwrap().to_string();
        assert_eq!(rec, &expected_csv_row(&item, created), "row {i}");
    }

    // Tab-delimited, a subset of columns, filtered: still exactly the matching source rows.
    let (tsv, _, status, _) = export(
        &stack,
        "/exports/orders?delimiter=tab&columns=status,order_id&status=paid",
    )
    .await;
    let rows = read_csv(&tsv, b'\t');
    let expected: Vec<Vec<String>> = (0..ROWS)
        .map(|i| infra::seed::order_item("acme", i))
        .filter(|it| s(it, "status") == Some("paid"))
        .map(|it| vec![s(&it, "order_id").unwrap().to_string(), "paid".to_string()])
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(rows, expected, "catalog column order, filtered rows");
    assert_eq!(status["rows_written"], expected.len() as u64);
}

#[tokio::test]
async fn range_export_reads_the_created_at_index() {
    let stack = Stack::new(200, &[]).await;
    // Rows are 37 s apart from 2024-01-01T00:00:00Z: rows 10..=20 fall in this window.
    let (file, _, _, manifest) = export(
        &stack,
        "/exports/orders?columns=order_id,created_at&from=2024-01-01T00:06:10Z&to=2024-01-01T00:12:20Z",
    )
    .await;
    let rows = read_csv(&file, b',');
    let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    let expected: Vec<String> = (10..=20)
        .map(|i| infra::seed::order_id("acme", i))
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(manifest["range"]["column"], "created_at");
}

/// The number text of `key` in a raw NDJSON line, as written (serde_json would read it as f64).
fn raw_number<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
    let rest = &line[start..];
    &rest[..rest.find([',', '}']).unwrap()]
}

#[tokio::test]
async fn ndjson_lines_are_typed_objects_of_the_source_rows() {
    const ROWS: u64 = 80;
    let stack = Stack::new(ROWS, &[]).await;
    let uri = "/exports/orders?format=ndjson&tz=Europe/Paris";
    let (file, name, status, manifest) = export(&stack, uri).await;
    assert!(
        name.starts_with("orders-") && name.ends_with(".ndjson"),
        "{name}"
    );
    assert_eq!(status["format"], "ndjson");
    assert_manifest_describes(&manifest, &file, ROWS, "ndjson");
    let dl = stack
        .get(
            &format!(
                "/exports/jobs/{}/download",
                status["job_id"].as_str().unwrap()
            ),
            &stack.reader("acme"),
        )
        .await;
    let (_, headers, _) = stack.fetch(dl.header("location")).await;
    assert_eq!(headers["content-type"], "application/x-ndjson");

    // CI reads the same rows with Python's json and csv modules (infra/scripts/check_ndjson.py).
    if let Ok(path) = std::env::var("NDJSON_SAMPLE_OUT") {
        let (csv, _, _, _) = export(&stack, "/exports/orders?tz=Europe/Paris").await;
        std::fs::write(&path, &file).unwrap();
        std::fs::write(format!("{path}.csv"), csv).unwrap();
    }
    let text = std::str::from_utf8(&file).unwrap();
    assert!(text.ends_with('\n'));
    let paris = chrono_tz::Europe::Paris;
    let catalog = shared::domain::Catalog::builtin().unwrap();
    let columns = catalog.get("orders").unwrap().column_names();
    let (mut n, mut formula_starts) = (0u64, 0);
    for (i, line) in text.lines().enumerate() {
        let item = infra::seed::order_item("acme", i as u64);
        let ctx = format!("row {i}: {line}");
        let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
        let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            columns.iter().copied().collect(),
            "{ctx}: keys are column names"
        );
        // In catalog order on the line (serde_json's map need not keep it).
        let at: Vec<usize> = columns
            .iter()
            .map(|c| line.find(&format!("\"{c}\":")).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{ctx}: catalog order");
        for k in ["order_id", "customer_id", "status", "currency"] {
            assert_eq!(obj[k], s(&item, k).unwrap(), "{ctx}");
        }
        // Text is never neutralised: JSON is not a spreadsheet.
        assert_eq!(
            obj["customer_name"],
            s(&item, "customer_name").unwrap(),
            "{ctx}"
        );
        let created = DateTime::parse_from_rfc3339(s(&item, "created_at").unwrap())
            .unwrap()
            .with_timezone(&paris)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        assert_eq!(
            obj["created_at"], created,
            "{ctx}: RFC 3339 in the requested zone"
        );
        for k in ["amount", "tax"] {
            assert!(obj[k].is_number(), "{ctx}: decimals are numbers");
            assert_eq!(
                raw_number(line, k),
                s(&item, k).unwrap(),
                "{ctx}: exact text"
            );
        }
        assert_eq!(
            obj["items"].as_i64().map(|v| v.to_string()).as_deref(),
            s(&item, "items")
        );
        let Some(AttributeValue::Bool(paid)) = item.get("paid") else {
            panic!()
        };
        assert_eq!(obj["paid"], *paid, "{ctx}");
        match s(&item, "ship_date") {
            Some(d) => assert_eq!(obj["ship_date"], d, "{ctx}: ISO date"),
            None => assert!(obj["ship_date"].is_null(), "{ctx}: empty -> null"),
        }
        match s(&item, "note") {
            Some(t) => assert_eq!(obj["note"], t, "{ctx}"),
            None => assert!(obj["note"].is_null(), "{ctx}"),
        }
        formula_starts += [&obj["customer_name"], &obj["note"]]
            .iter()
            .filter_map(|v| v.as_str())
            .filter(|t| neutralised(t) != *t)
            .count();
        n += 1;
    }
    assert_eq!(n, ROWS);
    assert!(
        formula_starts > 0,
        "the seed has formula starts to leave alone"
    );
}
