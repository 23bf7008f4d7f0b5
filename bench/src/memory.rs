//! Memory of idle sandboxes: what one more frozen stem cell costs the host.
//!
//! A daemon keeps `N` Python stem cells (`--stem-cells python=N --pause-grace 50`);
//! once all are made and frozen, each stem cell's cgroup is read for its memory
//! usage (v1 `memory.usage_in_bytes`, v2 `memory.current`: the pages charged to the
//! sandbox, i.e. those it allocated or copied on write itself) and its processes for
//! their proportional set size (the sum of `Pss:` in `/proc/<pid>/smaps_rollup` over
//! the pids in its `cgroup.procs`: each page shared by k processes counts 1/k). With
//! `--new-sandboxes fork` the pages a stem cell shares with the fork server's zygote
//! are charged to the fork server's cgroup, which is measured too and amortised over
//! the `N` stem cells.
//!
//! Results are bytes, not latencies: they go to `target/sprout-bench/memory.json` and a
//! table of their own.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use serde::Serialize;

use crate::daemon::Daemon;
use crate::guard::median;
use crate::latency::NewSandboxes;

/// One memory measurement, as written to `memory.json`.
#[derive(Serialize, Debug, Clone)]
pub struct MemoryRow {
    pub what: String,
    /// How the daemon made its sandboxes: `fork` or `create`.
    pub new_sandboxes: &'static str,
    /// Sandboxes measured (the median is over them); for the fork server, 1.
    pub n: usize,
    pub median_bytes: u64,
    pub min_bytes: u64,
    pub max_bytes: u64,
}

impl MemoryRow {
    fn new(what: &str, made: NewSandboxes, values: &[u64]) -> MemoryRow {
        assert!(!values.is_empty(), "{what}: no values");
        let as_f64: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        MemoryRow {
            what: what.to_owned(),
            new_sandboxes: made.arg(),
            n: values.len(),
            median_bytes: median(&as_f64) as u64,
            min_bytes: *values.iter().min().expect("not empty"),
            max_bytes: *values.iter().max().expect("not empty"),
        }
    }
}

/// A cgroup's memory, as one hierarchy shows it.
#[derive(Debug, Clone, Copy)]
struct CgroupMemory {
    usage: u64,
    /// Of `usage`, anonymous memory (`memory.stat`: v1 `rss`, v2 `anon`); the rest is
    /// mostly kernel memory (page tables, stacks) and page cache.
    anon: u64,
    pss: u64,
}

/// Where a daemon's cgroups are in the memory hierarchy, and which file holds usage.
struct Hierarchy {
    /// The daemon's parent cgroup: `<mount>/sprout/<agent pid>`.
    parent: PathBuf,
    usage_file: &'static str,
    /// The key of anonymous memory in `memory.stat`.
    anon_key: &'static str,
}

impl Hierarchy {
    fn of(agent_pid: u32) -> Hierarchy {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let (root, usage_file, anon_key) = if v2 {
            ("/sys/fs/cgroup", "memory.current", "anon")
        } else {
            ("/sys/fs/cgroup/memory", "memory.usage_in_bytes", "rss")
        };
        Hierarchy {
            parent: Path::new(root).join("sprout").join(agent_pid.to_string()),
            usage_file,
            anon_key,
        }
    }

    /// The cgroups of the daemon's sandboxes (`sprout-<pid>-<n>`), sorted.
    fn sandboxes(&self, agent_pid: u32) -> anyhow::Result<Vec<PathBuf>> {
        let prefix = format!("sprout-{agent_pid}-");
        let mut found = Vec::new();
        let entries = fs::read_dir(&self.parent)
            .with_context(|| format!("list {}", self.parent.display()))?;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let is_sandbox = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if is_sandbox && entry.file_type()?.is_dir() {
                found.push(entry.path());
            }
        }
        found.sort();
        Ok(found)
    }

    /// The fork server's cgroup (`sprout-<pid>.forks`).
    fn fork_server(&self, agent_pid: u32) -> PathBuf {
        self.parent.join(format!("sprout-{agent_pid}.forks"))
    }

    /// A cgroup's memory usage, its descendants' included.
    fn usage(&self, cgroup: &Path) -> anyhow::Result<u64> {
        let usage_path = cgroup.join(self.usage_file);
        fs::read_to_string(&usage_path)
            .with_context(|| format!("read {}", usage_path.display()))?
            .trim()
            .parse()
            .with_context(|| format!("parse {}", usage_path.display()))
    }

    fn read(&self, cgroup: &Path) -> anyhow::Result<CgroupMemory> {
        let usage = self.usage(cgroup)?;
        let stat_path = cgroup.join("memory.stat");
        let stat = fs::read_to_string(&stat_path)
            .with_context(|| format!("read {}", stat_path.display()))?;
        let anon = stat_value(&stat, self.anon_key)
            .with_context(|| format!("no {} in {}", self.anon_key, stat_path.display()))?;
        let procs_path = cgroup.join("cgroup.procs");
        let procs = fs::read_to_string(&procs_path)
            .with_context(|| format!("read {}", procs_path.display()))?;
        let mut pss = 0;
        let mut pids = 0;
        for pid in procs.split_whitespace() {
            pss += pss_of(pid)?;
            pids += 1;
        }
        ensure!(pids > 0, "{} has no process", cgroup.display());
        Ok(CgroupMemory { usage, anon, pss })
    }
}

