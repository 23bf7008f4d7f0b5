//! `bench guard`: a performance regression guard that fails when a hot path gets
//! about twice as slow, and does not fail on a noisy, shared 2-core machine.
//!
//! Absolute times on a shared VM move by 2x from run to run, so each check measures
//! a sprout path against a baseline that does not go through sprout, in the same
//! run, interleaved: a round holds samples of the path and of the baseline taken
//! alternately (which goes first alternates between rounds), and the check's ratio is
//! the median over rounds of median(path samples) / median(baseline samples). Load
//! from other processes slows both halves of a round alike; a slow round is outvoted
//! by the others. A check whose ratio is above its bound is measured once more, from
//! scratch (a new daemon), and fails only if the retry is above the bound too.
//!
//! The checks ([`CHECKS`]):
//! - `warm`: a warm invoke of a no-op on a daemon's socket (HTTP, keep-alive) against
//!   a round trip of the same request bytes over Unix sockets through a chain of three
//!   relay threads, one sample of each in turn. The client is pinned to one CPU and
//!   the relays alternate, starting on the other: six cross-CPU wake-ups per round
//!   trip, as many as the warm path makes (client, agent, shim, instance and back).
//!   A single echo thread tracked the warm path badly: unpinned its round trip is
//!   15 µs or 110 µs as the scheduler puts both ends on one CPU or not, and pinned,
//!   32 µs or 115 µs as the VM's cross-CPU wake-ups were cheap or dear that minute,
//!   while the warm path, which spends more of its time running, moved far less
//!   (ratios 1.3-4.4 within an hour); against the chain they were 0.8-1.3.
//! - `stem`: a cold invoke from a stem cell against a cold call to a `python3`
//!   zygote on the host ([`FORK_SERVER`]: fork, import of the handler, call, exit),
//!   5 of those per stem-cell start. (Against `runc run` the ratio is ~0.08 and moved
//!   between 0.06 and 0.22: a 60 ms CPU-bound baseline does not track a 4 ms path
//!   bound by wake-ups.)
//! - `new`: a cold invoke with an empty pool (a new sandbox, forked from the fork
//!   server's zygote) against `runc run` of the same handler (the latency suite's
//!   baseline). Each sample must have forked its sandbox (the status counters), so a
//!   fork server that stopped working fails the check with an error, whatever the
//!   time; the bound alone would catch it too, as a sandbox created by libcontainer
//!   measures ~1.0x `runc run` here (the typical ratio before the fork server).
//!
//! Before each cold sample, and each baseline sample of a cold check, the daemon's
//! pool has settled (stem cells made and frozen, the previous function's sandbox
//! gone).
//!
//! The bounds are 1.6-1.7x the typical ratio measured on the development VM
//! (2 cores, cgroup v1, other builds and tests running), above every ratio seen in
//! repeated runs, so that doubling a path fails (numbers in README, "Benchmarks").

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ipc::client::Client;
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use serde_json::json;

use crate::baseline;
use crate::daemon::{ok, Daemon};
use crate::latency::{expect_start, invoke, NewSandboxes, KEEP_RUNNING};
use crate::stats;

/// One guarded path: its ratio to its baseline must stay at or below `bound`.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    /// Short name, for `--only`.
    pub name: &'static str,
    pub path: &'static str,
    pub baseline: &'static str,
    /// The ratio typically measured on the development VM (for the report only).
    pub typical: f64,
    pub bound: f64,
}

