//! AWS adapters of the ports, one module per service, and the wiring that builds [`Deps`] from one
//! `SdkConfig` ("config is expensive, clients are cheap").

use std::error::Error as StdError;
use std::sync::Arc;

use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

use crate::config::{Config, LogFormat, SdkTimeouts};
use crate::domain::catalog::{Catalog, CatalogError};
use crate::ports::{PortError, SystemClock};
use crate::services::Deps;

pub mod dynamodb;
pub mod s3;
pub mod sqs;

/// What one port method needs from IAM. Each adapter keeps the list for its methods next to its
/// code; `tests/template.rs` checks that every SDK call an adapter makes is in its list, and that
/// template.yaml grants each listed action, on its resource, to every function whose code calls
/// the method. A new SDK call or a new port call in a function that lacks its grant fails there,
/// not in AWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IamNeed {
    /// The port field of `Deps` the method is called through (`jobs`, `entries`, `source`, ...).
    pub port: &'static str,
    pub method: &'static str,
    /// SDK operations the method sends, as the code names them (`batch_get_item`).
    pub calls: &'static [&'static str],
    pub actions: &'static [&'static str],
    pub resource: IamResource,
}

impl IamNeed {
    pub const fn new(
        port: &'static str,
        method: &'static str,
        calls: &'static [&'static str],
        actions: &'static [&'static str],
        resource: IamResource,
    ) -> Self {
        Self {
            port,
            method,
            calls,
            actions,
            resource,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IamResource {
    MetaTable,
    /// The metadata table's indexes (the warmer's expiry index).
    MetaTableIndexes,
    SourceTables,
    SourceTableIndexes,
    /// Objects under `exports/` in the export bucket.
    ExportObjects,
    JobQueue,
}

/// Error codes after which the same call may well succeed.
const RETRYABLE_CODES: [&str; 9] = [
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "SlowDown",
    "InternalError",
    "InternalServerError",
    "ServiceUnavailable",
    "RequestTimeout",
    "TransactionConflictException",
];

/// Maps any SDK error to a [`PortError`], deciding whether a retry can help.
pub(crate) fn sdk_error<E, R>(op: &str, err: SdkError<E, R>) -> PortError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let retryable = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(se) => se
            .err()
            .code()
            .is_some_and(|c| RETRYABLE_CODES.contains(&c)),
        _ => false,
    };
    let message = match err.code() {
        Some(code) => format!("{code}: {}", err.message().unwrap_or("no message")),
        None => aws_sdk_dynamodb::error::DisplayErrorContext(&err).to_string(),
    };
    PortError::failed(op, message, retryable)
}

fn timeouts(t: &SdkTimeouts) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(t.connect)
        .operation_attempt_timeout(t.attempt)
        .operation_timeout(t.call)
        .build()
}

/// Builds every port from one `SdkConfig`, each client with the timeouts of its kind of call.
pub fn deps_from_aws(sdk: &aws_config::SdkConfig, config: Config, catalog: Catalog) -> Deps {
    let ddb = |t: &SdkTimeouts| {
        aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(sdk)
                .timeout_config(timeouts(t))
                .build(),
        )
    };
    let s3_conf = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(config.s3_force_path_style)
        .timeout_config(timeouts(&config.sdk_bulk))
        .build();
    let s3 = aws_sdk_s3::Client::from_conf(s3_conf);
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(sdk)
            .timeout_config(timeouts(&config.sdk))
            .build(),
    );
    let meta = Arc::new(dynamodb::MetaStore::new(
        ddb(&config.sdk),
        &config.meta_table,
    ));
    Deps {
        jobs: meta.clone(),
        entries: meta.clone(),
        generations: meta.clone(),
        counters: meta.clone(),
        slots: meta,
        source: Arc::new(dynamodb::DynamoSource::new(ddb(&config.sdk_bulk))),
        files: Arc::new(s3::S3Files::new(s3, &config.bucket)),
        queue: Arc::new(sqs::SqsQueue::new(sqs, &config.queue_url)),
        clock: Arc::new(SystemClock),
        metrics: crate::telemetry::Metrics::stdout(),
        catalog: Arc::new(catalog),
        config: Arc::new(config),
    }
}

/// Cold start for every function: config read once from env, logs started in its format,
/// catalog validated, AWS clients built once. A failure is logged before it is returned.
pub async fn deps_from_env() -> Result<Deps, StartupError> {
    let config = Config::from_env();
    // A config that cannot be read still gets its error logged, in the default format.
    crate::telemetry::init(
        config
            .as_ref()
            .map_or_else(|_| LogFormat::default(), |c| c.log_format),
    );
    let started = async {
        let config = config?;
        let catalog = load_catalog(config.catalog_path.as_deref())?;
        let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        Ok(deps_from_aws(&sdk, config, catalog))
    };
    started
        .await
        .inspect_err(|e: &StartupError| tracing::error!(error = %e, "cold start failed"))
}

/// The file at `path` when given, else the built-in catalog.
fn load_catalog(path: Option<&std::path::Path>) -> Result<Catalog, CatalogError> {
    match path {
        None => Catalog::builtin(),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| CatalogError::Io {
                path: p.display().to_string(),
                message: e.to_string(),
            })?;
            Catalog::from_toml(&text)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Catalog(#[from] crate::domain::catalog::CatalogError),
}

#[cfg(test)]
pub(crate) mod testkit;
