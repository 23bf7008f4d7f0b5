//! sprout's cgroups on cgroup v1 and v2: where they are, what they count, how they go.
//!
//! libcontainer creates and configures each sandbox's cgroup; this module only reads
//! counters and removes trees (a crashed agent's leftovers, the agent's own parent
//! cgroup at exit). Everything goes through the hierarchy root given at
//! construction, so tests run on a fake tree in a temp dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::oom::{keyed_value, OomWatch};
use crate::{io_err, Error};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller under the root (legacy or hybrid layout).
    V1,
    /// One unified hierarchy at the root.
    V2,
}

/// The host's cgroup hierarchy, seen from its root (normally `/sys/fs/cgroup`).
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    version: CgroupVersion,
}

const KILL_ROUNDS: u32 = 200;
/// Where the host's cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl Cgroups {
    /// Detects the host's setup at `/sys/fs/cgroup` (see [`Cgroups::detect_at`]).
    pub fn detect() -> Result<Cgroups, Error> {
        Cgroups::detect_at(Path::new(CGROUP_ROOT))
    }

    /// Detects the setup of the hierarchy at `root`: v2 when `root` is a unified
    /// hierarchy, which has `cgroup.controllers` at its root; v1 otherwise, the legacy
    /// layout (one mount per controller) and the hybrid one, whose cgroup2 mount
    /// `unified/` has no controllers. (libcgroups, which libcontainer uses, looks at
    /// the file system types instead, with the same outcome.) A root that cannot be
    /// listed is an error.
    pub fn detect_at(root: &Path) -> Result<Cgroups, Error> {
        fs::read_dir(root).map_err(io_err("list the cgroup root", root))?;
        let version = if root.join("cgroup.controllers").is_file() {
            CgroupVersion::V2
        } else {
            CgroupVersion::V1
        };
        Ok(Cgroups {
            root: root.to_path_buf(),
            version,
        })
    }

    /// A hierarchy at `root` (for tests).
    pub fn at(root: &Path, version: CgroupVersion) -> Cgroups {
        Cgroups {
            root: root.to_path_buf(),
            version,
        }
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Every directory that stands for the cgroup `rel` (one per v1 controller).
    pub fn dirs(&self, rel: &Path) -> Vec<PathBuf> {
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        match self.version {
            CgroupVersion::V2 => vec![self.root.join(rel)],
            CgroupVersion::V1 => self
                .v1_hierarchies()
                .into_iter()
                .map(|h| h.join(rel))
                .collect(),
        }
    }

    /// v1 controller mounts: real directories under the root, minus the controller-less
    /// `unified` of the hybrid layout (and symlinks such as `cpu -> cpu,cpuacct`).
    fn v1_hierarchies(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_type().map(|t| t.is_dir()).unwrap_or(false) && e.file_name() != "unified"
            })
            .map(|e| e.path())
            .collect();
        dirs.sort();
        dirs
    }

    /// The directory of `controller` (a v1 hierarchy name) for `rel`.
    pub fn controller_dir(&self, controller: &str, rel: &Path) -> PathBuf {
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        match self.version {
            CgroupVersion::V2 => self.root.join(rel),
            CgroupVersion::V1 => self.root.join(controller).join(rel),
        }
    }

    fn memory_dir(&self, rel: &Path) -> PathBuf {
        self.controller_dir("memory", rel)
    }

    /// The memory charged to `rel` now, in bytes (v1 `memory.usage_in_bytes`, v2
    /// `memory.current`).
    pub fn memory_usage(&self, rel: &Path) -> Result<u64, Error> {
        let file = match self.version {
            CgroupVersion::V1 => self.memory_dir(rel).join("memory.usage_in_bytes"),
            CgroupVersion::V2 => self.memory_dir(rel).join("memory.current"),
        };
        let text = fs::read_to_string(&file).map_err(io_err("read", &file))?;
        text.trim()
            .parse()
            .map_err(|_| io_err("parse", &file)(std::io::Error::other(text.trim().to_owned())))
    }

    /// How many times the kernel's OOM killer killed a process in `rel`.
    pub fn oom_kills(&self, rel: &Path) -> Result<u64, Error> {
        let file = match self.version {
            CgroupVersion::V1 => self.memory_dir(rel).join("memory.oom_control"),
            CgroupVersion::V2 => self.memory_dir(rel).join("memory.events"),
        };
        let text = fs::read_to_string(&file).map_err(io_err("read", &file))?;
        Ok(keyed_value(&text, "oom_kill").unwrap_or(0))
    }

    /// Sets up the out-of-memory notification of `rel` (see [`OomWatch`]). Costs a
    /// few system calls and one descriptor, once per instance.
    pub fn watch_oom(&self, rel: &Path) -> Result<OomWatch, Error> {
        let dir = self.memory_dir(rel);
        match self.version {
            CgroupVersion::V1 => OomWatch::v1(&dir),
            CgroupVersion::V2 => OomWatch::v2(&dir),
        }
    }

    /// Kills every process in `rel` and its descendants, then removes the cgroups,
    /// deepest first, in every hierarchy. Missing cgroups are fine. Frozen cgroups are
    /// thawed after the kill: on v1 a frozen task does not die until thawed.
    pub fn remove_tree(&self, rel: &Path) -> Result<(), Error> {
        self.signal_tree(rel);
        self.thaw_tree(rel);
        for dir in self.dirs(rel) {
            if dir.is_dir() {
                remove_dir_tree(&dir)?;
            }
        }
        Ok(())
    }

    /// SIGKILLs, once, every process listed in `rel` and the cgroups below it, in every
    /// hierarchy.
    fn signal_tree(&self, rel: &Path) {
        for dir in self.dirs(rel) {
            visit_tree(&dir, &mut |d| signal_all(d));
        }
    }

    /// Thaws `rel` and every cgroup below it (best effort).
    pub fn thaw_tree(&self, rel: &Path) {
        let (dir, file, value) = match self.version {
            CgroupVersion::V1 => (
                self.controller_dir("freezer", rel),
                "freezer.state",
                "THAWED",
            ),
            CgroupVersion::V2 => (self.controller_dir("", rel), "cgroup.freeze", "0"),
        };
        visit_tree(&dir, &mut |d| {
            let f = d.join(file);
            if f.exists() {
                let _ = fs::write(&f, value);
            }
        });
    }

    /// On cgroup v1, keeps an empty cgroup `rel` frozen. The v1 freezer switches a
    /// kernel static key whenever the number of freezing cgroups goes between zero and
    /// one, which patches kernel code across CPUs: measured here, a thaw took 222 us
    /// that way and 50 us with another cgroup frozen. With the anchor held, sandbox
    /// freezes and thaws never make that switch. On v2 it does nothing. The anchor
    /// goes with [`Cgroups::remove_tree`] of its parent.
    pub fn hold_freezer_anchor(&self, rel: &Path) -> Result<(), Error> {
        if self.version != CgroupVersion::V1 {
            return Ok(());
        }
        let dir = self.controller_dir("freezer", rel);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let state = dir.join("freezer.state");
        fs::write(&state, "FROZEN").map_err(io_err("write", &state))
    }

    /// Moves this process into the cgroup it is in already (the memory hierarchy's on
    /// v1), on a thread of its own, and returns at once. A move between cgroups
    /// through `cgroup.procs` takes the kernel's global thread-group lock, whose first
    /// writer after a quiet spell waits for an RCU grace period (8 to 12 ms here) and
    /// whose writers within about 20 ms of the last pay nothing. Made as an agent
    /// starts, that wait overlaps the agent's own set-up instead of the creation of its
    /// first sandbox, whose init libcontainer moves the same way. Best effort: a move
    /// that fails only loses the overlap.
    pub fn prepay_move(&self) {
        let Some(procs) = fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| self.procs_file_of(&text))
        else {
            return;
        };
        let pid = std::process::id().to_string();
        let moved = std::thread::Builder::new()
            .name("sprout-cgroup-move".into())
            .spawn(move || {
                // Never made: only a cgroup's own file is written.
                let written = fs::OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, pid.as_bytes()));
                if let Err(e) = written {
                    tracing::debug!(file = %procs.display(), error = %e, "could not prepay a cgroup move");
                }
            });
        if let Err(e) = moved {
            tracing::debug!(error = %e, "could not start a thread to prepay a cgroup move");
        }
    }

    /// The `cgroup.procs` of the cgroup `/proc/<pid>/cgroup`'s `text` names (the
    /// memory hierarchy's on v1). In a cgroup namespace the path may climb above its
    /// root (`/../..`): that is no cgroup of this hierarchy's, and `None`.
    fn procs_file_of(&self, text: &str) -> Option<PathBuf> {
        let at = cgroup_of(text, self.version).filter(|at| !at.split('/').any(|c| c == ".."))?;
        Some(
            self.controller_dir("memory", Path::new(at))
                .join("cgroup.procs"),
        )
    }

    /// Makes the cgroup `rel` in every hierarchy, so that an agent's parent exists for
    /// its life: another agent stopping removes the shared parent above it
    /// ([`Cgroups::remove_if_unused`]) only while nothing is below. That removal can
    /// come between making the shared parent and `rel`, so a vanished parent is made
    /// again (up to 100 times: each stopping agent removes it at most once).
    pub fn make(&self, rel: &Path) -> Result<(), Error> {
        for dir in self.dirs(rel) {
            let mut tries = 0;
            loop {
                match fs::create_dir_all(&dir) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 100 => {
                        tries += 1;
                    }
                    done => {
                        done.map_err(io_err("create", &dir))?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether process `pid` is in the cgroup `rel` (from the hierarchy root), as
    /// `/proc/<pid>/cgroup` says: on v1 the memory controller's line, on v2 the `0::`
    /// line. A process that is gone is an error (`NotFound`, or `ESRCH`).
    pub fn contains_pid(&self, rel: &Path, pid: i32) -> std::io::Result<bool> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        Ok(cgroup_of(&text, self.version).is_some_and(|at| same_cgroup(at, rel)))
    }

    /// The processes (host pids) in the cgroup `rel` itself, sorted: its memory
    /// controller's (v1) or the unified hierarchy's (v2) `cgroup.procs`.
    pub fn procs(&self, rel: &Path) -> Result<Vec<i32>, Error> {
        let file = self.memory_dir(rel).join("cgroup.procs");
        let text = fs::read_to_string(&file).map_err(io_err("read", &file))?;
        let mut pids = text
            .lines()
            .map(|l| {
                l.trim().parse::<i32>().map_err(|_| {
                    io_err("parse", &file)(std::io::Error::other(format!("pid {l:?}")))
                })
            })
            .collect::<Result<Vec<i32>, Error>>()?;
        pids.sort_unstable();
        Ok(pids)
    }

    /// Sets the memory limit of the cgroup `rel` to `bytes`, swap included (v1
    /// `memory.limit_in_bytes`, then `memory.memsw.limit_in_bytes` where the kernel
    /// accounts swap, which must stay at or above it; v2 `memory.max`, whose
    /// `memory.swap.max` libcontainer set to 0). Lowering it below what the cgroup
    /// uses fails (v1 `EBUSY` after reclaim).
    pub fn set_memory_limit(&self, rel: &Path, bytes: u64) -> Result<(), Error> {
        let dir = self.memory_dir(rel);
        let files: &[&str] = match self.version {
            CgroupVersion::V1 => &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
            CgroupVersion::V2 => &["memory.max"],
        };
        for (i, name) in files.iter().enumerate() {
            let file = dir.join(name);
            if i > 0 && !file.exists() {
                continue; // no swap accounting
            }
            fs::write(&file, bytes.to_string()).map_err(io_err("write", &file))?;
        }
        Ok(())
    }

    /// Removes `rel` where it is an empty leaf; a cgroup still in use is left alone.
    pub fn remove_if_unused(&self, rel: &Path) {
        for dir in self.dirs(rel) {
            let _ = fs::remove_dir(&dir);
        }
    }
}

/// The path `/proc/<pid>/cgroup` (its text) gives for the memory controller (v1) or
/// the unified hierarchy (v2).
pub(crate) fn cgroup_of(text: &str, version: CgroupVersion) -> Option<&str> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match version {
            CgroupVersion::V2 => id == "0" && controllers.is_empty(),
            CgroupVersion::V1 => controllers.split(',').any(|c| c == "memory"),
        };
        wanted.then_some(path)
    })
}

