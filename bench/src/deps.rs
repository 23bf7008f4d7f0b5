//! The `deps` suite (issue 13): cold starts of Python functions that import packages
//! (`examples/deps-numpy`, `examples/deps-pandas`; `--quick`: `examples/deps-six`),
//! each function's rows side by side with baselines measured in the same run.
//!
//! For each function, every row invokes it with the event `{}` and checks the answer
//! against what the host's `python3` prints for the handler with the same
//! requirements installed (so each row really imported the pinned packages):
//!
//! - **(a) first ever**: a daemon with an empty package cache (each iteration a new
//!   daemon, so a new `--data-dir`), timed twice: the registration (pip's resolution
//!   and every package's install, each in its install sandbox, from the index) and the
//!   first invoke after it (a new sandbox). The status counters must show packages
//!   installed and no cache hit.
//! - **(b) packages cached, new sandbox**: one daemon with no stem cells and package
//!   zygotes off (`--package-zygotes-mb 0`); a seed function installs the packages,
//!   then each sample registers a new function with the same requirements (cache hits
//!   only: the install counter must not move), times its first invoke, which must start
//!   in a new sandbox forked from the fork server (`X-Sprout-Start: new_sandbox`, the
//!   status counters), and removes it.
//! - **(c) package-aware zygote**: as (b) on a daemon with package zygotes on
//!   (`--package-zygotes-mb BUDGET`); the seed function's cold start asks for one, the
//!   suite waits for it (`GET /status`, `package_zygotes`) and for its pool to
//!   settle (the frozen count: stem cells forked from it, if it keeps any), and each
//!   sample, with the pool back to that, must start from it
//!   (`X-Sprout-Start: package_zygote`). When `sprout serve` has no
//!   `--package-zygotes-mb` yet, (c) is skipped with a printed note and (b) runs
//!   without the flag (there are no package zygotes to turn off then).
//! - **baselines**: `runc run` of the same handler with the packages pre-installed
//!   (`baseline::install_site`, bind-mounted into the bundle's rootfs), and the host's
//!   `/usr/bin/python3 -c "import MODULE"` with `PYTHONPATH` at the same directory.
//!
//! Samples of (b) and (c) come after 2 warm-up samples; the baselines do their own
//! warm-ups. Every registration resolves through the index again (only the installs
//! are cached), so a registration the agent refuses for its packages (the index
//! unreachable for a moment) is tried again, up to 3 times; in (a) the iteration
//! starts again with a new daemon, and the failed attempt is not a sample. Each daemon, bundle and package directory is removed when its row ends.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ipc::client::{Client, ClientResponse};
use serde_json::{json, Value};

use crate::baseline;
use crate::daemon::{ok, Daemon};
use crate::latency::{expect_start, invoke, NewSandboxes};
use crate::stats::{self, Row};

/// `sprout serve`'s flag for the package zygotes' memory budget (0: none).
pub const ZYGOTE_FLAG: &str = "--package-zygotes-mb";

/// The event every row sends.
const EVENT: &str = "{}";

/// Samples of (b) and (c) taken and thrown away first.
const WARM_UPS: usize = 2;

/// How long (c) waits for a package zygote of the set.
const ZYGOTE_WAIT: Duration = Duration::from_secs(120);

/// A function of the suite: `examples/<example>` (an `f.py` and a `requirements.txt`
/// with pinned versions) importing `module`.
#[derive(Debug, Clone, Copy)]
pub struct Function {
    /// Names its rows (`numpy: (c) package-aware zygote`).
    pub label: &'static str,
    pub example: &'static str,
    /// What the host-import baseline imports.
    pub module: &'static str,
}

/// The full run's functions: the numpy and pandas.
pub const FULL: &[Function] = &[
    Function {
        label: "numpy",
        example: "deps-numpy",
        module: "numpy",
    },
    Function {
        label: "pandas",
        example: "deps-pandas",
        module: "pandas",
    },
];

