//! `sprout serve`: the agent as a daemon serving the HTTP API on a Unix socket, and
//! with `--listen` on a TCP address too (keys, TLS), until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agent::{Agent, Config};
use anyhow::{bail, Context as _};
use clap::Args;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{SigSet, Signal};

use crate::Context;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Worker threads running requests.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Where what must outlive the daemon is kept (registrations, uploaded code, the
    /// package cache; activation records later). One daemon at a time.
    #[arg(long, value_name = "PATH", env = "SPROUT_DATA_DIR", default_value = agent::data_dir::DEFAULT_PATH)]
    data_dir: PathBuf,
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    install: InstallArgs,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    admission: AdmissionArgs,
    #[command(flatten)]
    records: RecordArgs,
    #[command(flatten)]
    tcp: TcpArgs,
    /// OpenWhisk's API host, given to every OpenWhisk activation as __OW_API_HOST
    /// (the URL its actions reach the API at; OpenWhisk's `whisk.api.host`).
    #[arg(long, value_name = "URL", value_parser = parse_api_host)]
    api_host: Option<String>,
    #[command(flatten)]
    invoker: InvokerArgs,
}

/// `--api-host`: a URL of printable characters, at most
/// [`agent::openwhisk::MAX_FIELD`] bytes.
fn parse_api_host(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= agent::openwhisk::MAX_FIELD
        && text.chars().all(|c| c.is_ascii_graphic());
    match ok {
        true => Ok(text.to_owned()),
        false => Err(format!(
            "{:?} is not an API host: give a URL (1 to {} printable characters, no spaces)",
            text.chars().take(80).collect::<String>(),
            agent::openwhisk::MAX_FIELD
        )),
    }
}

/// The OpenWhisk invoker contract (`POST /invoke` on --listen).
#[derive(Args, Debug)]
struct InvokerArgs {
    /// This node's invoker instance number (a controller's `invoker<N>`), named in
    /// every acknowledgement.
    #[arg(long, value_name = "N", default_value_t = 0)]
    invoker_id: u64,
    /// The memory this invoker offers for activations, as its acknowledgements name
    /// it (`userMemory`), MB (default: --memory-budget).
    #[arg(long, value_name = "MB")]
    user_memory: Option<u64>,
    /// The acknowledgement's key for the invoker: `invoker` (DigitalOcean's
    /// functions-invoker, and OpenWhisk before mid-2020) or `instance` (upstream
    /// OpenWhisk's InvokerInstanceId).
    #[arg(long, value_name = "invoker|instance", default_value = "invoker", value_parser = parse_ack_key)]
    ack_key: ipc::openwhisk::invoker::AckKey,
    /// OpenWhisk's CouchDB, `http[s]://[USER:PASSWORD@]HOST:PORT`: an activation
    /// whose action this node does not have at its revision fetches it from the
    /// `whisks` database; non-blocking activations' records go to `activations`.
    /// Give credentials through the environment (SPROUT_WHISKS_DB) rather than the
    /// command line, which other users can read.
    #[arg(
        long,
        value_name = "URL",
        env = "SPROUT_WHISKS_DB",
        hide_env_values = true
    )]
    whisks_db: Option<String>,
}

fn parse_ack_key(text: &str) -> Result<ipc::openwhisk::invoker::AckKey, String> {
    match text {
        "invoker" => Ok(ipc::openwhisk::invoker::AckKey::Invoker),
        "instance" => Ok(ipc::openwhisk::invoker::AckKey::Instance),
        other => Err(format!("{other:?} is neither invoker nor instance")),
    }
}

