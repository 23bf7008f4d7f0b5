//! Baselines for the latency harness, measured on the same host in the same run:
//! the same Python function run by plain `python3` on the host, and in a one-shot
//! OCI container made by `runc` and by `crun` from a bundle equivalent to a sprout
//! sandbox.
//!
//! Every sample is the wall time of one whole run, from just before the process is
//! spawned to when it has exited (its stdout/stderr are drained by reader threads
//! started before the clock). Each run really calls the function: the program run by
//! `python3 -I -c` inserts the handler directory in `sys.path`, imports `f`, calls
//! `f.f(json.loads(event))` and prints `json.dumps(result)`; every run's exit status
//! and stdout are checked against what host `python3` printed. The program sets
//! `sys.dont_write_bytecode` (like the `-B` of sprout's shim), so no run writes a
//! `__pycache__` into the handler directory; all three read one if it already exists.
//!
//! Each baseline does 2 warm-up runs (not returned) first. The container baselines
//! build their bundle once, use a fresh container id and cgroup path per run and
//! delete both after each run, and remove `/sprout-bench` from every cgroup
//! hierarchy when done, also when a run fails (see [`Cleanup`]).
//!
//! The bundle has a sprout sandbox's mounts, namespaces (pid, ipc, uts, mount,
//! network), limits (128 MiB memory = memory+swap, 64 pids, one CPU), no capabilities
//! and no_new_privs; unlike sprout's spec it has no cgroup namespace, no seccomp filter
//! and no masked/read-only paths, so the runtimes do slightly less work than sprout's.
//!
//! For handlers that import packages (`bench deps`), [`install_site`] installs a
//! `requirements.txt` into a host directory (`pip install --target`, binary wheels
//! only, so no package code runs on the host); [`runc_run_with_site`] bind-mounts it
//! read-only at [`SITE_DIR`] in the bundle's rootfs and the program puts it on
//! `sys.path` right after the code directory (where sprout puts `/deps`), and
//! [`host_import`] times the host's `python3 -c "import MODULE"` with `PYTHONPATH` at
//! it.

use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use serde_json::json;

const PYTHON: &str = "/usr/bin/python3";
/// Where the handler directory is mounted in the container (as in sprout).
const CODE_DIR: &str = "/code";
/// Parent of every cgroup the container baselines create, in each hierarchy.
const CGROUP_PARENT: &str = "sprout-bench";
const WARMUP_RUNS: usize = 2;
/// A run taking longer than this is killed and fails the baseline.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// The hybrid layout's controller-less cgroup2 mount, which crun refuses.
const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// The language a baseline runs the handler in, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// `python3 -I -c PROGRAM EVENT`: `f.py`'s `f(event)`.
    Python,
    /// `node -e PROGRAM EVENT`: the directory's module (`index.js`), its `main`.
    Node,
}

impl Lang {
    fn interpreter(self) -> &'static str {
        match self {
            Lang::Python => PYTHON,
            Lang::Node => NODE,
        }
    }

    /// The handler file a directory must hold.
    fn handler_file(self) -> &'static str {
        match self {
            Lang::Python => "f.py",
            Lang::Node => "index.js",
        }
    }

    /// The interpreter's arguments that run the handler in `code_dir` on `event_json`,
    /// with `site` (a directory of installed Python packages) on the import path.
    fn args(self, code_dir: &str, site: Option<&str>, event_json: &str) -> Vec<String> {
        match self {
            Lang::Python => vec![
                "-I".into(),
                "-c".into(),
                program(code_dir, site),
                event_json.into(),
            ],
            // Only Python baselines are given packages (`ContainerBaseline::new`).
            Lang::Node => vec!["-e".into(), node_program(code_dir), event_json.into()],
        }
    }
}

const NODE: &str = "/usr/bin/node";

/// The program `node -e` runs; the event is its `process.argv[1]`. It prints the
/// awaited result as JSON, as the Python program does.
fn node_program(code_dir: &str) -> String {
    let dir = serde_json::to_string(code_dir).expect("a str serializes");
    format!(
        "const m = require({dir});\n\
         const f = typeof m === 'function' ? m : m.main;\n\
         Promise.resolve(f(JSON.parse(process.argv[1])))\n\
           .then((r) => console.log(JSON.stringify(r)));\n"
    )
}

/// The program `python3 -I -c` runs; the event is its `sys.argv[1]`. With `site`, that
/// directory comes right after the code directory on `sys.path` (as sprout's `/deps`).
fn program(code_dir: &str, site: Option<&str>) -> String {
    // A JSON string literal is a valid Python string literal.
    let dir = serde_json::to_string(code_dir).expect("a str serializes");
    let site = site.map_or_else(String::new, |s| {
        let s = serde_json::to_string(s).expect("a str serializes");
        format!("sys.path.insert(1, {s})\n")
    });
    format!(
        "import sys, json\n\
         sys.dont_write_bytecode = True\n\
         sys.path.insert(0, {dir})\n\
         {site}\
         import f\n\
         print(json.dumps(f.f(json.loads(sys.argv[1]))))\n"
    )
}

