//! `sprout`: the command line. Parses arguments, turns them into agent requests
//! (embedded, or over a daemon's Unix socket or TCP listener), prints results, maps errors to exit
//! codes. One module per subcommand; what they share is here ([`Context`],
//! [`LimitArgs`], reading an event) and in [`print`].
//!
//! Exit codes: 1 the function failed, 2 the request was wrong, 3 sprout failed, 4 a
//! limit refused the request (429: try again later) ([`agent::ErrorKind::exit_code`]).

#![allow(clippy::result_large_err)] // see agent/src/lib.rs

mod activation;
mod embedded;
mod function;
mod invoke;
mod package;
mod print;
mod serve;
mod status;
mod workflow;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use agent::EXIT_BAD_REQUEST;
use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use ipc::api::FunctionConfig;
use ipc::client::Client;

/// sprout: a latency-first worker runtime for serverless functions.
#[derive(Parser, Debug)]
#[command(name = "sprout", version, about)]
struct Cli {
    /// Talk to the daemon on this Unix socket instead of running an embedded agent.
    #[arg(long, global = true, env = "SPROUT_SOCKET")]
    socket: Option<PathBuf>,
    /// Talk to the daemon's TCP listener (`sprout serve --listen`) instead:
    /// http://HOST:PORT or https://HOST:PORT. Not with --socket.
    #[arg(long, global = true, env = "SPROUT_URL", value_name = "URL")]
    url: Option<String>,
    /// The key sent to --url (HTTP basic auth), UUID:KEY. Prefer SPROUT_KEY: a
    /// command line is visible to every user of the machine.
    #[arg(
        long,
        global = true,
        env = "SPROUT_KEY",
        value_name = "UUID:KEY",
        hide_env_values = true
    )]
    key: Option<String>,
    /// The CA certificates (PEM) an https --url's certificate must chain to
    /// (default: /etc/ssl/certs/ca-certificates.crt).
    #[arg(long, global = true, env = "SPROUT_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Invoke a function: a directory (embedded agent) or, with --socket or --url, a
    /// registered name.
    Invoke(invoke::InvokeArgs),
    /// Declarative workflows.
    #[command(subcommand)]
    Workflow(workflow::WorkflowCommand),
    /// Run the agent as a daemon serving the HTTP API on a Unix socket (and TCP with
    /// --listen).
    Serve(Box<serve::ServeArgs>),
    /// Manage functions registered on the daemon.
    #[command(subcommand)]
    Fn(function::FnCommand),
    /// The daemon's package cache.
    #[command(subcommand)]
    Pkg(package::PkgCommand),
    /// Show the daemon's status.
    Status,
    /// Activation records on the daemon: one record, its result or logs, or a listing.
    #[command(subcommand)]
    Activation(activation::ActivationCommand),
}

/// The global options every subcommand runs with, checked.
pub struct Context {
    /// The daemon's socket (`serve`: the one it serves).
    pub socket: Option<PathBuf>,
    /// The daemon's TCP listener, and how to reach it.
    pub url: Option<(String, ipc::client::TcpOptions)>,
    pub state_dir: PathBuf,
    pub namespace: String,
    pub sandbox_uids: rootfs::SandboxUids,
}

impl Context {
    /// Whether the commands talk to a daemon (else they run an embedded agent).
    pub fn remote(&self) -> bool {
        self.socket.is_some() || self.url.is_some()
    }

    /// Whether the daemon is reached over the network: it then takes functions only
    /// as uploads.
    pub fn over_tcp(&self) -> bool {
        self.url.is_some()
    }

    /// A connection to the daemon, for the commands that talk to one.
    pub fn client(&self) -> anyhow::Result<Client> {
        match (&self.url, &self.socket) {
            (Some((url, options)), _) => Ok(Client::connect_url(url, options)?),
            (None, Some(socket)) => Ok(Client::connect(socket)?),
            (None, None) => bail!("this command talks to a daemon: pass --socket PATH (or SPROUT_SOCKET), or --url URL (or SPROUT_URL) for its TCP listener (start one with `sprout serve --socket PATH`)"),
        }
    }
}

