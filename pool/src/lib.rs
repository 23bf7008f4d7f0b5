//! Sandbox lifecycle for sprout, through youki's `libcontainer`.
//!
//! libcontainer is not safe to call from several threads (it changes the working
//! directory and clones with a raw `clone3` that skips libc's fork handlers), so every
//! call to it happens in one single-threaded **spawner** process ([`Spawner`]): the
//! `sprout-spawner` executable (this crate's binary, [`spawner_main`]), which the
//! agent starts with its control channel on descriptor 3, at any time and from any
//! thread. The agent asks the spawner to create and destroy sandboxes over that
//! [`ipc::Channel`]; the spawner answers with the sandbox's pid and the agent's end
//! of the shim's channel. Every request has a deadline, and the spawner's death is
//! seen through a pidfd: requests in flight fail at once, its sandboxes are killed,
//! and the next request starts a new spawner.
//!
//! [`StateDir`] is the agent's locked directory under `/run/sprout`; [`Cgroups`]
//! reads and removes sprout's cgroups on v1 and v2 (behind a root path, so the logic
//! is tested on a fake tree); [`cleanup_stale`] removes what a crashed agent left.
//! [`Sandbox`] carries one sandbox's state machine. For sandboxes forked from a
//! fork server: [`prepare_cgroup`] makes a new sandbox cgroup with its limits and
//! opens the files a process joins it through, [`pidfd_pid`] reads a pidfd's host pid, [`seccomp_bpf`] compiles a
//! sandbox's seccomp filter for a process to load itself, and
//! [`Spawner::adopt`] registers the result. [`network`] decides a sandbox's
//! network: its own loopback always (up from its creation), outbound IPv4 for a
//! function registered with `network: egress`.

mod cgroup;
mod freezer;
pub mod network;
mod oom;
mod sandbox;
mod seccomp;
mod spawner;
mod state;
mod sys;

pub use cgroup::{prepare_cgroup, CgroupVersion, Cgroups};
pub use freezer::Freezer;
pub use oom::OomWatch;
pub use sandbox::{Sandbox, SandboxState};
pub use seccomp::{seccomp_bpf, BPF_INSTRUCTION_SIZE};
pub use spawner::{
    find_spawner, spawner_main, Spawner, CREATE_DEADLINE, REQUEST_DEADLINE, SHUTDOWN_DEADLINE,
    SPAWNER_EXE, TURN_DEADLINE,
};
pub use sys::pidfd_pid;

/// A workflow's scratch filesystem: a detached mount (a tmpfs of its own, or a clone of
/// a sandbox's `/workflow`) that the spawner clones onto sandboxes' `/workflow`. It is
/// in no mount namespace of its own; the memory is freed when this and every attached
/// clone are gone.
#[derive(Debug)]
pub struct Scratch(std::os::fd::OwnedFd);

impl Scratch {
    /// A new, empty tmpfs of at most `size_mb` MiB.
    pub fn new_tmpfs(size_mb: u64) -> std::io::Result<Scratch> {
        sys::new_tmpfs(size_mb).map(Scratch)
    }
}
pub use state::{cleanup_stale, sweep_stale_tables, StateDir, TableSweep};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no sprout-spawner executable: tried {}", .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    SpawnerMissing { tried: Vec<PathBuf> },
    #[error("start the spawner {exe}")]
    SpawnerStart {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the spawner (pid {pid}) died ({how}) during {op}")]
    SpawnerDied {
        pid: i32,
        how: String,
        op: &'static str,
    },
    #[error(
        "the spawner (pid {pid}) was busy with other requests for {after:?}; {op} was not sent"
    )]
    SpawnerBusy {
        pid: i32,
        op: &'static str,
        after: std::time::Duration,
    },
    #[error("the spawner (pid {pid}) did not answer {op} within {after:?}; it was killed")]
    SpawnerTimeout {
        pid: i32,
        op: &'static str,
        after: std::time::Duration,
    },
    #[error("sandbox {id}: create")]
    Create {
        id: String,
        #[source]
        source: SpawnerFailure,
    },
    #[error("sandbox {id}: {what}")]
    Mount {
        id: String,
        what: &'static str,
        #[source]
        source: SpawnerFailure,
    },
    #[error("sandbox {id}: adopt")]
    Adopt {
        id: String,
        #[source]
        source: SpawnerFailure,
    },
    #[error("sandbox {id}: destroy")]
    Destroy {
        id: String,
        #[source]
        source: SpawnerFailure,
    },
    #[error("sandbox {id}: illegal transition {from:?} -> {to:?}")]
    Transition {
        id: String,
        from: SandboxState,
        to: SandboxState,
    },
    #[error("the spawner has stopped")]
    Stopped,
    #[error("talking to the spawner")]
    Spawner(#[source] ipc::Error),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory {path} is locked by another agent")]
    Locked { path: PathBuf },
    #[error("{path}: not {} after {after:?}", if *frozen { "frozen" } else { "thawed" })]
    Freezer {
        path: PathBuf,
        frozen: bool,
        after: std::time::Duration,
    },
    #[error("sandbox {id}: set limits")]
    Limits {
        id: String,
        #[source]
        source: libcgroups::common::AnyManagerError,
    },
    #[error("sandbox {id}: open its cgroup manager")]
    CgroupManager {
        id: String,
        #[source]
        source: libcgroups::common::CreateCgroupSetupError,
    },
    #[error("cgroup {cgroup}: {what}: {message}")]
    PrepareCgroup {
        cgroup: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("seccomp filter: {what} is not supported")]
    SeccompUnsupported { what: String },
    #[error("seccomp filter: {op}")]
    Seccomp {
        op: &'static str,
        #[source]
        source: libseccomp::error::SeccompError,
    },
    #[error("seccomp filter: syscall {name}")]
    SeccompSyscall {
        name: String,
        #[source]
        source: libseccomp::error::SeccompError,
    },
    #[error("cgroup {path} still busy after {attempts} attempts")]
    CgroupBusy { path: PathBuf, attempts: u32 },
}

/// What the spawner reported for a failed operation (its whole cause chain).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpawnerFailure(pub String);

/// Shorthand for building [`Error::Io`].
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}

/// For tests that need root (sandboxes, real cgroups); the integration tests include
/// the same file.
#[cfg(test)]
pub(crate) mod test_support;
