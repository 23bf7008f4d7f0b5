//! Forked sandboxes: the fork server's state (made on first use, remade after it
//! dies, its memory limit, the bound on children not yet in their cgroups) and what
//! its exchange needs (its zygote's id maps, the uid window of forked sandboxes, the
//! mount plan and seccomp program its children read). The exchange itself is
//! `Sandboxes::fork_stem_cell`'s.
//!
//! The fork server is a sandbox created by libcontainer like any other, with a
//! seccomp filter that also allows `unshare` and `mount` ([`rootfs::zygote_spec`]).
//! Its shim (`sprout-shim fork-server`) runs a Python zygote that moves into a user
//! namespace of its own (mapped here: inside 0 is the fork server's host uid), keeps
//! CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID and CAP_SETPCAP there (none on the host),
//! and forks, for each new sandbox, a child that makes the sandbox of itself
//! (`sprout_runtime.enter`); the agent makes the sandbox's cgroup, the child joins
//! it, and the spawner adopts the result. `docs/design.md` ("Forked sandboxes") has
//! the whole exchange; `docs/security.md` what each process may do.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipc::proto::{Runtime, SandboxSpec, ShimLink};
use parking_lot::Mutex;
use pool::Sandbox;
use rootfs::{Limits, SandboxConfig};
use serde_json::json;

use crate::config::Config;
use crate::error::Error;
use crate::instance::BOOT_TIMEOUT;

/// The fork server's own memory (its zygote, and the children not yet in their
/// cgroups): the base of its limit.
const FORK_SERVER_BASE_MB: u64 = 64;
/// What each live sandbox forked from it leaves charged to the fork server: the
/// zygote's pages the zygote rewrote after the fork (it copies them for itself; the
/// originals stay with the sandbox's processes and are charged where they were first
/// charged). About 0.6 MiB measured; 1 MiB allowed.
const RETAINED_PER_SANDBOX_MB: u64 = 1;
/// A fork is refused (the sandbox is created instead) when the fork server has less
/// than this left below its limit: it must never reach its limit, as its zygote's
/// death takes every sandbox forked from it along.
const HEADROOM_MB: u64 = 16;
/// Its pids limit: its shim and zygote, and the children making sandboxes at once.
pub(super) const FORK_SERVER_PIDS: u64 = 256;
/// After the fork server failed to start, it is not tried again for this long.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// At most this many forked children wait at once to join their cgroups: until then
/// what they write is charged to the fork server, whose memory limit must hold them
/// all.
const MAX_UNMOVED: usize = 8;
/// What a forked child not yet in its own cgroup is allowed to have charged to a
/// package fork server (the pages it touched between the fork and its move).
const UNMOVED_CHILD_MB: u64 = 2;
/// Where the fork server's children read what they make (under `/.sprout`).
const PLAN_FILE: &str = "forked.json";
const SECCOMP_FILE: &str = "seccomp.bpf";

/// A fork server: the plain one (made on first use, remade after it dies) or a
/// package fork server (made once; gone for good when it dies).
#[derive(Debug)]
pub(super) struct ForkServer {
    /// Its sandbox id.
    id: String,
    /// Its uid window: the slots of the agent's range it and the sandboxes forked
    /// from it take their uids from, the only ones its user namespace maps.
    slots: std::ops::Range<u32>,
    /// Its memory limit (MiB): a package fork server's is lowered once its zygote
    /// imported its packages ([`ForkServer::set_memory_mb`]).
    memory_mb: AtomicU64,
    /// What it reserves against the sandboxes' memory budget (MiB): the plain one its
    /// limit, a package fork server nothing (its memory counts against the package
    /// zygotes' budget, as measured).
    reserved_mb: u64,
    state: Mutex<State>,
    /// Forked children not yet in their own cgroup, and its wake-up.
    unmoved: Mutex<usize>,
    moved: parking_lot::Condvar,
}

/// A forked child not yet out of the fork server's cgroup: its place among
/// [`MAX_UNMOVED`] is given back when this is dropped (it joined its own, or failed).
pub(super) struct Unmoved<'a>(&'a ForkServer);

impl Drop for Unmoved<'_> {
    fn drop(&mut self) {
        *self.0.unmoved.lock() -= 1;
        self.0.moved.notify_one();
    }
}

#[derive(Debug)]
enum State {
    Down { retry_at: Option<Instant> },
    Up(Box<Server>),
}