pub const CHECKS: [Check; 3] = [
    Check {
        name: "warm",
        path: "warm invoke (no-op, daemon socket)",
        baseline: "round trip of the same bytes through three relay threads on alternate CPUs",
        typical: 0.9,
        bound: 1.5,
    },
    Check {
        name: "stem",
        path: "cold invoke from a stem cell",
        baseline: "fork of a host python3 zygote that imports and calls the handler",
        typical: 1.15,
        bound: 1.95,
    },
    // Forked: 0.29-0.31x in five runs on the development VM (15-18 ms against
    // 49-63 ms; 0.38-0.45x before the child joined its cgroup itself). The bound, 1.67x
    // that, is half of `runc run`, well below the ~1.0x of a sandbox created by
    // libcontainer: it fails when the new sandbox is no longer clearly faster than
    // `runc run`, or when forking gets ~10 ms slower.
    Check {
        name: "new",
        path: "cold invoke, empty pool (new sandbox)",
        baseline: "runc run (same handler, python3)",
        typical: 0.30,
        bound: 0.50,
    },
];

/// One round: a block of samples of the path and one of its baseline, in µs.
#[derive(Debug, Clone, Default)]
pub struct Round {
    pub path: Vec<f64>,
    pub baseline: Vec<f64>,
}

/// The median of `v` (the mean of the two middle values for an even count).
pub fn median(v: &[f64]) -> f64 {
    assert!(!v.is_empty(), "median of no samples");
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// The median over rounds of median(path) / median(baseline).
pub fn ratio(rounds: &[Round]) -> f64 {
    let per_round: Vec<f64> = rounds
        .iter()
        .map(|r| median(&r.path) / median(&r.baseline))
        .collect();
    median(&per_round)
}

/// What one measurement of a check gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub ratio: f64,
    /// Median of all path and baseline samples, µs (for the report).
    pub path_us: f64,
    pub baseline_us: f64,
}

impl Attempt {
    pub fn of(rounds: &[Round]) -> Attempt {
        let all = |f: fn(&Round) -> &Vec<f64>| {
            median(
                &rounds
                    .iter()
                    .flat_map(|r| f(r).iter().copied())
                    .collect::<Vec<_>>(),
            )
        };
        Attempt {
            ratio: ratio(rounds),
            path_us: all(|r| &r.path),
            baseline_us: all(|r| &r.baseline),
        }
    }
}

/// The outcome of a check: every attempt made, and whether it passed.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub check: Check,
    pub attempts: Vec<Attempt>,
    pub passed: bool,
}

impl Verdict {
    /// One line: the ratio (and the retry's), the bound and the medians.
    pub fn describe(&self) -> String {
        let c = &self.check;
        let first = &self.attempts[0];
        let retry = match self.attempts.get(1) {
            Some(a) => format!(", {:.2}x on retry", a.ratio),
            None => String::new(),
        };
        let last = self.attempts.last().expect("at least one attempt");
        format!(
            "{} [{}] {}: {:.2}x the {}{retry} (bound {:.2}x, typical {:.2}x; medians {} vs {})",
            if self.passed { "ok" } else { "REGRESSION" },
            c.name,
            c.path,
            first.ratio,
            c.baseline,
            c.bound,
            c.typical,
            stats::human(last.path_us),
            stats::human(last.baseline_us),
        )
    }
}

/// Measures `check` (with `measure`), and once more if the ratio is over the bound.
/// Passes when an attempt is within the bound.
pub fn judge(
    check: Check,
    mut measure: impl FnMut() -> anyhow::Result<Attempt>,
) -> anyhow::Result<Verdict> {
    let mut attempts = Vec::new();
    for _ in 0..2 {
        let a = measure().with_context(|| format!("measure {}", check.path))?;
        ensure!(
            a.ratio.is_finite() && a.ratio > 0.0,
            "{}: measured a ratio of {}",
            check.path,
            a.ratio
        );
        let within = a.ratio <= check.bound;
        attempts.push(a);
        if within {
            return Ok(Verdict {
                check,
                attempts,
                passed: true,
            });
        }
    }
    Ok(Verdict {
        check,
        attempts,
        passed: false,
    })
}

/// How much each check measures.
pub struct Settings {
    pub warm_rounds: usize,
    pub warm_block: usize,
    pub cold_rounds: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            warm_rounds: 100,
            warm_block: 20,
            cold_rounds: 40,
        }
    }
}

