//! Cold start of the warmer function: logs, config, clients, then one warm-up per scheduled event.

use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use lambda_runtime::{service_fn, LambdaEvent};
use shared::adapters::deps_from_env;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let deps = deps_from_env().await?;
    let deps = &deps;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<EventBridgeEvent>| async move {
            Ok::<_, lambda_runtime::Error>(warmer::handle(deps, event.payload).await?)
        },
    ))
    .await
}