/// The quick run's function: a small pure-Python package (CI-sized downloads).
pub const QUICK: &[Function] = &[Function {
    label: "six",
    example: "deps-six",
    module: "six",
}];

/// How much to measure.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Iterations of (a), each installing from the index.
    pub first_runs: usize,
    /// Samples of (b) and (c) (each a registration, which resolves through pip).
    pub cold_runs: usize,
    /// Samples of each baseline.
    pub baseline_runs: usize,
    /// `--package-zygotes-mb` of the daemon of (c).
    pub zygote_budget_mb: u64,
    /// The functions measured.
    pub functions: &'static [Function],
}

impl Settings {
    /// `bench deps [--quick] [--package-zygotes-mb N]`.
    pub fn from_args(args: &[String]) -> anyhow::Result<Settings> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut s = if quick {
            Settings {
                first_runs: 1,
                cold_runs: 3,
                baseline_runs: 3,
                zygote_budget_mb: 1024,
                functions: QUICK,
            }
        } else {
            Settings {
                first_runs: 3,
                cold_runs: 20,
                baseline_runs: 20,
                zygote_budget_mb: 1024,
                functions: FULL,
            }
        };
        if let Some(i) = args.iter().position(|a| a == ZYGOTE_FLAG) {
            let v = args
                .get(i + 1)
                .with_context(|| format!("{ZYGOTE_FLAG} takes a number of MiB, e.g. 1024"))?;
            s.zygote_budget_mb = v
                .parse()
                .with_context(|| format!("{ZYGOTE_FLAG} {v:?}: not a number of MiB"))?;
            ensure!(
                s.zygote_budget_mb > 0,
                "{ZYGOTE_FLAG} 0 would measure no package zygote: give the budget of row (c)"
            );
        }
        Ok(s)
    }
}

/// Row names, one place.
fn path(f: &Function, row: &str) -> String {
    format!("{}: {row}", f.label)
}
pub const INSTALL: &str = "(a) first ever: registration (resolve + install)";
pub const FIRST_INVOKE: &str = "(a) first ever: first invoke (new sandbox)";
pub const CACHED: &str = "(b) packages cached, new sandbox";
pub const ZYGOTE: &str = "(c) package-aware zygote";
pub const RUNC: &str = "runc run (packages in rootfs)";

fn host_import_row(f: &Function) -> String {
    format!("host python3 -c \"import {}\"", f.module)
}

/// What the suite measured: its rows and why any row was skipped.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    pub skipped: Vec<String>,
}

/// Whether `sprout serve` takes `flag` (from its `--help`).
pub fn serve_accepts(bin: &Path, flag: &str) -> anyhow::Result<bool> {
    let out = Command::new(bin.join("sprout"))
        .args(["serve", "--help"])
        .output()
        .context("run sprout serve --help")?;
    ensure!(
        out.status.success(),
        "sprout serve --help: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(help_has_flag(&String::from_utf8_lossy(&out.stdout), flag))
}

/// Whether clap's help text lists `flag` (as a whole word: not `--flag-more`).
fn help_has_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let after = help[i + flag.len()..].chars().next();
        let before = help[..i].chars().next_back();
        !matches!(after, Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '-')
    })
}

/// The daemon flags of each row: (a) and (b) with package zygotes off (when the
/// flag exists), (c) with `budget` (`None`: the flag does not exist yet).
#[derive(Debug, PartialEq)]
struct DaemonArgs {
    off: Vec<String>,
    zygotes: Option<Vec<String>>,
}