/// The fork server's sandbox, the channel to its shim, and its host uid (inside 0 of
/// its user namespace; only sandbox uids above it are mapped there).
#[derive(Debug)]
pub(super) struct Server {
    pub(super) sandbox: Sandbox,
    pub(super) shim: ShimLink,
    pub(super) uid: u32,
    /// One past the last host uid its user namespace maps.
    pub(super) window_end: u32,
}

impl ForkServer {
    /// Writes what the fork server's children read into the runtime directory (seen
    /// at `/.sprout`): the plan of a sandbox's own mounts and masked paths, taken
    /// from the same spec libcontainer's sandboxes are made from, and the sandbox's
    /// seccomp filter compiled to BPF.
    pub(super) fn install(
        runtime_dir: &Path,
        root: &Path,
        config: &Config,
        users: &rootfs::SandboxUsers,
        agent_id: &str,
        slots: std::ops::Range<u32>,
    ) -> Result<ForkServer, Error> {
        // The fork server's own host user: the first of its window when it can be
        // (taken now, before any sandbox), so that its one uid mapping (inside 0 →
        // it, and the window after it) covers every sandbox user. Once it was
        // destroyed its next user may be a later one; sandboxes below it are then
        // created instead (their child cannot take their uid).
        users
            .assign_in(&id(agent_id), slots.clone())
            .map_err(|e| Error::State {
                path: PathBuf::from("sandbox uids"),
                source: std::io::Error::other(e.to_string()),
            })?;
        let template = rootfs::bundle_spec(&SandboxConfig {
            id: "sprout-template".into(),
            root: root.to_path_buf(),
            cgroups_path: PathBuf::from("/sprout/template"),
            runtime_dir: runtime_dir.to_path_buf(),
            shim: config.shim.clone(),
            code: None,
            limits: Limits {
                memory_bytes: config.defaults.memory_mb << 20,
                pids: config.defaults.pids,
                cpus: config.defaults.cpus,
            },
            env: Vec::new(),
        })
        .map_err(|e| spec_err(runtime_dir, &e))?;
        let plan = plan(&template);
        let plan_path = runtime_dir.join(PLAN_FILE);
        write_public(&plan_path, plan.to_string().as_bytes())?;
        let seccomp = template
            .linux()
            .as_ref()
            .and_then(|l| l.seccomp().clone())
            .ok_or_else(|| spec_err(runtime_dir, &std::io::Error::other("no seccomp section")))?;
        let bpf = pool::seccomp_bpf(&seccomp)?;
        write_public(&runtime_dir.join(SECCOMP_FILE), &bpf)?;
        let memory_mb = memory_mb(config);
        Ok(ForkServer::new(id(agent_id), slots, memory_mb, memory_mb))
    }

    /// A fork server `id` (down until its first use) with uid window `slots`. The
    /// plain one is made by [`ForkServer::install`]; a package fork server is made
    /// with this, its user taken when it starts.
    pub(super) fn new(
        id: String,
        slots: std::ops::Range<u32>,
        memory_mb: u64,
        reserved_mb: u64,
    ) -> ForkServer {
        ForkServer {
            id,
            slots,
            memory_mb: AtomicU64::new(memory_mb),
            reserved_mb,
            state: Mutex::new(State::Down { retry_at: None }),
            unmoved: Mutex::new(0),
            moved: parking_lot::Condvar::new(),
        }
    }

    /// Its sandbox id.
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// Its uid window (slots of the agent's range).
    pub(super) fn slots(&self) -> std::ops::Range<u32> {
        self.slots.clone()
    }

    /// Whether it is up.
    pub(super) fn is_up(&self) -> bool {
        matches!(*self.state.lock(), State::Up(_))
    }

    /// Takes its server out (it is then down): for its owner to destroy.
    pub(super) fn take(&self) -> Option<Server> {
        match std::mem::replace(&mut *self.state.lock(), State::Down { retry_at: None }) {
            State::Up(server) => Some(*server),
            State::Down { .. } => None,
        }
    }

    /// Starts the fork server if it is down (and was not failing lately); returns
    /// its host uid. Called before a sandbox's uid is taken, so that the sandbox
    /// gets one above it.
    pub(super) fn ensure_up(
        &self,
        sandbox: &str,
        start: impl FnOnce() -> Result<Server, Error>,
    ) -> Result<u32, Error> {
        let mut state = self.state.lock();
        up(&mut state, sandbox, start).map(|s| s.uid)
    }