/// Admission control: what is refused with 429 before it is queued.
#[derive(Args, Debug)]
struct AdmissionArgs {
    /// Requests one function's queue may hold (waiting for an instance); one more is
    /// refused with 429 ("queue is full") and never enters it.
    #[arg(long, value_name = "N", default_value_t = agent::DEFAULT_MAX_QUEUE as u64, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    max_queue: u64,
    /// Client invocations one namespace may have in flight (queued or running) at
    /// once; 0 is unlimited. A namespace in --namespace-limits has its own.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=agent::admission::MAX_LIMIT))]
    namespace_concurrent: u64,
    /// Client invocations one namespace may start in any 60 seconds (a sliding
    /// window in one-second steps); 0 is unlimited.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=agent::admission::MAX_LIMIT))]
    namespace_per_minute: u64,
    /// Limits per namespace, one line each: `NAMESPACE concurrent=N per_minute=M`
    /// (a key left out takes the default above; `#` starts a comment line).
    #[arg(long, value_name = "FILE")]
    namespace_limits: Option<PathBuf>,
}

impl AdmissionArgs {
    fn limits(&self) -> anyhow::Result<agent::NamespaceLimits> {
        let defaults = agent::NamespaceLimit {
            concurrent: self.namespace_concurrent,
            per_minute: self.namespace_per_minute,
        };
        Ok(match &self.namespace_limits {
            Some(path) => agent::NamespaceLimits::load(path, defaults)?,
            None => agent::NamespaceLimits {
                defaults,
                ..Default::default()
            },
        })
    }
}

/// Activation records and asynchronous invocations.
#[derive(Args, Debug)]
struct RecordArgs {
    /// Finished activation records kept: the newest ones (accepted, unfinished ones
    /// are never removed).
    #[arg(long, value_name = "N", default_value_t = agent::activations::DEFAULT_MAX_COUNT, value_parser = clap::value_parser!(u64).range(1..))]
    activations_max: u64,
    /// Activation records older than this (by start) are removed: 7d, 12h, 30m, 90s.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_age)]
    activations_max_age: Duration,
    /// Keep no activation records (ids are still answered; `?blocking=false` is
    /// refused). For measuring what records cost.
    #[arg(long)]
    no_records: bool,
    /// Threads running accepted asynchronous invocations (each waits in its
    /// function's queue like a client's request).
    #[arg(long, value_name = "N", default_value_t = agent::DEFAULT_ASYNC_WORKERS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    async_workers: usize,
}

/// A retention age: humantime's units (`7d`, `12h`, `30m`, `90s`), at least a second.
fn parse_age(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .ok()
        .filter(|d| *d >= Duration::from_secs(1))
        .ok_or_else(|| {
            format!(
                "{text:?} is not an age: give a number and a unit (7d, 12h, 30m, 90s), at least 1s"
            )
        })
}

/// The TCP listener.
#[derive(Args, Debug)]
struct TcpArgs {
    /// Also serve the API on this TCP address (an IP address and port:
    /// `127.0.0.1:8080`, `[::1]:8080`, `0.0.0.0:443`; port 0 picks a free one, which
    /// the log names: "listening on http://ADDR"). Needs --auth or --no-auth.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The keys --listen accepts (HTTP basic auth): one a line, `NAMESPACE UUID:KEY`,
    /// `*` as the namespace for a key that acts in every one; blank lines and `#`
    /// comments allowed. The file must not be readable or writable by others.
    #[arg(long, value_name = "FILE", requires = "listen")]
    auth: Option<PathBuf>,
    /// Serve --listen without keys: only on a loopback address (127.0.0.0/8, ::1).
    #[arg(long, requires = "listen", conflicts_with = "auth")]
    no_auth: bool,
    /// TLS on --listen: the certificate chain (PEM). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires_all = ["listen", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// TLS on --listen: the certificate's private key (PEM). Needs --tls-cert.
    #[arg(long, value_name = "FILE", requires_all = ["listen", "tls_cert"])]
    tls_key: Option<PathBuf>,
}