/// The `Pss:` of `/proc/<pid>/smaps_rollup`, in bytes.
fn pss_of(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    parse_pss(&text).with_context(|| format!("no Pss line in {path}"))
}

/// The value of `key` in a `memory.stat` (`key value` lines).
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// `Pss:   1234 kB` → 1234 × 1024.
fn parse_pss(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup.lines().find_map(|l| {
        let kb = l.strip_prefix("Pss:")?.trim().strip_suffix("kB")?.trim();
        kb.parse::<u64>().ok().map(|kb| kb * 1024)
    })
}

/// A daemon keeping `stem_cells` Python stem cells made as `made` says, once all are
/// made and frozen (checked to have been made that way), with its memory hierarchy.
fn settled(
    bin: &Path,
    made: NewSandboxes,
    stem_cells: usize,
) -> anyhow::Result<(Daemon, Hierarchy)> {
    let target = format!("python={stem_cells}");
    let d = Daemon::start(
        bin,
        &[
            "--stem-cells",
            &target,
            "--pause-grace",
            "50",
            "--new-sandboxes",
            made.arg(),
        ],
    )?;
    let mut c = d.client()?;
    let n = stem_cells as u64;
    d.wait_status(&mut c, "the stem cells to be made and frozen", |s| {
        s["sandboxes"].as_u64() == Some(n)
            && s["stem_cells"].as_u64() == Some(n)
            && s["frozen"].as_u64() == Some(n)
    })?;
    let s = d.status(&mut c)?;
    let (forked, created) = (&s["sandboxes_forked"], &s["sandboxes_created"]);
    let as_made = match made {
        NewSandboxes::Fork => forked.as_u64() == Some(n) && created.as_u64() == Some(0),
        NewSandboxes::Create => created.as_u64() == Some(n) && forked.as_u64() == Some(0),
    };
    if !as_made {
        bail!(
            "with --new-sandboxes {}: {forked} stem cells forked and {created} created, \
             expected all {n} {}",
            made.arg(),
            made.arg()
        );
    }
    let h = Hierarchy::of(d.pid());
    Ok((d, h))
}