    /// Its memory limit (MiB): its own, and what each sandbox the budget can hold
    /// leaves charged to it.
    pub(super) fn memory_mb(&self) -> u64 {
        self.memory_mb.load(Ordering::Relaxed)
    }

    /// Records its lowered memory limit (MiB), once written to its cgroup.
    pub(super) fn set_memory_mb(&self, mb: u64) {
        self.memory_mb.store(mb, Ordering::Relaxed);
    }

    /// What it reserves against the sandboxes' memory budget (MiB).
    pub(super) fn reserved_mb(&self) -> u64 {
        self.reserved_mb
    }

    /// Whether sandboxes of `runtime` are forked. Python's adopt a fork of the fork
    /// server's zygote as their own.
    pub(super) fn serves(&self, runtime: Runtime) -> bool {
        runtime == Runtime::Python
    }

    /// Has the fork server's zygote fork the child that makes sandbox `spec`;
    /// returns the fork server's cgroup (where that child is until it joins its own)
    /// and the child's place among the unmoved ones (drop it once it joined). A fork
    /// server is made with `start` when there is none; one found dead is given to
    /// `destroy`, and the next fork makes a new one.
    pub(super) fn fork(
        &self,
        cgroups: &pool::Cgroups,
        spec: &SandboxSpec,
        shim_end: OwnedFd,
        output: OwnedFd,
        start: impl FnOnce() -> Result<Server, Error>,
        destroy: impl FnOnce(Server),
    ) -> Result<(PathBuf, Unmoved<'_>), Error> {
        let unmoved = {
            let mut n = self.unmoved.lock();
            let deadline = Instant::now() + BOOT_TIMEOUT;
            while *n >= MAX_UNMOVED {
                if self.moved.wait_until(&mut n, deadline).timed_out() {
                    return Err(Error::Spawn {
                        sandbox: spec.sandbox.clone(),
                        function: String::new(),
                        message: format!(
                            "{MAX_UNMOVED} forked children did not join their cgroups within {BOOT_TIMEOUT:?}"
                        ),
                    });
                }
            }
            *n += 1;
            Unmoved(self)
        };
        let mut state = self.state.lock();
        let server = up(&mut state, &spec.sandbox, start)?;
        let used = cgroups
            .memory_usage(server.sandbox.cgroup())
            .unwrap_or(u64::MAX);
        let limit_mb = self.memory_mb();
        if used.saturating_add(HEADROOM_MB << 20) > limit_mb << 20 {
            return Err(Error::Spawn {
                sandbox: spec.sandbox.clone(),
                function: String::new(),
                message: format!(
                    "the fork server is full ({} MiB charged of its {} MiB)",
                    used >> 20,
                    limit_mb
                ),
            });
        }
        if spec.uid <= server.uid || spec.uid >= server.window_end {
            return Err(Error::Spawn {
                sandbox: spec.sandbox.clone(),
                function: String::new(),
                message: format!(
                    "its uid {} is not above the fork server's ({}) and below its window's end ({}), so not mapped there",
                    spec.uid, server.uid, server.window_end
                ),
            });
        }
        let answer = server.shim.fork_sandbox(spec, &shim_end, &output);
        drop((shim_end, output));
        match answer {
            Ok(Ok(_pid)) => Ok((server.sandbox.cgroup().to_path_buf(), unmoved)),
            Ok(Err(message)) => Err(Error::Spawn {
                sandbox: spec.sandbox.clone(),
                function: String::new(),
                message,
            }),
            Err(source) => {
                // It died or said something it should not: the next fork starts a new one.
                let State::Up(dead) =
                    std::mem::replace(&mut *state, State::Down { retry_at: None })
                else {
                    unreachable!("the fork server was up")
                };
                let id = dead.sandbox.id().to_owned();
                tracing::warn!(sandbox_id = %id, error = %ipc::chain(&source), "the fork server is gone");
                destroy(*dead);
                Err(Error::Protocol {
                    sandbox: id,
                    peer: "fork server",
                    source,
                })
            }
        }
    }
}

/// The fork server of `state`, started with `start` if it is down (and did not fail
/// to start within [`RETRY_AFTER`]).
fn up<'a>(
    state: &'a mut State,
    sandbox: &str,
    start: impl FnOnce() -> Result<Server, Error>,
) -> Result<&'a mut Server, Error> {
    if let State::Down { retry_at } = state {
        if retry_at.is_some_and(|t| Instant::now() < t) {
            return Err(Error::Spawn {
                sandbox: sandbox.to_owned(),
                function: String::new(),
                message: "the fork server failed to start lately".into(),
            });
        }
        match start() {
            Ok(server) => *state = State::Up(Box::new(server)),
            Err(e) => {
                *state = State::Down {
                    retry_at: Some(Instant::now() + RETRY_AFTER),
                };
                return Err(e);
            }
        }
    }
    match state {
        State::Up(server) => Ok(server),
        State::Down { .. } => unreachable!("the fork server was just started"),
    }
}

