//! What activation records cost, in the latency suite: a warm invoke with records on
//! against `--no-records`, measured side by side; and asynchronous invocations
//! (`?blocking=false`) against blocking ones, as throughput.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipc::client::{Client, ClientResponse};
use serde_json::json;

use crate::daemon::{ok, Daemon};
use crate::latency::{expect_start, invoke, KEEP_RUNNING};
use crate::stats::Row;

pub const WARM_ON: &str = "warm invoke (no-op, daemon socket), records on";
pub const WARM_OFF: &str = "warm invoke (no-op, daemon socket), --no-records";

/// Samples of one daemon in a row before the other's: long enough that each
/// daemon's event loop is in its busy-polling steady state, as in the warm row.
const BLOCK: usize = 25;
/// Fresh pairs of daemons the warm pair is measured on: where the scheduler puts a
/// daemon's event loop and its instance (the same CPU or not) makes its warm invoke
/// ~60 or ~160 µs on the 2-core VM for a while, whatever the records; fresh pairs
/// draw that again.
const SESSIONS: usize = 4;

/// The warm pair: two daemons, one keeping records (its data directory's
/// `activations/records.db`), one with `--no-records`, each with a warm no-op
/// instance; blocks of [`BLOCK`] invokes on each in turn from a client pinned to one
/// CPU, which one goes first alternating by round, so both see the same machine
/// state; on [`SESSIONS`] fresh pairs (at least one round each). Returns the two rows
/// (`runs` samples each, pooled) and the median over rounds of the difference of the
/// two blocks' medians (on − off), in µs.
pub fn warm_pair(bin: &Path, noop: &Path, runs: usize) -> anyhow::Result<(Row, Row, f64)> {
    let rounds = runs.div_ceil(BLOCK);
    let sessions = SESSIONS.min(rounds);
    let mut samples: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut deltas = Vec::with_capacity(rounds);
    for session in 0..sessions {
        let share = rounds / sessions + usize::from(session < rounds % sessions);
        let (s, d) = warm_session(bin, noop, runs / 10, share, session % 2 == 1)?;
        samples[0].extend(s[0].iter());
        samples[1].extend(s[1].iter());
        deltas.extend(d);
    }
    deltas.sort_by(f64::total_cmp);
    let delta = crate::stats::percentile(&deltas, 0.5);
    Ok((
        Row::new(WARM_ON, &samples[0]),
        Row::new(WARM_OFF, &samples[1]),
        delta,
    ))
}

type Samples = [Vec<Duration>; 2];

/// One pair of daemons (started in the other order with `flip`): `rounds` rounds
/// after `warmup` invokes each; the samples (on, off) and each round's difference.
fn warm_session(
    bin: &Path,
    noop: &Path,
    warmup: usize,
    rounds: usize,
    flip: bool,
) -> anyhow::Result<(Samples, Vec<f64>)> {
    let off_args: Vec<&str> = KEEP_RUNNING
        .iter()
        .copied()
        .chain(["--no-records"])
        .collect();
    let (on, off) = if flip {
        let off = Daemon::start(bin, &off_args)?;
        (Daemon::start(bin, KEEP_RUNNING)?, off)
    } else {
        let on = Daemon::start(bin, KEEP_RUNNING)?;
        (on, Daemon::start(bin, &off_args)?)
    };
    let cpu = crate::guard::two_cpus()?.0;
    // Measured from a thread of its own, so nothing started later inherits the pin.
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<(Samples, Vec<f64>)> {
            crate::guard::pin(cpu)?;
            let mut clients = Vec::new();
            for d in [&on, &off] {
                let mut c = d.client()?;
                d.register(&mut c, "noop", noop, json!({}))?;
                for _ in 0..=warmup {
                    invoke(&mut c, "noop")?; // the instance, then warm-up
                }
                clients.push(c);
            }
            // The daemon with records answers with an id it keeps; the other keeps none.
            let r = invoke(&mut clients[0], "noop")?;
            let id = r
                .header("x-sprout-activation-id")
                .context("no X-Sprout-Activation-Id")?
                .to_owned();
            wait_recorded(&mut clients[0], &id)?;
            let r = clients[1].request("GET", &format!("/activations/{id}"), None, b"")?;
            if r.status != 404 {
                bail!("the --no-records daemon answered {} for a record", r.status);
            }
            let mut samples: Samples = [Vec::new(), Vec::new()];
            let mut deltas = Vec::with_capacity(rounds);
            let cpu_before = writer_cpu(on.pid());
            for round in 0..rounds {
                let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                let mut medians = [0.0; 2];
                for which in order {
                    let c = &mut clients[which];
                    let mut block = Vec::with_capacity(BLOCK);
                    for _ in 0..BLOCK {
                        let t = Instant::now();
                        let r = invoke(c, "noop")?;
                        block.push(t.elapsed());
                        expect_start(&r, "warm")?;
                    }
                    medians[which] = Row::new("block", &block).p50_us;
                    samples[which].extend(block);
                }
                deltas.push(medians[0] - medians[1]);
            }
            // Let the last batch commit, then charge the writer's time to the records.
            std::thread::sleep(Duration::from_millis(50));
            if let (Some(a), Some(b)) = (cpu_before, writer_cpu(on.pid())) {
                let per = b.saturating_sub(a).as_secs_f64() * 1e6 / samples[0].len() as f64;
                eprintln!("  the record writer used {per:.1} µs of CPU per record");
            }
            Ok((samples, deltas))
        })
        .join()
        .expect("measuring thread")
    })
}

