//! `sprout`: the command line. Parses arguments, turns them into agent requests
//! (embedded, or over a daemon's Unix socket), prints results, maps errors to exit codes.

#![allow(clippy::result_large_err)] // see agent/src/lib.rs

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use agent::{Agent, Config, ErrorKind, FunctionSource, Request, Response, EXIT_BAD_REQUEST};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ipc::api::{ErrorBody, ErrorDetail, FunctionConfig, FunctionInfo, RegisterFunction};
use ipc::client::Client;

/// sprout: a latency-first worker runtime for serverless functions.
#[derive(Parser, Debug)]
#[command(name = "sprout", version, about)]
struct Cli {
    /// Talk to the daemon on this Unix socket instead of running an embedded agent.
    #[arg(long, global = true, env = "SPROUT_SOCKET")]
    socket: Option<PathBuf>,
    /// Parent directory of the agent's state.
    #[arg(
        long,
        global = true,
        env = "SPROUT_STATE_DIR",
        default_value = "/run/sprout"
    )]
    state_dir: PathBuf,
    /// The namespace functions and workflows are registered, listed, removed and
    /// invoked in (fn, invoke, workflow).
    #[arg(
        long,
        global = true,
        env = "SPROUT_NAMESPACE",
        default_value = agent::DEFAULT_NAMESPACE
    )]
    namespace: String,
    /// First host uid (and gid) of the range sandboxes run as: each live sandbox has
    /// its own, base + slot. Two agents on one host need ranges that do not overlap.
    #[arg(
        long,
        global = true,
        env = "SPROUT_SANDBOX_UID_BASE",
        default_value_t = rootfs::SandboxUids::DEFAULT_BASE
    )]
    sandbox_uid_base: u32,
    /// How many uids the range has: at most this many sandboxes at once.
    #[arg(
        long,
        global = true,
        env = "SPROUT_SANDBOX_UIDS",
        default_value_t = rootfs::SandboxUids::DEFAULT_COUNT
    )]
    sandbox_uids: u32,
    #[command(subcommand)]
    command: Command,
}

/// `--sandbox-uid-base`/`--sandbox-uids`, checked once in [`run`] before any agent starts.
static SANDBOX_UIDS: std::sync::OnceLock<rootfs::SandboxUids> = std::sync::OnceLock::new();

/// The sandbox uid range of this command's agent.
fn sandbox_uids() -> rootfs::SandboxUids {
    SANDBOX_UIDS.get().copied().unwrap_or_default()
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Invoke a function: a directory (embedded agent) or, with --socket, a registered name.
    Invoke {
        /// Function directory, or its name on the daemon.
        function: String,
        /// Event JSON; `-` reads it from stdin.
        #[arg(default_value = "{}")]
        event: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Also print what the function wrote to stdout/stderr (on stderr).
        #[arg(long)]
        logs: bool,
        /// Also register this function directory (embedded agent), for the function to
        /// call by its directory's name; repeatable.
        #[arg(long = "with", value_name = "DIR")]
        with: Vec<PathBuf>,
    },
    /// Declarative workflows.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Run the agent as a daemon serving the HTTP API on a Unix socket.
    Serve {
        /// Worker threads running requests.
        #[arg(long, default_value_t = 64)]
        workers: usize,
        #[command(flatten)]
        pool: PoolArgs,
        #[command(flatten)]
        http: HttpArgs,
    },
    /// Manage functions registered on the daemon.
    #[command(subcommand)]
    Fn(FnCommand),
    /// Show the daemon's status.
    Status,
}

