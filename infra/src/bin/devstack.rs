//! `devstack`: the local stack's command line (provision, env, seed, bridge, demo, token).
//! It talks to the AWS emulator named by `AWS_ENDPOINT_URL`, and to the source tables' own one at
//! `SOURCE_ENDPOINT_URL` when that is set.

use anyhow::{anyhow, bail, Context};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use infra::bridge::{self, BridgeConfig};
use infra::demo::{self, DemoConfig};
use infra::provision::{self, Provisioned};
use infra::supervise::WatchSpec;
use infra::template::{Template, LOCAL_ACCOUNT_ID};
use infra::{seed, token};
use shared::config::SourceSettings;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_STACK: &str = "export-cache";
const DEFAULT_REGION: &str = "us-east-1";
const DEFAULT_WATCH: &str = "http://127.0.0.1:9000";
/// Flags of `demo`, which `crash-check` takes too.
const DEMO_FLAGS: &[&str] = &[
    "api",
    "tenant",
    "user",
    "dataset",
    "format",
    "out-dir",
    "timeout-secs",
];
/// The local stack's job lease (see `env_lines`).
const LOCAL_LEASE_SECONDS: u64 = 60;

const USAGE: &str = "\
devstack: the export cache's local stack (talks to the emulator at AWS_ENDPOINT_URL)

