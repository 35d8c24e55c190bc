//! A `cargo lambda watch` that serves one function and is started again when that function's
//! process dies.
//!
//! Why: `cargo lambda watch` (1.9.2) starts a function's process on the first invoke and never
//! again. When that process dies (`kill -9`, a panic that aborts, a cold start that exits), the
//! watch keeps accepting invokes for the function and none of them is ever answered. In AWS a
//! crashed invocation ends with an error and the next invoke gets a fresh runtime. The bridge gets
//! the same by giving the worker a watch of its own (so the API's watch is never touched),
//! watching the worker's process while an invocation runs, and restarting that watch when the
//! process is gone or the invocation outlives the function's timeout.
//!
//! The function's process is found in the process table (`ps`, on Linux and macOS alike): it is a
//! descendant of the watch that either is the function's binary or is the `cargo run --bin <name>`
//! that becomes it (cargo replaces itself with the binary, same pid). Process-table polling rather
//! than the watch's log lines, because the log wording is the watch's own and changes between
//! versions, while "a process we saw is gone" does not.

use anyhow::{anyhow, bail, Context};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How to start the watch that serves the function.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Program and arguments, e.g. `cargo lambda watch -A 127.0.0.1 -P 9001`.
    pub program: String,
    pub args: Vec<String>,
    /// Where the watch listens (the bridge invokes `http://127.0.0.1:{port}`).
    pub port: u16,
    /// The function binary it serves (`export-worker`).
    pub function: String,
    /// Extra environment for the watch (and so for the function); the rest is inherited.
    pub env: Vec<(String, String)>,
    /// Appends the watch's output here; `None` inherits the bridge's stdout/stderr.
    pub log: Option<PathBuf>,
    /// How long to wait for the watch to accept connections.
    pub start_timeout: Duration,
}

impl WatchSpec {
    /// `cargo lambda watch -A 127.0.0.1 -P {port}` serving `function`.
    pub fn cargo_lambda(port: u16, function: impl Into<String>) -> Self {
        WatchSpec {
            program: "cargo".to_owned(),
            args: ["lambda", "watch", "-A", "127.0.0.1", "-P"]
                .into_iter()
                .map(str::to_owned)
                .chain([port.to_string()])
                .collect(),
            port,
            function: function.into(),
            env: Vec::new(),
            log: None,
            start_timeout: Duration::from_secs(60),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// One row of the process table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    /// `ps` state; `Z` is a zombie: dead, only not reaped yet.
    pub stat: String,
    pub args: String,
}

/// Parses `ps -A -o pid= -o ppid= -o stat= -o args=`; unreadable lines are skipped.
pub fn parse_ps(output: &str) -> Vec<Proc> {
    output
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let pid = fields.next()?.parse().ok()?;
            let ppid = fields.next()?.parse().ok()?;
            let stat = fields.next()?.to_owned();
            let args = fields.collect::<Vec<_>>().join(" ");
            Some(Proc {
                pid,
                ppid,
                stat,
                args,
            })
        })
        .collect()
}

/// The live (non-zombie) processes below `root`, `root` excluded.
pub fn descendants(table: &[Proc], root: u32) -> Vec<&Proc> {
    let mut children: HashMap<u32, Vec<&Proc>> = HashMap::new();
    for p in table {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            if seen.insert(child.pid) {
                stack.push(child.pid);
                if !child.stat.starts_with('Z') {
                    out.push(*child);
                }
            }
        }
    }
    out
}

/// What a process is to the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The `cargo run --bin {function}` that builds the function and then becomes it.
    Build,
    /// The function's binary.
    Function,
}

/// `p`'s role for `function`, if any.
pub fn role_of(p: &Proc, function: &str) -> Option<Role> {
    let mut args = p.args.split_whitespace();
    let program = args.next().unwrap_or_default();
    let base = program.rsplit('/').next().unwrap_or(program);
    if base == function {
        return Some(Role::Function);
    }
    let rest: Vec<&str> = args.collect();
    let builds = rest.windows(2).any(|w| w[0] == "--bin" && w[1] == function)
        || rest.iter().any(|a| *a == format!("--bin={function}"));
    builds.then_some(Role::Build)
}

/// The function's live process under `root` and its role; the binary wins over its build.
pub fn function_process(table: &[Proc], root: u32, function: &str) -> Option<(u32, Role)> {
    descendants(table, root)
        .into_iter()
        .filter_map(|p| role_of(p, function).map(|r| (p.pid, r)))
        .max_by_key(|(_, r)| *r == Role::Function)
}

/// Set by cargo for the crate it builds or runs, never meant to be inherited by another build.
fn is_per_crate_cargo_var(name: &str) -> bool {
    const EXACT: [&str; 7] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
    ];
    EXACT.contains(&name) || name.starts_with("CARGO_PKG_") || name.starts_with("CARGO_BIN_EXE_")
}