#[derive(Subcommand, Debug)]
enum FnCommand {
    /// Register (or replace) a function from a directory.
    Add {
        name: String,
        dir: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
        /// Upload the directory as a tar archive instead of passing its path.
        #[arg(long)]
        upload: bool,
    },
    /// List registered functions.
    Ls,
    /// Remove a function and its warm instances.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
enum WorkflowCommand {
    /// Run a workflow file on INPUT: embedded (its "functions" are registered from
    /// their directories first) or, with --socket, on the daemon (which registers its
    /// "functions" by path and the workflow under the file's name).
    Run {
        file: PathBuf,
        /// Input JSON; `-` reads it from stdin.
        #[arg(default_value = "{}")]
        input: String,
    },
}

#[derive(Args, Debug, Default)]
struct LimitArgs {
    /// Handler as module:function (default f:f, i.e. f.py with def f(event)).
    #[arg(long)]
    handler: Option<String>,
    /// Memory limit in MiB (default 128).
    #[arg(long, value_name = "MiB")]
    memory: Option<u64>,
    /// Timeout in milliseconds (default 60000).
    #[arg(long, value_name = "ms")]
    timeout: Option<u64>,
    /// Process limit (default 64).
    #[arg(long)]
    pids: Option<u64>,
    /// CPU limit in cores (default 1).
    #[arg(long)]
    cpus: Option<f64>,
    /// Instances of the function at most; requests beyond wait in its queue (default 4).
    #[arg(long)]
    max_instances: Option<usize>,
}

/// The daemon's warm pool.
#[derive(Args, Debug)]
struct PoolArgs {
    /// Prewarmed, frozen sandboxes kept ready.
    #[arg(long, default_value_t = 2)]
    stem_cells: usize,
    /// Freeze a warm instance after it has been idle this long.
    #[arg(long, value_name = "ms", default_value_t = 50)]
    pause_grace: u64,
    /// Destroy a warm instance after it has been idle this long.
    #[arg(long, value_name = "s", default_value_t = 600)]
    idle_ttl: u64,
    /// Memory the sandboxes' limits may add up to before idle ones are evicted
    /// (default: half of the machine's memory).
    #[arg(long, value_name = "MiB")]
    memory_budget: Option<u64>,
    /// Calls one sandbox may have in flight on the agent's call socket; past it a call
    /// is refused at once with too_many_calls.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        value_parser = clap::value_parser!(u64).range(1..=65536)
    )]
    max_calls_per_sandbox: u64,
    /// The sprout-spawner executable (default: next to this one, or in its parent
    /// directory).
    #[arg(long, value_name = "PATH", env = "SPROUT_SPAWNER")]
    spawner: Option<PathBuf>,
}

impl PoolArgs {
    fn config(&self) -> agent::PoolConfig {
        agent::PoolConfig {
            stem_cells: self.stem_cells,
            pause_grace: std::time::Duration::from_millis(self.pause_grace),
            idle_ttl: std::time::Duration::from_secs(self.idle_ttl),
            memory_budget_mb: self
                .memory_budget
                .unwrap_or_else(agent::default_memory_budget_mb),
        }
    }
}

/// The daemon's API connections and shutdown.
#[derive(Args, Debug)]
struct HttpArgs {
    /// Connections open at most; more are answered 503 and closed at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// A request head, then its body, must arrive within this long (else 408):
    /// milliseconds (`500`, `500ms`) or seconds (`10s`).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    read_timeout: std::time::Duration,
    /// An idle connection (no request begun) is closed after this long.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    keep_alive_timeout: std::time::Duration,
    /// On SIGTERM/SIGINT, requests being handled get this long to finish before they
    /// are answered 503 (a second signal ends it): milliseconds or seconds.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: std::time::Duration,
}

impl HttpArgs {
    fn limits(&self) -> agent::http::Limits {
        agent::http::Limits {
            read_timeout: self.read_timeout,
            idle_timeout: self.keep_alive_timeout,
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            ..agent::http::Limits::default()
        }
    }
}

/// `500` or `500ms` (milliseconds), `10s` (seconds); at least 1 ms.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (digits, ms_per) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else {
        (t, 1)
    };
    let ms = digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(ms_per))
        .filter(|&ms| ms >= 1)
        .ok_or_else(|| {
            format!("{text:?} is not a duration: give milliseconds (500, 500ms) or seconds (10s), at least 1 ms")
        })?;
    Ok(std::time::Duration::from_millis(ms))
}

impl LimitArgs {
    fn config(&self) -> FunctionConfig {
        FunctionConfig {
            handler: self.handler.clone(),
            memory_mb: self.memory,
            timeout_ms: self.timeout,
            pids: self.pids,
            cpus: self.cpus,
            max_instances: self.max_instances,
        }
    }
}

/// Exit codes: 1 the function failed, 2 the request was wrong, 3 sprout failed.

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Serve { .. }));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sprout: {}", chain(&e));
            // An agent's error (starting or stopping the embedded agent) says whose
            // fault it was; anything else here is about the command line or its input.
            match e.downcast_ref::<agent::Error>() {
                Some(err) => exit_code(err.kind()),
                None => ExitCode::from(EXIT_BAD_REQUEST),
            }
        }
    }
}

