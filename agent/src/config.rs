//! Agent settings.

use std::path::PathBuf;
use std::time::Duration;

use crate::runtime::Runtime;

/// Calls one sandbox may have in flight on the call socket unless configured otherwise.
pub const DEFAULT_MAX_CALLS_IN_FLIGHT: usize = 64;

/// Requests one function's queue holds unless configured otherwise (`--max-queue`).
pub const DEFAULT_MAX_QUEUE: usize = 256;

/// Limits a function gets when it does not set its own (OpenWhisk-style names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    pub memory_mb: u64,
    pub timeout_ms: u64,
    pub pids: u64,
    pub cpus: f64,
    /// Instances of one function at most; requests beyond wait in its queue.
    pub max_instances: usize,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            memory_mb: 128,
            timeout_ms: 60_000,
            pids: 64,
            cpus: 1.0,
            max_instances: 4,
        }
    }
}

/// The warm pool's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolConfig {
    /// Prewarmed (frozen) sandboxes kept ready, per runtime.
    pub stem_cells: StemCells,
    /// A warm instance idle this long is frozen.
    pub pause_grace: Duration,
    /// A warm instance idle this long is destroyed.
    pub idle_ttl: Duration,
    /// Memory (MiB) that sandboxes may reserve through their limits; beyond it the
    /// least recently used idle ones are evicted.
    pub memory_budget_mb: u64,
    /// How new sandboxes are made (stem cells, and cold starts when none is ready).
    pub new_sandboxes: NewSandboxes,
    /// Memory (MiB) the package zygotes may take together, each counted at its
    /// memory limit (`--package-zygotes-mb`); 0 turns them off.
    pub package_zygotes_mb: u64,
    /// Ready stem cells kept forked from each package zygote (`--package-stem-cells`).
    pub package_stem_cells: usize,
}

/// The default of `--package-zygotes-mb`.
pub const DEFAULT_PACKAGE_ZYGOTES_MB: u64 = 1024;

/// How the pool makes a new sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NewSandboxes {
    /// Forked from the fork server's zygote (Python), else created by libcontainer.
    /// The fork server is made when the first sandbox is needed; an agent that does
    /// not keep sandboxes warm (the one-shot CLI) always creates.
    #[default]
    Fork,
    /// Every sandbox created by libcontainer.
    Create,
}

impl NewSandboxes {
    /// `fork` or `create`.
    pub fn parse(text: &str) -> Result<NewSandboxes, String> {
        match text {
            "fork" => Ok(NewSandboxes::Fork),
            "create" => Ok(NewSandboxes::Create),
            other => Err(format!("{other:?} is neither fork nor create")),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            stem_cells: StemCells::python(2),
            pause_grace: Duration::from_millis(50),
            idle_ttl: Duration::from_secs(600),
            memory_budget_mb: default_memory_budget_mb(),
            new_sandboxes: NewSandboxes::Fork,
            package_zygotes_mb: DEFAULT_PACKAGE_ZYGOTES_MB,
            package_stem_cells: 1,
        }
    }
}

/// How many stem cells the pool keeps ready for each runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StemCells {
    /// By [`Runtime`], in [`Runtime::ALL`]'s order.
    counts: [usize; Runtime::ALL.len()],
}

/// The most stem cells of one runtime `--stem-cells` accepts.
pub const MAX_STEM_CELLS: usize = 1024;

impl StemCells {
    /// `n` Python stem cells and none of any other runtime.
    pub fn python(n: usize) -> StemCells {
        StemCells::default().with(Runtime::Python, n)
    }

    pub fn with(mut self, runtime: Runtime, n: usize) -> StemCells {
        self.counts[runtime as usize] = n;
        self
    }

    pub fn get(&self, runtime: Runtime) -> usize {
        self.counts[runtime as usize]
    }