/// The fork server's memory limit for `config`: its base, and
/// [`RETAINED_PER_SANDBOX_MB`] for each sandbox of the default memory limit the
/// budget holds.
fn memory_mb(config: &Config) -> u64 {
    FORK_SERVER_BASE_MB + budget_sandboxes(config) * RETAINED_PER_SANDBOX_MB
}

/// How many sandboxes of the default memory limit the memory budget holds.
fn budget_sandboxes(config: &Config) -> u64 {
    config
        .pool
        .memory_budget_mb
        .div_ceil(config.defaults.memory_mb.max(1))
}

/// A package fork server's memory limit (MiB) while its zygote imports, for a uid
/// window of `window`: the plain fork server's base, its headroom
/// ([`package_headroom_mb`]) and the whole package zygotes' budget. Once imported it
/// is lowered to its measured usage and its headroom, and that is what it counts at
/// against the budget (`crate::zygotes`).
pub(super) fn package_memory_mb(window: &std::ops::Range<u32>, config: &Config) -> u64 {
    FORK_SERVER_BASE_MB + package_headroom_mb(window, config) + config.pool.package_zygotes_mb
}

/// What a package fork server may take above its zygote's memory as measured after
/// its imports (MiB): [`RETAINED_PER_SANDBOX_MB`] for each sandbox that can be forked
/// from it at once (its window, or what the memory budget holds at the default
/// limit if fewer), its forked children not yet in their cgroups
/// ([`MAX_UNMOVED`] × [`UNMOVED_CHILD_MB`]) and the [`HEADROOM_MB`] below its limit a
/// fork needs.
pub(super) fn package_headroom_mb(window: &std::ops::Range<u32>, config: &Config) -> u64 {
    let sandboxes = u64::from(window.end - window.start).min(budget_sandboxes(config));
    sandboxes * RETAINED_PER_SANDBOX_MB + MAX_UNMOVED as u64 * UNMOVED_CHILD_MB + HEADROOM_MB
}

/// The fork server's sandbox id: not `sprout-<agent>-<n>`, as it is no sandbox of a
/// function's.
pub(super) fn id(agent_id: &str) -> String {
    format!("sprout-{agent_id}.forks")
}

/// The slots of the agent's uid range sandboxes forked from a fork server take
/// theirs from: the first half (each fork server's own, then the forked
/// sandboxes'); created sandboxes take the second half. A fork server's user
/// namespace maps only its own window of the forked half ([`Windows`]), so a
/// compromised fork server, which may take any uid mapped there, can never take a
/// created sandbox's, nor one of another fork server's sandboxes.
pub(super) fn forked_slots(range: rootfs::SandboxUids) -> std::ops::Range<u32> {
    0..range.count.div_ceil(2)
}

/// Most package fork servers at once (each has a window of its own).
pub(super) const MAX_PACKAGE_WINDOWS: u32 = 16;
/// The largest package fork server window (its own uid and its sandboxes').
pub(super) const MAX_PACKAGE_WINDOW: u32 = 256;
/// The smallest: below it package fork servers are not made.
const MIN_PACKAGE_WINDOW: u32 = 4;

/// How the forked half of the uid range is cut into fork servers' windows: the
/// plain fork server keeps the first part; with package zygotes, the last quarter
/// of the forked half is cut into [`MAX_PACKAGE_WINDOWS`] windows of equal size (at
/// most [`MAX_PACKAGE_WINDOW`] slots), one per package fork server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Windows {
    pub(super) plain: std::ops::Range<u32>,
    /// Each package fork server's window (none: the range is too small, or package
    /// zygotes are off).
    pub(super) packages: Vec<std::ops::Range<u32>>,
}

impl Windows {
    pub(super) fn new(range: rootfs::SandboxUids, package_zygotes: bool) -> Windows {
        let forked = forked_slots(range);
        let size = (forked.end / 4 / MAX_PACKAGE_WINDOWS).min(MAX_PACKAGE_WINDOW);
        if !package_zygotes || size < MIN_PACKAGE_WINDOW {
            return Windows {
                plain: forked,
                packages: Vec::new(),
            };
        }
        let first = forked.end - size * MAX_PACKAGE_WINDOWS;
        Windows {
            plain: 0..first,
            packages: (0..MAX_PACKAGE_WINDOWS)
                .map(|i| first + i * size..first + (i + 1) * size)
                .collect(),
        }
    }
}