fn init_tracing(daemon: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPROUT_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if daemon {
            "info,libcgroups=error,libcontainer=warn"
        } else {
            "warn,libcgroups=error"
        })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let uids = rootfs::SandboxUids::new(cli.sandbox_uid_base, cli.sandbox_uids).map_err(|e| {
        anyhow::anyhow!(
            "--sandbox-uid-base {} --sandbox-uids {}: {e}",
            cli.sandbox_uid_base,
            cli.sandbox_uids
        )
    })?;
    let _ = SANDBOX_UIDS.set(uids);
    let ns = cli.namespace.as_str();
    if !matches!(cli.command, Command::Serve { .. }) {
        agent::validate_namespace(ns)?;
    }
    match (cli.command, cli.socket) {
        (
            Command::Serve {
                workers,
                pool,
                http,
                ..
            },
            Some(socket),
        ) => serve(&socket, &cli.state_dir, workers, &pool, &http),
        (Command::Serve { .. }, None) => bail!("serve needs --socket PATH (or SPROUT_SOCKET)"),
        (
            Command::Invoke {
                function,
                event,
                limits,
                logs,
                with,
            },
            socket,
        ) => {
            let event = read_event(&event)?;
            match socket {
                Some(socket) => {
                    if limits.config() != FunctionConfig::default() || !with.is_empty() {
                        bail!("--handler/--memory/--timeout/--pids/--cpus/--with belong to `sprout fn add` when using a daemon");
                    }
                    invoke_remote(&socket, ns, &function, &event, logs)
                }
                None => invoke_embedded(
                    &cli.state_dir,
                    ns,
                    Path::new(&function),
                    &with,
                    &limits,
                    event,
                    logs,
                ),
            }
        }
        (Command::Workflow(WorkflowCommand::Run { file, input }), socket) => {
            let input = read_event(&input)?;
            let text = std::fs::read(&file)
                .with_context(|| format!("read workflow file {}", file.display()))?;
            let workflow = match agent::Workflow::parse(&text) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("sprout: {}: {}", file.display(), ipc::chain(&e));
                    return Ok(ExitCode::from(EXIT_BAD_REQUEST));
                }
            };
            let base = file.parent().unwrap_or(Path::new("."));
            let functions: Vec<(String, PathBuf)> = workflow
                .functions
                .iter()
                .map(|(n, d)| (n.clone(), base.join(d)))
                .collect();
            let name = agent::function_name_for_dir(&file.with_extension(""));
            match socket {
                Some(socket) => workflow_remote(&socket, ns, &name, &text, &functions, &input),
                None => workflow_embedded(&cli.state_dir, ns, &name, workflow, &functions, input),
            }
        }
        (Command::Fn(cmd), Some(socket)) => fn_command(&socket, ns, cmd),
        (Command::Status, Some(socket)) => {
            let resp = Client::connect(&socket)?.request("GET", "/status", None, b"")?;
            print_remote(resp.status, &resp.body, false)
        }
        (Command::Fn(_) | Command::Status, None) => {
            bail!("this command talks to a daemon: pass --socket PATH or set SPROUT_SOCKET (start one with `sprout serve --socket PATH`)")
        }
    }
}

/// Reads and validates the event before anything else happens.
fn read_event(arg: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = if arg == "-" {
        let mut b = Vec::new();
        std::io::stdin()
            .read_to_end(&mut b)
            .context("read event from stdin")?;
        b
    } else {
        arg.as_bytes().to_vec()
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).context("invalid event JSON")?;
    Ok(bytes)
}

fn note_requirements(dir: &Path) {
    if dir.join("requirements.txt").is_file() {
        eprintln!(
            "sprout: note: {} has requirements.txt; per-function dependencies are not supported yet, \
             so the function runs with the standard library of the host's Python only",
            dir.display()
        );
    }
}

