//! Checks of a downloaded export file, by readers that are not the encoders that wrote it: the
//! `csv` crate for CSV, flate2 for the gzip layer, the `zip` crate for the XLSX container (every
//! entry read to its end, so every CRC-32 is verified, as `unzip -t` does) and calamine for the
//! workbook's cells.

use anyhow::{anyhow, bail, Context};
use calamine::{Reader, Xlsx};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// What a file holds, as its reader saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    /// Data rows (headers excluded; every sheet of a workbook has one).
    pub rows: u64,
    /// The first header row.
    pub header: Vec<String>,
    /// For csv.gz: sha256 of the decompressed bytes (they must be the CSV export's bytes).
    pub inner_sha256: Option<String>,
    /// What else was verified, for the demo's log.
    pub detail: String,
}

/// Reads `path` according to `format` (`csv`, `csv.gz`, `xlsx`).
pub fn check_file(format: &str, path: &Path) -> anyhow::Result<FileCheck> {
    let open = || File::open(path).with_context(|| format!("opening {}", path.display()));
    match format {
        "csv" => check_csv(BufReader::new(open()?)),
        "csv.gz" => check_csv_gz(BufReader::new(open()?)),
        "xlsx" => check_xlsx(path),
        other => bail!("no check for format {other:?}"),
    }
}

/// RFC 4180 records: the header, then data rows, every row as wide as the header.
pub fn check_csv(reader: impl Read) -> anyhow::Result<FileCheck> {
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(reader);
    let header: Vec<String> = csv
        .headers()
        .context("reading the CSV header")?
        .iter()
        .map(str::to_owned)
        .collect();
    if header.is_empty() || header.iter().all(String::is_empty) {
        bail!("the CSV has no header row");
    }
    let mut rows = 0u64;
    let mut record = csv::ByteRecord::new();
    while csv
        .read_byte_record(&mut record)
        .with_context(|| format!("reading CSV record {}", rows + 2))?
    {
        rows += 1;
    }
    Ok(FileCheck {
        rows,
        detail: format!("{} columns, every row as wide as the header", header.len()),
        header,
        inner_sha256: None,
    })
}

/// Hashes what passes through, so the decompressed CSV is read once for both jobs.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A gzip stream (its CRC-32 and length trailer are verified by the decoder) holding a CSV.
pub fn check_csv_gz(reader: impl Read) -> anyhow::Result<FileCheck> {
    let mut plain = Hashing {
        inner: flate2::read::MultiGzDecoder::new(reader),
        hasher: Sha256::new(),
    };
    let mut check = check_csv(&mut plain).context("inside the gzip stream")?;
    // The CSV reader may stop before the trailer: read to the end so the CRC is checked.
    std::io::copy(&mut plain, &mut std::io::sink()).context("reading the gzip trailer")?;
    check.inner_sha256 = Some(hex::encode(plain.hasher.finalize()));
    check.detail = format!("gzip CRC-32 and length ok; {}", check.detail);
    Ok(check)
}

/// The XLSX container, then its sheets through calamine.
pub fn check_xlsx(path: &Path) -> anyhow::Result<FileCheck> {
    let entries = check_zip(path)?;
    let mut book: Xlsx<_> =
        calamine::open_workbook(path).map_err(|e| anyhow!("calamine cannot open it: {e}"))?;
    let names = book.sheet_names();
    if names.is_empty() {
        bail!("the workbook has no sheet");
    }
    let mut rows = 0u64;
    let mut header: Option<Vec<String>> = None;
    for name in &names {
        let range = book
            .worksheet_range(name)
            .map_err(|e| anyhow!("calamine cannot read sheet {name:?}: {e}"))?;
        let mut sheet_rows = range.rows();
        let first: Vec<String> = sheet_rows
            .next()
            .ok_or_else(|| anyhow!("sheet {name:?} is empty"))?
            .iter()
            .map(|c| c.to_string())
            .collect();
        match &header {
            None => header = Some(first),
            Some(h) if *h == first => {}
            Some(h) => bail!("sheet {name:?} starts with {first:?}, the first sheet with {h:?}"),
        }
        rows += sheet_rows.count() as u64;
    }
    Ok(FileCheck {
        rows,
        header: header.unwrap_or_default(),
        inner_sha256: None,
        detail: format!(
            "zip ok ({entries} entries, every CRC-32 verified); calamine read {} sheet{}",
            names.len(),
            if names.len() == 1 { "" } else { "s" }
        ),
    })
}