impl DaemonArgs {
    fn new(zygote_flag: bool, budget_mb: u64) -> DaemonArgs {
        let base: Vec<String> = [
            "--stem-cells",
            "0",
            "--pause-grace",
            "3600000",
            "--new-sandboxes",
            NewSandboxes::Fork.arg(),
        ]
        .map(str::to_owned)
        .into();
        let with = |mb: u64| {
            let mut a = base.clone();
            a.extend([ZYGOTE_FLAG.to_owned(), mb.to_string()]);
            a
        };
        if zygote_flag {
            DaemonArgs {
                off: with(0),
                zygotes: Some(with(budget_mb)),
            }
        } else {
            DaemonArgs {
                off: base,
                zygotes: None,
            }
        }
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs the suite, printing each row as it is measured.
pub fn run(bin: &Path, ws: &Path, settings: &Settings) -> anyhow::Result<Outcome> {
    let zygote_flag = serve_accepts(bin, ZYGOTE_FLAG)?;
    let args = DaemonArgs::new(zygote_flag, settings.zygote_budget_mb);
    let mut outcome = Outcome::default();
    if !zygote_flag {
        let note = format!(
            "row (c) skipped: `sprout serve` has no {ZYGOTE_FLAG} yet (no package-aware \
             zygotes); row (b) runs without the flag"
        );
        eprintln!("  note: {note}");
        outcome.skipped.push(note);
    }
    for f in settings.functions {
        function(bin, ws, f, settings, &args, &mut outcome.rows)
            .with_context(|| format!("the {} function", f.label))?;
    }
    Ok(outcome)
}

fn step(rows: &mut Vec<Row>, row: Row) {
    eprintln!(
        "  {:<62} p50 {:>10}  p99 {:>10}",
        row.path,
        stats::human(row.p50_us),
        stats::human(row.p99_us)
    );
    rows.push(row);
}

/// Every row of one function.
fn function(
    bin: &Path,
    ws: &Path,
    f: &Function,
    settings: &Settings,
    args: &DaemonArgs,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let dir = ws.join("examples").join(f.example);
    let requirements = dir.join("requirements.txt");
    // The host's copy of the packages, for the baselines and the expected answer.
    let site = Site::install(&requirements)?;
    let expected: Value = {
        let text = baseline::host_reference(&dir, site.path(), EVENT)?;
        serde_json::from_str(&text).with_context(|| format!("the host printed {text:?}"))?
    };
    eprintln!("  {}: expected answer {expected}", f.label);

    let (install, first) = first_ever(bin, &dir, &expected, settings.first_runs, &args.off)
        .context("(a) first ever")?;
    step(rows, Row::new(&path(f, INSTALL), &install));
    step(rows, Row::new(&path(f, FIRST_INVOKE), &first));

    let cached = cold_starts(
        bin,
        &dir,
        &expected,
        settings.cold_runs,
        &args.off,
        Via::New,
    )
    .context("(b) packages cached, new sandbox")?;
    step(rows, Row::new(&path(f, CACHED), &cached));

    if let Some(zygotes) = &args.zygotes {
        let z = cold_starts(
            bin,
            &dir,
            &expected,
            settings.cold_runs,
            zygotes,
            Via::Zygote,
        )
        .context("(c) package-aware zygote")?;
        step(rows, Row::new(&path(f, ZYGOTE), &z));
    }

    let runc = baseline::runc_run_with_site(&dir, site.path(), EVENT, settings.baseline_runs)
        .context("runc run with the packages")?;
    step(rows, Row::new(&path(f, RUNC), &runc));
    let host = baseline::host_import(f.module, site.path(), settings.baseline_runs)
        .context("host import")?;
    step(rows, Row::new(&path(f, &host_import_row(f)), &host));
    Ok(())
}

/// A host directory with a `requirements.txt` installed (`baseline::install_site`),
/// removed when dropped.
struct Site {
    site: PathBuf,
    // Removes the directory when dropped.
    _dir: tempfile::TempDir,
}

impl Site {
    fn install(requirements: &Path) -> anyhow::Result<Site> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("sprout-bench-site-")
            .tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let t = Instant::now();
        baseline::install_site(requirements, &dir.path().join("site-packages"))?;
        eprintln!(
            "  installed {} on the host for the baselines ({})",
            requirements.display(),
            stats::human(t.elapsed().as_secs_f64() * 1e6)
        );
        let site = dir.path().join("site-packages");
        Ok(Site { site, _dir: dir })
    }

    fn path(&self) -> &Path {
        &self.site
    }
}

/// The package counters of `GET /status`: (installed, cache hits).
fn package_counters(d: &Daemon, c: &mut Client) -> anyhow::Result<(u64, u64)> {
    let s = d.status(c)?;
    let count = |field: &str| {
        s[field]
            .as_u64()
            .with_context(|| format!("GET /status has no {field}: {s}"))
    };
    Ok((count("packages_installed")?, count("package_cache_hits")?))
}

/// Registrations tried before a failing package install or resolution fails the row.
const ATTEMPTS: usize = 3;

/// Registers `dir` as `name`: `Ok(Err(message))` when the agent refused it for its
/// packages (`package_error`: pip could not resolve or install, typically the index
/// unreachable for a moment), any other failure an error.
fn try_register(c: &mut Client, name: &str, dir: &Path) -> anyhow::Result<Result<(), String>> {
    let body = json!({ "path": dir }).to_string();
    let r = c.request(
        "PUT",
        &format!("/functions/{name}"),
        Some("application/json"),
        body.as_bytes(),
    )?;
    if r.status == 400 {
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        if v["error"]["kind"] == "package_error" {
            let message = v["error"]["message"].as_str().unwrap_or("").to_owned();
            return Ok(Err(message));
        }
    }
    ok(&r, "register")?;
    Ok(Ok(()))
}

/// [`try_register`] up to [`ATTEMPTS`] times (for untimed registrations: the
/// packages are cached, but each registration resolves through the index again).
fn register(c: &mut Client, name: &str, dir: &Path) -> anyhow::Result<()> {
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        match try_register(c, name, dir)? {
            Ok(()) => return Ok(()),
            Err(message) => {
                eprintln!(
                    "  note: registering {name} failed (attempt {attempt}): {}",
                    tail(&message)
                );
                last = message;
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
    bail!("registering {name} failed {ATTEMPTS} times: {last}")
}

/// The end of a long message (pip's errors are at the end).
fn tail(message: &str) -> &str {
    let mut start = message.len().saturating_sub(300);
    while !message.is_char_boundary(start) {
        start += 1;
    }
    &message[start..]
}

/// Checks an invoke's answer against the host's.
fn check_answer(r: &ClientResponse, expected: &Value) -> anyhow::Result<()> {
    let got: Value = serde_json::from_slice(&r.body).with_context(|| {
        format!(
            "the answer is not JSON: {:?}",
            String::from_utf8_lossy(&r.body)
        )
    })?;
    ensure!(
        &got == expected,
        "the function answered {got}, the host's python3 {expected}"
    );
    Ok(())
}

/// (a): per iteration a new daemon (an empty package cache in its new data
/// directory): the registration's time and the first invoke's.
fn first_ever(
    bin: &Path,
    dir: &Path,
    expected: &Value,
    runs: usize,
    args: &[String],
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut installs, mut firsts) = (Vec::new(), Vec::new());
    let mut failures = 0;
    while installs.len() < runs {
        let d = Daemon::start(bin, &strs(args))?;
        let mut c = d.client()?;
        ensure!(
            package_counters(&d, &mut c)? == (0, 0),
            "a new daemon's package counters are not zero"
        );
        let t = Instant::now();
        let registered = try_register(&mut c, "first", dir)?;
        let took = t.elapsed();
        if let Err(message) = registered {
            // Not a sample: the iteration starts again with a new daemon (an empty
            // cache again).
            failures += 1;
            eprintln!(
                "  note: a first-ever registration failed: {}",
                tail(&message)
            );
            ensure!(
                failures < ATTEMPTS,
                "first-ever registrations failed {failures} times: {message}"
            );
            continue;
        }
        installs.push(took);
        let (installed, hits) = package_counters(&d, &mut c)?;
        ensure!(
            installed > 0 && hits == 0,
            "registering with an empty cache installed {installed} packages and found \
             {hits} cached: not a first install"
        );
        let before = NewSandboxes::made(&d, &mut c)?;
        let t = Instant::now();
        let r = invoke(&mut c, "first")?;
        firsts.push(t.elapsed());
        expect_start(&r, "new_sandbox")?;
        NewSandboxes::Fork.check_made(before, NewSandboxes::made(&d, &mut c)?, 1)?;
        check_answer(&r, expected)?;
    }
    Ok((installs, firsts))
}

/// How the samples of [`cold_starts`] must start.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    /// A new sandbox forked from the fork server (`new_sandbox`), importing the
    /// packages in its load.
    New,
    /// A package-aware zygote that imported them already (`package_zygote`).
    Zygote,
}

impl Via {
    fn start(self) -> &'static str {
        match self {
            Via::New => "new_sandbox",
            Via::Zygote => "package_zygote",
        }
    }
}