fn invoke_embedded(
    state_dir: &Path,
    namespace: &str,
    dir: &Path,
    with: &[PathBuf],
    limits: &LimitArgs,
    event: Vec<u8>,
    logs: bool,
) -> anyhow::Result<ExitCode> {
    // Check the function before starting anything, so a typo leaves nothing behind.
    if !dir.is_dir() {
        bail!(
            "function directory {} does not exist or is not a directory",
            dir.display()
        );
    }
    let config = Config {
        state_root: state_dir.to_path_buf(),
        sandbox_uids: sandbox_uids(),
        keep_warm: false,
        ..Config::new()
    };
    let name = agent::function_name_for_dir(dir);
    if let Err(e) = agent::check_function(&name, dir, &limits.config(), &config) {
        return Ok(print_error(&e.detail(), exit_code(e.kind()), false));
    }
    let others: Vec<(String, PathBuf)> = with
        .iter()
        .map(|d| (agent::function_name_for_dir(d), d.clone()))
        .collect();
    for (n, d) in &others {
        if let Err(e) = agent::check_function(n, d, &FunctionConfig::default(), &config) {
            return Ok(print_error(&e.detail(), exit_code(e.kind()), false));
        }
    }
    note_requirements(dir);
    let agent = Agent::start(config).context("start the embedded agent")?;
    let result = register_dirs(&agent, namespace, &others)
        .and_then(|()| {
            agent.handle(Request::RegisterFunction {
                namespace: namespace.to_owned(),
                name: name.clone(),
                source: FunctionSource::Dir(dir.to_path_buf()),
                config: limits.config(),
            })
        })
        .and_then(|_| {
            agent.handle(Request::Invoke {
                namespace: namespace.to_owned(),
                name,
                event,
            })
        });
    agent.shutdown().context("shut the embedded agent down")?;
    match result {
        Ok(Response::Invoked(inv)) => {
            if logs {
                print_logs(&inv.logs);
            }
            println!("{}", String::from_utf8_lossy(&inv.result));
            Ok(ExitCode::SUCCESS)
        }
        Ok(other) => bail!("unexpected response {other:?}"),
        Err(e) => Ok(print_error(&e.detail(), exit_code(e.kind()), logs)),
    }
}

fn register_dirs(
    agent: &Agent,
    namespace: &str,
    functions: &[(String, PathBuf)],
) -> Result<(), agent::Error> {
    for (name, dir) in functions {
        agent.handle(Request::RegisterFunction {
            namespace: namespace.to_owned(),
            name: name.clone(),
            source: FunctionSource::Dir(dir.clone()),
            config: FunctionConfig::default(),
        })?;
    }
    Ok(())
}

fn workflow_embedded(
    state_dir: &Path,
    namespace: &str,
    name: &str,
    workflow: agent::Workflow,
    functions: &[(String, PathBuf)],
    input: Vec<u8>,
) -> anyhow::Result<ExitCode> {
    let config = Config {
        state_root: state_dir.to_path_buf(),
        sandbox_uids: sandbox_uids(),
        keep_warm: false,
        ..Config::new()
    };
    for (n, d) in functions {
        if let Err(e) = agent::check_function(n, d, &FunctionConfig::default(), &config) {
            return Ok(print_error(&e.detail(), exit_code(e.kind()), false));
        }
    }
    let agent = Agent::start(config).context("start the embedded agent")?;
    let result = register_dirs(&agent, namespace, functions)
        .and_then(|()| {
            agent.handle(Request::RegisterWorkflow {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                workflow,
            })
        })
        .and_then(|_| {
            agent.handle(Request::RunWorkflow {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                input,
            })
        });
    agent.shutdown().context("shut the embedded agent down")?;
    match result {
        Ok(Response::WorkflowRan(out)) => {
            println!("{}", String::from_utf8_lossy(&out.result));
            Ok(ExitCode::SUCCESS)
        }
        Ok(other) => bail!("unexpected response {other:?}"),
        Err(e) => Ok(print_error(&e.detail(), exit_code(e.kind()), false)),
    }
}

/// Registers the file's functions (by path) and the workflow on the daemon, and runs it.
fn workflow_remote(
    socket: &Path,
    namespace: &str,
    name: &str,
    text: &[u8],
    functions: &[(String, PathBuf)],
    input: &[u8],
) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(socket)?;
    for (fname, dir) in functions {
        let path = dir
            .canonicalize()
            .with_context(|| format!("function directory {}", dir.display()))?;
        let body = serde_json::to_vec(&RegisterFunction {
            path: path.display().to_string(),
            config: FunctionConfig::default(),
            ..Default::default()
        })?;
        let resp = client.request(
            "PUT",
            &ipc::api::function_path(namespace, fname, ""),
            Some("application/json"),
            &body,
        )?;
        if resp.status != 200 {
            return print_remote(resp.status, &resp.body, false);
        }
    }
    let mut doc: serde_json::Value = serde_json::from_slice(text)?;
    if let Some(obj) = doc.as_object_mut() {
        obj.remove("functions");
    }
    let resp = client.request(
        "PUT",
        &ipc::api::workflow_path(namespace, name, ""),
        Some("application/json"),
        &serde_json::to_vec(&doc)?,
    )?;
    if resp.status != 200 {
        return print_remote(resp.status, &resp.body, false);
    }
    let resp = client.request(
        "POST",
        &ipc::api::workflow_path(namespace, name, "/invoke"),
        Some("application/json"),
        input,
    )?;
    print_remote(resp.status, &resp.body, false)
}