/// Reads the process table with `ps` (present on Linux and macOS).
pub async fn process_table() -> anyhow::Result<Vec<Proc>> {
    let out = Command::new("ps")
        .args([
            "-A", "-o", "pid=", "-o", "ppid=", "-o", "stat=", "-o", "args=",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await
        .context("running ps")?;
    if !out.status.success() {
        bail!("ps exited with {}", out.status);
    }
    Ok(parse_ps(&String::from_utf8_lossy(&out.stdout)))
}

/// What the supervisor knows about the function's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// No process of the function seen since the watch started: not invoked yet.
    NotStarted,
    /// `cargo run` is building the function (its timeout has not started).
    Building(u32),
    /// The function's process is alive.
    Running(u32),
    /// It was seen and is gone, or the watch itself exited: invokes would hang.
    Dead(String),
    /// The process table could not be read; only timeouts can tell.
    Unknown,
}

pub struct Supervisor {
    spec: WatchSpec,
    child: Option<Child>,
    /// The function's pid last seen under the current watch.
    seen: Option<u32>,
    started: u32,
    warned_ps: bool,
}

impl Supervisor {
    /// Starts the watch and waits until it accepts connections.
    pub async fn start(spec: WatchSpec) -> anyhow::Result<Self> {
        let mut s = Supervisor {
            spec,
            child: None,
            seen: None,
            started: 0,
            warned_ps: false,
        };
        s.spawn().await?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        self.spec.url()
    }

    pub fn function(&self) -> &str {
        &self.spec.function
    }

    /// How many times the watch was started (1 = never restarted).
    pub fn starts(&self) -> u32 {
        self.started
    }

    /// The watch's pid while it runs.
    pub fn watch_pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let addr = format!("127.0.0.1:{}", self.spec.port);
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            bail!(
                "{addr} is already taken: pick another worker watch port (something else would get the invokes)"
            );
        }
        let mut cmd = Command::new(&self.spec.program);
        // Variables a parent cargo sets for the crate it runs (when the bridge runs under
        // `cargo test`): seen by the function's own `cargo run`, some of them (ring's build
        // script tracks CARGO_MANIFEST_DIR) make it rebuild the dependencies, and the next
        // plain `cargo build` rebuild them back.
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(is_per_crate_cargo_var) {
                cmd.env_remove(&name);
            }
        }
        cmd.args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            // Its own process group, so a restart can stop the watch and the cargo/rustc
            // processes of a build in progress together, and Ctrl-C in a terminal reaches the
            // bridge first, which then stops the watch in order.
            .process_group(0);
        match &self.spec.log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                let err = file.try_clone().context("cloning the log file handle")?;
                cmd.stdout(file).stderr(err);
            }
            None => {
                cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
            }
        }
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting `{} {}` (is cargo-lambda installed? `make bootstrap`)",
                self.spec.program,
                self.spec.args.join(" ")
            )
        })?;
        self.started += 1;
        self.seen = None;
        let pid = child.id().unwrap_or_default();
        let deadline = Instant::now() + self.spec.start_timeout;
        loop {
            if let Some(status) = child.try_wait().context("checking the watch")? {
                bail!(
                    "`{} {}` exited with {status} during start-up",
                    self.spec.program,
                    self.spec.args.join(" ")
                );
            }
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                self.child = Some(child);
                self.stop().await;
                bail!(
                    "the watch did not accept connections on {addr} within {:?}",
                    self.spec.start_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!(pid, url = %self.url(), function = %self.spec.function, start = self.started, "worker watch started");
        self.child = Some(child);
        Ok(())
    }

    /// Looks at the watch and the function's process.
    pub async fn health(&mut self) -> Health {
        let Some(child) = self.child.as_mut() else {
            return Health::Dead("the watch is not running".to_owned());
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                return Health::Dead(format!("cargo lambda watch exited ({status})"))
            }
            Ok(None) => {}
            Err(e) => return Health::Dead(format!("cannot wait on the watch: {e}")),
        }
        let Some(root) = child.id() else {
            return Health::Dead("the watch has exited".to_owned());
        };
        let table = match process_table().await {
            Ok(t) => t,
            Err(e) => {
                if !self.warned_ps {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the process table; a dead worker is noticed only by the invocation timeout");
                    self.warned_ps = true;
                }
                return Health::Unknown;
            }
        };
        // The build counts as seen too: a function that exits at cold start may be gone
        // before a poll ever sees its binary, but its `cargo run` lasts a second or more.
        match (
            function_process(&table, root, &self.spec.function),
            self.seen,
        ) {
            (Some((pid, role)), _) => {
                self.seen = Some(pid);
                match role {
                    Role::Build => Health::Building(pid),
                    Role::Function => Health::Running(pid),
                }
            }
            (None, Some(pid)) => Health::Dead(format!(
                "{} (pid {pid}) is gone and cargo lambda watch does not start it again",
                self.spec.function
            )),
            (None, None) => Health::NotStarted,
        }
    }

    /// Stops the watch (and whatever it runs) and starts it again on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        // The port is released when the watch exits; allow a moment for the OS to agree.
        let mut last = Err(anyhow!("not tried"));
        for _ in 0..5 {
            last = self.spawn().await;
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        last
    }

    /// SIGTERM to the watch's process group (the watch stops its function in turn), SIGKILL
    /// to it and to every process that was below it after 5 s. Only processes this supervisor
    /// started, or that they started, are signalled, each by its id.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Some(pid) = child.id() else {
            let _ = child.wait().await;
            return;
        };
        // The function runs in a process group of its own (watchexec does that), so it is
        // collected by ancestry before the watch goes away and its children are re-parented.
        let below: Vec<u32> = match process_table().await {
            Ok(t) => descendants(&t, pid).iter().map(|p| p.pid).collect(),
            Err(_) => Vec::new(),
        };
        signal("TERM", &format!("-{pid}"));
        let graceful = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        if graceful.is_err() {
            tracing::warn!(pid, "the worker watch did not stop in 5 s; killing it");
            signal("KILL", &format!("-{pid}"));
            let _ = child.wait().await;
        }
        // Anything of ours still alive below the old watch (a hung function ignores SIGTERM).
        if let Ok(table) = process_table().await {
            let alive: HashSet<u32> = table
                .iter()
                .filter(|p| !p.stat.starts_with('Z'))
                .map(|p| p.pid)
                .collect();
            for p in below.iter().filter(|p| alive.contains(p)) {
                signal("KILL", &p.to_string());
            }
        }
        self.seen = None;
    }
}