/// Whether the path from `/proc/<pid>/cgroup` is the cgroup `rel`.
pub(crate) fn same_cgroup(at: &str, rel: &Path) -> bool {
    Path::new(at).strip_prefix("/").unwrap_or(Path::new(at)) == rel.strip_prefix("/").unwrap_or(rel)
}

/// Makes the sandbox cgroup `cgroup` (from the hierarchy root; in every v1 hierarchy,
/// or the unified one), sets `resources` there with libcgroups as libcontainer does
/// for a sandbox it creates (v1 `cpuset.cpus` and `cpuset.mems` copied from above
/// when empty), and opens, for writing, the file a process joins it through: each v1
/// hierarchy's `tasks`, or v2's `cgroup.procs`. A forked sandbox's first process
/// writes `0` into each (it moves itself; on v1, a single-threaded process moving
/// itself through `tasks` does not take the kernel's global thread-group lock, which
/// waits for an RCU grace period, 1 to 13 ms here, on every other move). The files
/// are opened by the caller (root), so whoever writes a pid into them needs no
/// permission of its own; a pid is read in the writer's pid namespace. Safe to call
/// from several threads for different cgroups.
pub fn prepare_cgroup(
    cgroups: &Cgroups,
    cgroup: &Path,
    resources: &oci_spec::runtime::LinuxResources,
) -> Result<Vec<std::os::fd::OwnedFd>, Error> {
    use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt};
    let fail = |what: &'static str| {
        move |e: &dyn std::fmt::Display| Error::PrepareCgroup {
            cgroup: cgroup.to_path_buf(),
            what,
            message: e.to_string(),
        }
    };
    let dirs = cgroups.dirs(cgroup);
    for dir in &dirs {
        fs::create_dir_all(dir).map_err(|e| fail("make it")(&e))?;
    }
    if cgroups.version() == CgroupVersion::V1 {
        let cpuset = cgroups.controller_dir("cpuset", Path::new("/"));
        if cpuset.is_dir() {
            fill_cpuset(&cpuset, cgroup)
                .map_err(|e| fail("copy cpuset.cpus and cpuset.mems")(&e))?;
        }
    }
    let name = cgroup
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let manager = create_cgroup_manager(CgroupConfig {
        cgroup_path: cgroup.to_path_buf(),
        systemd_cgroup: false,
        container_name: name,
    })
    .map_err(|e| fail("open its cgroup manager")(&ipc::chain(&e)))?;
    let opt = ControllerOpt {
        resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    };
    manager
        .apply(&opt)
        .map_err(|e| fail("set the limits")(&ipc::chain(&e)))?;
    let join = match cgroups.version() {
        CgroupVersion::V1 => "tasks",
        CgroupVersion::V2 => "cgroup.procs",
    };
    dirs.iter()
        .map(|dir| {
            fs::OpenOptions::new()
                .write(true)
                .open(dir.join(join))
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| fail("open its join file")(&e))
        })
        .collect()
}