    /// Every stem cell wanted, of every runtime.
    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// The runtimes that have stem cells.
    pub fn runtimes(&self) -> impl Iterator<Item = Runtime> + '_ {
        Runtime::ALL.into_iter().filter(|r| self.get(*r) > 0)
    }

    /// Parses `sprout serve --stem-cells`: `python=2,nodejs=1,native=1` (a runtime
    /// left out has none), or a bare number of Python stem cells.
    pub fn parse(text: &str) -> Result<StemCells, String> {
        let count = |runtime: &str, n: &str| {
            n.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= MAX_STEM_CELLS)
                .ok_or_else(|| {
                    format!("stem cells {runtime}{n:?}: give a number from 0 to {MAX_STEM_CELLS}")
                })
        };
        if !text.contains('=') {
            return count("", text).map(StemCells::python);
        }
        let mut cells = StemCells::default();
        for part in text.split(',') {
            let (name, n) = part.split_once('=').ok_or_else(|| {
                format!("stem cells {part:?}: give RUNTIME=N (python=2,nodejs=1) or a number")
            })?;
            let name = name.trim();
            let runtime = Runtime::ALL
                .into_iter()
                .find(|r| r.name() == name)
                .ok_or_else(|| {
                    format!("stem cells for unknown runtime {name:?}: use python, nodejs or native")
                })?;
            cells = cells.with(runtime, count(&format!("{name}="), n)?);
        }
        Ok(cells)
    }
}

impl std::fmt::Display for StemCells {
    /// `python=2,nodejs=1,native=0`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, runtime) in Runtime::ALL.into_iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{}={}", runtime.name(), self.get(runtime))?;
        }
        Ok(())
    }
}

/// Half of the machine's memory.
pub fn default_memory_budget_mb() -> u64 {
    let total_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find_map(|l| {
            l.strip_prefix("MemTotal:")
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
    });
    total_kb.map_or(4096, |kb| kb / 1024 / 2)
}

/// The machine's online CPUs (`/sys/devices/system/cpu/online`), or what the
/// process may use when that cannot be read.
pub fn machine_cpus() -> u64 {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|list| count_cpu_list(&list))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64))
}

/// The number of CPUs in a kernel CPU list such as `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> Option<u64> {
    let mut n = 0;
    for part in list.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
                b.checked_sub(a)? + 1
            }
            None => part.parse::<u64>().map(|_| 1).ok()?,
        };
    }
    (n > 0).then_some(n)
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Parent of every agent's state directory.
    pub state_root: PathBuf,
    /// Host path of the `sprout-shim` binary.
    pub shim: PathBuf,
    /// The `sprout-spawner` executable; `None`: next to the running executable or
    /// in its parent directory ([`pool::find_spawner`]).
    pub spawner: Option<PathBuf>,
    pub defaults: Defaults,
    /// Keep instances warm between invocations and run the pool manager (the
    /// daemon); the embedded CLI does neither.
    pub keep_warm: bool,
    pub pool: PoolConfig,
    /// Captured output kept per stream per invocation; the rest is dropped and flagged.
    pub log_limit: usize,
    /// Calls (and resolves) one sandbox may have in flight on the agent's call socket;
    /// past it a call is refused at once with `too_many_calls`. At least 1.
    pub max_calls_in_flight: usize,
    /// The host ids sandboxes run as: each live sandbox has its own uid (= gid) from
    /// this range, so at most `count` sandboxes at once. Two agents on one host need
    /// ranges that do not overlap. A function's files must be readable by "other".
    pub sandbox_uids: rootfs::SandboxUids,
    /// The data directory ([`crate::DataDir`]): what must outlive the process
    /// (uploaded code now; registrations, the package cache and activation records
    /// later). `None`: the agent keeps nothing beyond its life (the embedded CLI).
    pub data_dir: Option<PathBuf>,
    /// The package cache without a data directory (the embedded CLI):
    /// `$SPROUT_PACKAGE_CACHE`, else [`DEFAULT_PACKAGE_CACHE`]. With a data directory
    /// the cache is its `packages/`.
    pub package_cache: PathBuf,
    /// Limits of each install sandbox (`--install-memory-mb`, `--install-timeout`).
    pub install_limits: crate::packages::InstallLimits,
    /// Where packages come from (`--package-index`, `--npm-registry`): PyPI and the
    /// npm registry unless the operator names a mirror.
    pub package_sources: crate::packages::Sources,
    /// Requests one function's queue may hold (`--max-queue`, at least 1); one more
    /// is refused with 429 and never enters it.
    pub max_queue: usize,
    /// Each namespace's limits on client invocations in flight and per minute
    /// (`--namespace-concurrent`, `--namespace-per-minute`, `--namespace-limits`).
    pub namespace_limits: crate::admission::NamespaceLimits,
    /// Keep no activation records (`--no-records`), even with a data directory: ids
    /// are still made and answered; asynchronous invocations are refused.
    pub no_records: bool,
    /// How long activation records are kept (`--activations-max`,
    /// `--activations-max-age`).
    pub activations: crate::activations::Retention,
    /// Threads that run accepted asynchronous invocations (`--async-workers`): each
    /// waits in its function's queue like a client's request. At least 1.
    pub async_workers: usize,
    /// OpenWhisk's API host (`--api-host URL`): each OpenWhisk activation's
    /// `__OW_API_HOST`. `None`: not set.
    pub api_host: Option<String>,
    /// How the node acts as an OpenWhisk invoker (`POST /invoke`): its identity in
    /// acknowledgements, and OpenWhisk's CouchDB (`--whisks-db`) if any.
    pub openwhisk_invoker: crate::openwhisk::invoker::Settings,
}

