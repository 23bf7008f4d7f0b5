//! sprout's end-to-end latency harness.
//!
//! `cargo run -p bench --release -- skeleton [--runs N]` measures, on a release build:
//! the whole `sprout invoke examples/hello` process (embedded agent: start, sandbox,
//! invoke, clean-up), and cold and warm invokes of the same function through a daemon's
//! Unix socket. It prints a table and writes `target/sprout-bench/skeleton.json` (an
//! array of `{path, n, p50_us, p99_us, ...}`). The warm-pool issue grows this into the
//! full `latency` suite with runc/crun baselines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipc::client::Client;
use serde::Serialize;

#[derive(Serialize)]
struct Row {
    path: String,
    n: usize,
    p50_us: f64,
    p99_us: f64,
    min_us: f64,
    max_us: f64,
}

fn row(path: &str, mut samples: Vec<Duration>) -> Row {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let pct = |p: f64| us(samples[((samples.len() as f64 - 1.0) * p).round() as usize]);
    Row {
        path: path.to_owned(),
        n: samples.len(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        min_us: us(samples[0]),
        max_us: us(*samples.last().unwrap()),
    }
}

/// The workspace's target directory for this profile (where `sprout` was built).
fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .context("no parent of the bench binary")?
        .to_path_buf();
    if !dir.join("sprout").is_file() || !dir.join("sprout-shim").is_file() {
        bail!(
            "{} has no sprout/sprout-shim: run `cargo build --release --workspace --bins` first",
            dir.display()
        );
    }
    Ok(dir)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(bin: &Path) -> anyhow::Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("sprout-bench-").tempdir()?;
        let socket = dir.path().join("api.sock");
        let child = Command::new(bin.join("sprout"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start sprout serve")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Client::connect(&socket).is_err() {
            if Instant::now() > deadline {
                bail!("daemon did not come up on {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Daemon {
            child,
            socket,
            _dir: dir,
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn skeleton(runs: usize) -> anyhow::Result<Vec<Row>> {
    let bin = bin_dir()?;
    let hello = workspace().join("examples/hello");
    let mut rows = Vec::new();

    // Embedded: the whole process, as a user runs it.
    let mut samples = Vec::new();
    for _ in 0..runs.clamp(5, 50) {
        let t = Instant::now();
        let out = Command::new(bin.join("sprout"))
            .arg("invoke")
            .arg(&hello)
            .arg(r#"{"name":"Alice"}"#)
            .output()?;
        samples.push(t.elapsed());
        if !out.status.success() || out.stdout != b"\"Hello, Alice!\"\n" {
            bail!(
                "embedded invoke failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    rows.push(row("embedded hello (whole process)", samples));

    // Through the daemon: cold (new sandbox each time: re-registering retires the
    // warm instance), then warm.
    let daemon = Daemon::start(&bin)?;
    let mut client = Client::connect(&daemon.socket)?;
    let register = serde_json::json!({ "path": hello }).to_string();
    let mut cold = Vec::new();
    for _ in 0..runs.clamp(5, 30) {
        let r = client.request(
            "PUT",
            "/functions/hello",
            Some("application/json"),
            register.as_bytes(),
        )?;
        if r.status != 200 {
            bail!("register failed: {}", String::from_utf8_lossy(&r.body));
        }
        let t = Instant::now();
        let r = client.request(
            "POST",
            "/functions/hello/invoke",
            Some("application/json"),
            br#"{"name":"Alice"}"#,
        )?;
        cold.push(t.elapsed());
        if r.status != 200 || r.header("x-sprout-cold") != Some("true") {
            bail!(
                "cold invoke failed: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
    }
    rows.push(row("daemon cold invoke (new sandbox)", cold));
    let mut warm = Vec::new();
    for _ in 0..runs.max(100) {
        let t = Instant::now();
        let r = client.request(
            "POST",
            "/functions/hello/invoke",
            Some("application/json"),
            br#"{"name":"Alice"}"#,
        )?;
        warm.push(t.elapsed());
        if r.status != 200 || r.body != b"\"Hello, Alice!\"" {
            bail!(
                "warm invoke failed: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
    }
    rows.push(row("daemon warm invoke", warm));
    drop(client);
    drop(daemon);
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse())
        .transpose()
        .context("--runs takes a number")?
        .unwrap_or(100);
    let rows = match args.first().map(String::as_str) {
        Some("skeleton") => skeleton(runs)?,
        _ => bail!("usage: bench skeleton [--runs N]"),
    };
    println!(
        "{:<36} {:>5} {:>12} {:>12} {:>12} {:>12}",
        "path", "n", "p50 (µs)", "p99 (µs)", "min (µs)", "max (µs)"
    );
    for r in &rows {
        println!(
            "{:<36} {:>5} {:>12.0} {:>12.0} {:>12.0} {:>12.0}",
            r.path, r.n, r.p50_us, r.p99_us, r.min_us, r.max_us
        );
    }
    let out = workspace().join("target/sprout-bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join("skeleton.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&rows)?)?;
    println!("wrote {}", file.display());
    Ok(())
}