/// A fork server's user namespace's map of uids or gids: inside 0 is the fork
/// server's own host id `own`, and every id of its window (`slots` of the agent's
/// range) above it is itself (so a forked sandbox's processes see the ids the host
/// sees). Ids below `own` (none unless the fork server had to be remade) are not
/// mapped: those sandboxes are created instead.
fn id_map(own: u32, range: rootfs::SandboxUids, slots: &std::ops::Range<u32>) -> String {
    let end = window_end(range, slots);
    let above = u64::from(end).saturating_sub(u64::from(own) + 1);
    let mut map = format!("0 {own} 1\n");
    if above > 0 {
        map += &format!("{} {} {above}\n", own + 1, own + 1);
    }
    map
}

/// One past the last host id of window `slots`.
pub(super) fn window_end(range: rootfs::SandboxUids, slots: &std::ops::Range<u32>) -> u32 {
    range.base.saturating_add(slots.end)
}

/// Waits for the fork server's `ready` and maps its zygote's user namespace
/// ([`id_map`]) to its window `slots`; returns its zygote's pid.
pub(super) fn map_zygote(
    sandbox: &mut Sandbox,
    shim: &mut ShimLink,
    cgroups: &pool::Cgroups,
    user: rootfs::SandboxUser,
    range: rootfs::SandboxUids,
    slots: &std::ops::Range<u32>,
) -> Result<i32, Error> {
    let protocol = |source: ipc::Error| Error::Protocol {
        sandbox: sandbox.id().to_owned(),
        peer: "fork server",
        source,
    };
    shim.0
        .stream()
        .set_read_timeout(Some(BOOT_TIMEOUT))
        .map_err(|e| protocol(ipc::Error::Io(e)))?;
    // The timeout is kept: a fork server that stops answering must not hold up every
    // new sandbox (nor the agent's shutdown); a fork that times out counts it dead.
    let ipc::Message { header, fds, .. } =
        shim.0.recv::<ipc::proto::ShimEvent>().map_err(protocol)?;
    if !matches!(header, ipc::proto::ShimEvent::Ready { .. }) {
        return Err(protocol(ipc::Error::Unexpected {
            op: ipc::proto::op_of(&header).to_owned(),
            expected: "ready",
        }));
    }
    let [pidfd]: [OwnedFd; 1] = fds.try_into().map_err(|v: Vec<OwnedFd>| {
        protocol(ipc::Error::MissingFds {
            expected: 1,
            queued: v.len(),
        })
    })?;
    let pid = pool::pidfd_pid(pidfd.as_fd()).map_err(|e| protocol(ipc::Error::Io(e)))?;
    let bad = |what: String| Error::Spawn {
        sandbox: sandbox.id().to_owned(),
        function: String::new(),
        message: what,
    };
    if !cgroups.contains_pid(sandbox.cgroup(), pid).unwrap_or(false) {
        return Err(bad(format!(
            "the fork server's zygote (pid {pid}) is not in its cgroup"
        )));
    }
    for (file, id) in [("uid_map", user.uid), ("gid_map", user.gid)] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, id_map(id, range, slots))
            .map_err(|e| bad(format!("write {path}: {e}")))?;
    }
    if exited(&pidfd) {
        return Err(bad(format!("the fork server's zygote (pid {pid}) exited")));
    }
    sandbox.ready()?;
    Ok(pid)
}

/// Whether the process of `pidfd` has exited (its pidfd is readable).
pub(super) fn exited(pidfd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// What a forked sandbox's child mounts of its own (`forked.json`): every mount of
/// a sandbox's spec but the bind mounts (the host's `/usr`, `/.sprout`, the shim,
/// code) and `/dev` (its device nodes), which it keeps from the fork server, and the
/// masked and read-only paths of its `/proc`.
fn plan(spec: &oci_spec::runtime::Spec) -> serde_json::Value {
    let mounts: Vec<serde_json::Value> = spec
        .mounts()
        .iter()
        .flatten()
        .filter(|m| m.typ().as_deref() != Some("bind") && m.destination() != Path::new("/dev"))
        .map(|m| {
            json!({
                "destination": m.destination(),
                "type": m.typ(),
                "source": m.source(),
                "options": m.options(),
            })
        })
        .collect();
    let linux = spec.linux().as_ref();
    json!({
        "mounts": mounts,
        "masked_paths": linux.and_then(|l| l.masked_paths().clone()).unwrap_or_default(),
        "readonly_paths": linux.and_then(|l| l.readonly_paths().clone()).unwrap_or_default(),
    })
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)))
        .map_err(|source| Error::State {
            path: path.to_path_buf(),
            source,
        })
}

