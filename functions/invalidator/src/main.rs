//! Cold start of the invalidator function: logs, config, clients, then one call per batch of
//! stream records from the source tables.

use aws_lambda_events::event::dynamodb::Event;
use lambda_runtime::{service_fn, LambdaEvent};
use shared::adapters::deps_from_env;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let deps = deps_from_env().await?;
    let deps = &deps;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Event>| async move {
        Ok::<_, lambda_runtime::Error>(invalidator::handle(deps, event.payload).await)
    }))
    .await
}
