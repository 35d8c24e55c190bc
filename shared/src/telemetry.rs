//! Structured logs: JSON in Lambda (CloudWatch), text locally. The Lambda runtime's span carries
//! the request id; the services add tenant, dataset, cache result and job id as fields.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    // try_init: a second call (tests, local runs) keeps the first subscriber instead of panicking.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .without_time()
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