/// Where [`runc_run_with_site`] mounts the packages in the container.
pub const SITE_DIR: &str = "/deps/site-packages";

/// Installs `requirements` (a `requirements.txt`) into `into` on the host for the
/// package baselines: `/usr/bin/python3 -m pip install --target`, binary wheels only
/// (`--only-binary :all:`: no sdist is built, so no package code runs here), no cache.
/// `into` must not exist yet, or be empty.
pub fn install_site(requirements: &Path, into: &Path) -> anyhow::Result<()> {
    let out = Command::new(PYTHON)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-input",
            "--no-cache-dir",
        ])
        .args(["--disable-pip-version-check", "--only-binary", ":all:"])
        .arg("--target")
        .arg(into)
        .arg("-r")
        .arg(requirements)
        // `--target` touches no system package; Debian's marker refuses it all the same.
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .stdin(Stdio::null())
        .output()
        .context("run pip")?;
    if !out.status.success() {
        bail!(
            "pip install -r {} --target {}: {}: {}",
            requirements.display(),
            into.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The host's `python3 -c "import MODULE"` with `PYTHONPATH=site`, one process per
/// run (after 2 warm-up runs): the floor of what importing the package costs, with no
/// sandbox and no handler. The environment is only `PATH`, `LANG` and `PYTHONPATH`;
/// the working directory is `/`.
pub fn host_import(module: &str, site: &Path, runs: usize) -> anyhow::Result<Vec<Duration>> {
    ensure!(
        !module.is_empty()
            && module
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')),
        "{module:?} is not a module name"
    );
    ensure!(site.is_dir(), "{} is not a directory", site.display());
    let mut samples = Vec::with_capacity(runs);
    for i in 0..WARMUP_RUNS + runs {
        let mut cmd = Command::new(PYTHON);
        cmd.arg("-c")
            .arg(format!("import {module}"))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("PYTHONPATH", site)
            // `-c` puts the working directory first on `sys.path`: nothing there.
            .current_dir("/");
        let out = timed(&mut cmd, RUN_TIMEOUT).context("run the host interpreter")?;
        out.check(&format!("python3 -c \"import {module}\""), "")?;
        if i >= WARMUP_RUNS {
            samples.push(out.elapsed);
        }
    }
    Ok(samples)
}

/// What the host's `python3` prints for the handler in `handler_dir` with the
/// packages of `site` on its path: the output every package baseline must match.
pub fn host_reference(handler_dir: &Path, site: &Path, event_json: &str) -> anyhow::Result<String> {
    let handler_dir = absolute(Lang::Python, handler_dir)?;
    reference_output(Lang::Python, &handler_dir, Some(site), event_json)
}

/// `python3` on the host, one process per run: interpreter start-up, import of `f`,
/// the call and the exit. This is the floor every sandboxed path is compared with.
pub fn host_python(
    handler_dir: &Path,
    event_json: &str,
    runs: usize,
) -> anyhow::Result<Vec<Duration>> {
    host_process(Lang::Python, handler_dir, event_json, runs)
}

/// The interpreter of `lang` on the host, one process per run (see [`host_python`]).
pub fn host_process(
    lang: Lang,
    handler_dir: &Path,
    event_json: &str,
    runs: usize,
) -> anyhow::Result<Vec<Duration>> {
    let host = HostBaseline::new(lang, handler_dir, event_json)?;
    let mut samples = Vec::with_capacity(runs);
    for i in 0..WARMUP_RUNS + runs {
        let elapsed = host.run()?;
        if i >= WARMUP_RUNS {
            samples.push(elapsed);
        }
    }
    Ok(samples)
}

/// The interpreter of `lang` on the host running the handler, one process per
/// [`run`](Self::run), set up once (see [`host_python`]).
pub struct HostBaseline {
    lang: Lang,
    args: Vec<String>,
    expected: String,
}

impl HostBaseline {
    pub fn new(lang: Lang, handler_dir: &Path, event_json: &str) -> anyhow::Result<Self> {
        let handler_dir = absolute(lang, handler_dir)?;
        let expected = reference_output(lang, &handler_dir, None, event_json)?;
        let args = lang.args(path_str(&handler_dir)?, None, event_json);
        Ok(HostBaseline {
            lang,
            args,
            expected,
        })
    }

    /// One process, timed from spawn to exit; its output checked.
    pub fn run(&self) -> anyhow::Result<Duration> {
        let mut cmd = Command::new(self.lang.interpreter());
        cmd.args(&self.args);
        let out = timed(&mut cmd, RUN_TIMEOUT).context("run the host interpreter")?;
        out.check("host interpreter", &self.expected)?;
        Ok(out.elapsed)
    }
}

/// `runc run --bundle B ID` in the foreground, one new container per run: runc's
/// start-up, namespaces, cgroups (created and configured per run), mounts, pivot_root,
/// `python3` start-up, import, call and exit, and runc's tear-down of the container and
/// its leaf cgroups (`runc run` deletes the container when it exits; the empty
/// `/sprout-bench` parents stay until the baseline ends). Not timed: writing
/// config.json, the check that nothing is left and the removal of anything that is.
pub fn runc_run(
    lang: Lang,
    handler_dir: &Path,
    event_json: &str,
    runs: usize,
) -> anyhow::Result<Vec<Duration>> {
    container_runs(Runtime::Runc, lang, handler_dir, None, event_json, runs)
}

/// `runc run` of a Python handler that imports packages, as [`runc_run`], with the
/// installed packages of `site` (see [`install_site`]) bind-mounted read-only at
/// [`SITE_DIR`] in the rootfs, on `sys.path` right after the code directory.
pub fn runc_run_with_site(
    handler_dir: &Path,
    site: &Path,
    event_json: &str,
    runs: usize,
) -> anyhow::Result<Vec<Duration>> {
    container_runs(
        Runtime::Runc,
        Lang::Python,
        handler_dir,
        Some(site),
        event_json,
        runs,
    )
}

/// `crun run --bundle B ID` in the foreground, one new container per run, as for
/// [`runc_run`].
///
/// crun 1.8 refuses the hybrid cgroup layout (cgroup v1 controllers plus a
/// controller-less cgroup2 at `/sys/fs/cgroup/unified`), so on such a host every run is
/// `unshare -m --propagation private sh -c 'umount /sys/fs/cgroup/unified && exec crun
/// ...'`, and the samples INCLUDE that wrapper's cost (`unshare`'s start-up, a new mount
/// namespace, `sh` start-up, a fork+exec of `umount`, the exec of crun). Measure it with
/// [`crun_wrapper_overhead`] to subtract or quote it. On a host without that layout crun
/// runs directly.
pub fn crun_run(
    handler_dir: &Path,
    event_json: &str,
    runs: usize,
) -> anyhow::Result<Vec<Duration>> {
    container_runs(
        Runtime::Crun,
        Lang::Python,
        handler_dir,
        None,
        event_json,
        runs,
    )
}

/// The cost the crun wrapper adds to each [`crun_run`] sample: the same
/// `unshare -m --propagation private sh -c 'umount /sys/fs/cgroup/unified && exec ...'`
/// running `/bin/true` instead of crun (so it also includes one exec of a trivial
/// program, a slight over-estimate). After 2 warm-up runs. All zeros when the host needs
/// no wrapper (crun is then run directly).
pub fn crun_wrapper_overhead(runs: usize) -> anyhow::Result<Vec<Duration>> {
    if !needs_crun_wrapper()? {
        return Ok(vec![Duration::ZERO; runs]);
    }
    let truth = find_program("true")?;
    let mut samples = Vec::with_capacity(runs);
    for i in 0..WARMUP_RUNS + runs {
        let mut cmd = crun_wrapper()?;
        cmd.arg(&truth);
        let out = timed(&mut cmd, RUN_TIMEOUT).context("run the crun wrapper")?;
        out.check("unshare/umount wrapper", "")?;
        if i >= WARMUP_RUNS {
            samples.push(out.elapsed);
        }
    }
    Ok(samples)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Runtime {
    Runc,
    Crun,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Crun => "crun",
        }
    }

    /// `<runtime> --root <state> <args...>`, through the crun wrapper where needed.
    fn command(self, binary: &Path, state: &Path, wrap: bool) -> anyhow::Result<Command> {
        let mut cmd = if wrap {
            let mut c = crun_wrapper()?;
            c.arg(binary);
            c
        } else {
            Command::new(binary)
        };
        cmd.arg("--root").arg(state);
        Ok(cmd)
    }
}

/// `unshare -m --propagation private sh -c 'umount UNIFIED && exec "$0" "$@"'`: append
/// the program and its arguments.
fn crun_wrapper() -> anyhow::Result<Command> {
    let mut cmd = Command::new(find_program("unshare")?);
    cmd.args(["-m", "--propagation", "private"])
        .arg(find_program("sh")?)
        .arg("-c")
        .arg(format!("umount {UNIFIED} && exec \"$0\" \"$@\""));
    Ok(cmd)
}

/// Whether this is the hybrid layout crun refuses: cgroup v1 at `/sys/fs/cgroup` with
/// a cgroup2 mounted at [`UNIFIED`].
fn needs_crun_wrapper() -> anyhow::Result<bool> {
    let mounts = cgroup_mounts()?;
    let v2_at = |p: &str| mounts.iter().any(|m| m.v2 && m.path == Path::new(p));
    Ok(v2_at(UNIFIED) && !v2_at("/sys/fs/cgroup"))
}

fn container_runs(
    runtime: Runtime,
    lang: Lang,
    handler_dir: &Path,
    site: Option<&Path>,
    event_json: &str,
    runs: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut baseline = ContainerBaseline::new(runtime, lang, handler_dir, site, event_json)?;
    let mut samples = Vec::with_capacity(runs);
    for n in 0..WARMUP_RUNS + runs {
        let elapsed = baseline.run()?;
        if n >= WARMUP_RUNS {
            samples.push(elapsed);
        }
    }
    baseline.finish()?;
    Ok(samples)
}

/// `runc run` of the handler, one new container per [`ContainerBaseline::run`], set up
/// once: for measurements that interleave it with another path (`bench guard`).
pub fn runc_baseline(handler_dir: &Path, event_json: &str) -> anyhow::Result<ContainerBaseline> {
    ContainerBaseline::new(Runtime::Runc, Lang::Python, handler_dir, None, event_json)
}

/// `crun run` of the handler (through the wrapper where needed: see [`crun_run`]), as
/// [`runc_baseline`].
pub fn crun_baseline(handler_dir: &Path, event_json: &str) -> anyhow::Result<ContainerBaseline> {
    ContainerBaseline::new(Runtime::Crun, Lang::Python, handler_dir, None, event_json)
}

/// A one-shot container baseline set up once (bundle, state directory, expected
/// output): each [`run`](Self::run) runs one new container, checks its output and
/// cleans it up. Everything it made is removed by [`finish`](Self::finish), or on drop.
pub struct ContainerBaseline {
    runtime: Runtime,
    lang: Lang,
    binary: PathBuf,
    wrap: bool,
    handler_dir: PathBuf,
    /// Installed packages bind-mounted at [`SITE_DIR`], if any.
    site: Option<PathBuf>,
    event_json: String,
    expected: String,
    bundle: PathBuf,
    state: PathBuf,
    /// Runs so far (each container id and cgroup is new).
    n: usize,
    // Declared before `_dir`, so dropped (cleaned up) before the tempdir goes.
    cleanup: Cleanup,
    _dir: tempfile::TempDir,
}

impl ContainerBaseline {
    fn new(
        runtime: Runtime,
        lang: Lang,
        handler_dir: &Path,
        site: Option<&Path>,
        event_json: &str,
    ) -> anyhow::Result<Self> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the {} baseline needs root",
            runtime.name()
        );
        ensure!(
            lang == Lang::Python || site.is_none(),
            "only Python baselines import installed packages"
        );
        let handler_dir = absolute(lang, handler_dir)?;
        let site = match site {
            Some(s) => Some(
                fs::canonicalize(s)
                    .with_context(|| format!("package directory {}", s.display()))?,
            ),
            None => None,
        };
        let expected = reference_output(lang, &handler_dir, site.as_deref(), event_json)?;
        let binary = find_program(runtime.name())?;
        let wrap = runtime == Runtime::Crun && needs_crun_wrapper()?;

        let dir = tempfile::Builder::new()
            .prefix(&format!("sprout-bench-{}-", runtime.name()))
            .tempdir()
            .context("create the bundle's tempdir")?;
        let bundle = dir.path().join("bundle");
        let state = dir.path().join(format!("{}-state", runtime.name()));
        fs::create_dir_all(&state).with_context(|| format!("create {}", state.display()))?;
        write_skeleton(&bundle.join("rootfs"))?;
        if site.is_some() {
            let p = bundle.join("rootfs").join(SITE_DIR.trim_start_matches('/'));
            fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        }
        let cleanup = Cleanup {
            runtime,
            binary: binary.clone(),
            state: state.clone(),
            wrap,
            runs: Vec::new(),
        };
        Ok(ContainerBaseline {
            runtime,
            lang,
            binary,
            wrap,
            handler_dir,
            site,
            event_json: event_json.to_owned(),
            expected,
            bundle,
            state,
            n: 0,
            cleanup,
            _dir: dir,
        })
    }

    /// Runs one new container (timed: spawn to exit), deletes it and its cgroups
    /// (untimed), then checks its exit status and output.
    pub fn run(&mut self) -> anyhow::Result<Duration> {
        let runtime = self.runtime.name();
        let pid = std::process::id();
        let n = self.n;
        self.n += 1;
        let id = format!("sprout-bench-{runtime}-{pid}-{n}");
        let cgroup = format!("/{CGROUP_PARENT}/{runtime}-{pid}-{n}");
        let config = bundle_config(
            self.lang,
            &self.handler_dir,
            self.site.as_deref(),
            &self.event_json,
            &cgroup,
        );
        let path = self.bundle.join("config.json");
        fs::write(&path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("write {}", path.display()))?;

        self.cleanup.runs.push((id.clone(), cgroup.clone()));
        let mut cmd = self.runtime.command(&self.binary, &self.state, self.wrap)?;
        cmd.arg("run").arg("--bundle").arg(&self.bundle).arg(&id);
        let out = timed(&mut cmd, RUN_TIMEOUT);
        // Clean up this run (untimed) before judging it.
        self.cleanup.run(&id, &cgroup)?;
        self.cleanup.runs.pop();
        let out = out.with_context(|| format!("run {runtime} container {id}"))?;
        out.check(&format!("{runtime} run {id}"), &self.expected)?;
        Ok(out.elapsed)
    }

    /// Removes what is left (the parent cgroups); the first error.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.cleanup.finish()
    }
}

