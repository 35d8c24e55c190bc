//! Cold start of the worker function: logs, config, clients, then one handler call per batch.

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{service_fn, LambdaEvent};
use shared::adapters::deps_from_env;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let deps = deps_from_env().await?;
    let deps = &deps;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let deadline = worker::deadline_of(
            event.context.deadline,
            deps.clock.now(),
            deps.config.worker.timeout,
        );
        let owner = event.context.request_id.clone();
        Ok::<_, lambda_runtime::Error>(
            worker::handle_batch(deps, event.payload, &owner, deadline).await,
        )
    }))
    .await
}