/// A function's settings, as `invoke` (embedded) and `fn add` take them.
#[derive(Args, Debug, Default)]
pub struct LimitArgs {
    /// Language runtime: python, nodejs or native, optionally with the installed
    /// version (python:3.11, nodejs:20, nodejs:default). Default: detected from the
    /// directory (f.py or the handler's .py; package.json, index.js, main.js,
    /// activity.json; exec, bootstrap).
    #[arg(long, value_name = "RUNTIME[:VERSION]")]
    runtime: Option<String>,
    /// Network: none (only the sandbox's own loopback) or egress (outbound IPv4 and
    /// the host's DNS; default none).
    #[arg(long, value_name = "none|egress")]
    network: Option<String>,
    /// Handler. Python: module:function (default f:f, i.e. f.py with def f(event)).
    /// Node.js: file.export or file:export (default: the directory's module). Native:
    /// the executable's file name (default exec, else bootstrap).
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

impl LimitArgs {
    pub fn config(&self) -> FunctionConfig {
        FunctionConfig {
            runtime: self.runtime.clone(),
            network: self.network.clone(),
            handler: self.handler.clone(),
            memory_mb: self.memory,
            timeout_ms: self.timeout,
            pids: self.pids,
            cpus: self.cpus,
            max_instances: self.max_instances,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Serve(_)));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sprout: {}", chain(&e));
            // An agent's error (starting or stopping the embedded agent) says whose
            // fault it was; anything else here is about the command line or its input.
            match e.downcast_ref::<agent::Error>() {
                Some(err) => print::exit_code(err.kind()),
                None => ExitCode::from(EXIT_BAD_REQUEST),
            }
        }
    }
}

/// Logs to stderr, filtered by `SPROUT_LOG`; coloured only on a terminal, and not
/// when `NO_COLOR` is set (<https://no-color.org>).
fn init_tracing(daemon: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPROUT_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if daemon {
            "info,libcgroups=error,libcontainer=warn"
        } else {
            "warn,libcgroups=error"
        })
    });
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .init();
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let sandbox_uids =
        rootfs::SandboxUids::new(cli.sandbox_uid_base, cli.sandbox_uids).map_err(|e| {
            anyhow::anyhow!(
                "--sandbox-uid-base {} --sandbox-uids {}: {e}",
                cli.sandbox_uid_base,
                cli.sandbox_uids
            )
        })?;
    if !matches!(cli.command, Command::Serve(_)) {
        agent::validate_namespace(&cli.namespace)?;
    }
    let serving = matches!(cli.command, Command::Serve(_));
    let url = match cli.url {
        Some(_) if serving => bail!("--url (SPROUT_URL) is for the commands that talk to a daemon; `serve` listens on TCP with --listen ADDR"),
        Some(_) if cli.socket.is_some() => bail!("give the daemon as --socket (SPROUT_SOCKET) or --url (SPROUT_URL), not both"),
        Some(url) => Some((
            url,
            ipc::client::TcpOptions {
                key: cli.key,
                ca_cert: cli.ca_cert,
            },
        )),
        None if cli.key.is_some() && !serving => {
            bail!("--key (SPROUT_KEY) goes with --url: the Unix socket takes no key")
        }
        None => None,
    };
    let cx = Context {
        url,
        socket: cli.socket,
        state_dir: cli.state_dir,
        namespace: cli.namespace,
        sandbox_uids,
    };
    match cli.command {
        Command::Serve(args) => serve::run(&cx, &args),
        Command::Invoke(args) => invoke::run(&cx, args),
        Command::Workflow(cmd) => workflow::run(&cx, cmd),
        Command::Fn(cmd) => function::run(&cx, cmd),
        Command::Pkg(cmd) => package::run(&cx, cmd),
        Command::Activation(cmd) => activation::run(&cx, cmd),
        Command::Status => status::run(&cx),
    }
}

/// Reads and validates an event (or input) argument before anything else happens:
/// JSON text, or `-` for stdin.
pub fn read_event(arg: &str) -> anyhow::Result<Vec<u8>> {
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
