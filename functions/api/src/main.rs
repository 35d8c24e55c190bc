//! Cold start of the HTTP API function: logs, config, clients, router. Logic lives in the library.

use shared::adapters::deps_from_env;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    let deps = deps_from_env().await?;
    lambda_http::run(api::router(deps)).await
}