/// Memory of `stem_cells` idle (frozen) Python stem cells made as `made` says: per
/// sandbox, cgroup usage (and its anonymous part) and PSS; with `fork`, the fork
/// server's cgroup usage and PSS, whole and divided by `stem_cells`. And what one
/// more idle stem cell costs the host: the usage of the agent's whole cgroup tree
/// (`/sprout/<pid>`: sandboxes, fork server) with `stem_cells` less that with half as
/// many (another daemon), divided by the difference. That marginal cost also counts
/// the pages a forked sandbox copied on write while it was still in the fork server's
/// cgroup (they stay charged there), which its own cgroup's usage misses.
pub fn idle(bin: &Path, made: NewSandboxes, stem_cells: usize) -> anyhow::Result<Vec<MemoryRow>> {
    ensure!(stem_cells >= 2, "measure at least 2 stem cells");
    let n = stem_cells as u64;
    let (d, h) = settled(bin, made, stem_cells)?;
    let cgroups = h.sandboxes(d.pid())?;
    ensure!(
        cgroups.len() == stem_cells,
        "expected {stem_cells} sandbox cgroups in {}, found {}",
        h.parent.display(),
        cgroups.len()
    );
    let per_sandbox = cgroups
        .iter()
        .map(|cg| h.read(cg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let label = |what: &str| format!("idle stem cell, {what} ({})", made.arg());
    let mut rows = vec![
        MemoryRow::new(
            &label("cgroup memory usage"),
            made,
            &per_sandbox.iter().map(|m| m.usage).collect::<Vec<_>>(),
        ),
        MemoryRow::new(
            &format!("  of which anonymous ({})", made.arg()),
            made,
            &per_sandbox.iter().map(|m| m.anon).collect::<Vec<_>>(),
        ),
        MemoryRow::new(
            &label("PSS of its processes"),
            made,
            &per_sandbox.iter().map(|m| m.pss).collect::<Vec<_>>(),
        ),
    ];
    if made == NewSandboxes::Fork {
        let server = h.read(&h.fork_server(d.pid()))?;
        let per = |v: u64| v / n;
        rows.extend([
            MemoryRow::new("fork server, cgroup memory usage", made, &[server.usage]),
            MemoryRow::new("  of which anonymous", made, &[server.anon]),
            MemoryRow::new("fork server, PSS of its processes", made, &[server.pss]),
            MemoryRow::new(
                &format!("  fork server cgroup usage ÷ {stem_cells} stem cells"),
                made,
                &[per(server.usage)],
            ),
            MemoryRow::new(
                &format!("  fork server PSS ÷ {stem_cells} stem cells"),
                made,
                &[per(server.pss)],
            ),
        ]);
    }
    let total = h.usage(&h.parent)?;
    drop(d);
    let half = stem_cells / 2;
    let (d, h) = settled(bin, made, half)?;
    let total_half = h.usage(&h.parent)?;
    drop(d);
    let marginal = total.saturating_sub(total_half) / (stem_cells - half) as u64;
    rows.push(MemoryRow::new(
        &format!(
            "one more idle stem cell, agent's cgroups, {half} → {stem_cells} ({})",
            made.arg()
        ),
        made,
        &[marginal],
    ));
    Ok(rows)
}

/// 2.41 MiB, 812 KiB.
pub fn human_bytes(b: u64) -> String {
    if b < 1 << 20 {
        format!("{:.0} KiB", b as f64 / 1024.0)
    } else {
        format!("{:.2} MiB", b as f64 / f64::from(1 << 20))
    }
}

/// Prints the memory table.
pub fn print(rows: &[MemoryRow]) {
    println!(
        "{:<58} {:>7} {:>4} {:>11} {:>11} {:>11}",
        "memory", "made", "n", "median", "min", "max"
    );
    for r in rows {
        println!(
            "{:<58} {:>7} {:>4} {:>11} {:>11} {:>11}",
            r.what,
            r.new_sandboxes,
            r.n,
            human_bytes(r.median_bytes),
            human_bytes(r.min_bytes),
            human_bytes(r.max_bytes)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_is_read_from_smaps_rollup() {
        let text = "55d0c1a2e000-7ffd4a3f1000 ---p 00000000 00:00 0 [rollup]\n\
                    Rss:                7340 kB\n\
                    Pss:                2345 kB\n\
                    Pss_Anon:           1200 kB\n";
        assert_eq!(parse_pss(text), Some(2345 * 1024));
        assert_eq!(parse_pss("Rss: 12 kB\n"), None);
        let stat = "cache 0\nrss 3297280\nrss_huge 0\ntotal_rss 3297280\n";
        assert_eq!(stat_value(stat, "rss"), Some(3297280));
        assert_eq!(stat_value(stat, "anon"), None);
        // This process's own: a real file parses.
        assert!(pss_of(&std::process::id().to_string()).unwrap() > 0);
    }

    #[test]
    fn rows_take_the_median() {
        let r = MemoryRow::new("x", NewSandboxes::Fork, &[3 << 20, 1 << 20, 2 << 20]);
        assert_eq!(
            (r.n, r.median_bytes, r.min_bytes, r.max_bytes),
            (3, 2 << 20, 1 << 20, 3 << 20)
        );
        assert_eq!(human_bytes(812 * 1024), "812 KiB");
        assert_eq!(human_bytes(5 << 19), "2.50 MiB");
    }

    #[test]
    fn only_sandbox_cgroups_are_listed() {
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join("sprout/42");
        for d in [
            "sprout-42-1",
            "sprout-42-12",
            "sprout-42.forks",
            "freezer-anchor",
            "sprout-42-x",
            "sprout-4-1",
        ] {
            fs::create_dir_all(parent.join(d)).unwrap();
        }
        fs::write(parent.join("sprout-42-3"), "").unwrap(); // a file, not a cgroup
        let h = Hierarchy {
            parent: parent.clone(),
            usage_file: "memory.current",
            anon_key: "anon",
        };
        assert_eq!(
            h.sandboxes(42).unwrap(),
            vec![parent.join("sprout-42-1"), parent.join("sprout-42-12")]
        );
        assert_eq!(h.fork_server(42), parent.join("sprout-42.forks"));
    }
}