fn exit_code(kind: ErrorKind) -> ExitCode {
    ExitCode::from(kind.exit_code())
}

fn print_logs(logs: &ipc::api::Logs) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(logs.stdout.as_bytes());
    let _ = err.write_all(logs.stderr.as_bytes());
    if logs.truncated {
        let _ = writeln!(err, "sprout: (output truncated)");
    }
}

/// A failed invocation: the error JSON on stdout (it is the invocation's outcome),
/// one line on stderr.
fn print_error(detail: &ErrorDetail, code: ExitCode, logs: bool) -> ExitCode {
    if logs {
        if let Some(l) = &detail.logs {
            print_logs(l);
        }
    }
    let mut shown = detail.clone();
    if !logs {
        shown.logs = None;
    }
    if matches!(
        detail.kind.as_str(),
        "handler_error"
            | "load_error"
            | "timeout"
            | "out_of_memory"
            | "instance_died"
            | "bad_result"
            | "call_failed"
            | "cancelled"
    ) {
        println!(
            "{}",
            serde_json::to_string(&ErrorBody { error: shown }).unwrap_or_default()
        );
    }
    eprintln!("sprout: {}", detail.message);
    code
}

fn invoke_remote(
    socket: &Path,
    namespace: &str,
    name: &str,
    event: &[u8],
    logs: bool,
) -> anyhow::Result<ExitCode> {
    let rest = if logs { "/invoke?logs=true" } else { "/invoke" };
    let path = ipc::api::function_path(namespace, name, rest);
    let resp = Client::connect(socket)?.request("POST", &path, Some("application/json"), event)?;
    if resp.status == 200 && logs {
        let record: ipc::api::InvocationRecord =
            serde_json::from_slice(&resp.body).context("decode invocation record")?;
        print_logs(&record.logs);
        println!("{}", record.result.get());
        return Ok(ExitCode::SUCCESS);
    }
    print_remote(resp.status, &resp.body, logs)
}

/// Prints a daemon's answer: the body on success, the error otherwise.
fn print_remote(status: u16, body: &[u8], logs: bool) -> anyhow::Result<ExitCode> {
    if status == 200 {
        println!("{}", String::from_utf8_lossy(body));
        return Ok(ExitCode::SUCCESS);
    }
    let err: ErrorBody = serde_json::from_slice(body).with_context(|| {
        format!(
            "daemon answered {status} with {}",
            String::from_utf8_lossy(body)
        )
    })?;
    let code = match status {
        _ => ErrorKind::from_http_status(status).exit_code(),
    };
    Ok(print_error(&err.error, ExitCode::from(code), logs))
}