/// Deletes what a container baseline may leave: the containers of `runs` (if their
/// state still exists), their cgroups, and `/sprout-bench` in every hierarchy (when it
/// is empty: a concurrent baseline may still use it). Runs on drop, so also when a run
/// fails or panics.
struct Cleanup {
    runtime: Runtime,
    binary: PathBuf,
    state: PathBuf,
    wrap: bool,
    /// Runs not cleaned up yet: (container id, cgroup path).
    runs: Vec<(String, String)>,
}

impl Cleanup {
    /// Deletes one run's container and cgroups.
    fn run(&self, id: &str, cgroup: &str) -> anyhow::Result<()> {
        let mut result = Ok(());
        if self.state.join(id).exists() {
            let deleted = self
                .runtime
                .command(&self.binary, &self.state, self.wrap)
                .and_then(|mut cmd| {
                    cmd.args(["delete", "-f", id]);
                    timed(&mut cmd, RUN_TIMEOUT)
                });
            match deleted {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    result = Err(anyhow::anyhow!(
                        "{} delete -f {id}: {}: {}",
                        self.runtime.name(),
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }
                Err(e) => {
                    result = Err(e.context(format!("{} delete -f {id}", self.runtime.name())))
                }
            }
        }
        let removed = remove_cgroup(cgroup);
        result.and(removed)
    }

    /// Cleans up the remaining runs and the parent cgroups; the first error.
    fn finish(&mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        for (id, cgroup) in std::mem::take(&mut self.runs) {
            let r = self.run(&id, &cgroup);
            if result.is_ok() {
                result = r;
            }
        }
        let r = remove_parent_cgroups();
        result.and(r)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!(
                "sprout-bench: {} baseline clean-up: {e:#}",
                self.runtime.name()
            );
        }
    }
}