/// v1 cpuset: a cgroup takes no process while its `cpuset.cpus` or `cpuset.mems` is
/// empty; fills each level from `root` down to `cgroup` from the level above.
fn fill_cpuset(root: &Path, cgroup: &Path) -> std::io::Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let mut here = root.to_path_buf();
        let mut value = fs::read_to_string(here.join(file))?;
        for part in cgroup.strip_prefix("/").unwrap_or(cgroup).components() {
            here.push(part);
            let own = fs::read_to_string(here.join(file))?;
            if own.trim().is_empty() {
                fs::write(here.join(file), value.trim())?;
            } else {
                value = own;
            }
        }
    }
    Ok(())
}

fn remove_dir_tree(dir: &Path) -> Result<(), Error> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()), // removed meanwhile
        other => other.map_err(io_err("list", dir))?,
    };
    let children: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    for child in children {
        remove_dir_tree(&child)?;
    }
    kill_all(dir)?;
    // Processes leave a cgroup shortly after they die: a busy cgroup is retried.
    for _ in 0..KILL_ROUNDS {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("remove cgroup", dir)(e))
            }
            _ => return Ok(()),
        }
    }
    Err(Error::CgroupBusy {
        path: dir.to_path_buf(),
        attempts: KILL_ROUNDS,
    })
}