/// Runs the checks named in `only` (all when empty); fails naming every regressed
/// path, its ratio and its bound.
pub fn run(bin: &Path, ws: &Path, settings: &Settings, only: &[String]) -> anyhow::Result<()> {
    let noop = ws.join("examples/noop");
    let started = Instant::now();
    let mut failed = Vec::new();
    for check in CHECKS {
        if !only.is_empty() && !only.iter().any(|o| o == check.name) {
            continue;
        }
        let t = Instant::now();
        let verdict = judge(check, || match check.name {
            "warm" => warm(bin, &noop, settings),
            "stem" => cold(bin, &noop, settings, 2),
            "new" => cold(bin, &noop, settings, 0),
            other => bail!("no measurement for {other}"),
        })?;
        println!(
            "{}  [{:.1} s]",
            verdict.describe(),
            t.elapsed().as_secs_f64()
        );
        if !verdict.passed {
            failed.push(verdict);
        }
    }
    println!("guard took {:.1} s", started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        let lines: Vec<String> = failed
            .iter()
            .map(|v| {
                let a = v.attempts.last().expect("an attempt");
                format!(
                    "{}: {:.2}x the {} (allowed: {:.2}x)",
                    v.check.path, a.ratio, v.check.baseline, v.check.bound
                )
            })
            .collect();
        bail!(
            "performance regression (over the bound, and again on retry):\n  {}",
            lines.join("\n  ")
        );
    }
    Ok(())
}

/// What the relay baseline sends: the bytes of the warm invoke's request.
fn request_bytes() -> Vec<u8> {
    b"POST /functions/noop/invoke HTTP/1.1\r\nHost: sprout\r\nContent-Length: 2\r\n\
      Content-Type: application/json\r\n\r\n{}"
        .to_vec()
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pin to CPU {cpu}"))
}

/// Two CPUs this process may run on (the same one twice on a single CPU).
pub(crate) fn two_cpus() -> anyhow::Result<(usize, usize)> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    match cpus[..] {
        [] => bail!("no CPU in this process's affinity mask"),
        [one] => Ok((one, one)),
        [a, b, ..] => Ok((a, b)),
    }
}

/// A chain of threads, the first on `cpus[0]`, the next on `cpus[1]`, and so on: each
/// passes every message of `len` bytes it reads from upstream on to the next, and the
/// answer back; the last writes it back. A message to `first` and its answer are then
/// `2 * cpus.len()` wake-ups, one per thread each way.
fn relay_chain(
    first: UnixStream,
    len: usize,
    cpus: &[usize],
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(cpus.len());
    let mut upstream = first;
    for (i, &cpu) in cpus.iter().enumerate() {
        let (next, far) = if i + 1 < cpus.len() {
            let (a, b) = UnixStream::pair()?;
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        let mut up = upstream;
        threads.push(std::thread::spawn(move || {
            if pin(cpu).is_err() {
                return;
            }
            let mut down = next;
            let mut buf = vec![0u8; len];
            while up.read_exact(&mut buf).is_ok() {
                if let Some(d) = down.as_mut() {
                    if d.write_all(&buf).is_err() || d.read_exact(&mut buf).is_err() {
                        break;
                    }
                }
                if up.write_all(&buf).is_err() {
                    break;
                }
            }
        }));
        match far {
            Some(f) => upstream = f,
            None => break,
        }
    }
    Ok(threads)
}

/// Warm invoke on a daemon's socket, interleaved with a round trip of the same
/// bytes through three relay threads on alternate CPUs; the client is pinned to the
/// first CPU, the first relay to the other.
fn warm(bin: &Path, noop: &Path, settings: &Settings) -> anyhow::Result<Attempt> {
    let d = Daemon::start(bin, KEEP_RUNNING)?;
    let (cpu_a, cpu_b) = two_cpus()?;
    let msg = request_bytes();
    let (mut near, far) = UnixStream::pair()?;
    near.set_read_timeout(Some(Duration::from_secs(10)))?;
    let peer = relay_chain(far, msg.len(), &[cpu_b, cpu_a, cpu_b])?;
    let mut buf = vec![0u8; msg.len()];
    // Measured from a thread of its own, so nothing started later inherits the pin.
    let rounds = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<Vec<Round>> {
            pin(cpu_a)?;
            let mut c = d.client()?;
            d.register(&mut c, "noop", noop, json!({}))?;
            invoke(&mut c, "noop")?;
            let mut relayed = || -> anyhow::Result<f64> {
                let t = Instant::now();
                near.write_all(&msg)?;
                near.read_exact(&mut buf)
                    .context("read the relayed answer")?;
                Ok(us(t.elapsed()))
            };
            let mut warm = || -> anyhow::Result<f64> {
                let t = Instant::now();
                let r = invoke(&mut c, "noop")?;
                let took = us(t.elapsed());
                expect_start(&r, "warm")?;
                Ok(took)
            };
            for _ in 0..settings.warm_block * 4 {
                warm()?; // warm-up
                relayed()?;
            }
            let mut rounds = Vec::with_capacity(settings.warm_rounds);
            for i in 0..settings.warm_rounds {
                let mut round = Round::default();
                for _ in 0..settings.warm_block {
                    if i % 2 == 0 {
                        round.path.push(warm()?);
                        round.baseline.push(relayed()?);
                    } else {
                        round.baseline.push(relayed()?);
                        round.path.push(warm()?);
                    }
                }
                rounds.push(round);
            }
            Ok(rounds)
        })
        .join()
        .expect("measuring thread")
    });
    drop(near);
    for t in peer {
        t.join().expect("relay thread");
    }
    let rounds = rounds?;
    Ok(Attempt::of(&rounds))
}