struct CgroupMount {
    path: PathBuf,
    v2: bool,
}

/// The cgroup hierarchies mounted in this mount namespace.
fn cgroup_mounts() -> anyhow::Result<Vec<CgroupMount>> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    let mut mounts = Vec::new();
    for line in info.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source ...
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split(' ').next().unwrap_or("");
        let v2 = match fstype {
            "cgroup" => false,
            "cgroup2" => true,
            _ => continue,
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        mounts.push(CgroupMount {
            path: PathBuf::from(unescape_mountinfo(mount_point)),
            v2,
        });
    }
    Ok(mounts)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the cgroup `rel` (a path from the hierarchy root) from every hierarchy,
/// killing any process left in it first.
fn remove_cgroup(rel: &str) -> anyhow::Result<()> {
    let rel = rel.trim_start_matches('/');
    let mut result = Ok(());
    for m in cgroup_mounts()? {
        let dir = m.path.join(rel);
        if let Err(e) = remove_cgroup_dir(&dir) {
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}

fn remove_cgroup_dir(dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("remove cgroup {}", dir.display()))
            }
            // Busy: processes of a killed run may still be in it (or exiting).
            Err(_) => {
                for pid in fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Removes `/sprout-bench` from every hierarchy where it exists and is empty.
fn remove_parent_cgroups() -> anyhow::Result<()> {
    let mut result = Ok(());
    for m in cgroup_mounts()? {
        let dir = m.path.join(CGROUP_PARENT);
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            // Another baseline (another process) still has a cgroup below it.
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                let busy = fs::read_dir(&dir)
                    .map(|d| d.flatten().any(|e| e.path().is_dir()))
                    .unwrap_or(false);
                if !busy && result.is_ok() {
                    result = Err(e).with_context(|| format!("remove cgroup {}", dir.display()));
                }
            }
            Err(e) => {
                if result.is_ok() {
                    result = Err(e).with_context(|| format!("remove cgroup {}", dir.display()));
                }
            }
        }
    }
    result
}