impl Drop for Supervisor {
    /// A bridge that ends without `stop()` (a panic, a test that fails) still asks the watch to
    /// stop; SIGTERM lets it stop its function first, which SIGKILL would orphan.
    fn drop(&mut self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            signal("TERM", &format!("-{pid}"));
        }
    }
}

/// `kill -s SIG -- target` (a pid, or `-pgid` for a group); errors (already gone) are ignored.
/// The `kill` command rather than libc because this workspace forbids unsafe code.
fn signal(sig: &str, target: &str) {
    let _ = std::process::Command::new("kill")
        .args(["-s", sig, "--", target])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: &str = "\
    1     0 Ss   /sbin/init
  100     1 Ssl  /work/.local/venv/bin/cargo-lambda lambda watch -A 127.0.0.1 -P 9001
  101   100 Ssl  target/debug/export-worker
  102   100 S    /root/.cargo/bin/cargo run --color auto --manifest-path Cargo.toml --bin export-warmer
  103   102 R    rustc --crate-name warmer
  104   100 Z    [export-worker] <defunct>
  200     1 S    target/debug/export-worker
";

    #[test]
    fn ps_output_is_parsed_with_arguments_kept() {
        let table = parse_ps(PS);
        assert_eq!(table.len(), 7);
        assert_eq!(table[1].pid, 100);
        assert_eq!(table[1].ppid, 1);
        assert_eq!(
            table[3].args,
            "/root/.cargo/bin/cargo run --color auto --manifest-path Cargo.toml --bin export-warmer"
        );
        assert!(parse_ps("garbage line\n\n  x y z").is_empty());
    }

    #[test]
    fn descendants_skip_zombies_and_strangers() {
        let table = parse_ps(PS);
        let pids: Vec<u32> = descendants(&table, 100).iter().map(|p| p.pid).collect();
        let mut sorted = pids.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![101, 102, 103]);
    }

    #[test]
    fn the_function_is_its_binary_or_the_cargo_run_that_becomes_it() {
        let table = parse_ps(PS);
        assert_eq!(
            function_process(&table, 100, "export-worker"),
            Some((101, Role::Function))
        );
        assert_eq!(
            function_process(&table, 100, "export-warmer"),
            Some((102, Role::Build))
        );
        // Not below this watch: another stack's worker is none of our business.
        assert_eq!(function_process(&table, 100, "export-api"), None);
        let eq = Proc {
            pid: 5,
            ppid: 1,
            stat: "S".into(),
            args: "cargo run --bin=stub-worker".into(),
        };
        assert_eq!(role_of(&eq, "stub-worker"), Some(Role::Build));
        assert_eq!(role_of(&eq, "stub"), None);
    }

    #[test]
    fn a_parent_cargos_per_crate_variables_are_not_inherited() {
        for name in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_BIN_EXE_devstack",
            "OUT_DIR",
        ] {
            assert!(is_per_crate_cargo_var(name), "{name}");
        }
        for name in [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO",
            "PATH",
            "CARGO_LAMBDA_COLOR",
        ] {
            assert!(!is_per_crate_cargo_var(name), "{name}");
        }
    }

    #[tokio::test]
    async fn the_process_table_includes_this_test() {
        let table = process_table().await.expect("ps works here");
        let me = std::process::id();
        assert!(table.iter().any(|p| p.pid == me));
    }

    #[test]
    fn cargo_lambda_spec_binds_loopback_on_its_port() {
        let spec = WatchSpec::cargo_lambda(9101, "export-worker");
        assert_eq!(
            spec.args,
            ["lambda", "watch", "-A", "127.0.0.1", "-P", "9101"]
        );
        assert_eq!(spec.url(), "http://127.0.0.1:9101");
    }
}