/// The stem-cell check's baseline: a `python3` process on the host, started once
/// with `json` imported (a zygote), that for each event line on its stdin forks a
/// child which imports the handler `f` from the directory in `argv[1]`, calls it and
/// writes the result to a pipe; the parent reaps the child and prints the result.
/// That is a cold start's core (a fork of an initialised interpreter, the import,
/// the call) without sprout in between. It exits at EOF on stdin.
const FORK_SERVER: &str = r#"import json, os, sys
sys.dont_write_bytecode = True
code = sys.argv[1]
for line in sys.stdin.buffer:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        sys.path.insert(0, code)
        import f
        os.write(w, json.dumps(f.f(json.loads(line))).encode() + b"\n")
        os._exit(0)
    os.close(w)
    out = b""
    while True:
        d = os.read(r, 65536)
        if not d:
            break
        out += d
    os.close(r)
    os.waitpid(pid, 0)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
"#;

/// A running [`FORK_SERVER`]; [`call`](Self::call) is one forked cold call.
struct ForkServer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    line: String,
}

impl ForkServer {
    fn start(handler_dir: &Path) -> anyhow::Result<ForkServer> {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-I", "-c", FORK_SERVER])
            .arg(handler_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the python3 fork server")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(ForkServer {
            child,
            stdin,
            stdout,
            line: String::new(),
        })
    }

    /// One event, `{}`, to a new fork: spawn to answer.
    fn call(&mut self) -> anyhow::Result<Duration> {
        self.line.clear();
        let stdin = self.stdin.as_mut().expect("open until dropped");
        let t = Instant::now();
        stdin.write_all(b"{}\n")?;
        stdin.flush()?;
        self.stdout.read_line(&mut self.line)?;
        let took = t.elapsed();
        ensure!(
            self.line == "{}\n",
            "the fork server answered {:?}",
            self.line
        );
        Ok(took)
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        drop(self.stdin.take()); // EOF: the server exits
        let _ = self.child.wait();
    }
}

