//! A ZIP archive written front to back, handed out in pieces, and continued in another process
//! from a small record of what came before.
//!
//! Every entry has general-purpose bit 3 set: its local header carries no CRC-32 or sizes, a data
//! descriptor after the data does (APPNOTE 4.3.9), so data can be streamed without knowing its
//! length. The central directory at the end needs each entry's name, offset, CRC-32 and sizes:
//! that list, and the number of bytes handed out, is all a continuation needs.
//!
//! Written here rather than with a crate: the `zip` crate's `ZipWriter::new_stream` (which
//! rust_xlsxwriter uses) and `rawzip`'s `ZipArchiveWriter` stream entries with data descriptors,
//! but keep the entry list and the open entry's CRC and sizes inside the writer; neither can be
//! rebuilt from them in another invocation (`rawzip`'s `with_offset` restores the position only).
//! The records themselves are a few fixed layouts.
//!
//! Sizes and offsets: an entry's sizes must fit 32 bits, which the caller guarantees (the XLSX
//! encoder starts a new sheet long before a sheet's XML reaches 4 GiB), so local headers and data
//! descriptors never need ZIP64 fields. Offsets and the entry count may outgrow 32 and 16 bits in a
//! long export: the central directory then gets ZIP64 extended information for those entries and
//! the ZIP64 end records (APPNOTE 4.3.14, 4.3.15, 4.5.3).

use super::EncodeError;

const LOCAL_HEADER: u32 = 0x0403_4b50;
const DATA_DESCRIPTOR: u32 = 0x0807_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const ZIP64_END: u32 = 0x0606_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const END: u32 = 0x0605_4b50;

/// Sizes after the data (bit 3), and names in UTF-8 (bit 11) for names that are not ASCII.
const FLAG_DESCRIPTOR: u16 = 1 << 3;
const FLAG_UTF8: u16 = 1 << 11;
const DEFLATED: u16 = 8;
/// 2.0 reads deflate; 4.5 is needed for ZIP64 fields. "Made by" 4.5 on MS-DOS (no Unix modes).
const VERSION_DEFLATE: u16 = 20;
const VERSION_ZIP64: u16 = 45;
const VERSION_MADE_BY: u16 = 45;
/// 1980-01-01 00:00 in MS-DOS format, the fixed time rust_xlsxwriter (and Excel) write too.
const DOS_TIME: u16 = 0;
const DOS_DATE: u16 = (1 << 5) | 1;
const ZIP64_EXTRA_ID: u16 = 0x0001;

/// A finished entry as the central directory lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRecord {
    pub name: String,
    /// Where its local header starts.
    pub offset: u64,
    pub crc32: u32,
    pub compressed: u64,
    pub size: u64,
}

pub struct ZipWriter {
    /// Bytes not handed out yet.
    out: Vec<u8>,
    /// Bytes handed out before `out`.
    written: u64,
    entries: Vec<EntryRecord>,
    /// Values above this go to ZIP64 fields; `u32::MAX` except in tests that need ZIP64 records
    /// without writing 4 GiB.
    zip64_above: u64,
}

impl ZipWriter {
    /// An archive whose first `written` bytes are already out, holding `entries`.
    pub fn new(written: u64, entries: Vec<EntryRecord>) -> Self {
        Self {
            out: Vec::with_capacity(1 << 16),
            written,
            entries,
            zip64_above: u64::from(u32::MAX),
        }
    }

    /// Offset of the next byte written here.
    pub fn position(&self) -> u64 {
        self.written + self.out.len() as u64
    }

    pub fn buffered(&self) -> usize {
        self.out.len()
    }

    pub fn entries(&self) -> &[EntryRecord] {
        &self.entries
    }

    /// Writes the local header of an entry whose data follows; returns its offset.
    pub fn start_entry(&mut self, name: &str) -> Result<u64, EncodeError> {
        let offset = self.position();
        let name_len = name_len(name)?;
        let out = &mut self.out;
        put32(out, LOCAL_HEADER);
        put16(out, VERSION_DEFLATE);
        put16(out, flags(name));
        put16(out, DEFLATED);
        put16(out, DOS_TIME);
        put16(out, DOS_DATE);
        // CRC-32 and sizes are in the data descriptor.
        put32(out, 0);
        put32(out, 0);
        put32(out, 0);
        put16(out, name_len);
        put16(out, 0);
        out.extend_from_slice(name.as_bytes());
        Ok(offset)
    }

