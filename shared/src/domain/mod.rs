//! Domain types: the catalog, requests and their cache keys, identities, jobs and cache entries,
//! cell values. The bottom layer: it imports nothing from `encode`, `ports`, `adapters` or
//! `services` (`tests::domain_imports_nothing_above_it` keeps it so).

pub mod catalog;
pub mod event;
pub mod identity;
pub mod invalidation;
pub mod job;
pub mod key;
pub mod plan;
pub mod request;
pub mod value;

pub use catalog::{Catalog, Column, ColumnType, Dataset};
pub use event::JobEvent;
pub use identity::Identity;
pub use job::{
    AppendRead, BaseFile, CacheEntry, Checkpoint, EncoderState, Freshness, Generation, HitKind,
    Job, JobError, JobKind, JobMessage, JobStatus, MessageKind, SheetEntry, UploadedPart,
    XlsxState,
};
pub use key::{CacheKey, Owner};
pub use request::{
    ExportSpec, FieldError, Format, RawExportRequest, RequestError, ResolvedExport, TimeZone,
};
pub use value::{Row, Value};

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Paths below `crate::` that the domain may not name: everything above it.
    const ABOVE: [&str; 8] = [
        "catalog",
        "config",
        "encode",
        "ports",
        "adapters",
        "services",
        "telemetry",
        "testing",
    ];

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn domain_imports_nothing_above_it() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain");
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        assert!(files.len() >= 6, "found only {files:?}");
        let mut offences = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            for (n, line) in text.lines().enumerate() {
                // Any mention counts, not only `use` lines: `crate::encode::X` inline too.
                for above in ABOVE {
                    let needle = format!("crate::{above}");
                    if line.contains(&needle) && !line.trim_start().starts_with("//") {
                        offences.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                    }
                }
                // From a domain module, two `super`s reach the crate root and anything in it.
                if line.contains(concat!("super::", "super::")) {
                    offences.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(
            offences.is_empty(),
            "the domain names layers above it:\n{}",
            offences.join("\n")
        );
    }
}