/// (b) and (c): first invokes of new functions whose packages are cached.
fn cold_starts(
    bin: &Path,
    dir: &Path,
    expected: &Value,
    runs: usize,
    args: &[String],
    via: Via,
) -> anyhow::Result<Vec<Duration>> {
    let d = Daemon::start(bin, &strs(args))?;
    let mut c = d.client()?;
    // The seed installs the packages, and (c)'s zygote policy sees the set used.
    register(&mut c, "seed", dir)?;
    for _ in 0..3 {
        check_answer(&invoke(&mut c, "seed")?, expected)?;
    }
    let installed = package_counters(&d, &mut c)?.0;
    ensure!(installed > 0, "the seed registration installed nothing");
    // (c): the zygote, and what its pool keeps ready (frozen stem cells forked from
    // it, when it keeps any: no other sandbox of this daemon is ever frozen) as it
    // settles; every sample waits for the pool to be back to that.
    let ready = match via {
        Via::New => 0,
        Via::Zygote => {
            wait_for_zygote(&d, &mut c)?;
            let frozen = settled_frozen(&d, &mut c)?;
            eprintln!("  package zygote ready, {frozen} frozen stem cells kept from it");
            frozen
        }
    };
    let mut samples = Vec::with_capacity(runs);
    for i in 0..WARM_UPS + runs {
        if via == Via::Zygote {
            d.wait_status(&mut c, "the package zygote's pool", |s| {
                s["package_zygotes"].as_u64().unwrap_or(0) > 0
                    && s["frozen"].as_u64().unwrap_or(0) >= ready
            })?;
        }
        let name = format!("cold{i}");
        register(&mut c, &name, dir)?;
        let before = NewSandboxes::made(&d, &mut c)?;
        let t = Instant::now();
        let r = invoke(&mut c, &name)?;
        let took = t.elapsed();
        expect_start(&r, via.start())?;
        if via == Via::New {
            NewSandboxes::Fork.check_made(before, NewSandboxes::made(&d, &mut c)?, 1)?;
        }
        check_answer(&r, expected)?;
        if i >= WARM_UPS {
            samples.push(took);
        }
        let r = c.request("DELETE", &format!("/functions/{name}"), None, b"")?;
        ok(&r, "remove")?;
    }
    let now = package_counters(&d, &mut c)?.0;
    ensure!(
        now == installed,
        "{} packages were installed again during the samples: the cache missed",
        now - installed
    );
    Ok(samples)
}

