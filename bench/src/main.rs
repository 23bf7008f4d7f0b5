//! sprout's end-to-end latency suite.
//!
//! `cargo run -p bench --release -- latency` measures, in one run on this host:
//! the whole `sprout invoke` process; warm, frozen-warm and cold (stem cell, empty
//! pool with the sandbox forked and created by libcontainer) invokes through a
//! daemon's Unix socket; a cold-start storm (32 new functions at once), both ways;
//! throughput with concurrent clients; and, as baselines, `runc run` and `crun run`
//! of an equivalent bundle running the same handler with `python3`, and a plain host
//! `python3` process. It prints a table, writes `target/sprout-bench/latency.json`
//! (`path`, `n`, `p50_us`, `p99_us`; throughput rows add `ops_per_s`) and one
//! latency-distribution plot (SVG) per path under `target/sprout-bench/plots/`. Then
//! the memory of idle stem cells, forked and created (see `memory.rs`): a table of its
//! own and `target/sprout-bench/memory.json`. Among the rows: a warm invoke with
//! activation records on against `--no-records`, side by side, and asynchronous
//! invocations against blocking ones (`records.rs`); `bench records` measures only
//! those.
//!
//! `cargo run -p bench --release -- deps` measures cold starts of functions that
//! import packages (numpy, pandas; `--quick`: six) from an empty package cache, with
//! the packages cached, and from a package-aware zygote, against `runc run` with the
//! packages in its rootfs and the host merely importing them (see `deps.rs`); it
//! writes `target/sprout-bench/deps.json`.
//!
//! `cargo run -p bench --release -- guard` is the regression guard CI runs: each hot
//! path against a baseline measured interleaved in the same run; it exits non-zero
//! when a path is over its bound twice (see `guard.rs`).

mod baseline;
mod daemon;
mod deps;
mod guard;
mod latency;
mod memory;
mod oneshot;
mod plot;
mod records;
mod stats;
mod workflows;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use latency::NewSandboxes;
use stats::Row;

/// How much to measure: `--quick` is a smoke run (CI-sized), the default is for
/// the README table.
struct Settings {
    warm_runs: usize,
    frozen_runs: usize,
    cold_runs: usize,
    process_runs: usize,
    clients: Vec<usize>,
    throughput_for: Duration,
    /// Rounds of the cold-start storm (each [`STORM_WIDTH`] invokes).
    storm_rounds: usize,
    /// Stem cells whose memory is measured.
    memory_stem_cells: usize,
    /// Asynchronous invocations against blocking ones.
    burst: records::Burst,
}

/// Functions invoked at once in the cold-start storm.
const STORM_WIDTH: usize = 32;

impl Settings {
    fn from_args(args: &[String]) -> anyhow::Result<Settings> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut s = if quick {
            Settings {
                warm_runs: 200,
                frozen_runs: 20,
                cold_runs: 5,
                process_runs: 3,
                clients: vec![1, 16],
                throughput_for: Duration::from_millis(500),
                storm_rounds: 1,
                memory_stem_cells: 4,
                burst: records::Burst {
                    n: 200,
                    clients: 4,
                    rounds: 1,
                },
            }
        } else {
            Settings {
                warm_runs: 2000,
                frozen_runs: 200,
                cold_runs: 50,
                process_runs: 30,
                clients: vec![1, 4, 16, 64],
                throughput_for: Duration::from_secs(3),
                storm_rounds: 5,
                memory_stem_cells: 8,
                burst: records::Burst {
                    n: 2000,
                    clients: 4,
                    rounds: 2,
                },
            }
        };
        if let Some(i) = args.iter().position(|a| a == "--clients") {
            let list = args
                .get(i + 1)
                .context("--clients takes a list, e.g. 1,4,16")?;
            s.clients = list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .context("--clients")?;
        }
        Ok(s)
    }
}

/// The value after `flag` in `args`, if the flag is there.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
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