    /// Raw deflate data of the open entry: taken as it is when nothing waits before it (a
    /// sheet's last deflate segment can be a part's worth, not worth copying).
    pub fn write(&mut self, data: Vec<u8>) {
        if self.out.is_empty() {
            self.out = data;
        } else {
            self.out.extend_from_slice(&data);
        }
    }

    /// Writes the data descriptor of the entry started at `offset` and lists it.
    pub fn end_entry(
        &mut self,
        name: &str,
        offset: u64,
        crc32: u32,
        compressed: u64,
        size: u64,
    ) -> Result<(), EncodeError> {
        let fits = |n: u64| u32::try_from(n).ok();
        let (Some(c), Some(s)) = (fits(compressed), fits(size)) else {
            return Err(EncodeError::Xlsx(format!(
                "{name} grew to {size} bytes; ZIP entries here stay below 4 GiB"
            )));
        };
        put32(&mut self.out, DATA_DESCRIPTOR);
        put32(&mut self.out, crc32);
        put32(&mut self.out, c);
        put32(&mut self.out, s);
        self.entries.push(EntryRecord {
            name: name.to_string(),
            offset,
            crc32,
            compressed,
            size,
        });
        Ok(())
    }

    /// Everything written since the last hand-out, followed by `more` (bytes that belong after
    /// them, such as a deflate segment still held by its compressor).
    pub fn take_with(&mut self, mut more: Vec<u8>) -> Vec<u8> {
        let mut bytes = std::mem::replace(&mut self.out, Vec::with_capacity(1 << 16));
        // The smaller side is the one copied: either may hold most of a part.
        if bytes.len() >= more.len() {
            bytes.extend_from_slice(&more);
        } else {
            more.splice(0..0, bytes);
            bytes = more;
        }
        self.written += bytes.len() as u64;
        bytes
    }

    /// The central directory and end records after everything written; returns the bytes not
    /// handed out yet, to the end of the archive.
    pub fn finish(mut self) -> Result<Vec<u8>, EncodeError> {
        let start = self.position();
        let limit = self.zip64_above;
        for e in &self.entries {
            let zip64 = e.offset > limit;
            let out = &mut self.out;
            put32(out, CENTRAL_HEADER);
            put16(out, VERSION_MADE_BY);
            put16(
                out,
                if zip64 {
                    VERSION_ZIP64
                } else {
                    VERSION_DEFLATE
                },
            );
            put16(out, flags(&e.name));
            put16(out, DEFLATED);
            put16(out, DOS_TIME);
            put16(out, DOS_DATE);
            put32(out, e.crc32);
            // `end_entry` checked that sizes fit.
            put32(out, e.compressed as u32);
            put32(out, e.size as u32);
            put16(out, name_len(&e.name)?);
            put16(out, if zip64 { 12 } else { 0 });
            // Comment length, disk number, internal and external attributes.
            put16(out, 0);
            put16(out, 0);
            put16(out, 0);
            put32(out, 0);
            put32(out, if zip64 { u32::MAX } else { e.offset as u32 });
            out.extend_from_slice(e.name.as_bytes());
            if zip64 {
                put16(out, ZIP64_EXTRA_ID);
                put16(out, 8);
                put64(out, e.offset);
            }
        }
        let end = self.position();
        let size = end - start;
        let count = self.entries.len() as u64;
        let zip64 = start > limit || size > limit || count >= u64::from(u16::MAX);
        let out = &mut self.out;
        if zip64 {
            put32(out, ZIP64_END);
            // Size of the rest of this record.
            put64(out, 44);
            put16(out, VERSION_MADE_BY);
            put16(out, VERSION_ZIP64);
            put32(out, 0);
            put32(out, 0);
            put64(out, count);
            put64(out, count);
            put64(out, size);
            put64(out, start);
            put32(out, ZIP64_LOCATOR);
            put32(out, 0);
            put64(out, end);
            put32(out, 1);
        }
        // Fields that do not fit say so with all ones; readers take them from the ZIP64 record.
        let count16 = if zip64 { u16::MAX } else { count as u16 };
        let narrow = |n: u64| if zip64 { u32::MAX } else { n as u32 };
        put32(out, END);
        put16(out, 0);
        put16(out, 0);
        put16(out, count16);
        put16(out, count16);
        put32(out, narrow(size));
        put32(out, narrow(start));
        put16(out, 0);
        Ok(self.out)
    }
}

