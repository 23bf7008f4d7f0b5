//! `bench oneshot`: the README's main command, a whole `sprout invoke DIR` process
//! (embedded agent, one new sandbox, clean-up) of `examples/hello`, against what a
//! one-shot run of the same function with the same event costs elsewhere, measured
//! interleaved in one run: `crun run` and `runc run` of an equivalent bundle running
//! the handler with `python3`, and the host's `python3` alone (no sandbox at all:
//! the floor). Each round runs every path
//! once, starting with a different one each round, so drift on the host lands on all
//! of them alike. It writes `target/sprout-bench/oneshot.json`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::baseline::{self, HostBaseline, Lang};
use crate::stats::Row;

pub const SPROUT: &str = "sprout invoke DIR (whole process, embedded)";
pub const CRUN: &str = "crun run (same handler, python3)*";
pub const RUNC: &str = "runc run (same handler, python3)";
pub const HOST: &str = "host python3 process (same handler)";
pub const CRUN_WRAPPER: &str = "  * of which unshare + umount wrapper";

/// Runs before the rounds whose samples are dropped (page cache, first runs).
const WARMUP_ROUNDS: usize = 2;

/// The event every path gets.
const EVENT: &str = r#"{"name":"Alice"}"#;

/// One whole `sprout invoke DIR '{"name":"Alice"}'` process of `examples/hello`,
/// timed from spawn to exit; its output checked.
pub fn embedded_once(bin: &Path, hello: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let out = Command::new(bin.join("sprout"))
        .arg("invoke")
        .arg(hello)
        .arg(EVENT)
        .output()?;
    let took = t.elapsed();
    if !out.status.success() || out.stdout != b"\"Hello, Alice!\"\n" {
        bail!(
            "embedded invoke failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// `rounds` interleaved rounds of the four paths; the crun wrapper's own cost after
/// them. Rows in the order of the constants above.
pub fn run(bin: &Path, ws: &Path, rounds: usize) -> anyhow::Result<Vec<Row>> {
    // Every path runs the README's function with its event.
    let hello = ws.join("examples/hello");
    let mut crun = baseline::crun_baseline(&hello, EVENT)?;
    let mut runc = baseline::runc_baseline(&hello, EVENT)?;
    let host = HostBaseline::new(Lang::Python, &hello, EVENT)?;
    let mut samples: [Vec<Duration>; 4] = Default::default();
    for round in 0..WARMUP_ROUNDS + rounds {
        let mut took = [Duration::ZERO; 4];
        for k in 0..4 {
            let path = (round + k) % 4;
            took[path] = match path {
                0 => embedded_once(bin, &hello)?,
                1 => crun.run()?,
                2 => runc.run()?,
                _ => host.run()?,
            };
        }
        if round >= WARMUP_ROUNDS {
            for (all, one) in samples.iter_mut().zip(took) {
                all.push(one);
            }
        }
    }
    crun.finish()?;
    runc.finish()?;
    let wrapper = baseline::crun_wrapper_overhead(rounds)?;
    let [s, c, r, h] = samples;
    Ok(vec![
        Row::new(SPROUT, &s),
        Row::new(CRUN, &c),
        Row::new(RUNC, &r),
        Row::new(HOST, &h),
        Row::new(CRUN_WRAPPER, &wrapper),
    ])
}

/// What the rows say about the target (a one-shot faster than `crun run`).
pub fn verdict(rows: &[Row]) -> Option<String> {
    let p50 = |path: &str| rows.iter().find(|r| r.path == path).map(|r| r.p50_us);
    let (s, c, r, h) = (p50(SPROUT)?, p50(CRUN)?, p50(RUNC)?, p50(HOST)?);
    Some(format!(
        "one-shot sprout invoke vs crun run: {:.2}x, vs runc run: {:.2}x, over host python3: +{:.1} ms (p50)",
        s / c,
        s / r,
        (s - h) / 1000.0
    ))
}