/// Waits until the daemon has a package zygote.
fn wait_for_zygote(d: &Daemon, c: &mut Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + ZYGOTE_WAIT;
    loop {
        let s = d.status(c)?;
        if s["package_zygotes"].as_u64().unwrap_or(0) > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no package zygote after {ZYGOTE_WAIT:?}: {s}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's frozen sandboxes once the count has not changed for [`SETTLED`].
fn settled_frozen(d: &Daemon, c: &mut Client) -> anyhow::Result<u64> {
    let deadline = Instant::now() + ZYGOTE_WAIT;
    let frozen = |c: &mut Client| -> anyhow::Result<u64> {
        Ok(d.status(c)?["frozen"].as_u64().unwrap_or(0))
    };
    let (mut last, mut since) = (frozen(c)?, Instant::now());
    while since.elapsed() < SETTLED {
        ensure!(
            Instant::now() < deadline,
            "the frozen count did not settle in {ZYGOTE_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        let now = frozen(c)?;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    Ok(last)
}

/// How long the frozen count must hold to count as settled.
const SETTLED: Duration = Duration::from_secs(2);

/// The targets, against this run's numbers: for numpy (in a quick run, the
/// first function stands in for it), (c)'s p50 at most 10 ms, at least 20× faster
/// than `runc run`, and faster than the host merely importing the package.
pub fn targets(outcome: &Outcome, functions: &[Function]) -> Vec<String> {
    let find = |p: &str| outcome.rows.iter().find(|r| r.path == p);
    let mut lines = Vec::new();
    let Some(f) = functions.first() else {
        return lines;
    };
    let stand_in = if f.label == "numpy" {
        String::new()
    } else {
        format!(" ({} stands in for numpy in this run)", f.label)
    };
    let zygote = find(&path(f, ZYGOTE));
    let runc = find(&path(f, RUNC));
    let host = find(&path(f, &host_import_row(f)));
    match zygote {
        None => lines.push(format!(
            "{}: (c) not measured, so its targets are not checked{stand_in}: {}",
            f.label,
            outcome.skipped.join("; ")
        )),
        Some(z) => {
            lines.push(format!(
                "{}: (c) package-aware zygote p50 {} (target <= 10 ms: {}){stand_in}",
                f.label,
                stats::human(z.p50_us),
                crate::met(z.p50_us <= 10_000.0)
            ));
            if let Some(runc) = runc {
                let x = runc.p50_us / z.p50_us;
                lines.push(format!(
                    "{}: (c) vs runc run: {x:.1}x faster (p50; target >= 20x: {})",
                    f.label,
                    crate::met(x >= 20.0)
                ));
            }
            if let Some(host) = host {
                lines.push(format!(
                    "{}: (c) p50 {} vs host python3 -c \"import {}\" p50 {} (target: faster: {})",
                    f.label,
                    stats::human(z.p50_us),
                    f.module,
                    stats::human(host.p50_us),
                    crate::met(z.p50_us < host.p50_us)
                ));
            }
        }
    }
    // Context, not targets.
    for f in functions {
        if let (Some(b), Some(runc)) = (find(&path(f, CACHED)), find(&path(f, RUNC))) {
            lines.push(format!(
                "{}: (b) packages cached, new sandbox: runc run's p50 / its p50 = {:.2} \
                 (above 1: faster than runc run)",
                f.label,
                runc.p50_us / b.p50_us
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn settings_take_quick_and_the_zygote_budget() {
        let s = Settings::from_args(&args(&["deps"])).unwrap();
        assert_eq!(s.functions[0].label, "numpy");
        assert_eq!(s.functions[1].label, "pandas");
        assert_eq!(s.zygote_budget_mb, 1024);
        let q = Settings::from_args(&args(&["deps", "--quick", ZYGOTE_FLAG, "256"])).unwrap();
        assert_eq!(q.functions[0].label, "six");
        assert_eq!(q.zygote_budget_mb, 256);
        assert!(q.cold_runs < s.cold_runs);
        for bad in [
            &["deps", ZYGOTE_FLAG][..],
            &["deps", ZYGOTE_FLAG, "x"],
            &["deps", ZYGOTE_FLAG, "0"],
        ] {
            let err = format!("{:#}", Settings::from_args(&args(bad)).unwrap_err());
            assert!(err.contains(ZYGOTE_FLAG), "{err}");
        }
    }

    #[test]
    fn the_zygote_flag_is_found_only_as_itself() {
        let help = "Options:\n      --pause-grace <ms>\n      --package-zygotes-mb <MiB>\n          Memory\n";
        assert!(help_has_flag(help, ZYGOTE_FLAG));
        assert!(!help_has_flag(
            "      --package-zygotes-mb-max <MiB>\n",
            ZYGOTE_FLAG
        ));
        assert!(!help_has_flag(
            "      --no-package-zygotes-mb\n",
            ZYGOTE_FLAG
        ));
        assert!(!help_has_flag("      --stem-cells <N>\n", ZYGOTE_FLAG));
    }

    #[test]
    fn rows_b_and_c_differ_only_in_the_budget() {
        let with = DaemonArgs::new(true, 512);
        assert_eq!(&with.off[with.off.len() - 2..], [ZYGOTE_FLAG, "0"]);
        let z = with.zygotes.unwrap();
        assert_eq!(&z[z.len() - 2..], [ZYGOTE_FLAG, "512"]);
        assert_eq!(z[..z.len() - 2], with.off[..with.off.len() - 2]);
        assert!(with.off.windows(2).any(|w| w == ["--stem-cells", "0"]));
        // Without the flag: no (c), and (b) without it.
        let without = DaemonArgs::new(false, 512);
        assert!(without.zygotes.is_none());
        assert!(!without.off.iter().any(|a| a == ZYGOTE_FLAG));
    }

    fn row(f: &Function, name: &str, ms: u64) -> Row {
        Row::new(&path(f, name), &[Duration::from_millis(ms)])
    }

    #[test]
    fn targets_are_judged_from_the_rows() {
        let f = FULL[0];
        let host = host_import_row(&f);
        let pass = Outcome {
            rows: vec![
                row(&f, ZYGOTE, 8),
                row(&f, RUNC, 200),
                row(&f, &host, 90),
                row(&f, CACHED, 120),
            ],
            skipped: Vec::new(),
        };
        let lines = targets(&pass, FULL).join("\n");
        assert!(lines.contains("target <= 10 ms: met"), "{lines}");
        assert!(
            lines.contains("25.0x faster (p50; target >= 20x: met)"),
            "{lines}"
        );
        assert!(lines.contains("(target: faster: met)"), "{lines}");
        assert!(!lines.contains("NOT"), "{lines}");
        let fail = Outcome {
            rows: vec![row(&f, ZYGOTE, 12), row(&f, RUNC, 200), row(&f, &host, 11)],
            skipped: Vec::new(),
        };
        let lines = targets(&fail, FULL).join("\n");
        assert!(lines.contains("target <= 10 ms: NOT met"), "{lines}");
        assert!(lines.contains("target >= 20x: NOT met"), "{lines}");
        assert!(lines.contains("(target: faster: NOT met)"), "{lines}");
        // Skipped: said, not judged.
        let skipped = Outcome {
            rows: vec![row(&f, RUNC, 200)],
            skipped: vec!["row (c) skipped: no flag".into()],
        };
        let lines = targets(&skipped, FULL).join("\n");
        assert!(
            lines.contains("(c) not measured") && lines.contains("no flag"),
            "{lines}"
        );
        assert!(!lines.contains("met"), "{lines}");
        // A quick run says what stands in for numpy.
        let q = QUICK[0];
        let quick = Outcome {
            rows: vec![row(&q, ZYGOTE, 5)],
            skipped: Vec::new(),
        };
        assert!(targets(&quick, QUICK)
            .join("\n")
            .contains("six stands in for numpy"));
    }

    #[test]
    fn the_suites_functions_pin_their_packages() {
        let ws = crate::workspace();
        for f in FULL.iter().chain(QUICK) {
            let dir = ws.join("examples").join(f.example);
            assert!(dir.join("f.py").is_file(), "{}", dir.display());
            let req = std::fs::read_to_string(dir.join("requirements.txt")).unwrap();
            let lines: Vec<&str> = req.lines().filter(|l| !l.trim().is_empty()).collect();
            assert!(!lines.is_empty());
            for l in lines {
                assert!(l.contains("=="), "{}: {l} is not pinned", f.example);
            }
            assert!(
                req.contains(&format!("{}==", f.module)),
                "{} does not pin {}",
                f.example,
                f.module
            );
        }
    }
}