fn flags(name: &str) -> u16 {
    if name.is_ascii() {
        FLAG_DESCRIPTOR
    } else {
        FLAG_DESCRIPTOR | FLAG_UTF8
    }
}

fn name_len(name: &str) -> Result<u16, EncodeError> {
    u16::try_from(name.len())
        .map_err(|_| EncodeError::Xlsx(format!("ZIP entry name too long: {} bytes", name.len())))
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::encode::deflate::Deflater;
    use std::io::{Cursor, Read};

    /// Adds one deflated entry.
    fn add(zip: &mut ZipWriter, name: &str, data: &[u8]) {
        let offset = zip.start_entry(name).unwrap();
        let mut d = Deflater::new(6, 0, 0);
        d.write(data).unwrap();
        let (crc, size) = (d.crc32(), d.length());
        let body = d.finish().unwrap();
        let compressed = body.len() as u64;
        zip.write(body);
        zip.end_entry(name, offset, crc, compressed, size).unwrap();
    }

    /// An archive of `files`, handed out in pieces after every entry.
    fn archive(files: &[(&str, Vec<u8>)], zip64_above: u64) -> Vec<u8> {
        let mut zip = ZipWriter::new(0, Vec::new());
        zip.zip64_above = zip64_above;
        let mut bytes = Vec::new();
        for (name, data) in files {
            add(&mut zip, name, data);
            bytes.extend(zip.take_with(Vec::new()));
        }
        bytes.extend(zip.finish().unwrap());
        bytes
    }

    /// Every entry, read through the `zip` crate (which checks each CRC-32 and size).
    pub(crate) fn read_all(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut z = ::zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        (0..z.len())
            .map(|i| {
                let mut f = z.by_index(i).unwrap();
                let mut data = Vec::new();
                f.read_to_end(&mut data).unwrap();
                (f.name().unwrap().to_string(), data)
            })
            .collect()
    }

    fn files() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("a.xml", b"<a>hello</a>".repeat(100)),
            ("dir/b.txt", Vec::new()),
            ("café.txt", b"non-ASCII name".to_vec()),
        ]
    }

    #[test]
    fn entries_read_back_with_their_names_and_data() {
        let files = files();
        let bytes = archive(&files, u64::from(u32::MAX));
        let back = read_all(&bytes);
        let want: Vec<(String, Vec<u8>)> =
            files.into_iter().map(|(n, d)| (n.to_string(), d)).collect();
        assert_eq!(back, want);
    }

    /// Offsets and the directory are put in ZIP64 fields from 0 on, as a 5 GB export would put them.
    #[test]
    fn zip64_records_read_back_the_same() {
        let files = files();
        let plain = read_all(&archive(&files, u64::from(u32::MAX)));
        let bytes = archive(&files, 0);
        assert_eq!(read_all(&bytes), plain);
        let end = &bytes[bytes.len() - 22..];
        assert_eq!(&end[..4], &END.to_le_bytes());
        assert_eq!(
            &end[16..20],
            &u32::MAX.to_le_bytes(),
            "offset from the ZIP64 record"
        );
    }

    #[test]
    fn an_entry_beyond_4_gib_is_an_error() {
        let mut zip = ZipWriter::new(0, Vec::new());
        let offset = zip.start_entry("big").unwrap();
        let err = zip.end_entry("big", offset, 0, 1, 1 << 32).unwrap_err();
        assert!(err.to_string().contains("4 GiB"), "{err}");
    }

    #[test]
    fn a_continued_archive_equals_one_written_at_once() {
        let files = files();
        let whole = archive(&files, u64::from(u32::MAX));
        // Stop after the first entry, keep the records, continue in a new writer.
        let mut first = ZipWriter::new(0, Vec::new());
        add(&mut first, files[0].0, &files[0].1);
        let mut bytes = first.take_with(Vec::new());
        let mut rest = ZipWriter::new(first.position(), first.entries().to_vec());
        for (name, data) in &files[1..] {
            add(&mut rest, name, data);
        }
        bytes.extend(rest.finish().unwrap());
        assert_eq!(bytes, whole);
    }
}
