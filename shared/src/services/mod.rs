//! The use cases, one module each; the function crates only translate events to these calls.

use std::sync::Arc;

use crate::config::Config;
use crate::domain::catalog::Catalog;
use crate::ports::{
    Clock, Counters, EntryStore, Generations, JobEvents, JobQueue, JobStore, ObjectStore,
    PortError, RowSource, TenantSlots,
};

mod append;
pub mod cache_admin;
pub mod datasets;
pub mod export;
pub mod invalidate;
pub mod jobs;
pub mod process;
pub mod runs;
pub mod status;
pub mod tenant_slots;
pub mod warm;

/// Everything a use case may touch, built once per cold start.
#[derive(Clone)]
pub struct Deps {
    pub config: Arc<Config>,
    pub catalog: Arc<Catalog>,
    // The metadata store, one port per concern (one DynamoDB table behind them all).
    pub jobs: Arc<dyn JobStore>,
    pub entries: Arc<dyn EntryStore>,
    pub generations: Arc<dyn Generations>,
    pub counters: Arc<dyn Counters>,
    pub slots: Arc<dyn TenantSlots>,
    pub files: Arc<dyn ObjectStore>,
    pub queue: Arc<dyn JobQueue>,
    /// Completion events on the bus (nothing when `EVENT_BUS_NAME=off`).
    pub events: Arc<dyn JobEvents>,
    pub source: Arc<dyn RowSource>,
    pub clock: Arc<dyn Clock>,
    /// EMF metrics: stdout in the functions, a buffer in tests.
    pub metrics: crate::telemetry::Metrics,
}

pub use crate::domain::catalog::KEEP_RECORDS_FOR_DAYS;

/// A marker outlives any job that still runs; it is only a safety net for jobs that vanished.
pub const MARKER_HOURS: i64 = 6;

/// Errors a caller can act on; the API maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Request(#[from] crate::domain::RequestError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("too many new exports; retry in {retry_after} s")]
    RateLimited { retry_after: u32 },
    #[error("internal: {0}")]
    Internal(PortError),
}

impl From<PortError> for ServiceError {
    /// A retryable failure (a stalled or throttled AWS service, a timeout) is the caller's 503
    /// with Retry-After, not a 500; its cause goes to the logs, never to the caller.
    fn from(e: PortError) -> Self {
        if e.is_retryable() {
            tracing::warn!(error = %e, "a backing service is slow or unavailable");
            ServiceError::Unavailable(
                "a backing service is slow or unavailable; retry shortly".into(),
            )
        } else {
            ServiceError::Internal(e)
        }
    }
}

pub(crate) fn require_scope(
    who: &crate::domain::Identity,
    scope: &str,
) -> Result<(), ServiceError> {
    if who.has_scope(scope) {
        Ok(())
    } else {
        Err(ServiceError::Forbidden(format!(
            "this needs the `{scope}` scope, which the token does not grant"
        )))
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_append;
#[cfg(test)]
mod tests_entries;
#[cfg(test)]
mod tests_events;
#[cfg(test)]
mod tests_fresh;
#[cfg(test)]
mod tests_hardening;
#[cfg(test)]
mod tests_metrics;