/// Calls `f` on `dir` and every directory below it.
fn visit_tree(dir: &Path, f: &mut dyn FnMut(&Path)) {
    f(dir);
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                visit_tree(&e.path(), f);
            }
        }
    }
}

/// Sends SIGKILL to every process listed in `dir/cgroup.procs`, once.
fn signal_all(dir: &Path) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// SIGKILLs the processes listed in `dir/cgroup.procs` until none remain (a process
/// forking between a read and the kill is caught in the next round).
fn kill_all(dir: &Path) -> Result<(), Error> {
    let procs = dir.join("cgroup.procs");
    for _ in 0..KILL_ROUNDS {
        let text = match fs::read_to_string(&procs) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("read", &procs)(e)),
        };
        let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            tracing::debug!(pid, cgroup = %dir.display(), "killing leftover process");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(Error::CgroupBusy {
        path: dir.to_path_buf(),
        attempts: KILL_ROUNDS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oom::OOM_RECHECK;
    use nix::poll::PollFlags;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_process_cgroup_is_read_from_the_memory_or_unified_line() {
        let v1 = "13:misc:/\n12:pids:/sprout/1/a\n6:memory:/sprout/1/a\n1:name=systemd:/x\n0::/x\n";
        assert_eq!(cgroup_of(v1, CgroupVersion::V1), Some("/sprout/1/a"));
        assert_eq!(cgroup_of(v1, CgroupVersion::V2), Some("/x"));
        let joined = "4:cpu,memory:/sprout/1/b\n";
        assert_eq!(cgroup_of(joined, CgroupVersion::V1), Some("/sprout/1/b"));
        assert_eq!(cgroup_of("0::/sprout/1/c\n", CgroupVersion::V1), None);
        assert_eq!(
            cgroup_of("0::/sprout/1/c\n", CgroupVersion::V2),
            Some("/sprout/1/c")
        );
        // A path holding ':' stays whole.
        assert_eq!(cgroup_of("0::/a:b\n", CgroupVersion::V2), Some("/a:b"));
        assert!(same_cgroup("/sprout/1/a", Path::new("/sprout/1/a")));
        assert!(same_cgroup("/sprout/1/a", Path::new("sprout/1/a")));
        assert!(!same_cgroup("/sprout/1/a/b", Path::new("/sprout/1/a")));
        assert!(!same_cgroup("/sprout/1/ab", Path::new("/sprout/1/a")));
        let me = std::process::id() as i32;
        let cgroups = Cgroups::detect().unwrap();
        let text = fs::read_to_string("/proc/self/cgroup").unwrap();
        let mine = cgroup_of(&text, cgroups.version()).unwrap();
        assert!(cgroups.contains_pid(Path::new(mine), me).unwrap());
        assert!(!cgroups.contains_pid(Path::new("/sprout/none"), me).unwrap());
        assert!(cgroups.contains_pid(Path::new(mine), i32::MAX).is_err());
    }

    /// The move is of this process into its own cgroup, in the hierarchy the root
    /// given names: checked on a fake tree, where it is a plain file written.
    #[test]
    fn a_prepaid_move_writes_this_process_into_its_own_cgroup() {
        let text = fs::read_to_string("/proc/self/cgroup").unwrap();
        // A v2-only host has no memory line for v1.
        for version in [CgroupVersion::V1, CgroupVersion::V2] {
            let Some(mine) = cgroup_of(&text, version) else {
                continue;
            };
            let t = tempfile::tempdir().unwrap();
            let cgroups = Cgroups::at(t.path(), version);
            let dir = cgroups.controller_dir("memory", Path::new(mine));
            fs::create_dir_all(&dir).unwrap();
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, "").unwrap();
            cgroups.prepay_move();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while fs::read_to_string(&procs).unwrap().is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{version:?}: nothing written"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(
                fs::read_to_string(&procs).unwrap(),
                std::process::id().to_string()
            );
        }
    }

    /// Real children moved into new cgroups, from several threads at once, each get
    /// their limits; the cgroups go with `remove_tree`, and the children with them.
    #[test]
    fn prepare_cgroup_gives_files_that_move_a_process_into_a_new_limited_cgroup() {
        if !crate::test_support::root_or_skip(
            "prepare_cgroup_gives_files_that_move_a_process_into_a_new_limited_cgroup",
        ) {
            return;
        }
        let cgroups = Cgroups::detect().unwrap();
        let parent = PathBuf::from(format!("/sprout-test-{}-enter", std::process::id()));
        let read = |cgroup: &Path, controller: &str, v1: &str, v2: &str| {
            let file = match cgroups.version() {
                CgroupVersion::V1 => cgroups.controller_dir(controller, cgroup).join(v1),
                CgroupVersion::V2 => cgroups.controller_dir("", cgroup).join(v2),
            };
            fs::read_to_string(&file).map(|t| t.trim().to_owned())
        };
        let mut children = Vec::new();
        let mut threads = Vec::new();
        for i in 0..4u64 {
            let child = std::process::Command::new("sleep")
                .arg("100")
                .spawn()
                .unwrap();
            let pid = child.id() as i32;
            children.push(child);
            let cgroup = parent.join(format!("sandbox-{i}"));
            threads.push(std::thread::spawn(move || {
                let limits = rootfs::Limits {
                    memory_bytes: (96 + i) << 20,
                    pids: 30 + i,
                    cpus: 0.5,
                };
                let cgroups = Cgroups::detect().unwrap();
                let entered =
                    prepare_cgroup(&cgroups, &cgroup, &rootfs::resources(&limits).unwrap())
                        .and_then(|files| {
                            for f in files {
                                use std::io::Write;
                                fs::File::from(f)
                                    .write_all(pid.to_string().as_bytes())
                                    .map_err(crate::io_err("join", &cgroup))?;
                            }
                            Ok(())
                        });
                (cgroup, pid, entered)
            }));
        }
        let mut seen = Vec::new();
        for t in threads {
            let (cgroup, pid, entered) = t.join().unwrap();
            seen.push((
                entered,
                cgroups.contains_pid(&cgroup, pid),
                read(&cgroup, "memory", "memory.limit_in_bytes", "memory.max"),
                read(&cgroup, "pids", "pids.max", "pids.max"),
                read(&cgroup, "cpu", "cpu.cfs_quota_us", "cpu.max"),
            ));
        }
        let removed = cgroups.remove_tree(&parent);
        let statuses: Vec<_> = children.iter_mut().map(|c| c.wait().unwrap()).collect();
        removed.unwrap();
        for (i, (entered, inside, memory, pids, cpu)) in seen.into_iter().enumerate() {
            entered.unwrap();
            assert!(inside.unwrap(), "child {i} is in its cgroup");
            assert_eq!(memory.unwrap(), ((96 + i as u64) << 20).to_string());
            assert_eq!(pids.unwrap(), (30 + i).to_string());
            let cpu = cpu.unwrap();
            assert!(cpu == "50000" || cpu == "50000 100000", "{cpu}");
        }
        for status in statuses {
            assert!(!status.success(), "the child was killed with its cgroup");
        }
        assert!(cgroups.dirs(&parent).iter().all(|d| !d.exists()));
    }

    fn fake_v1(root: &Path) -> Cgroups {
        for c in ["memory", "pids", "cpu", "freezer", "unified"] {
            fs::create_dir_all(root.join(c)).unwrap();
        }
        std::os::unix::fs::symlink(root.join("cpu"), root.join("cpu,cpuacct")).unwrap();
        Cgroups::at(root, CgroupVersion::V1)
    }

    /// A unified hierarchy at `root`: its root has `cgroup.controllers` and, like every
    /// cgroup, control files (which a fake tree holds as plain files).
    fn fake_v2(root: &Path) -> Cgroups {
        fs::create_dir_all(root).unwrap();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.procs"), "1\n").unwrap();
        fs::write(root.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
        Cgroups::at(root, CgroupVersion::V2)
    }

    /// Other agents removing the shared parent while this one makes its own below it
    /// (the race `make` closes): a thread removes an empty `/sprout`, 90 times in all,
    /// as 90 agents stopping would. Each of them can cost `make` one more try.
    #[test]
    fn make_outlasts_the_shared_parent_being_removed_meanwhile() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v1(t.path());
        let parents = cg.dirs(Path::new("/sprout"));
        let remover = std::thread::spawn(move || {
            let mut removed = 0;
            while removed < 90 {
                for p in &parents {
                    if fs::remove_dir(p).is_ok() {
                        removed += 1;
                    }
                }
            }
        });
        let mut i = 0;
        while !remover.is_finished() {
            let rel = PathBuf::from(format!("/sprout/{i}"));
            cg.make(&rel).unwrap();
            for dir in cg.dirs(&rel) {
                assert!(dir.is_dir(), "{}", dir.display());
                fs::remove_dir(&dir).unwrap();
            }
            i += 1;
        }
        remover.join().unwrap();
    }

    #[test]
    fn procs_and_the_memory_limit_are_the_memory_controllers_files() {
        let t = tempfile::tempdir().unwrap();
        let v1 = fake_v1(&t.path().join("v1"));
        let rel = Path::new("/sprout/1/sprout-1.pz-1");
        let mem = v1.controller_dir("memory", rel);
        fs::create_dir_all(&mem).unwrap();
        fs::write(mem.join("cgroup.procs"), "30\n7\n").unwrap();
        assert_eq!(v1.procs(rel).unwrap(), [7, 30]);
        fs::write(mem.join("cgroup.procs"), "7\nx\n").unwrap();
        let e = v1.procs(rel).unwrap_err().to_string();
        assert!(e.contains("cgroup.procs"), "{e}");
        // Swap accounted: both limits; not accounted: the memory limit alone.
        fs::write(mem.join("memory.memsw.limit_in_bytes"), "9").unwrap();
        v1.set_memory_limit(rel, 96 << 20).unwrap();
        for f in ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"] {
            assert_eq!(fs::read_to_string(mem.join(f)).unwrap(), "100663296", "{f}");
        }
        fs::remove_file(mem.join("memory.memsw.limit_in_bytes")).unwrap();
        v1.set_memory_limit(rel, 1 << 20).unwrap();
        assert!(!mem.join("memory.memsw.limit_in_bytes").exists());
        assert_eq!(
            fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap(),
            "1048576"
        );
        let v2 = fake_v2(&t.path().join("v2"));
        let dir = t.path().join("v2/sprout/1/sprout-1.pz-1");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        assert!(v2.procs(rel).unwrap().is_empty());
        v2.set_memory_limit(rel, 2 << 20).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            "2097152"
        );
        // A cgroup that is not there is an error naming the file.
        let e = v2.procs(Path::new("/sprout/none")).unwrap_err().to_string();
        assert!(e.contains("/sprout/none/cgroup.procs"), "{e}");
    }

    #[test]
    fn detect_finds_v2_by_cgroup_controllers_at_the_root_and_v1_otherwise() {
        let t = tempfile::tempdir().unwrap();
        let v2 = t.path().join("unified-host");
        fake_v2(&v2);
        let cg = Cgroups::detect_at(&v2).unwrap();
        assert_eq!(cg.version(), CgroupVersion::V2);
        assert_eq!(cg.dirs(Path::new("/sprout/1")), [v2.join("sprout/1")]);

        // Legacy: one directory per controller.
        let legacy = t.path().join("legacy-host");
        fake_v1(&legacy);
        let cg = Cgroups::detect_at(&legacy).unwrap();
        assert_eq!(cg.version(), CgroupVersion::V1);
        assert_eq!(
            cg.controller_dir("memory", Path::new("/sprout/1")),
            legacy.join("memory/sprout/1")
        );
        // Hybrid: the controllers are v1; `unified/` is a cgroup2 mount without any.
        let hybrid = t.path().join("hybrid-host");
        fake_v1(&hybrid);
        fs::write(hybrid.join("unified/cgroup.controllers"), "").unwrap();
        assert_eq!(
            Cgroups::detect_at(&hybrid).unwrap().version(),
            CgroupVersion::V1
        );

        let err = Cgroups::detect_at(&t.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("none"), "{err}");
    }

    #[test]
    fn v1_dirs_span_controllers_but_not_unified_or_links() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v1(t.path());
        let dirs = cg.dirs(Path::new("/sprout/7"));
        let names: Vec<_> = dirs
            .iter()
            .map(|d| d.strip_prefix(t.path()).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            names,
            [
                "cpu/sprout/7",
                "freezer/sprout/7",
                "memory/sprout/7",
                "pids/sprout/7"
            ]
            .map(PathBuf::from)
        );
        let v2 = Cgroups::at(t.path(), CgroupVersion::V2);
        assert_eq!(v2.dirs(Path::new("/sprout/7")), [t.path().join("sprout/7")]);
    }

    #[test]
    fn oom_kills_read_from_v1_and_v2_files() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v1(t.path());
        let d = t.path().join("memory/sprout/1/s");
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(Path::new("/sprout/1/s")).unwrap(), 2);

        let v2 = Cgroups::at(t.path(), CgroupVersion::V2);
        let d = t.path().join("sprout/2");
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(v2.oom_kills(Path::new("/sprout/2")).unwrap(), 1);

        let err = v2
            .oom_kills(Path::new("/sprout/none"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sprout/none/memory.events"), "{err}");
    }

    #[test]
    fn an_oom_watch_registers_an_eventfd_on_v1_and_reads_memory_events_on_v2() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v1(t.path());
        let d = t.path().join("memory/sprout/1/s");
        fs::create_dir_all(&d).unwrap();
        let control = |kills: u32| format!("oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n");
        fs::write(d.join("memory.oom_control"), control(1)).unwrap();
        let mut w = cg.watch_oom(Path::new("/sprout/1/s")).unwrap();
        assert_eq!(w.poll_flags(), PollFlags::POLLIN);
        // `<eventfd> <oom_control fd>`, as cgroup.event_control takes it.
        let line = fs::read_to_string(d.join("cgroup.event_control")).unwrap();
        let (efd, cfd) = line.split_once(' ').unwrap();
        assert_eq!(efd.parse::<i32>().unwrap(), w.fd().as_raw_fd());
        assert!(cfd.parse::<i32>().is_ok(), "{line}");
        assert_eq!(w.recheck_in(), None);
        // An OOM notification (an eventfd count) comes before its kill is counted:
        // not a kill yet, but the watch asks to look again soon.
        nix::unistd::write(w.fd(), &1u64.to_ne_bytes()).unwrap();
        assert!(!w.killed(true));
        assert_eq!(w.recheck_in(), Some(OOM_RECHECK));
        // The notification was cleared.
        let mut buf = [0u8; 8];
        assert_eq!(
            nix::unistd::read(w.fd().as_raw_fd(), &mut buf),
            Err(nix::errno::Errno::EAGAIN)
        );
        assert!(!w.killed(false));
        fs::write(d.join("memory.oom_control"), control(2)).unwrap();
        assert!(w.killed(false));

        let v2 = Cgroups::at(t.path(), CgroupVersion::V2);
        let d = t.path().join("sprout/2");
        fs::create_dir_all(&d).unwrap();
        let events = |max: u32, kills: u32| {
            format!("low 0\nhigh 0\nmax {max}\noom {kills}\noom_kill {kills}\noom_group_kill 0\n")
        };
        fs::write(d.join("memory.events"), events(0, 0)).unwrap();
        let mut w = v2.watch_oom(Path::new("/sprout/2")).unwrap();
        assert_eq!(w.poll_flags(), PollFlags::POLLPRI);
        // `max` events alone (reclaim at the limit) are not a kill, nor an OOM.
        fs::write(d.join("memory.events"), events(7, 0)).unwrap();
        assert!(!w.killed(true));
        assert_eq!(w.recheck_in(), None);
        fs::write(d.join("memory.events"), events(9, 1)).unwrap();
        assert!(w.killed(true));
        // A cgroup that is gone: no watch, by name.
        let err = v2
            .watch_oom(Path::new("/sprout/none"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sprout/none/memory.events"), "{err}");
    }

    #[test]
    fn the_freezer_anchor_is_a_frozen_v1_cgroup_and_nothing_on_v2() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v1(t.path());
        cg.hold_freezer_anchor(Path::new("/sprout/5/freezer-anchor"))
            .unwrap();
        let state = t
            .path()
            .join("freezer/sprout/5/freezer-anchor/freezer.state");
        assert_eq!(fs::read_to_string(state).unwrap(), "FROZEN");
        let v2 = Cgroups::at(&t.path().join("v2"), CgroupVersion::V2);
        v2.hold_freezer_anchor(Path::new("/sprout/5/freezer-anchor"))
            .unwrap();
        assert!(!t.path().join("v2").exists());
    }

    #[test]
    fn thaw_tree_thaws_every_frozen_cgroup_below() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v1(t.path());
        let leaf = t.path().join("freezer/sprout/3/sprout-3-1");
        fs::create_dir_all(&leaf).unwrap();
        fs::write(leaf.join("freezer.state"), "FROZEN").unwrap();
        cg.thaw_tree(Path::new("/sprout/3"));
        assert_eq!(
            fs::read_to_string(leaf.join("freezer.state")).unwrap(),
            "THAWED"
        );
    }

    #[test]
    fn remove_tree_removes_nested_empty_cgroups_in_every_hierarchy() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v1(t.path());
        for d in cg.dirs(Path::new("/sprout/9/sprout-9-1")) {
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("cgroup.procs"), "").unwrap();
        }
        // A fake tree cannot rmdir a directory that holds files; real cgroupfs can.
        // Model that by removing the control files first.
        for d in cg.dirs(Path::new("/sprout/9/sprout-9-1")) {
            fs::remove_file(d.join("cgroup.procs")).unwrap();
        }
        cg.remove_tree(Path::new("/sprout/9")).unwrap();
        for d in cg.dirs(Path::new("/sprout/9")) {
            assert!(!d.exists(), "{} left", d.display());
        }
        assert!(
            t.path().join("memory/sprout").is_dir(),
            "the parent is not part of the tree"
        );
        cg.remove_if_unused(Path::new("/sprout"));
        assert!(!t.path().join("memory/sprout").exists());
        cg.remove_tree(Path::new("/sprout/absent")).unwrap();
    }

    #[test]
    fn v2_thaw_tree_writes_0_to_every_cgroup_freeze_below() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v2(t.path());
        let parent = t.path().join("sprout/3");
        let leaf = parent.join("sprout-3-1");
        let deeper = leaf.join("inner");
        fs::create_dir_all(&deeper).unwrap();
        for d in [&parent, &leaf, &deeper] {
            fs::write(d.join("cgroup.freeze"), "1\n").unwrap();
        }
        cg.thaw_tree(Path::new("/sprout/3"));
        for d in [&parent, &leaf, &deeper] {
            assert_eq!(
                fs::read_to_string(d.join("cgroup.freeze")).unwrap(),
                "0",
                "{} not thawed",
                d.display()
            );
            assert!(!d.join("freezer.state").exists(), "a v1 file on v2");
        }
        assert!(
            !t.path().join("freezer").exists(),
            "v2 has no freezer hierarchy"
        );
        // Outside the tree nothing is written.
        assert_eq!(
            fs::read_to_string(t.path().join("cgroup.procs")).unwrap(),
            "1\n"
        );
        assert!(!t.path().join("cgroup.freeze").exists());
    }

    #[test]
    fn v2_remove_tree_removes_nested_cgroups_and_keeps_the_parent() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v2(t.path());
        for rel in [
            "sprout/9/sprout-9-1/inner",
            "sprout/9/sprout-9-2",
            "sprout/8",
        ] {
            fs::create_dir_all(t.path().join(rel)).unwrap();
        }
        cg.remove_tree(Path::new("/sprout/9")).unwrap();
        assert!(!t.path().join("sprout/9").exists(), "the tree is left");
        assert!(
            t.path().join("sprout/8").is_dir(),
            "another agent's cgroup went too"
        );
        cg.remove_if_unused(Path::new("/sprout"));
        assert!(t.path().join("sprout").is_dir(), "/sprout is still in use");
        cg.remove_tree(Path::new("/sprout/8")).unwrap();
        cg.remove_if_unused(Path::new("/sprout"));
        assert!(!t.path().join("sprout").exists());
        assert!(
            t.path().join("cgroup.controllers").is_file(),
            "the root stays"
        );
        cg.remove_tree(Path::new("/sprout/absent")).unwrap();
    }

    /// The pids of a v2 tree's `cgroup.procs` files are killed, in every cgroup of the
    /// tree. A fake tree cannot hold processes, so its `cgroup.procs` lists a child of
    /// this test.
    #[test]
    fn v2_processes_listed_in_the_tree_are_killed() {
        use std::os::unix::process::ExitStatusExt;
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v2(t.path());
        let leaf = t.path().join("sprout/4/sprout-4-1");
        fs::create_dir_all(&leaf).unwrap();
        fs::write(t.path().join("sprout/4/cgroup.procs"), "").unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        fs::write(leaf.join("cgroup.procs"), format!("{}\n", child.id())).unwrap();

        cg.signal_tree(Path::new("/sprout/4"));

        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pid {} listed in the v2 tree was not killed", child.id());
        };
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    }
}
