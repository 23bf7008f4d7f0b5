//! The sprout paths of the latency suite, each against a daemon set up for it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipc::client::{Client, ClientResponse};
use serde_json::json;

use crate::daemon::{ok, Daemon};
use crate::stats::Row;

const EVENT: &[u8] = b"{}";

pub(crate) fn invoke(c: &mut Client, name: &str) -> anyhow::Result<ClientResponse> {
    let r = c.request(
        "POST",
        &format!("/functions/{name}/invoke"),
        Some("application/json"),
        EVENT,
    )?;
    ok(&r, "invoke")?;
    Ok(r)
}

pub(crate) fn expect_start(r: &ClientResponse, want: &str) -> anyhow::Result<()> {
    match r.header("x-sprout-start") {
        Some(got) if got == want => Ok(()),
        got => bail!("expected a {want} start, got {got:?}"),
    }
}

/// Never freeze, never evict: a warm instance stays running.
pub(crate) const KEEP_RUNNING: &[&str] = &["--stem-cells", "0", "--pause-grace", "3600000"];

/// A no-op function of one runtime, as the suite registers it.
pub struct Noop<'a> {
    /// The runtime's name (`python`, `nodejs`, `native`), as `--stem-cells` takes it.
    pub runtime: &'a str,
    pub dir: &'a Path,
    /// The handler, when not the runtime's default.
    pub handler: Option<&'a str>,
}

impl Noop<'_> {
    fn settings(&self) -> serde_json::Value {
        let mut settings = json!({ "runtime": self.runtime });
        if let Some(handler) = self.handler {
            settings["handler"] = json!(handler);
        }
        settings
    }
}

/// Warm invoke of a no-op function through the daemon's socket (keep-alive).
pub fn warm(bin: &Path, label: &str, noop: &Noop, runs: usize) -> anyhow::Result<Row> {
    let d = Daemon::start(bin, KEEP_RUNNING)?;
    let mut c = d.client()?;
    d.register(&mut c, "noop", noop.dir, noop.settings())?;
    invoke(&mut c, "noop")?;
    for _ in 0..runs / 10 {
        invoke(&mut c, "noop")?; // warm-up
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let r = invoke(&mut c, "noop")?;
        samples.push(t.elapsed());
        expect_start(&r, "warm")?;
    }
    Ok(Row::new(label, &samples))
}

/// Idle time before each frozen (and idle-control) invoke.
const IDLE_GAP: Duration = Duration::from_millis(10);

/// Invoke of a warm function whose sandbox is frozen (thaw + invoke), each after
/// [`IDLE_GAP`] idle; and, as a control, a warm instance that is never frozen after
/// the same gap: the difference is what freezing costs, the rest is waking up an
/// idle machine.
pub fn frozen(bin: &Path, noop: &Path, runs: usize) -> anyhow::Result<(Row, Row)> {
    let mut rows = Vec::new();
    for (grace, start, path) in [
        (
            "1",
            "thawed",
            "frozen warm invoke (thaw + invoke, after 10 ms idle)",
        ),
        ("3600000", "warm", "  control: warm invoke after 10 ms idle"),
    ] {
        let d = Daemon::start(bin, &["--stem-cells", "0", "--pause-grace", grace])?;
        let mut c = d.client()?;
        d.register(&mut c, "noop", noop, json!({}))?;
        invoke(&mut c, "noop")?;
        // Only samples that took the path count: a busy machine may not have frozen
        // the instance within the gap.
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            std::thread::sleep(IDLE_GAP);
            let t = Instant::now();
            let r = invoke(&mut c, "noop")?;
            let took = t.elapsed();
            if expect_start(&r, start).is_ok() {
                samples.push(took);
            }
        }
        if samples.len() < runs.div_ceil(2) {
            bail!(
                "{path}: only {} of {runs} invokes started {start}",
                samples.len()
            );
        }
        rows.push(Row::new(path, &samples));
    }
    let control = rows.pop().expect("two rows");
    Ok((rows.pop().expect("two rows"), control))
}

/// Cold invoke: a function never invoked before, from a stem cell of its runtime or,
/// with `stem_cells` 0, from a new sandbox. Each function is removed after its invoke.
pub fn cold(
    bin: &Path,
    path: &str,
    noop: &Noop,
    runs: usize,
    stem_cells: usize,
) -> anyhow::Result<Row> {
    let target = format!("{}={stem_cells}", noop.runtime);
    let d = Daemon::start(bin, &["--stem-cells", &target, "--pause-grace", "3600000"])?;
    let mut c = d.client()?;
    let start = if stem_cells > 0 {
        "stem_cell"
    } else {
        "new_sandbox"
    };
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + 2 {
        // Only measure with the pool full (stem cells made and frozen).
        d.wait_status(&mut c, "stem cells", |s| {
            s["stem_cells"].as_u64() == Some(stem_cells as u64)
                && s["frozen"].as_u64() >= Some(stem_cells as u64)
        })?;
        let name = format!("cold{i}");
        d.register(&mut c, &name, noop.dir, noop.settings())?;
        let t = Instant::now();
        let r = invoke(&mut c, &name)?;
        let took = t.elapsed();
        expect_start(&r, start)?;
        if i >= 2 {
            samples.push(took); // the first two warm up caches
        }
        let r = c.request("DELETE", &format!("/functions/{name}"), None, b"")?;
        ok(&r, "remove")?;
    }
    Ok(Row::new(path, &samples))
}

/// `clients` concurrent keep-alive clients invoking a no-op for `duration`.
pub fn throughput(
    bin: &Path,
    noop: &Path,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Row> {
    let d = Daemon::start(bin, KEEP_RUNNING)?;
    let mut c = d.client()?;
    d.register(&mut c, "noop", noop, json!({ "max_instances": 4 }))?;
    // Make the instances first, so the run measures warm throughput.
    std::thread::scope(|s| {
        for _ in 0..clients.min(4) {
            s.spawn(|| -> anyhow::Result<()> {
                let mut c = d.client()?;
                invoke(&mut c, "noop").map(drop)
            });
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let results: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                let d = &d;
                s.spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let mut c = d.client()?;
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        invoke(&mut c, "noop")?;
                        lat.push(t.elapsed());
                    }
                    Ok(lat)
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().expect("client thread"))
            .collect()
    });
    let elapsed = started.elapsed();
    let mut all = Vec::new();
    for r in results {
        all.extend(r.context("throughput client")?);
    }
    let ops = all.len() as f64 / elapsed.as_secs_f64();
    Ok(Row::new(&format!("throughput, {clients} clients (no-op)"), &all).with_ops_per_s(ops))
}
