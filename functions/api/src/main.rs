//! Cold start of the HTTP API function: logs, config, clients, router. Logic lives in the library.

use shared::adapters::deps_from_env;
use shared::telemetry;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    telemetry::init(telemetry::format_from_env());
    let deps = deps_from_env().await.inspect_err(|e| {
        tracing::error!(error = %e, "cold start failed");
    })?;
    lambda_http::run(api::router(deps)).await
}
