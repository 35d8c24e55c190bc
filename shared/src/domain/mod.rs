//! Domain types: requests and their cache keys, identities, jobs and cache entries, cell values.

pub mod identity;
pub mod job;
pub mod request;
pub mod value;

pub use identity::Identity;
pub use job::{
    CacheEntry, Checkpoint, EncoderState, Freshness, Generation, Job, JobError, JobKind,
    JobMessage, JobStatus, MessageKind, SheetEntry, UploadedPart, XlsxState,
};
pub use request::{
    CacheKey, ExportRequest, ExportSpec, FieldError, Format, RawExportRequest, RequestError,
};
pub use value::{Row, Value};