/// The rootfs skeleton, as sprout's: mount points, merged-/usr links, minimal /etc.
fn write_skeleton(root: &Path) -> anyhow::Result<()> {
    for d in ["proc", "dev", "sys", "tmp", "usr", "etc", "code"] {
        let p = root.join(d);
        fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        let p = root.join(link);
        symlink(target, &p).with_context(|| format!("create {}", p.display()))?;
    }
    for (file, content) in [
        ("etc/passwd", "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ] {
        let p = root.join(file);
        fs::write(&p, content).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

fn bind_ro(source: &Path, destination: &str) -> serde_json::Value {
    json!({
        "destination": destination, "type": "bind", "source": source,
        "options": ["rbind", "ro", "nosuid", "nodev"],
    })
}

/// config.json of the bundle: the same shape as a sprout sandbox's spec (read-only
/// root, /usr and the code bind-mounted read-only, tmpfs /tmp, limits, no
/// capabilities, no_new_privs), running the function once; with `site`, that
/// directory bind-mounted read-only at [`SITE_DIR`] and on the import path.
fn bundle_config(
    lang: Lang,
    handler_dir: &Path,
    site: Option<&Path>,
    event_json: &str,
    cgroups_path: &str,
) -> serde_json::Value {
    const MEMORY: u64 = 128 << 20;
    let mut args = vec![lang.interpreter().to_owned()];
    args.extend(lang.args(CODE_DIR, site.map(|_| SITE_DIR), event_json));
    let mut config = json!({
        "ociVersion": "1.0.2",
        "root": { "path": "rootfs", "readonly": true },
        "hostname": "sprout-bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            // No /sys/fs/cgroup below it, as in sprout.
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=64m"]},
            bind_ro(Path::new("/usr"), "/usr"),
            bind_ro(handler_dir, CODE_DIR),
        ],
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/tmp", "LANG=C.UTF-8"],
            "cwd": "/",
            "capabilities": {
                "bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true,
        },
        "linux": {
            "cgroupsPath": cgroups_path,
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "network"},
            ],
            "resources": {
                "devices": [{ "allow": false, "access": "rwm" }],
                "memory": { "limit": MEMORY, "swap": MEMORY },
                "pids": { "limit": 64 },
                "cpu": { "quota": 100_000, "period": 100_000 },
            },
        },
    });
    if let Some(site) = site {
        config["mounts"]
            .as_array_mut()
            .expect("mounts is a list")
            .push(bind_ro(site, SITE_DIR));
    }
    config
}