pub(super) fn spec_err(path: &Path, e: &dyn std::error::Error) -> Error {
    Error::State {
        path: path.to_path_buf(),
        source: std::io::Error::other(ipc::chain(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_map_is_the_fork_servers_id_then_the_range_above_it_as_itself() {
        let range = rootfs::SandboxUids::new(1000, 10).unwrap();
        // The forked half is 1000..1005: the created half (1005..1010) is never mapped.
        assert_eq!(forked_slots(range), 0..5);
        let half = forked_slots(range);
        assert_eq!(id_map(1000, range, &half), "0 1000 1\n1001 1001 4\n");
        assert_eq!(id_map(1003, range, &half), "0 1003 1\n1004 1004 1\n");
        assert_eq!(id_map(1004, range, &half), "0 1004 1\n");
        assert_eq!(id_map(1007, range, &half), "0 1007 1\n");
        let top = rootfs::SandboxUids::new(rootfs::SandboxUids::MAX_ID - 1, 2).unwrap();
        assert_eq!(forked_slots(top), 0..1);
        assert_eq!(
            id_map(top.base, top, &forked_slots(top)),
            format!("0 {} 1\n", top.base)
        );
    }

    #[test]
    fn package_fork_servers_get_windows_of_their_own_at_the_end_of_the_forked_half() {
        // Too small a range, or package zygotes off: the plain fork server has it all.
        let small = rootfs::SandboxUids::new(1000, 10).unwrap();
        assert_eq!(Windows::new(small, true).plain, 0..5);
        assert!(Windows::new(small, true).packages.is_empty());
        let range = rootfs::SandboxUids::new(1000, 1024).unwrap();
        assert_eq!(
            Windows::new(range, false),
            Windows {
                plain: 0..512,
                packages: vec![]
            }
        );
        // 1024: the forked half is 512, its last quarter 16 windows of 8.
        let w = Windows::new(range, true);
        assert_eq!(w.plain, 0..384);
        assert_eq!(w.packages.len(), 16);
        assert_eq!(w.packages[0], 384..392);
        assert_eq!(w.packages[15], 504..512);
        // The windows do not overlap, and a package fork server's map is its window.
        assert_eq!(
            id_map(1000 + 384, range, &w.packages[0]),
            "0 1384 1\n1385 1385 7\n"
        );
        assert_eq!(id_map(1000, range, &w.plain), "0 1000 1\n1001 1001 383\n");
        // The default range: windows of 256, the plain fork server keeps 28672.
        let w = Windows::new(rootfs::SandboxUids::DEFAULT, true);
        assert_eq!(w.plain, 0..32768 - 16 * 256);
        assert!(w.packages.iter().all(|p| p.len() == 256));
    }

    #[test]
    fn the_plan_keeps_binds_and_dev_and_lists_proc_masks() {
        let spec = rootfs::bundle_spec(&SandboxConfig {
            id: "sprout-1-1".into(),
            root: "/run/sprout/1/rootfs".into(),
            cgroups_path: "/sprout/1/sprout-1-1".into(),
            runtime_dir: "/run/sprout/1/runtime".into(),
            shim: "/opt/sprout/sprout-shim".into(),
            code: None,
            limits: Limits {
                memory_bytes: 128 << 20,
                pids: 64,
                cpus: 1.0,
            },
            env: vec![],
        })
        .unwrap();
        let plan = plan(&spec);
        let targets: Vec<&str> = plan["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        for want in [
            "/proc",
            "/tmp",
            "/workflow",
            "/fns",
            "/dev/shm",
            "/dev/mqueue",
            "/dev/pts",
            "/sys",
        ] {
            assert!(targets.contains(&want), "{want} not in {targets:?}");
        }
        for kept in ["/dev", "/usr", "/.sprout", "/.sprout/shim"] {
            assert!(!targets.contains(&kept), "{kept} in {targets:?}");
        }
        assert!(plan["masked_paths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "/proc/kcore"));
        assert!(plan["readonly_paths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "/proc/sys"));
    }
}