/// The default of `--async-workers`.
pub const DEFAULT_ASYNC_WORKERS: usize = 8;

/// Where the embedded CLI keeps installed packages.
pub const DEFAULT_PACKAGE_CACHE: &str = "/var/cache/sprout/packages";

impl Config {
    /// Defaults: state under `/run/sprout`, the shim next to the running binary
    /// (or `$SPROUT_SHIM`), the spawner `$SPROUT_SPAWNER` or found at start.
    pub fn new() -> Config {
        let shim = std::env::var_os("SPROUT_SHIM")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("sprout-shim")))
                    .unwrap_or_else(|| PathBuf::from("sprout-shim"))
            });
        Config {
            state_root: PathBuf::from("/run/sprout"),
            shim,
            spawner: std::env::var_os("SPROUT_SPAWNER").map(PathBuf::from),
            defaults: Defaults::default(),
            keep_warm: true,
            pool: PoolConfig::default(),
            log_limit: 1 << 20,
            max_calls_in_flight: DEFAULT_MAX_CALLS_IN_FLIGHT,
            sandbox_uids: rootfs::SandboxUids::DEFAULT,
            data_dir: None,
            package_cache: std::env::var_os("SPROUT_PACKAGE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PACKAGE_CACHE)),
            install_limits: crate::packages::InstallLimits::default(),
            package_sources: crate::packages::Sources::default(),
            max_queue: DEFAULT_MAX_QUEUE,
            namespace_limits: crate::admission::NamespaceLimits::default(),
            no_records: false,
            activations: crate::activations::Retention::default(),
            async_workers: DEFAULT_ASYNC_WORKERS,
            api_host: None,
            openwhisk_invoker: crate::openwhisk::invoker::Settings::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
        assert!(machine_cpus() >= 1);
    }

    #[test]
    fn stem_cells_are_counted_per_runtime() {
        let cells = StemCells::parse("python=2,nodejs=1,native=1").unwrap();
        assert_eq!(
            (
                cells.get(Runtime::Python),
                cells.get(Runtime::Nodejs),
                cells.get(Runtime::Native),
                cells.total()
            ),
            (2, 1, 1, 4)
        );
        assert_eq!(cells.to_string(), "python=2,nodejs=1,native=1");
        // A bare number still means Python; a runtime left out has none.
        assert_eq!(StemCells::parse("3").unwrap(), StemCells::python(3));
        assert_eq!(StemCells::parse("0").unwrap().total(), 0);
        let node = StemCells::parse("nodejs=2").unwrap();
        assert_eq!(node.runtimes().collect::<Vec<_>>(), [Runtime::Nodejs]);
        assert_eq!(PoolConfig::default().stem_cells, StemCells::python(2));
        for (bad, says) in [
            ("ruby=1", "unknown runtime \"ruby\""),
            ("python=x", "give a number"),
            ("python=-1", "give a number"),
            ("python=99999", "give a number"),
            ("x", "give a number"),
            ("python=1,nodejs", "give RUNTIME=N"),
            ("", "give a number"),
        ] {
            let e = StemCells::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