/// CPU time the daemon `pid`'s record writer thread (`sprout-records`) has used
/// (its `schedstat`), if it has one.
fn writer_cpu(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "sprout-records" {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let ns = stat.split_whitespace().next()?.parse().ok()?;
            return Some(Duration::from_nanos(ns));
        }
    }
    None
}

/// Waits until `GET /activations/{id}` is 200 (records are committed in batches).
fn wait_recorded(c: &mut Client, id: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.request("GET", &format!("/activations/{id}"), None, b"")?;
        if r.status == 200 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("activation {id} has no record: {}", r.status);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How many asynchronous and blocking invocations [`throughput`] makes.
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    /// Invocations of each kind in a round.
    pub n: usize,
    /// Client connections sending them.
    pub clients: usize,
    /// Rounds; which kind goes first alternates.
    pub rounds: usize,
}

const ASYNC_NS: &str = "bench-async";
const BLOCKING_NS: &str = "bench-blocking";
/// Instances of each function (as the throughput rows' `max_instances`).
const INSTANCES: usize = 4;

/// Throughput of asynchronous invocations against blocking ones, on one daemon with
/// records: in each round, `n` no-op invocations of each kind from `clients`
/// keep-alive connections (each its share, back to back), each kind its own
/// namespace and warm function. Asynchronous: until every `202` is answered (each
/// answer waits for its acceptance's commit: durable), then until every activation
/// has a finished record. Blocking: until every answer, then until every record is
/// committed. Every asynchronous activation's record is checked to be a success.
///
/// Rows: the `202`s (per-request latency; acceptances/s), the asynchronous
/// activations (acceptance to end, from the records' `wait_time + duration`, ms;
/// activations/s from the first request to the last record), the blocking
/// invocations (per-request latency; invocations/s to the last answer).
pub fn throughput(bin: &Path, noop: &Path, burst: Burst) -> anyhow::Result<Vec<Row>> {
    let d = Daemon::start(bin, KEEP_RUNNING)?;
    let mut c = d.client()?;
    for ns in [ASYNC_NS, BLOCKING_NS] {
        register_in(&mut c, ns, noop)?;
        // Make the instances first, so the run measures warm throughput.
        std::thread::scope(|s| -> anyhow::Result<()> {
            let threads: Vec<_> = (0..INSTANCES)
                .map(|_| {
                    s.spawn(|| -> anyhow::Result<()> {
                        let mut c = d.client()?;
                        expect(&post(&mut c, ns, "")?, 200)
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("warm-up thread")?;
            }
            Ok(())
        })?;
    }
    // The warm-up's records, committed before anything is measured.
    for ns in [ASYNC_NS, BLOCKING_NS] {
        wait_committed(&mut c, ns, INSTANCES)?;
    }
    let (mut recorded, mut blocking_recorded) = (INSTANCES, INSTANCES);
    let mut accept_lat = Vec::new();
    let mut end_lat = Vec::new();
    let mut blocking_lat = Vec::new();
    let (mut accept_time, mut async_time, mut blocking_time) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut blocking_commit_time, mut ids) = (Duration::ZERO, Vec::new());
    for round in 0..burst.rounds {
        let kinds = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for asynchronous in kinds {
            let ns = if asynchronous { ASYNC_NS } else { BLOCKING_NS };
            let query = if asynchronous { "?blocking=false" } else { "" };
            let started = Instant::now();
            let answers = burst_of(&d, ns, query, burst)?;
            let answered = started.elapsed();
            let want = if asynchronous {
                recorded + burst.n
            } else {
                blocking_recorded + burst.n
            };
            wait_committed(&mut c, ns, want)?;
            let all_recorded = started.elapsed();
            for (took, r) in answers {
                if asynchronous {
                    expect(&r, 202)?;
                    accept_lat.push(took);
                    let body: serde_json::Value = serde_json::from_slice(&r.body)?;
                    let id = body["activationId"]
                        .as_str()
                        .context("202 without activationId")?;
                    ids.push(id.to_owned());
                } else {
                    expect(&r, 200)?;
                    blocking_lat.push(took);
                }
            }
            if asynchronous {
                recorded = want;
                accept_time += answered;
                async_time += all_recorded;
            } else {
                blocking_recorded = want;
                blocking_time += answered;
                blocking_commit_time += all_recorded;
            }
        }
    }
    // Every accepted activation ran once and succeeded; its acceptance-to-end time
    // is in its record.
    for id in &ids {
        let r = c.request("GET", &format!("/activations/{id}"), None, b"")?;
        ok(&r, "read an asynchronous activation's record")?;
        let rec: serde_json::Value = serde_json::from_slice(&r.body)?;
        if rec["status"] != "success" || rec["blocking"] != false {
            bail!("asynchronous activation {id}: {rec}");
        }
        let ms = rec["wait_time"].as_u64().unwrap_or(0) + rec["duration"].as_u64().unwrap_or(0);
        end_lat.push(Duration::from_millis(ms));
    }
    let total = (burst.n * burst.rounds) as f64;
    let (n, k) = (burst.n, burst.clients);
    eprintln!(
        "  blocking records committed {:.0}/s ({} of {n} per round, {k} clients)",
        total / blocking_commit_time.as_secs_f64(),
        burst.rounds
    );
    Ok(vec![
        Row::new(
            &format!("asynchronous invoke: 202 answered ({n} per round, {k} clients)"),
            &accept_lat,
        )
        .with_ops_per_s(total / accept_time.as_secs_f64()),
        Row::new(
            &format!(
                "asynchronous invoke: accepted to finished, all {n} recorded (records' whole ms)"
            ),
            &end_lat,
        )
        .with_ops_per_s(total / async_time.as_secs_f64()),
        Row::new(
            &format!("blocking invoke, same burst ({n} per round, {k} clients)"),
            &blocking_lat,
        )
        .with_ops_per_s(total / blocking_time.as_secs_f64()),
    ])
}

/// `n` invocations of `ns/noop{query}` from `clients` connections; each answer with
/// how long it took.
fn burst_of(
    d: &Daemon,
    ns: &str,
    query: &str,
    burst: Burst,
) -> anyhow::Result<Vec<(Duration, ClientResponse)>> {
    let clients = (0..burst.clients)
        .map(|_| d.client())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let results: Vec<anyhow::Result<Vec<(Duration, ClientResponse)>>> = std::thread::scope(|s| {
        let threads: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                // The first n % clients connections send one more.
                let share = burst.n / burst.clients + usize::from(i < burst.n % burst.clients);
                s.spawn(move || -> anyhow::Result<Vec<(Duration, ClientResponse)>> {
                    let mut out = Vec::with_capacity(share);
                    for _ in 0..share {
                        let t = Instant::now();
                        let r = post(&mut c, ns, query)?;
                        out.push((t.elapsed(), r));
                    }
                    Ok(out)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("burst client thread"))
            .collect()
    });
    let mut all = Vec::with_capacity(burst.n);
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

fn register_in(c: &mut Client, ns: &str, noop: &Path) -> anyhow::Result<()> {
    let body = json!({ "path": noop, "max_instances": INSTANCES });
    let r = c.request(
        "PUT",
        &format!("/namespaces/{ns}/functions/noop"),
        Some("application/json"),
        body.to_string().as_bytes(),
    )?;
    ok(&r, "register")
}

fn post(c: &mut Client, ns: &str, query: &str) -> anyhow::Result<ClientResponse> {
    Ok(c.request(
        "POST",
        &format!("/namespaces/{ns}/functions/noop/invoke{query}"),
        Some("application/json"),
        b"{}",
    )?)
}

fn expect(r: &ClientResponse, status: u16) -> anyhow::Result<()> {
    if r.status != status {
        bail!(
            "expected {status}, got {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    Ok(())
}

/// Whether `ns` has at least `n` finished records: the listing holds finished ones
/// only, newest first, so the `n`-th exists once `n` are committed.
fn has_committed(c: &mut Client, ns: &str, n: usize) -> anyhow::Result<bool> {
    if n == 0 {
        return Ok(true);
    }
    let r = c.request(
        "GET",
        &format!("/activations?namespace={ns}&limit=1&skip={}", n - 1),
        None,
        b"",
    )?;
    ok(&r, "list records")?;
    let page: Vec<serde_json::Value> = serde_json::from_slice(&r.body)?;
    Ok(!page.is_empty())
}

/// Polls until `ns` has `n` finished records.
fn wait_committed(c: &mut Client, ns: &str, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !has_committed(c, ns, n)? {
        if Instant::now() > deadline {
            bail!("{ns}: fewer than {n} records after 120 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}