/// A cold invoke (from a stem cell, or with `stem_cells` 0 from a new sandbox),
/// interleaved with its baseline: for a stem cell, a block of 5 calls to a
/// [`ForkServer`]; for a new sandbox, one `runc run`. Each sandbox sample starts
/// with the pool settled (stem cells made and frozen, the previous function's
/// sandbox gone), and so does each `runc run`.
fn cold(
    bin: &Path,
    noop: &Path,
    settings: &Settings,
    stem_cells: usize,
) -> anyhow::Result<Attempt> {
    let target = stem_cells.to_string();
    let d = Daemon::start(bin, &["--stem-cells", &target, "--pause-grace", "3600000"])?;
    let mut c = d.client()?;
    let start = if stem_cells > 0 {
        "stem_cell"
    } else {
        "new_sandbox"
    };
    let settle = |c: &mut Client| {
        d.wait_status(c, "the pool to settle", |s| {
            s["sandboxes"].as_u64() == Some(stem_cells as u64)
                && s["stem_cells"].as_u64() == Some(stem_cells as u64)
                && s["frozen"].as_u64() == Some(stem_cells as u64)
        })
    };
    let mut n = 0;
    let mut cold_one = |c: &mut Client| -> anyhow::Result<f64> {
        settle(c)?;
        let name = format!("guard{n}");
        n += 1;
        d.register(c, &name, noop, json!({}))?;
        let before = NewSandboxes::made(&d, c)?;
        let t = Instant::now();
        let r = invoke(c, &name)?;
        let took = us(t.elapsed());
        expect_start(&r, start)?;
        if stem_cells == 0 {
            // A new sandbox must be forked: a libcontainer fallback is a regression
            // whatever its time.
            NewSandboxes::Fork.check_made(before, NewSandboxes::made(&d, c)?, 1)?;
        }
        let r = c.request("DELETE", &format!("/functions/{name}"), None, b"")?;
        ok(&r, "remove")?;
        Ok(took)
    };
    enum Baseline {
        Runc(baseline::ContainerBaseline),
        Fork(ForkServer),
    }
    let mut base = if stem_cells > 0 {
        Baseline::Fork(ForkServer::start(noop)?)
    } else {
        Baseline::Runc(baseline::runc_baseline(noop, "{}")?)
    };
    let mut base_block = |c: &mut Client| -> anyhow::Result<Vec<f64>> {
        settle(c)?;
        match &mut base {
            Baseline::Runc(r) => Ok(vec![us(r.run()?)]),
            Baseline::Fork(f) => (0..5).map(|_| f.call().map(us)).collect(),
        }
    };
    // Warm-up: caches, and the baselines' first runs.
    for _ in 0..2 {
        cold_one(&mut c)?;
        base_block(&mut c)?;
    }
    let mut rounds = Vec::with_capacity(settings.cold_rounds);
    for i in 0..settings.cold_rounds {
        let mut round = Round::default();
        if i % 2 == 0 {
            round.path.push(cold_one(&mut c)?);
            round.baseline = base_block(&mut c)?;
        } else {
            round.baseline = base_block(&mut c)?;
            round.path.push(cold_one(&mut c)?);
        }
        rounds.push(round);
    }
    if let Baseline::Runc(r) = base {
        r.finish()?;
    }
    Ok(Attempt::of(&rounds))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bound: f64) -> Check {
        Check {
            name: "t",
            path: "the path",
            baseline: "echo",
            typical: bound / 1.6,
            bound,
        }
    }

    /// A deterministic jitter in [-1, 1) (no randomness in the tests).
    fn jitter(i: usize) -> f64 {
        ((i * 7919 + 13) % 200) as f64 / 100.0 - 1.0
    }

    /// `rounds` rounds of `block` samples: the path takes `path_us`, the baseline
    /// `base_us`, each sample off by up to `noise` of itself, and each round slowed
    /// as a whole by up to `load` of itself (another process on the CPU), both
    /// blocks alike.
    fn rounds(path_us: f64, base_us: f64, noise: f64, load: f64, n: usize) -> Vec<Round> {
        (0..n)
            .map(|r| {
                let slow = 1.0 + load * (jitter(r * 31) + 1.0) / 2.0;
                let block = |us: f64, k: usize| -> Vec<f64> {
                    (0..15)
                        .map(|i| us * slow * (1.0 + noise * jitter(k * 1000 + r * 15 + i)))
                        .collect()
                };
                Round {
                    path: block(path_us, 1),
                    baseline: block(base_us, 2),
                }
            })
            .collect()
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        let r = |p: &[f64], b: &[f64]| Round {
            path: p.to_vec(),
            baseline: b.to_vec(),
        };
        // Per round 2, 3 and 100 (one slow outlier round): the median is 3.
        let rs = [
            r(&[20.0, 20.0, 1.0], &[10.0, 10.0, 10.0]),
            r(&[30.0], &[10.0]),
            r(&[1000.0], &[10.0]),
        ];
        assert_eq!(ratio(&rs), 3.0);
        let a = Attempt::of(&rs);
        assert_eq!((a.ratio, a.path_us, a.baseline_us), (3.0, 20.0, 10.0));
    }

    #[test]
    fn noise_and_load_within_the_bound_pass() {
        // Typical ratio 2.0, bound 1.6x that; 30% noise per sample and rounds slowed
        // by up to 3x by load.
        let c = check(3.2);
        let v = judge(c, || Ok(Attempt::of(&rounds(80.0, 40.0, 0.3, 2.0, 40)))).unwrap();
        assert!(v.passed, "{}", v.describe());
        assert_eq!(v.attempts.len(), 1);
        assert!((v.attempts[0].ratio - 2.0).abs() < 0.2, "{:?}", v.attempts);
    }

    #[test]
    fn a_doubled_path_fails() {
        let c = check(3.2);
        let v = judge(c, || Ok(Attempt::of(&rounds(160.0, 40.0, 0.3, 2.0, 40)))).unwrap();
        assert!(!v.passed, "{}", v.describe());
        assert_eq!(v.attempts.len(), 2, "a failure is retried once");
        let line = v.describe();
        assert!(line.starts_with("REGRESSION [t] the path: 4."), "{line}");
        assert!(
            line.contains("x the echo, 4.") && line.contains("x on retry (bound 3.20x"),
            "{line}"
        );
    }

    #[test]
    fn one_bad_run_passes_after_the_retry() {
        let c = check(3.2);
        let mut calls = 0;
        let v = judge(c, || {
            calls += 1;
            let path = if calls == 1 { 200.0 } else { 80.0 };
            Ok(Attempt::of(&rounds(path, 40.0, 0.3, 0.5, 40)))
        })
        .unwrap();
        assert!(v.passed, "{}", v.describe());
        assert_eq!(calls, 2);
        assert!(v.attempts[0].ratio > 3.2 && v.attempts[1].ratio < 3.2);
    }

    #[test]
    fn a_few_slow_rounds_are_outvoted() {
        // A third of the rounds has only the path slowed (load that hit one block):
        // the median over rounds ignores them.
        let mut rs = rounds(80.0, 40.0, 0.3, 0.0, 30);
        for r in rs.iter_mut().step_by(3) {
            r.path.iter_mut().for_each(|s| *s *= 4.0);
        }
        let a = Attempt::of(&rs);
        assert!(a.ratio < 2.5, "{a:?}");
    }

    #[test]
    fn measurement_errors_and_nonsense_ratios_fail() {
        let c = check(3.2);
        assert!(judge(c, || bail!("daemon did not start")).is_err());
        let err = judge(c, || {
            Ok(Attempt {
                ratio: f64::NAN,
                path_us: 1.0,
                baseline_us: 0.0,
            })
        })
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("measured a ratio of NaN"),
            "{err:#}"
        );
    }

    #[test]
    fn every_check_has_a_bound_above_its_typical_ratio() {
        for c in CHECKS {
            assert!(
                c.typical > 0.0 && c.bound > c.typical * 1.3 && c.bound < c.typical * 2.0,
                "{c:?}"
            );
        }
    }
}