/// What `--listen` serves, checked before anything starts.
struct Tcp {
    addr: SocketAddr,
    keys: Option<agent::http::Keys>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl TcpArgs {
    fn check(&self) -> anyhow::Result<Option<Tcp>> {
        let Some(addr) = self.listen else {
            return Ok(None);
        };
        let keys = match (&self.auth, self.no_auth) {
            (Some(file), _) => Some(
                agent::http::Keys::load(file).with_context(|| format!("--listen {addr}: --auth"))?,
            ),
            (None, true) if addr.ip().is_loopback() => None,
            (None, true) => bail!(
                "--listen {addr}: --no-auth is allowed only on a loopback address (127.0.0.0/8, ::1); give keys with --auth FILE"
            ),
            (None, false) => bail!(
                "--listen {addr}: give the keys it accepts with --auth FILE, or serve without keys with --no-auth (loopback addresses only)"
            ),
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(
                agent::http::tls_config(cert, key).with_context(|| format!("--listen {addr}"))?,
            ),
            _ => None,
        };
        Ok(Some(Tcp { addr, keys, tls }))
    }
}

/// Install sandboxes (functions' packages).
#[derive(Args, Debug)]
struct InstallArgs {
    /// The memory limit of each install sandbox (pip or npm, and any build they run).
    #[arg(long, value_name = "MiB", default_value_t = 250, value_parser = clap::value_parser!(u64).range(64..=65536))]
    install_memory_mb: u64,
    /// How long resolving or installing one package may take (then the registration
    /// fails): milliseconds or seconds.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    install_timeout: Duration,
    /// The PEP 503 simple index pip installs Python packages from (a mirror, as
    /// OpenLambda's pip_mirror). The node's choice: requirement lines cannot change it.
    #[arg(long, value_name = "URL", default_value = agent::packages::DEFAULT_INDEX, value_parser = parse_index)]
    package_index: String,
    /// The registry npm installs Node.js packages from; lock entries resolved
    /// anywhere else are refused.
    #[arg(long, value_name = "URL", default_value = agent::packages::npm::DEFAULT_REGISTRY, value_parser = parse_registry)]
    npm_registry: String,
}

fn parse_index(url: &str) -> Result<String, String> {
    agent::packages::source_url("--package-index", url).map_err(|e| e.to_string())
}

fn parse_registry(url: &str) -> Result<String, String> {
    agent::packages::source_url("--npm-registry", url).map_err(|e| e.to_string())
}

/// The daemon's warm pool.
#[derive(Args, Debug)]
struct PoolArgs {
    /// Prewarmed, frozen sandboxes kept ready, per runtime: `python=2,nodejs=1,native=1`
    /// (a runtime left out has none), or a bare number of Python ones.
    #[arg(long, value_name = "N|RUNTIME=N,...", default_value = "2", value_parser = agent::StemCells::parse)]
    stem_cells: agent::StemCells,
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
    /// How new sandboxes are made: `fork` (from the fork server's zygote, falling
    /// back to libcontainer when it cannot) or `create` (libcontainer, every time).
    #[arg(long, value_name = "fork|create", default_value = "fork", value_parser = agent::NewSandboxes::parse)]
    new_sandboxes: agent::NewSandboxes,
    /// Memory the package zygotes (fork servers whose zygote imported a package set
    /// of a namespace's functions) may take together, each counted at its memory limit
    /// (its usage once imported, and headroom for its forks); 0 turns them off.
    #[arg(long, value_name = "MiB", default_value_t = agent::DEFAULT_PACKAGE_ZYGOTES_MB)]
    package_zygotes_mb: u64,
    /// Ready (frozen) stem cells kept forked from each package zygote.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=16))]
    package_stem_cells: u64,
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
            pause_grace: Duration::from_millis(self.pause_grace),
            idle_ttl: Duration::from_secs(self.idle_ttl),
            memory_budget_mb: self
                .memory_budget
                .unwrap_or_else(agent::default_memory_budget_mb),
            stem_cells: self.stem_cells,
            new_sandboxes: self.new_sandboxes,
            package_zygotes_mb: self.package_zygotes_mb,
            package_stem_cells: self.package_stem_cells as usize,
        }
    }
}