/// `unzip -t`: every entry decompressed to its end, which makes the zip reader compare its
/// CRC-32 with the one recorded. Returns the number of entries.
pub fn check_zip(path: &Path) -> anyhow::Result<usize> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).context("not a zip file")?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).with_context(|| format!("zip entry {i}"))?;
        let name = entry
            .name()
            .map_or_else(|_| format!("#{i}"), |n| n.to_string());
        std::io::copy(&mut entry, &mut std::io::sink())
            .with_context(|| format!("zip entry {name} does not read back whole"))?;
    }
    Ok(zip.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const CSV: &[u8] = b"Order ID,Note\r\nA-1,\"multi\nline, \"\"quoted\"\"\"\r\nA-2,\r\n";

    #[test]
    fn csv_rows_exclude_the_header_and_survive_quoted_newlines() {
        let check = check_csv(CSV).unwrap();
        assert_eq!(check.rows, 2);
        assert_eq!(check.header, ["Order ID", "Note"]);
    }

    #[test]
    fn a_ragged_or_empty_csv_is_refused() {
        assert!(check_csv(&b"a,b\r\n1\r\n"[..]).is_err());
        assert!(check_csv(&b""[..]).is_err());
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn csv_gz_is_the_csv_inside_with_its_hash() {
        let check = check_csv_gz(&gzip(CSV)[..]).unwrap();
        assert_eq!(check.rows, 2);
        assert_eq!(check.header, ["Order ID", "Note"]);
        assert_eq!(
            check.inner_sha256.as_deref(),
            Some(hex::encode(Sha256::digest(CSV)).as_str())
        );
    }

    #[test]
    fn a_damaged_gzip_trailer_is_refused() {
        let mut gz = gzip(CSV);
        let n = gz.len();
        gz[n - 6] ^= 0xff; // inside the CRC-32
        assert!(check_csv_gz(&gz[..]).is_err());
    }

    fn workbook(dir: &Path, sheets: &[&[&[&str]]]) -> std::path::PathBuf {
        let mut book = rust_xlsxwriter::Workbook::new();
        for rows in sheets {
            let sheet = book.add_worksheet();
            for (r, row) in rows.iter().enumerate() {
                for (c, cell) in row.iter().enumerate() {
                    sheet.write(r as u32, c as u16, *cell).unwrap();
                }
            }
        }
        let path = dir.join("book.xlsx");
        book.save(&path).unwrap();
        path
    }

    #[test]
    fn xlsx_rows_are_counted_over_sheets_each_with_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = workbook(
            dir.path(),
            &[
                &[&["Order ID", "Note"], &["A-1", "x"], &["A-2", "y"]],
                &[&["Order ID", "Note"], &["A-3", "z"]],
            ],
        );
        let check = check_xlsx(&path).unwrap();
        assert_eq!(check.rows, 3);
        assert_eq!(check.header, ["Order ID", "Note"]);
        assert!(check.detail.contains("2 sheets"), "{}", check.detail);
    }

    #[test]
    fn a_corrupted_zip_entry_fails_the_integrity_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = workbook(dir.path(), &[&[&["h"], &["v"]]]);
        assert!(check_zip(&path).unwrap() > 3);
        // Flip a byte inside the first entry's compressed data (after its 30-byte local header
        // and name); its CRC-32 no longer matches.
        let mut bytes = std::fs::read(&path).unwrap();
        let name_len = u16::from_le_bytes([bytes[26], bytes[27]]) as usize;
        let extra_len = u16::from_le_bytes([bytes[28], bytes[29]]) as usize;
        bytes[30 + name_len + extra_len + 2] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        assert!(check_zip(&path).is_err());
    }

    #[test]
    fn unknown_formats_are_an_error() {
        assert!(check_file("ndjson", Path::new("/nonexistent")).is_err());
    }
}