USAGE: devstack <command> [--flag value]...

  provision [--stack export-cache] [--template template.yaml]
        create the stack's tables, queues and bucket from template.yaml (idempotent)
  env       [--stack export-cache] [--template PATH] [--schedule-secs 900]
        provision (idempotent) and print the `export VAR=...` lines the functions need
  seed      [--stack export-cache] [--rows 20000] [--tenants acme,globex]
        write deterministic orders (and rows/10 customers) for each tenant
  bridge    [--stack export-cache] [--watch http://127.0.0.1:9000] [--schedule-secs 900]
            [--queue-url URL] [--wait-secs 3] [--worker-port PORT] [--worker-log PATH]
            [--worker-reload true] [--worker-timeout-secs <template's Timeout>] [--redeliver-secs 5]
        play the SQS trigger (export-worker) and the schedule (export-warmer) until Ctrl-C.
        With --worker-port the worker runs under a `cargo lambda watch` of the bridge's own on
        that port, restarted when the worker dies or outlives its timeout plus 30 s; the
        message is then visible again after --redeliver-secs. Without it the worker is invoked
        on --watch and a dead worker can only time out.
  demo      [--api http://127.0.0.1:9000/lambda-url/export-api] [--tenant acme] [--user alice]
            [--dataset orders] [--format csv,xlsx,csv.gz] [--out-dir target/demo]
            [--timeout-secs 1200]
        run an export end to end in each format: miss, job progress, download, hit; the files
        are saved to --out-dir and checked (rows and header; gzip; zip integrity and calamine)
  crash-check [--api ...] [--worker-port 9001] [--format csv,xlsx,csv.gz] [--out-dir target/demo]
        after `demo`: exports each format again, kill -9s the worker mid-export and checks the
        job still succeeds with the demo's bytes (the bridge restarts the worker)
  orders    [--stack export-cache] [--tenant acme] [--insert 3] [--update 1] [--delete 1]
        change a tenant's orders while the stack runs: new orders after its last one, its first
        ones updated (status, note), the next ones deleted; the invalidator sees them on the
        stream when the source tables are on moto (SOURCE_EMULATOR=moto)
  token     [--tenant acme] [--user alice] [--scopes 'exports:read exports:admin'] [--ttl 43200]
        print a dev token signed with LOCAL_JWT_SECRET

With SOURCE_ENDPOINT_URL set (make up points it at dynalite), provision creates the source
tables (orders, customers) there, seed writes them there and env passes it on to the functions.
LOCAL_JWT_SECRET defaults to the dev secret `make up` uses.";

struct Flags {
    values: HashMap<String, String>,
}

impl Flags {
    fn parse(args: &[String], allowed: &[&str]) -> anyhow::Result<Self> {
        let mut values = HashMap::new();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            let Some(name) = arg.strip_prefix("--") else {
                bail!("unexpected argument {arg:?} (flags look like --name value)");
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => {
                    let value = rest
                        .next()
                        .ok_or_else(|| anyhow!("--{name} needs a value"))?;
                    (name.to_owned(), value.clone())
                }
            };
            if !allowed.contains(&name.as_str()) {
                bail!(
                    "unknown flag --{name}; this command takes {}",
                    allowed
                        .iter()
                        .map(|a| format!("--{a}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            values.insert(name, value);
        }
        Ok(Flags { values })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    fn or(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_owned()
    }

    fn number(&self, name: &str, default: u64) -> anyhow::Result<u64> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .replace('_', "")
                .parse()
                .with_context(|| format!("--{name} expects a whole number, got {v:?}")),
        }
    }

    fn template(&self) -> PathBuf {
        self.get("template")
            .map(PathBuf::from)
            .unwrap_or_else(provision::template_path)
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn secret() -> String {
    env_nonempty("LOCAL_JWT_SECRET").unwrap_or_else(|| token::DEFAULT_DEV_SECRET.to_owned())
}

/// SDK config for the emulator: `AWS_ENDPOINT_URL` is required (this tool never touches a real
/// account); region and dummy credentials are filled in when the environment has none.
async fn sdk() -> anyhow::Result<SdkConfig> {
    if env_nonempty("AWS_ENDPOINT_URL").is_none() {
        bail!(
            "AWS_ENDPOINT_URL is not set: devstack works against the local emulator \
             (`make up` starts one), e.g. export AWS_ENDPOINT_URL=http://127.0.0.1:4566"
        );
    }
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if env_nonempty("AWS_REGION").is_none() && env_nonempty("AWS_DEFAULT_REGION").is_none() {
        loader = loader.region(Region::new(DEFAULT_REGION));
    }
    if env_nonempty("AWS_ACCESS_KEY_ID").is_none() && env_nonempty("AWS_PROFILE").is_none() {
        loader = loader.test_credentials();
    }
    Ok(loader.load().await)
}

/// The config the source tables are written and provisioned through: the functions' own
/// (`SOURCE_ENDPOINT_URL`, `SOURCE_REGION`, as in `env.sh`), else the emulator's.
async fn source_sdk(sdk: &SdkConfig) -> anyhow::Result<SdkConfig> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let source = SourceSettings::from_map(&env)?;
    Ok(shared::adapters::source_sdk_config(sdk, &source).await)
}

fn region(sdk: &SdkConfig) -> String {
    sdk.region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| DEFAULT_REGION.to_owned())
}

/// Single-quotes a value for a POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn env_lines(p: &Provisioned, sdk: &SdkConfig, schedule_secs: u64) -> Vec<(String, String)> {
    let endpoint = env_nonempty("AWS_ENDPOINT_URL").unwrap_or_default();
    let access_key = env_nonempty("AWS_ACCESS_KEY_ID").unwrap_or_else(|| "test".to_owned());
    let secret_key = env_nonempty("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|| "test".to_owned());
    [
        ("META_TABLE", p.names.meta_table.clone()),
        ("EXPORT_BUCKET", p.names.bucket.clone()),
        ("JOB_QUEUE_URL", p.queue_url.clone()),
        ("SOURCE_TABLE_PREFIX", p.names.source_table_prefix.clone()),
        ("LOCAL_JWT_SECRET", secret()),
        ("S3_FORCE_PATH_STYLE", "true".to_owned()),
        ("LOG_FORMAT", "text".to_owned()),
        ("WARM_INTERVAL_SECONDS", schedule_secs.to_string()),
        // A job's lease outlives its holder when the worker is killed, and the next delivery
        // waits for it to expire (960 s by default, sized for AWS where two invocations may
        // overlap). Locally the bridge delivers one message at a time and stops a worker before
        // its message is seen again, so no two workers ever hold a job together, and a short
        // lease lets a killed export go on within about a minute, as the issue asks.
        ("LEASE_SECONDS", LOCAL_LEASE_SECONDS.to_string()),
        // The source tables' own emulator, when `make up` runs one (see README, "why dynalite").
        (
            "SOURCE_ENDPOINT_URL",
            env_nonempty("SOURCE_ENDPOINT_URL").unwrap_or_default(),
        ),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_REGION", region(sdk)),
        ("AWS_ACCESS_KEY_ID", access_key),
        ("AWS_SECRET_ACCESS_KEY", secret_key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn provision_cmd(flags: &Flags) -> anyhow::Result<Provisioned> {
    let sdk = sdk().await?;
    let stack = flags.or("stack", DEFAULT_STACK);
    let template = flags.template();
    provision::provision_with_source(&sdk, &source_sdk(&sdk).await?, &template, &stack)
        .await
        .with_context(|| format!("provisioning stack {stack} from {}", template.display()))
}

async fn cmd_provision(flags: Flags) -> anyhow::Result<()> {
    let p = provision_cmd(&flags).await?;
    let n = &p.names;
    println!("stack {} provisioned", n.stack);
    println!(
        "  tables  {}, {}, {}",
        n.meta_table, n.orders_table, n.customers_table
    );
    println!("  bucket  {}", n.bucket);
    println!("  queue   {}", p.queue_url);
    println!("  dlq     {}", p.dlq_url);
    Ok(())
}

async fn cmd_env(flags: Flags) -> anyhow::Result<()> {
    let schedule_secs = flags.number("schedule-secs", 900)?;
    let p = provision_cmd(&flags).await?;
    let sdk = sdk().await?;
    for (k, v) in env_lines(&p, &sdk, schedule_secs) {
        println!("export {k}={}", shell_quote(&v));
    }
    Ok(())
}

/// Table and queue names of `stack` as the template defines them (no AWS calls).
fn stack_names(flags: &Flags, sdk: &SdkConfig) -> anyhow::Result<(String, String, String)> {
    let stack = flags.or("stack", DEFAULT_STACK);
    let template = flags.template();
    let specs = Template::load(&template)?
        .stack_specs(&stack, LOCAL_ACCOUNT_ID, &region(sdk))
        .with_context(|| format!("resolving {} for stack {stack}", template.display()))?;
    Ok((
        specs.table("OrdersTable")?.name.clone(),
        specs.table("CustomersTable")?.name.clone(),
        specs.queue("JobQueue")?.name.clone(),
    ))
}

async fn cmd_orders(flags: Flags) -> anyhow::Result<()> {
    let sdk = sdk().await?;
    let (orders, _, _) = stack_names(&flags, &sdk)?;
    let tenant = flags.or("tenant", "acme");
    let counts = (
        flags.number("insert", 3)?,
        usize::try_from(flags.number("update", 1)?).context("--update")?,
        usize::try_from(flags.number("delete", 1)?).context("--delete")?,
    );
    let client = aws_sdk_dynamodb::Client::new(&source_sdk(&sdk).await?);
    let done = seed::change_orders(&client, &orders, &tenant, counts).await?;
    println!(
        "{tenant}: inserted {:?}, updated {:?}, deleted {:?}",
        done.inserted, done.updated, done.deleted
    );
    Ok(())
}

async fn cmd_seed(flags: Flags) -> anyhow::Result<()> {
    let sdk = sdk().await?;
    let rows = flags.number("rows", 20_000)?;
    let tenants_flag = flags.or("tenants", "acme,globex");
    let tenants: Vec<&str> = tenants_flag
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let (orders, customers, _) = stack_names(&flags, &sdk)?;
    println!(
        "seeding {rows} orders and {} customers for each of {} into {orders} and {customers}",
        seed::customer_count(rows),
        tenants.join(", ")
    );
    let report = seed::seed(
        &source_sdk(&sdk).await?,
        &orders,
        &customers,
        &tenants,
        rows,
    )
    .await?;
    println!(
        "seeded {} orders and {} customers in {:.1} s ({:.0} items/s, {} requests, {} items retried)",
        report.orders,
        report.customers,
        report.elapsed.as_secs_f64(),
        report.items_per_sec(),
        report.requests,
        report.retried_items
    );
    Ok(())
}

async fn cmd_bridge(flags: Flags) -> anyhow::Result<()> {
    let sdk = sdk().await?;
    let queue_url = match flags
        .get("queue-url")
        .map(str::to_owned)
        .or_else(|| env_nonempty("JOB_QUEUE_URL"))
    {
        Some(url) => url,
        None => {
            let (_, _, queue_name) = stack_names(&flags, &sdk)?;
            aws_sdk_sqs::Client::new(&sdk)
                .get_queue_url()
                .queue_name(&queue_name)
                .send()
                .await
                .map_err(|e| {
                    anyhow!(
                        "GetQueueUrl {queue_name} (run `devstack provision` first?): {}",
                        aws_sdk_sqs::error::DisplayErrorContext(&e)
                    )
                })?
                .queue_url
                .ok_or_else(|| anyhow!("GetQueueUrl {queue_name} returned no URL"))?
        }
    };
    let mut cfg = BridgeConfig::new(queue_url, flags.or("watch", DEFAULT_WATCH));
    cfg.schedule_secs = flags.number("schedule-secs", 900)?;
    cfg.wait_secs =
        i32::try_from(flags.number("wait-secs", 3)?.clamp(1, 20)).context("--wait-secs")?;
    cfg.rule_name = format!("{}-warmer-schedule", flags.or("stack", DEFAULT_STACK));
    let timeout = flags.number("worker-timeout-secs", worker_timeout_secs(&flags))?;
    cfg.invoke_timeout = Duration::from_secs(timeout) + bridge::TIMEOUT_GRACE;
    cfg.redeliver_after = Duration::from_secs(flags.number("redeliver-secs", 5)?);
    let stack = flags.or("stack", DEFAULT_STACK);
    cfg.stream_tables = vec![format!("{stack}-orders"), format!("{stack}-customers")];
    cfg.source_endpoint = env_nonempty("SOURCE_ENDPOINT_URL");
    if let Some(port) = flags.get("worker-port") {
        let port: u16 = port
            .parse()
            .with_context(|| format!("--worker-port expects a port number, got {port:?}"))?;
        let mut spec = WatchSpec::cargo_lambda(port, bridge::WORKER_FUNCTION);
        spec.log = flags.get("worker-log").map(PathBuf::from);
        match flags.or("worker-reload", "true").as_str() {
            "true" => {}
            // Nothing rebuilds or restarts the worker when files (or a worktree's git metadata)
            // change under it: what a run that only demonstrates wants.
            "false" => spec.args.push("--ignore-changes".to_owned()),
            other => anyhow::bail!("--worker-reload expects true or false, got {other:?}"),
        }
        cfg.worker_watch = Some(spec);
    }
    bridge::run(&sdk, cfg, shutdown_signal()).await
}

/// The worker function's `Timeout` in the template, which is what Lambda would enforce.
fn worker_timeout_secs(flags: &Flags) -> u64 {
    Template::load(&flags.template())
        .ok()
        .and_then(|t| {
            t.function_property("WorkerFunction", "Timeout")
                .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        })
        .unwrap_or(bridge::WORKER_TIMEOUT_SECS)
}

fn demo_config(flags: &Flags) -> anyhow::Result<DemoConfig> {
    let mut cfg = DemoConfig::new(flags.or("api", demo::DEFAULT_API), secret());
    cfg.tenant = flags.or("tenant", "acme");
    cfg.user = flags.or("user", "alice");
    cfg.dataset = flags.or("dataset", "orders");
    if let Some(formats) = flags.get("format") {
        cfg.formats = formats
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(str::to_owned)
            .collect();
    }
    if let Some(dir) = flags.get("out-dir") {
        cfg.out_dir = PathBuf::from(dir);
    }
    cfg.timeout = Duration::from_secs(flags.number("timeout-secs", 20 * 60)?);
    Ok(cfg)
}

async fn cmd_demo(flags: Flags) -> anyhow::Result<()> {
    let cfg = demo_config(&flags)?;
    let summary = demo::run(&cfg).await?;
    demo::print_summary(&cfg, &summary)
}

async fn cmd_crash_check(flags: Flags) -> anyhow::Result<()> {
    let cfg = demo_config(&flags)?;
    let port = flags.number("worker-port", 9001)?;
    let port = u16::try_from(port).with_context(|| format!("--worker-port {port}"))?;
    let mut reports = Vec::new();
    for format in &cfg.formats {
        reports.push(demo::crash_check(&cfg, format, port).await?);
    }
    println!();
    println!("== a worker killed mid-export (kill -9), per format ==");
    for r in &reports {
        println!(
            "  {:<7} killed pid {} at {} rows; succeeded {:.1} s later, attempts {}; sha256 {}",
            r.format,
            r.killed_pid,
            r.rows_at_kill,
            r.recovered.as_secs_f64(),
            r.attempts.map_or("?".to_owned(), |a| a.to_string()),
            r.sha256
        );
    }
    Ok(())
}

fn cmd_token(flags: Flags) -> anyhow::Result<()> {
    let scopes_flag = flags.or("scopes", &token::DEMO_SCOPES.join(" "));
    let scopes: Vec<&str> = scopes_flag.split_whitespace().collect();
    let jwt = token::dev_token(
        &secret(),
        &flags.or("tenant", "acme"),
        &flags.or("user", "alice"),
        &scopes,
        flags.number("ttl", 12 * 3_600)?,
    )?;
    println!("{jwt}");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return std::process::ExitCode::from(2);
    };
    let parsed = |allowed: &[&str]| Flags::parse(rest, allowed);
    let result = match command.as_str() {
        "provision" => match parsed(&["stack", "template"]) {
            Ok(f) => cmd_provision(f).await,
            Err(e) => Err(e),
        },
        "env" => match parsed(&["stack", "template", "schedule-secs"]) {
            Ok(f) => cmd_env(f).await,
            Err(e) => Err(e),
        },
        "seed" => match parsed(&["stack", "template", "rows", "tenants"]) {
            Ok(f) => cmd_seed(f).await,
            Err(e) => Err(e),
        },
        "bridge" => match parsed(&[
            "stack",
            "template",
            "watch",
            "schedule-secs",
            "queue-url",
            "wait-secs",
            "worker-port",
            "worker-log",
            "worker-reload",
            "worker-timeout-secs",
            "redeliver-secs",
        ]) {
            Ok(f) => cmd_bridge(f).await,
            Err(e) => Err(e),
        },
        "demo" => match parsed(DEMO_FLAGS) {
            Ok(f) => cmd_demo(f).await,
            Err(e) => Err(e),
        },
        "crash-check" => match parsed(&[DEMO_FLAGS, &["worker-port"]].concat()) {
            Ok(f) => cmd_crash_check(f).await,
            Err(e) => Err(e),
        },
        "orders" => match parsed(&["stack", "template", "tenant", "insert", "update", "delete"]) {
            Ok(f) => cmd_orders(f).await,
            Err(e) => Err(e),
        },
        "token" => parsed(&["tenant", "user", "scopes", "ttl"]).and_then(cmd_token),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(anyhow!("unknown command {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devstack {command}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn flags_take_space_or_equals() {
        let f = Flags::parse(
            &args(&["--rows", "500", "--tenants=a,b"]),
            &["rows", "tenants"],
        )
        .unwrap();
        assert_eq!(f.number("rows", 1).unwrap(), 500);
        assert_eq!(f.or("tenants", "x"), "a,b");
        assert_eq!(f.or("stack", DEFAULT_STACK), "export-cache");
    }

    #[test]
    fn unknown_flags_and_missing_values_are_errors() {
        assert!(Flags::parse(&args(&["--nope", "1"]), &["rows"]).is_err());
        assert!(Flags::parse(&args(&["--rows"]), &["rows"]).is_err());
        assert!(Flags::parse(&args(&["rows"]), &["rows"]).is_err());
        let f = Flags::parse(&args(&["--rows", "many"]), &["rows"]).unwrap();
        assert!(f.number("rows", 1).is_err());
    }

    #[test]
    fn the_bridge_bounds_the_worker_by_the_templates_timeout() {
        let flags = Flags::parse(&[], &[]).unwrap();
        assert_eq!(worker_timeout_secs(&flags), 900);
        let missing = Flags::parse(&args(&["--template", "/nonexistent.yaml"]), &["template"]);
        assert_eq!(
            worker_timeout_secs(&missing.unwrap()),
            bridge::WORKER_TIMEOUT_SECS
        );
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