/// What host `python3` prints for the event (with `site` on the import path): the
/// output every run must match.
fn reference_output(
    lang: Lang,
    handler_dir: &Path,
    site: Option<&Path>,
    event_json: &str,
) -> anyhow::Result<String> {
    let site = site.map(path_str).transpose()?;
    let out = Command::new(lang.interpreter())
        .args(lang.args(path_str(handler_dir)?, site, event_json))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", lang.interpreter()))?;
    if !out.status.success() {
        bail!(
            "the handler in {} fails on the host: {}: {}",
            handler_dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("the handler's output is not UTF-8")
}

fn absolute(lang: Lang, p: &Path) -> anyhow::Result<PathBuf> {
    let p = fs::canonicalize(p).with_context(|| format!("handler directory {}", p.display()))?;
    let file = lang.handler_file();
    ensure!(p.join(file).is_file(), "{} has no {file}", p.display());
    Ok(p)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// `name` on `PATH`, or in the usual system directories.
fn find_program(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found (is it installed?)"))
}

struct Outcome {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Spawn to exit.
    elapsed: Duration,
}

impl Outcome {
    fn check(&self, what: &str, expected: &str) -> anyhow::Result<()> {
        if !self.status.success() {
            bail!(
                "{what} failed: {}: {}",
                self.status,
                String::from_utf8_lossy(&self.stderr).trim()
            );
        }
        if self.stdout != expected.as_bytes() {
            bail!(
                "{what} printed {:?}, expected {expected:?} (stderr: {})",
                String::from_utf8_lossy(&self.stdout),
                String::from_utf8_lossy(&self.stderr).trim()
            );
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Watch {
    NotStarted,
    Running(i32),
    Done,
}

/// Runs `cmd` (stdin null, stdout and stderr captured) and times it from just before
/// the spawn to its exit. The pipe readers and the watchdog that SIGKILLs it after
/// `timeout` are set up before the clock starts.
fn timed(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Outcome> {
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let reader = |fd: std::os::fd::OwnedFd| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = fs::File::from(fd).read_to_end(&mut buf);
            buf
        })
    };
    let out_reader = reader(out_r);
    let err_reader = reader(err_r);

    let watch = Arc::new((Mutex::new(Watch::NotStarted), Condvar::new()));
    let watchdog = {
        let watch = Arc::clone(&watch);
        std::thread::spawn(move || {
            let (lock, cvar) = &*watch;
            let mut state = cvar
                .wait_while(lock.lock().unwrap(), |s| *s == Watch::NotStarted)
                .unwrap();
            let (s, res) = cvar
                .wait_timeout_while(state, timeout, |s| matches!(s, Watch::Running(_)))
                .unwrap();
            state = s;
            if res.timed_out() {
                if let Watch::Running(pid) = *state {
                    // Not reaped yet (the main thread marks it Done before reaping,
                    // under this lock), so the pid is still the child's.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    return true;
                }
            }
            false
        })
    };
    let set = |s: Watch| {
        let (lock, cvar) = &*watch;
        *lock.lock().unwrap() = s;
        cvar.notify_all();
    };

    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    let start = Instant::now();
    let spawned = cmd.spawn();
    // Drop the parent's copies of the write ends, so the readers see EOF at exit.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            set(Watch::Done);
            let _ = watchdog.join();
            let _ = (out_reader.join(), err_reader.join());
            return Err(e).with_context(|| format!("spawn {:?}", cmd.get_program()));
        }
    };
    set(Watch::Running(child.id() as i32));
    // Wait for the exit without reaping: the watchdog may still kill by pid.
    let waited = loop {
        match waitid(
            Id::Pid(Pid::from_raw(child.id() as i32)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r,
        }
    };
    let elapsed = start.elapsed();
    set(Watch::Done);
    let status = child.wait();
    let killed = watchdog.join().unwrap_or(false);
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    waited.context("waitid")?;
    let status = status.context("wait")?;
    if killed {
        bail!(
            "{:?} took more than {timeout:?} and was killed (stderr: {})",
            cmd.get_program(),
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(Outcome {
        status,
        stdout,
        stderr,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("f.py"),
            "def f(event):\n    return {\"hello\": event.get(\"name\", \"world\"), \"n\": 1}\n",
        )
        .unwrap();
        dir
    }

    const EVENT: &str = r#"{"name": "Alice \u00e9 'q' \"x\""}"#;

    /// The container tests share `/sprout-bench`: one at a time.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn no_bench_cgroups() {
        for entry in fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let p = entry.path().join(CGROUP_PARENT);
            assert!(!p.exists(), "{} was left behind", p.display());
        }
        let mounts = cgroup_mounts().unwrap();
        assert!(!mounts.is_empty(), "no cgroup hierarchy found to check");
        for m in mounts {
            let p = m.path.join(CGROUP_PARENT);
            assert!(!p.exists(), "{} was left behind", p.display());
        }
    }

    #[test]
    fn program_prints_the_result() {
        let h = handler();
        let out = reference_output(Lang::Python, h.path(), None, EVENT).unwrap();
        assert_eq!(
            out,
            "{\"hello\": \"Alice \\u00e9 'q' \\\"x\\\"\", \"n\": 1}\n"
        );
        assert!(!h.path().join("__pycache__").exists());
    }

    #[test]
    fn host_python_runs() {
        let h = handler();
        assert_eq!(host_python(h.path(), EVENT, 2).unwrap().len(), 2);
    }

    #[test]
    fn broken_handler_fails_loudly() {
        let h = handler();
        fs::write(
            h.path().join("f.py"),
            "def f(event):\n    raise ValueError('no')\n",
        )
        .unwrap();
        let err = format!("{:#}", host_python(h.path(), EVENT, 2).unwrap_err());
        assert!(err.contains("ValueError: no"), "{err}");
        let _serial = serial();
        // The handler's own failure, found before any container runs (not, say, a
        // missing runc).
        let err = format!(
            "{:#}",
            runc_run(Lang::Python, h.path(), EVENT, 2).unwrap_err()
        );
        assert!(
            err.contains("fails on the host") && err.contains("ValueError: no"),
            "{err}"
        );
        no_bench_cgroups();
    }

    /// A handler that fails only in a container (`/code` is read-only there): the run's
    /// exit status is checked, the error carries its stderr, and it is cleaned up.
    #[test]
    fn container_failure_is_reported() {
        let _serial = serial();
        let h = handler();
        fs::write(
            h.path().join("f.py"),
            "def f(event):\n    if __file__.startswith('/code/'):\n        open('/code/sprout-x', 'w')\n    return 1\n",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            runc_run(Lang::Python, h.path(), EVENT, 2).unwrap_err()
        );
        assert!(
            err.contains("runc run sprout-bench-runc-")
                && err.contains("failed: exit status: 1")
                && err.contains("Read-only file system"),
            "{err}"
        );
        assert!(!h.path().join("sprout-x").exists());
        no_bench_cgroups();
    }

    /// A handler whose output differs in a container (`__file__` is `/code/f.py`
    /// there): the baseline must fail, and still clean up.
    fn container_mismatch(run: fn(&Path, &str, usize) -> anyhow::Result<Vec<Duration>>) {
        let _serial = serial();
        let h = handler();
        fs::write(
            h.path().join("f.py"),
            "def f(event):\n    return __file__\n",
        )
        .unwrap();
        let err = format!("{:#}", run(h.path(), EVENT, 2).unwrap_err());
        assert!(err.contains("/code/f.py"), "{err}");
        no_bench_cgroups();
    }

    #[test]
    fn runc_output_is_checked() {
        container_mismatch(|dir, event, runs| runc_run(Lang::Python, dir, event, runs));
    }

    #[test]
    fn crun_output_is_checked() {
        container_mismatch(crun_run);
    }

    #[test]
    fn runc_runs_and_leaves_nothing() {
        let _serial = serial();
        let h = handler();
        assert_eq!(runc_run(Lang::Python, h.path(), EVENT, 2).unwrap().len(), 2);
        no_bench_cgroups();
    }

    #[test]
    fn crun_runs_and_leaves_nothing() {
        let _serial = serial();
        let h = handler();
        assert_eq!(crun_run(h.path(), EVENT, 2).unwrap().len(), 2);
        no_bench_cgroups();
    }

    /// A handler importing a module that only a site directory has.
    fn site_handler() -> (tempfile::TempDir, tempfile::TempDir) {
        let h = tempfile::tempdir().unwrap();
        fs::write(
            h.path().join("f.py"),
            "import sproutbenchpkg\n\ndef f(event):\n    return {\"v\": sproutbenchpkg.V, \"e\": event}\n",
        )
        .unwrap();
        let site = tempfile::tempdir().unwrap();
        fs::create_dir(site.path().join("sproutbenchpkg")).unwrap();
        fs::write(site.path().join("sproutbenchpkg/__init__.py"), "V = 7\n").unwrap();
        (h, site)
    }

    #[test]
    fn the_site_is_on_the_import_path() {
        let (h, site) = site_handler();
        let out = host_reference(h.path(), site.path(), r#"{"a": 1}"#).unwrap();
        assert_eq!(out, "{\"v\": 7, \"e\": {\"a\": 1}}\n");
        // Without it the handler cannot import its package.
        let err = format!("{:#}", host_python(h.path(), "{}", 1).unwrap_err());
        assert!(err.contains("No module named 'sproutbenchpkg'"), "{err}");
        assert!(!h.path().join("__pycache__").exists());
    }

    #[test]
    fn runc_imports_from_the_site_and_leaves_nothing() {
        let _serial = serial();
        let (h, site) = site_handler();
        let samples = runc_run_with_site(h.path(), site.path(), EVENT, 2).unwrap();
        assert_eq!(samples.len(), 2);
        no_bench_cgroups();
        // The same handler without the site fails on the host, before any container.
        let err = format!(
            "{:#}",
            runc_run(Lang::Python, h.path(), EVENT, 1).unwrap_err()
        );
        assert!(err.contains("No module named 'sproutbenchpkg'"), "{err}");
        no_bench_cgroups();
    }

    #[test]
    fn host_import_runs_and_checks() {
        let (_h, site) = site_handler();
        assert_eq!(
            host_import("sproutbenchpkg", site.path(), 2).unwrap().len(),
            2
        );
        let err = format!(
            "{:#}",
            host_import("sprout_bench_missing", site.path(), 1).unwrap_err()
        );
        assert!(
            err.contains("No module named 'sprout_bench_missing'"),
            "{err}"
        );
        for bad in ["os; import sys", "", "a..b", "x y"] {
            let err = format!("{:#}", host_import(bad, site.path(), 1).unwrap_err());
            assert!(err.contains("is not a module name"), "{err}");
        }
    }

    #[test]
    fn install_site_quotes_pip() {
        let dir = tempfile::tempdir().unwrap();
        let req = dir.path().join("requirements.txt");
        fs::write(&req, "this is === not a requirement\n").unwrap();
        let err = format!(
            "{:#}",
            install_site(&req, &dir.path().join("site")).unwrap_err()
        );
        assert!(
            err.contains("pip install -r") && err.contains("Invalid requirement"),
            "{err}"
        );
    }

    #[test]
    fn crun_wrapper_overhead_runs() {
        assert_eq!(crun_wrapper_overhead(2).unwrap().len(), 2);
    }

    #[test]
    fn timed_kills_on_timeout() {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("10");
        let t = Instant::now();
        let err = format!(
            "{:#}",
            timed(&mut cmd, Duration::from_millis(200))
                .err()
                .expect("a run past its timeout is an error")
        );
        assert!(err.contains("took more than 200ms and was killed"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