fn fn_command(socket: &Path, namespace: &str, cmd: FnCommand) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(socket)?;
    let resp = match cmd {
        FnCommand::Add {
            name,
            dir,
            limits,
            upload,
        } => {
            let abs = dir
                .canonicalize()
                .with_context(|| format!("function directory {}", dir.display()))?;
            note_requirements(&abs);
            if upload {
                let mut tar = tar::Builder::new(Vec::new());
                tar.follow_symlinks(false);
                tar.append_dir_all(".", &abs)
                    .with_context(|| format!("archive {}", abs.display()))?;
                let body = tar.into_inner().context("finish archive")?;
                let c = limits.config();
                let mut q = Vec::new();
                if let Some(h) = &c.handler {
                    q.push(format!("handler={h}"));
                }
                if let Some(v) = c.memory_mb {
                    q.push(format!("memory_mb={v}"));
                }
                if let Some(v) = c.timeout_ms {
                    q.push(format!("timeout_ms={v}"));
                }
                if let Some(v) = c.pids {
                    q.push(format!("pids={v}"));
                }
                if let Some(v) = c.cpus {
                    q.push(format!("cpus={v}"));
                }
                if let Some(v) = c.max_instances {
                    q.push(format!("max_instances={v}"));
                }
                let query = if q.is_empty() {
                    String::new()
                } else {
                    format!("?{}", q.join("&"))
                };
                client.request(
                    "PUT",
                    &ipc::api::function_path(namespace, &name, &query),
                    Some("application/x-tar"),
                    &body,
                )?
            } else {
                let body = serde_json::to_vec(&RegisterFunction {
                    path: abs.display().to_string(),
                    config: limits.config(),
                    ..Default::default()
                })?;
                client.request(
                    "PUT",
                    &ipc::api::function_path(namespace, &name, ""),
                    Some("application/json"),
                    &body,
                )?
            }
        }
        FnCommand::Ls => {
            let path = ipc::api::function_path(namespace, "", "");
            let resp = client.request("GET", &path, None, b"")?;
            if resp.status == 200 {
                let list: Vec<FunctionInfo> =
                    serde_json::from_slice(&resp.body).context("decode function list")?;
                println!(
                    "{:<24} {:<16} {:<16} {:>7} {:>9} {:>5}  PATH",
                    "NAME", "NAMESPACE", "HANDLER", "MEM_MB", "TIMEOUT", "WARM"
                );
                for f in list {
                    println!(
                        "{:<24} {:<16} {:<16} {:>7} {:>9} {:>5}  {}",
                        f.name,
                        f.namespace,
                        f.handler,
                        f.memory_mb,
                        f.timeout_ms,
                        f.warm_instances,
                        f.path
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            resp
        }
        FnCommand::Rm { name } => client.request(
            "DELETE",
            &ipc::api::function_path(namespace, &name, ""),
            None,
            b"",
        )?,
    };
    print_remote(resp.status, &resp.body, false)
}

fn serve(
    socket: &Path,
    state_dir: &Path,
    workers: usize,
    pool: &PoolArgs,
    http: &HttpArgs,
) -> anyhow::Result<ExitCode> {
    // Block the shutdown signals before any thread exists, so every thread inherits
    // the mask and one thread waits for them (the spawner clears its own mask).
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.thread_block().context("block signals")?;
    // Every client connection is a descriptor: allow as many as the hard limit does.
    // (Sandboxes get their own limit from their spec.)
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let agent = Agent::start(Config {
        state_root: state_dir.to_path_buf(),
        sandbox_uids: sandbox_uids(),
        pool: pool.config(),
        max_calls_in_flight: pool.max_calls_per_sandbox as usize,
        spawner: pool.spawner.clone(),
        ..Config::new()
    })
    .context("start the agent")?;
    let server = match agent::http::Server::bind(socket, http.limits()) {
        Ok(s) => s,
        Err(e) => {
            let _ = agent.shutdown();
            return Err(e).with_context(|| format!("serve on {}", socket.display()));
        }
    };
    let stop = server.shutdown_handle();
    let grace = http.shutdown_grace;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            // The first signal drains: no new connections, requests being handled
            // get the grace to finish. A second one ends the grace.
            match signals.wait() {
                Ok(sig) => {
                    tracing::info!(signal = ?sig, grace_ms = grace.as_millis() as u64, "shutting down");
                    stop.drain(grace);
                }
                Err(_) => {
                    stop.shutdown();
                    return;
                }
            }
            if let Ok(sig) = signals.wait() {
                tracing::info!(signal = ?sig, "second signal: ending the shutdown grace");
            }
            stop.shutdown();
        })
        .context("start signal thread")?;
    tracing::info!(socket = %socket.display(), "serving");
    let agent = Arc::new(agent);
    let served = server.run(agent.clone(), workers);
    agent.shutdown().context("shut the agent down")?;
    served.context("HTTP server")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod http_args_tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_are_milliseconds_or_seconds() {
        assert_eq!(parse_duration("500"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration(" 2 s"), Ok(Duration::from_secs(2)));
        for bad in [
            "",
            "0",
            "0s",
            "-1",
            "1.5s",
            "10m",
            "s",
            "99999999999999999999s",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(
                e.contains("milliseconds") && e.contains("seconds"),
                "{bad:?}: {e}"
            );
        }
    }
}
