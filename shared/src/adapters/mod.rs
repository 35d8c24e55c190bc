//! AWS adapters of the ports, one module per service, and the wiring that builds [`Deps`] from one
//! `SdkConfig` ("config is expensive, clients are cheap"); the source tables get a config of
//! their own derived from it when they live elsewhere (`SourceSettings`).

use std::error::Error as StdError;
use std::sync::Arc;

use aws_config::sts::AssumeRoleProvider;
use aws_config::{Region, SdkConfig};
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::SharedCredentialsProvider;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_async::time::SystemTimeSource;
use aws_types::origin::Origin;

use crate::config::{Config, LogFormat, SdkTimeouts, SourceSettings};
use crate::domain::catalog::{Catalog, CatalogError};
use crate::ports::{PortError, SystemClock};
use crate::services::Deps;

pub mod dynamodb;
pub mod events;
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
    /// The role configured in `SOURCE_ROLE_ARN` (template parameter `SourceRoleArn`).
    SourceRole,
    /// The account's default EventBridge bus (`EVENT_BUS_NAME`), for completion events.
    DefaultEventBus,
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

/// IAM needs of reading the source through a configured role: credentials for it from STS
/// (sent by the SDK's credentials provider, not by an adapter call; granted only when a role is
/// configured).
#[rustfmt::skip]
pub const SOURCE_ROLE_IAM: &[IamNeed] = &[
    IamNeed::new("source", "read_page", &[], &["sts:AssumeRole"], IamResource::SourceRole),
];

/// The session name the source role's sessions carry (CloudTrail shows it in the other account).
pub const SOURCE_SESSION_NAME: &str = "export-cache-source";

/// The config source reads go through: `sdk` itself when nothing is configured; else `sdk` with
/// the source's region, endpoint and, for a role, credentials that STS issues for it. The role
/// is assumed with `sdk`'s own credentials and region, and its credentials are renewed by the
/// SDK before they expire, so a long export never reads with stale ones.
pub async fn source_sdk_config(sdk: &SdkConfig, source: &SourceSettings) -> SdkConfig {
    if source.is_shared() {
        return sdk.clone();
    }
    let mut builder = sdk.to_builder();
    if let Some(region) = &source.region {
        builder.set_region(Some(Region::new(region.clone())));
    }
    if let Some(url) = &source.endpoint_url {
        builder.set_endpoint_url(Some(url.clone()));
        // Set in code, so it outranks AWS_ENDPOINT_URL, which a client built from this config
        // would otherwise read from the environment again and prefer.
        builder.insert_origin("endpoint_url", Origin::shared_config());
    }
    if let Some(role) = &source.role_arn {
        // The provider reads the time for its session names and expiry; a config made by hand
        // (tests) may have none, and the provider would panic without it.
        let base = match sdk.time_source() {
            Some(_) => sdk.clone(),
            None => sdk
                .to_builder()
                .time_source(SystemTimeSource::new())
                .build(),
        };
        let provider = AssumeRoleProvider::builder(role)
            .configure(&base)
            .session_name(SOURCE_SESSION_NAME)
            .build()
            .await;
        builder.set_credentials_provider(Some(SharedCredentialsProvider::new(provider)));
    }
    builder.build()
}

fn dynamodb_client(sdk: &SdkConfig, t: &SdkTimeouts) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(sdk)
            .timeout_config(timeouts(t))
            .build(),
    )
}

