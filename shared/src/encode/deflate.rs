//! A deflate stream written in segments that can be continued by a fresh compressor.
//!
//! Each [`Deflater::cut`] ends the current segment with a full flush (byte-aligned, no reference
//! to earlier bytes) and starts the next one with a brand-new compressor. A run that goes on and
//! a run resumed from the cut in another invocation therefore feed identical compressors the same
//! text and write the same bytes. The CRC-32 and length of the uncompressed text so far are what
//! a container (gzip trailer, ZIP data descriptor) needs at the end; they travel in the checkpoint.

use flate2::{Compress, Compression, FlushCompress, Status};

use super::EncodeError;

pub struct Deflater {
    level: u32,
    compress: Compress,
    out: Vec<u8>,
    crc: crc32fast::Hasher,
    length: u64,
}

/// Room added to the output before each call: deflate never grows input by more than a few bytes
/// per 16 KiB block plus the flush markers.
fn room_for(input: usize) -> usize {
    input + input / 1000 + 64
}

impl Deflater {
    /// A new segment at `level` continuing text whose CRC-32 is `crc32` over `length` bytes
    /// (`0, 0` for a new stream).
    pub fn new(level: u32, crc32: u32, length: u64) -> Self {
        Self {
            level,
            compress: Compress::new(Compression::new(level), false),
            out: Vec::with_capacity(1 << 20),
            crc: crc32fast::Hasher::new_with_initial_len(crc32, length),
            length,
        }
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), EncodeError> {
        self.crc.update(data);
        self.length += data.len() as u64;
        self.run(data, FlushCompress::None)
    }

    /// Compressed bytes of the current segment.
    pub fn buffered(&self) -> usize {
        self.out.len()
    }

    pub fn crc32(&self) -> u32 {
        self.crc.clone().finalize()
    }

    /// Uncompressed bytes written so far, earlier segments included.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Ends the segment with a full flush and returns its bytes; what follows starts afresh.
    pub fn cut(&mut self) -> Result<Vec<u8>, EncodeError> {
        self.run(&[], FlushCompress::Full)?;
        self.compress = Compress::new(Compression::new(self.level), false);
        Ok(std::mem::replace(
            &mut self.out,
            Vec::with_capacity(1 << 20),
        ))
    }

    /// Ends the stream with a final block and returns the last segment's bytes.
    pub fn finish(mut self) -> Result<Vec<u8>, EncodeError> {
        self.run(&[], FlushCompress::Finish)?;
        Ok(self.out)
    }

    fn run(&mut self, mut input: &[u8], flush: FlushCompress) -> Result<(), EncodeError> {
        loop {
            self.out.reserve(room_for(input.len()));
            let before = self.compress.total_in();
            let status = self
                .compress
                .compress_vec(input, &mut self.out, flush)
                .map_err(|e| EncodeError::Io(std::io::Error::other(e)))?;
            input = &input[(self.compress.total_in() - before) as usize..];
            // A call that left output room unused has emitted everything it had to.
            let drained = input.is_empty() && self.out.len() < self.out.capacity();
            let done = match flush {
                FlushCompress::Finish => status == Status::StreamEnd,
                _ => drained,
            };
            if done {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn inflate(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("row {i},value {},{}\r\n", i * 7 % 13, i % 5).into_bytes())
            .collect()
    }

    #[test]
    fn segments_cut_anywhere_inflate_to_the_text_and_resume_byte_identically() {
        let data = text(20_000);
        let pieces: Vec<&[u8]> = data.chunks(7_919).collect();
        // One run that cuts after every third piece.
        let mut whole = Vec::new();
        let mut d = Deflater::new(4, 0, 0);
        let mut states = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            d.write(p).unwrap();
            if i % 3 == 2 {
                whole.extend(d.cut().unwrap());
                states.push((i, whole.len(), d.crc32(), d.length()));
            }
        }
        let expected_crc = d.crc32();
        whole.extend(d.finish().unwrap());
        assert_eq!(inflate(&whole), data);
        assert_eq!(expected_crc, crc32fast::hash(&data));

        // Resumed from each cut with nothing but (crc, length): the same bytes follow.
        for (i, at, crc, len) in states {
            let mut r = Deflater::new(4, crc, len);
            let mut tail = whole[..at].to_vec();
            for (j, p) in pieces.iter().enumerate().skip(i + 1) {
                r.write(p).unwrap();
                if j % 3 == 2 {
                    tail.extend(r.cut().unwrap());
                }
            }
            assert_eq!(r.crc32(), expected_crc);
            tail.extend(r.finish().unwrap());
            assert_eq!(tail, whole, "resumed after piece {i}");
        }
    }

    #[test]
    fn an_empty_stream_is_valid() {
        let mut d = Deflater::new(1, 0, 0);
        let mut bytes = d.cut().unwrap();
        bytes.extend(d.finish().unwrap());
        assert!(inflate(&bytes).is_empty());
    }
}