/// The daemon's API connections and shutdown.
#[derive(Args, Debug)]
struct HttpArgs {
    /// Connections open at most on each listener (the Unix socket, --listen); more
    /// are answered 503 and closed at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// A request head, then its body, must arrive within this long (else 408):
    /// milliseconds (`500`, `500ms`) or seconds (`10s`).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    read_timeout: Duration,
    /// An idle connection (no request begun) is closed after this long.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    keep_alive_timeout: Duration,
    /// On SIGTERM/SIGINT, requests being handled get this long to finish before they
    /// are answered 503 (a second signal ends it): milliseconds or seconds.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// An OpenWhisk blocking invocation (`/api/v1`) still running after this long is
    /// answered 202 with its activation id, and finishes in the background
    /// (OpenWhisk's 60 s).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    openwhisk_wait: Duration,
}

impl HttpArgs {
    fn limits(&self) -> agent::http::Limits {
        agent::http::Limits {
            read_timeout: self.read_timeout,
            idle_timeout: self.keep_alive_timeout,
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            openwhisk_wait: self.openwhisk_wait,
            ..agent::http::Limits::default()
        }
    }
}

/// `500` or `500ms` (milliseconds), `10s` (seconds); at least 1 ms.
fn parse_duration(text: &str) -> Result<Duration, String> {
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
    Ok(Duration::from_millis(ms))
}

pub fn run(cx: &Context, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let Some(socket) = &cx.socket else {
        bail!("serve needs --socket PATH (or SPROUT_SOCKET)");
    };
    // Keys and certificates are read before anything starts: a bad one starts nothing.
    let tcp = args.tcp.check()?;
    // Block the shutdown signals before any thread exists, so every thread inherits
    // the mask and one thread waits for them (the spawner clears its own mask).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("block signals")?;
    // Every client connection is a descriptor: allow as many as the hard limit does.
    // (Sandboxes get their own limit from their spec.)
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    // Before anything starts: a bad limits file stops serve, naming the line.
    let namespace_limits = args.admission.limits()?;
    if let Some(url) = &args.invoker.whisks_db {
        agent::openwhisk::invoker::WhiskInvoker::check_url(url)?;
    }
    let pool = args.pool.config();
    let agent = Agent::start(Config {
        state_root: cx.state_dir.clone(),
        sandbox_uids: cx.sandbox_uids,
        pool,
        max_calls_in_flight: args.pool.max_calls_per_sandbox as usize,
        spawner: args.pool.spawner.clone(),
        data_dir: Some(args.data_dir.clone()),
        install_limits: agent::InstallLimits {
            memory_mb: args.install.install_memory_mb,
            timeout: args.install.install_timeout,
        },
        package_sources: agent::PackageSources::new(
            &args.install.package_index,
            &args.install.npm_registry,
        )?,
        max_queue: args.admission.max_queue as usize,
        namespace_limits,
        no_records: args.records.no_records,
        activations: agent::activations::Retention {
            max_count: args.records.activations_max,
            max_age: args.records.activations_max_age,
        },
        async_workers: args.records.async_workers,
        api_host: args.api_host.clone(),
        openwhisk_invoker: agent::openwhisk::invoker::Settings {
            instance: args.invoker.invoker_id,
            user_memory_mb: args.invoker.user_memory.unwrap_or(pool.memory_budget_mb),
            ack_key: args.invoker.ack_key,
            whisks_db: args.invoker.whisks_db.clone(),
        },
        ..Config::new()
    })
    .context("start the agent")?;
    let mut server = match agent::http::Server::bind(socket, args.http.limits()) {
        Ok(s) => s,
        Err(e) => {
            let _ = agent.shutdown();
            return Err(e).with_context(|| format!("serve on {}", socket.display()));
        }
    };
    if let Some(Tcp { addr, keys, tls }) = tcp {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let key_count = keys.as_ref().map_or(0, |k| k.len());
        match server.listen(addr, tls, keys) {
            Ok(bound) => tracing::info!(keys = key_count, "listening on {scheme}://{bound}"),
            Err(e) => {
                drop(server);
                let _ = agent.shutdown();
                return Err(e).context("--listen");
            }
        }
    }
    let stop = server.shutdown_handle();
    let grace = args.http.shutdown_grace;
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
    let served = server.run(agent.clone(), args.workers);
    agent.shutdown().context("shut the agent down")?;
    served.context("HTTP server")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
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