/// The whole `sprout invoke DIR` process: embedded agent, one sandbox, clean-up.
fn embedded(bin: &Path, hello: &Path, runs: usize) -> anyhow::Result<Row> {
    let samples = (0..runs)
        .map(|_| oneshot::embedded_once(bin, hello))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Row::new(oneshot::SPROUT, &samples))
}

/// The native no-op (`examples/noop-native/exec.c`) compiled with `cc -O2` into a
/// new directory the sandbox user can read.
fn native_noop(ws: &Path) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("sprout-bench-native-")
        .tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let out = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(dir.path().join("exec"))
        .arg(ws.join("examples/noop-native/exec.c"))
        .output()
        .context("run cc")?;
    if !out.status.success() {
        bail!(
            "cc examples/noop-native/exec.c: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir)
}

fn latency(settings: &Settings) -> anyhow::Result<Vec<Row>> {
    let bin = bin_dir()?;
    let ws = workspace();
    let (hello, noop) = (ws.join("examples/hello"), ws.join("examples/noop"));
    let event = "{}";
    let mut rows = Vec::new();
    let mut step = |name: &str, row: anyhow::Result<Row>| -> anyhow::Result<()> {
        let row = row.with_context(|| name.to_owned())?;
        eprintln!(
            "  {:<54} p50 {:>10}  p99 {:>10}",
            row.path,
            stats::human(row.p50_us),
            stats::human(row.p99_us)
        );
        rows.push(row);
        Ok(())
    };
    let python = latency::Noop {
        runtime: "python",
        dir: &noop,
        handler: None,
    };
    let node_dir = ws.join("examples/noop-nodejs");
    let node = latency::Noop {
        runtime: "nodejs",
        dir: &node_dir,
        handler: None,
    };
    let native_dir = native_noop(&ws)?;
    let native = latency::Noop {
        runtime: "native",
        dir: native_dir.path(),
        handler: None,
    };
    step(
        "warm",
        latency::warm(
            &bin,
            "warm invoke (no-op, daemon socket)",
            &python,
            settings.warm_runs,
        ),
    )?;
    for (tls, label) in [
        (false, "warm invoke (no-op, TCP with a key)"),
        (true, "warm invoke (no-op, TLS with a key)"),
    ] {
        let (tcp, control) = latency::warm_tcp(&bin, label, &python, settings.warm_runs, tls)?;
        step("warm over TCP", Ok(tcp))?;
        step("warm over TCP, control", Ok(control))?;
    }
    let [head, body, own] = latency::warm_invoker(&bin, &python, settings.warm_runs)
        .context("POST /invoke warm (OpenWhisk's invoker contract)")?;
    step("invoker, early acknowledgement", Ok(head))?;
    step("invoker, acknowledgement body", Ok(body))?;
    step("invoker, control", Ok(own))?;
    let (on, off, delta) = records::warm_pair(&bin, &noop, settings.warm_runs)
        .context("warm invoke, records on and off")?;
    step("records on", Ok(on))?;
    step("records off", Ok(off))?;
    eprintln!(
        "  records add {} to the warm p50 (median over rounds of the difference)",
        stats::human(delta)
    );
    let (frozen, idle_control) = latency::frozen(&bin, &noop, settings.frozen_runs)?;
    step("frozen", Ok(frozen))?;
    step("idle control", Ok(idle_control))?;
    step(
        "cold from stem cell",
        latency::cold(
            &bin,
            "cold invoke from a stem cell",
            &python,
            settings.cold_runs,
            2,
            None,
        ),
    )?;
    step(
        "cold with empty pool",
        latency::cold(
            &bin,
            NEW_FORK,
            &python,
            settings.cold_runs,
            0,
            Some(NewSandboxes::Fork),
        ),
    )?;
    step(
        "cold with empty pool, libcontainer",
        latency::cold(
            &bin,
            NEW_CREATE,
            &python,
            settings.cold_runs,
            0,
            Some(NewSandboxes::Create),
        ),
    )?;
    for (made, path) in [
        (NewSandboxes::Fork, STORM_FORK),
        (NewSandboxes::Create, STORM_CREATE),
    ] {
        step(
            "storm",
            latency::storm(&bin, path, &noop, made, STORM_WIDTH, settings.storm_rounds),
        )?;
    }
    step(
        "node warm",
        latency::warm(
            &bin,
            "Node.js warm invoke (no-op, daemon socket)",
            &node,
            settings.warm_runs,
        ),
    )?;
    step(
        "node cold from stem cell",
        latency::cold(
            &bin,
            "Node.js cold invoke from a stem cell",
            &node,
            settings.cold_runs,
            2,
            None,
        ),
    )?;
    step(
        "node cold with empty pool",
        latency::cold(
            &bin,
            "Node.js cold invoke, empty pool (new sandbox)",
            &node,
            settings.cold_runs,
            0,
            None,
        ),
    )?;
    step(
        "native warm",
        latency::warm(
            &bin,
            "native actionloop warm invoke (no-op, C)",
            &native,
            settings.warm_runs,
        ),
    )?;
    for &c in &settings.clients {
        step(
            "throughput",
            latency::throughput(&bin, &noop, c, settings.throughput_for),
        )?;
    }
    for row in records::throughput(&bin, &noop, settings.burst)
        .context("asynchronous against blocking invocations")?
    {
        step("asynchronous", Ok(row))?;
    }
    step("embedded", embedded(&bin, &hello, settings.process_runs))?;
    let runs = settings.process_runs;
    step(
        "runc",
        baseline::runc_run(baseline::Lang::Python, &noop, event, runs)
            .map(|s| Row::new("runc run (same handler, python3)", &s)),
    )?;
    step(
        "runc node",
        baseline::runc_run(baseline::Lang::Node, &node_dir, event, runs)
            .map(|s| Row::new("runc run (same Node.js handler, node)", &s)),
    )?;
    step(
        "crun",
        baseline::crun_run(&noop, event, runs)
            .map(|s| Row::new("crun run (same handler, python3)*", &s)),
    )?;
    step(
        "crun wrapper",
        baseline::crun_wrapper_overhead(runs)
            .map(|s| Row::new("  * of which unshare + umount wrapper", &s)),
    )?;
    step(
        "host python",
        baseline::host_python(&noop, event, runs)
            .map(|s| Row::new("host python3 process (same handler)", &s)),
    )?;
    step(
        "host node",
        baseline::host_process(baseline::Lang::Node, &node_dir, event, runs)
            .map(|s| Row::new("host node process (same Node.js handler)", &s)),
    )?;
    Ok(rows)
}

/// The activation records' rows alone (`bench records`): the warm pair and the
/// asynchronous burst, as `bench latency` measures them.
fn records_rows(bin: &Path, settings: &Settings) -> anyhow::Result<Vec<Row>> {
    let noop = workspace().join("examples/noop");
    let (on, off, delta) = records::warm_pair(bin, &noop, settings.warm_runs)
        .context("warm invoke, records on and off")?;
    eprintln!(
        "  records add {} to the warm p50 (median over rounds of the difference)",
        stats::human(delta)
    );
    let mut rows = vec![on, off];
    rows.extend(
        records::throughput(bin, &noop, settings.burst)
            .context("asynchronous against blocking invocations")?,
    );
    Ok(rows)
}

const NEW_FORK: &str = "cold invoke, empty pool (new sandbox)";
const NEW_CREATE: &str = "cold invoke, empty pool (new sandbox, libcontainer)";
const STORM_FORK: &str = "cold-start storm, 32 new functions at once";
const STORM_CREATE: &str = "cold-start storm, 32 new functions at once (libcontainer)";

/// The memory of idle stem cells, forked and created.
fn memory(settings: &Settings) -> anyhow::Result<Vec<memory::MemoryRow>> {
    let bin = bin_dir()?;
    let mut rows = Vec::new();
    for made in [NewSandboxes::Fork, NewSandboxes::Create] {
        rows.extend(
            memory::idle(&bin, made, settings.memory_stem_cells)
                .with_context(|| format!("memory of idle stem cells ({})", made.arg()))?,
        );
    }
    Ok(rows)
}

/// The targets for new sandboxes, against this run's numbers.
fn print_targets(rows: &[Row], mem: &[memory::MemoryRow]) {
    let find = |path: &str| rows.iter().find(|r| r.path == path);
    let runc = find("runc run (same handler, python3)");
    if let (Some(on), Some(off)) = (find(records::WARM_ON), find(records::WARM_OFF)) {
        let added = on.p50_us - off.p50_us;
        println!(
            "records add {added:.1} µs to the warm p50 ({} with records, {} with \
             --no-records, side by side; target <= 10 µs: {})",
            stats::human(on.p50_us),
            stats::human(off.p50_us),
            met(added <= 10.0)
        );
    }
    for (path, label) in [(NEW_FORK, "forked"), (NEW_CREATE, "libcontainer")] {
        if let (Some(new), Some(runc)) = (find(path), runc) {
            let x = runc.p50_us / new.p50_us;
            println!(
                "cold start with an empty pool ({label}) vs runc run: {x:.2}x faster (p50; \
                 target >= 3.5x: {})",
                met(x >= 3.5)
            );
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (storm, new) in [(STORM_FORK, NEW_FORK), (STORM_CREATE, NEW_CREATE)] {
        if let (Some(storm), Some(new)) = (find(storm), find(new)) {
            // The storm's p99 against the time `cores` CPUs would take to make 32 new
            // sandboxes side by side, each at the single new-sandbox p50 (same way).
            let serial = STORM_WIDTH as f64 / cores as f64 * new.p50_us;
            let x = storm.p99_us / serial;
            println!(
                "{}: p99 {} = {x:.2} x (32 / {cores} cores x {} p50 {}) (target <= 1.5: {})",
                storm.path,
                stats::human(storm.p99_us),
                new.path,
                stats::human(new.p50_us),
                met(x <= 1.5)
            );
        }
    }
    let median_of = |prefix: &str| {
        mem.iter()
            .find(|r| r.what.starts_with(prefix))
            .map(|r| r.median_bytes)
    };
    let mib = |b: Option<u64>| b.map_or_else(|| "not measured".to_owned(), memory::human_bytes);
    let marginal = |made: &str| {
        mem.iter()
            .find(|r| r.what.starts_with("one more idle stem cell") && r.new_sandboxes == made)
            .map(|r| r.median_bytes)
    };
    if let Some(forked) = marginal("fork") {
        println!(
            "unique memory per idle stem cell (what one more costs the agent's cgroups): \
             forked {} ({} in its own cgroup), libcontainer {} ({} in its own) \
             (target <= 3 MiB: {})",
            memory::human_bytes(forked),
            mib(median_of("idle stem cell, cgroup memory usage (fork)")),
            mib(marginal("create")),
            mib(median_of("idle stem cell, cgroup memory usage (create)")),
            met(forked <= 3 << 20)
        );
    }
}

fn met(yes: bool) -> &'static str {
    if yes {
        "met"
    } else {
        "NOT met"
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (rows, mem) = match args.first().map(String::as_str) {
        Some("latency") => {
            let settings = Settings::from_args(&args)?;
            eprintln!("measuring (release build recommended; this takes a few minutes)...");
            (latency(&settings)?, memory(&settings)?)
        }
        Some("records") => {
            // Only the rows of activation records (`bench latency` measures them too).
            let settings = Settings::from_args(&args)?;
            eprintln!("measuring what activation records cost (release build recommended)...");
            let rows = records_rows(&bin_dir()?, &settings)?;
            print_targets(&rows, &[]);
            return write_rows("records", &rows);
        }
        Some("memory") => {
            let settings = Settings::from_args(&args)?;
            eprintln!("measuring the memory of idle stem cells...");
            (Vec::new(), memory(&settings)?)
        }
        Some("workflows") => {
            let quick = args.iter().any(|a| a == "--quick");
            let n = if quick { 5 } else { 30 };
            let settings = workflows::Settings {
                chain_runs: n,
                transfer_runs: if quick { 3 } else { 20 },
                fan_runs: n,
                call_runs: if quick { 50 } else { 500 },
                only: flag_value(&args, "--only"),
            };
            eprintln!("measuring workflows (release build recommended)...");
            let rows = workflows::run(&bin_dir()?, &workspace(), &settings)?;
            return write_rows("workflows", &rows);
        }
        Some("deps") => {
            let settings = deps::Settings::from_args(&args)?;
            eprintln!(
                "measuring cold starts with packages (release build recommended; installs \
                 from the package index, this takes a while)..."
            );
            let outcome = deps::run(&bin_dir()?, &workspace(), &settings)?;
            stats::print(&outcome.rows);
            for line in deps::targets(&outcome, settings.functions) {
                println!("{line}");
            }
            return write_rows("deps", &outcome.rows);
        }
        Some("oneshot") => {
            let quick = args.iter().any(|a| a == "--quick");
            eprintln!("measuring one-shot runs, interleaved (release build recommended)...");
            let rows = oneshot::run(&bin_dir()?, &workspace(), if quick { 5 } else { 30 })?;
            stats::print(&rows);
            if let Some(verdict) = oneshot::verdict(&rows) {
                println!("{verdict}");
            }
            return write_rows("oneshot", &rows);
        }
        Some("guard") => {
            let only = match args.iter().position(|a| a == "--only") {
                Some(i) => args
                    .get(i + 1)
                    .context("--only takes a list of checks, e.g. warm,stem,new")?
                    .split(',')
                    .map(str::to_owned)
                    .collect(),
                None => Vec::new(),
            };
            eprintln!("guarding against performance regressions (release build recommended)...");
            return guard::run(
                &bin_dir()?,
                &workspace(),
                &guard::Settings::default(),
                &only,
            );
        }
        _ => bail!(
            "usage: bench latency [--quick] [--clients 1,4,16,64] | bench records [--quick] \
             | bench memory [--quick] | bench oneshot [--quick] \
             | bench workflows [--quick] [--only chain|call|transfer|fan] | bench deps [--quick] [--package-zygotes-mb MiB] \
             | bench guard [--only warm,stem,new]"
        ),
    };
    if !rows.is_empty() {
        stats::print(&rows);
    }
    memory::print(&mem);
    let find = |prefix: &str| {
        rows.iter()
            .find(|r| r.path.starts_with(prefix))
            .map(|r| r.p50_us)
    };
    if let (Some(stem), Some(runc)) = (find("cold invoke from a stem cell"), find("runc run")) {
        println!(
            "cold start from a stem cell vs runc run: {:.1}x faster (p50)",
            runc / stem
        );
    }
    if let (Some(stem), Some(runc)) = (
        find("Node.js cold invoke from a stem cell"),
        find("runc run (same Node.js handler"),
    ) {
        println!(
            "Node.js cold start from a stem cell vs runc run of node: {:.1}x faster (p50)",
            runc / stem
        );
    }
    print_targets(&rows, &mem);
    let out = workspace().join("target/sprout-bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join("memory.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&mem)?)?;
    if rows.is_empty() {
        println!("wrote {}", file.display());
        return Ok(());
    }
    write_rows("latency", &rows)
}

/// Writes `target/sprout-bench/<suite>.json` and a CDF plot per row.
fn write_rows(suite: &str, rows: &[Row]) -> anyhow::Result<()> {
    if !matches!(suite, "latency" | "deps" | "oneshot") {
        stats::print(rows);
    }
    let out = workspace().join("target/sprout-bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join(format!("{suite}.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(rows)?)?;
    for row in rows {
        plot::cdf(&out.join("plots"), row).with_context(|| format!("plot {}", row.path))?;
    }
    println!(
        "wrote {} and plots in {}",
        file.display(),
        out.join("plots").display()
    );
    Ok(())
}