/// Builds every port from one `SdkConfig`, each client with the timeouts of its kind of call;
/// the source reader's client from [`source_sdk_config`].
pub async fn deps_from_aws(sdk: &SdkConfig, config: Config, catalog: Catalog) -> Deps {
    let source_sdk = source_sdk_config(sdk, &config.source).await;
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
    let events: Arc<dyn crate::ports::JobEvents> = match &config.event_bus {
        Some(bus) => Arc::new(events::BusEvents::new(
            aws_sdk_eventbridge::Client::from_conf(
                aws_sdk_eventbridge::config::Builder::from(sdk)
                    .timeout_config(timeouts(&config.sdk))
                    .build(),
            ),
            bus,
        )),
        None => Arc::new(events::NoEvents),
    };
    let meta = Arc::new(dynamodb::MetaStore::new(
        dynamodb_client(sdk, &config.sdk),
        &config.meta_table,
    ));
    Deps {
        jobs: meta.clone(),
        entries: meta.clone(),
        generations: meta.clone(),
        counters: meta.clone(),
        slots: meta,
        source: Arc::new(dynamodb::DynamoSource::new(
            dynamodb_client(&source_sdk, &config.sdk_bulk),
            config.source_decoder,
        )),
        files: Arc::new(s3::S3Files::new(s3, &config.bucket)),
        queue: Arc::new(sqs::SqsQueue::new(sqs, &config.queue_url)),
        events,
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
        Ok(deps_from_aws(&sdk, config, catalog).await)
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials};
    use aws_smithy_http_client::test_util::StaticReplayClient;
    use aws_smithy_types::retry::RetryConfig;

    use super::testkit::{answer, answering, ok};
    use super::*;
    use crate::domain::catalog::ColumnType;
    use crate::ports::SourceQuery;

    /// `AWS_ENDPOINT_URL` as `aws_config::load_defaults` hands it to every client (not only
    /// through `SdkConfig::endpoint_url`): each client reads it again at build time.
    #[derive(Debug)]
    struct EndpointFromEnvironment(Option<&'static str>);

    impl aws_types::service_config::LoadServiceConfig for EndpointFromEnvironment {
        fn load_config(
            &self,
            key: aws_types::service_config::ServiceConfigKey<'_>,
        ) -> Option<String> {
            (key.env() == "AWS_ENDPOINT_URL").then_some(self.0?.to_owned())
        }
    }

    /// The function's own config: its region, its role's credentials, every call through `http`.
    /// No time source, as in a config made by hand.
    fn function_sdk(http: &StaticReplayClient) -> SdkConfig {
        function_sdk_with(http, None)
    }

    fn function_sdk_with(http: &StaticReplayClient, endpoint: Option<&'static str>) -> SdkConfig {
        let mut builder = SdkConfig::builder();
        if let Some(url) = endpoint {
            builder.set_endpoint_url(Some(url.to_owned()));
            builder.insert_origin("endpoint_url", Origin::shared_environment_variable());
        }
        builder
            .service_config(EndpointFromEnvironment(endpoint))
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "AKIDFUNCTION",
                "function-secret",
                None,
                None,
                "test",
            )))
            .retry_config(RetryConfig::disabled())
            .http_client(http.clone())
            .build()
    }

    async fn deps(http: &StaticReplayClient, source: &[(&str, &str)]) -> Deps {
        deps_on(function_sdk(http), source).await
    }

    async fn deps_on(sdk: SdkConfig, source: &[(&str, &str)]) -> Deps {
        let mut env: HashMap<String, String> = [
            ("META_TABLE", "stack-meta"),
            ("EXPORT_BUCKET", "b"),
            ("JOB_QUEUE_URL", "https://sqs.us-east-1.amazonaws.com/1/q"),
        ]
        .into_iter()
        .chain(source.iter().copied())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        env.insert("SOURCE_TABLE_PREFIX".into(), "stack-".into());
        let config = Config::from_map(&env).unwrap();
        deps_from_aws(&sdk, config, Catalog::builtin().unwrap()).await
    }

    fn orders_of(tenant: &str) -> SourceQuery {
        SourceQuery {
            table: "stack-orders".into(),
            tenant_attribute: "tenant_id".into(),
            tenant: tenant.into(),
            range: None,
            filters: Vec::new(),
            columns: vec![("order_id".into(), ColumnType::String)],
            page_size: None,
        }
    }

    fn one_order() -> http::Response<aws_smithy_types::body::SdkBody> {
        ok(serde_json::json!({ "Items": [ { "order_id": { "S": "ORD-1" } } ] }))
    }

    fn header<'a>(r: &'a aws_sdk_dynamodb::config::http::HttpRequest, name: &str) -> &'a str {
        r.headers().get(name).unwrap_or_default()
    }

    #[tokio::test]
    async fn unset_source_settings_read_through_the_functions_own_client() {
        let http = answering(vec![one_order()]);
        let page = deps(&http, &[])
            .await
            .source
            .read_page(&orders_of("acme"), None)
            .await
            .unwrap();
        assert_eq!(page.rows.len(), 1);
        let sent: Vec<_> = http.actual_requests().collect();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].uri(), "https://dynamodb.us-east-1.amazonaws.com/");
        assert!(header(sent[0], "authorization").contains("Credential=AKIDFUNCTION/"));
    }

    #[tokio::test]
    async fn a_source_endpoint_moves_only_the_source_reads() {
        let http = answering(vec![one_order(), ok(serde_json::json!({}))]);
        // Locally AWS_ENDPOINT_URL names the metadata's emulator, and it must not win.
        let sdk = function_sdk_with(&http, Some("http://127.0.0.1:4566"));
        let deps = deps_on(sdk, &[("SOURCE_ENDPOINT_URL", "http://127.0.0.1:4567")]).await;
        deps.source
            .read_page(&orders_of("acme"), None)
            .await
            .unwrap();
        // The metadata table stays where it was.
        deps.jobs.get_job("j1").await.unwrap();
        let sent: Vec<_> = http.actual_requests().collect();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].uri(), "http://127.0.0.1:4567/");
        assert_eq!(sent[1].uri(), "http://127.0.0.1:4566/");
    }

    #[tokio::test]
    async fn a_source_role_is_assumed_and_its_credentials_sign_the_reads_in_the_source_region() {
        let assumed = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <AssumedRoleUser>
      <AssumedRoleId>AROAEXAMPLE:export-cache-source</AssumedRoleId>
      <Arn>arn:aws:sts::111122223333:assumed-role/export-reader/export-cache-source</Arn>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAASSUMED</AccessKeyId>
      <SecretAccessKey>assumed-secret</SecretAccessKey>
      <SessionToken>assumed-session-token</SessionToken>
      <Expiration>2099-01-01T00:00:00Z</Expiration>
    </Credentials>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>r1</RequestId></ResponseMetadata>
</AssumeRoleResponse>"#;
        let http = answering(vec![
            answer(200, &[("content-type", "text/xml")], assumed),
            one_order(),
            one_order(),
        ]);
        let role = "arn:aws:iam::111122223333:role/export-reader";
        let deps = deps(
            &http,
            &[("SOURCE_ROLE_ARN", role), ("SOURCE_REGION", "eu-west-1")],
        )
        .await;
        for _ in 0..2 {
            deps.source
                .read_page(&orders_of("acme"), None)
                .await
                .unwrap();
        }

        let sent: Vec<_> = http.actual_requests().collect();
        assert_eq!(
            sent.len(),
            3,
            "one AssumeRole, then the reads with its credentials cached"
        );
        let sts = sent[0];
        assert_eq!(
            sts.uri(),
            "https://sts.us-east-1.amazonaws.com/",
            "STS in the function's region"
        );
        assert!(header(sts, "authorization").contains("Credential=AKIDFUNCTION/"));
        let form = std::str::from_utf8(sts.body().bytes().unwrap()).unwrap();
        let fields: HashMap<String, String> = form_urlencoded::parse(form.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(fields["Action"], "AssumeRole");
        assert_eq!(fields["RoleArn"], role);
        assert_eq!(fields["RoleSessionName"], SOURCE_SESSION_NAME);
        for read in &sent[1..] {
            // DynamoDB's account-based endpoint, of the role's account, in the source region.
            assert_eq!(
                read.uri(),
                "https://111122223333.ddb.eu-west-1.amazonaws.com/"
            );
            let auth = header(read, "authorization");
            assert!(auth.contains("Credential=ASIAASSUMED/"), "{auth}");
            assert!(auth.contains("/eu-west-1/dynamodb/aws4_request"), "{auth}");
            assert_eq!(
                header(read, "x-amz-security-token"),
                "assumed-session-token"
            );
        }
    }
}
