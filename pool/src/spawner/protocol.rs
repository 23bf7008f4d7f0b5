//! What the agent and its spawner say to each other over the control channel: one
//! request enum, one reply enum, each a JSON frame header; descriptors travel beside
//! them (which ones, each variant says).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{CREATE_DEADLINE, REQUEST_DEADLINE, SHUTDOWN_DEADLINE};

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum SpawnerRequest {
    /// Carries one descriptor: the write end of the agent's pipe for the sandbox's
    /// output, which becomes the container's stdout and stderr.
    Create {
        id: String,
        bundle: PathBuf,
    },
    Destroy {
        id: String,
    },
    /// Makes `dir` (a host directory) visible read-only at `target` inside the
    /// sandbox (`/code`, or a new directory under `/fns`).
    AttachCode {
        id: String,
        dir: PathBuf,
        target: PathBuf,
    },
    /// Carries a descriptor: a detached mount to clone onto the sandbox's `/workflow`.
    AttachScratch {
        id: String,
    },
    /// Removes what `AttachScratch` put on the sandbox's `/workflow`.
    DetachScratch {
        id: String,
    },
    /// Replaces the sandbox's own `/workflow` with a new, empty tmpfs.
    ResetScratch {
        id: String,
    },
    /// Puts a clone of sandbox `from`'s `/workflow` on sandbox `id`'s.
    AttachScratchFrom {
        id: String,
        from: String,
    },
    /// Gives the sandbox outbound network (a veth pair, NAT, the host's
    /// `/etc/resolv.conf` read-only): see [`crate::network`].
    AttachNetwork {
        id: String,
    },
    /// Registers a sandbox forked from a fork server: `pid` (its first process, PID
    /// 1 of its namespaces) in `cgroup` (`<agent's cgroup>/<id>`). Answered `done`.
    Adopt {
        id: String,
        pid: i32,
        cgroup: PathBuf,
    },
    /// The agent is exiting cleanly and removes its state itself.
    Shutdown,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum SpawnerReply {
    /// Carries one descriptor: the agent's end of the shim's channel.
    Created {
        pid: i32,
    },
    Destroyed,
    Done,
    Failed {
        message: String,
    },
}

impl SpawnerRequest {
    /// The request's name (in errors) and how long the spawner has to answer it.
    pub(super) fn op(&self) -> (&'static str, Duration) {
        match self {
            SpawnerRequest::Create { .. } => ("create", CREATE_DEADLINE),
            SpawnerRequest::Destroy { .. } => ("destroy", REQUEST_DEADLINE),
            SpawnerRequest::AttachCode { .. } => ("attach_code", REQUEST_DEADLINE),
            SpawnerRequest::AttachScratch { .. } => ("attach_scratch", REQUEST_DEADLINE),
            SpawnerRequest::DetachScratch { .. } => ("detach_scratch", REQUEST_DEADLINE),
            SpawnerRequest::ResetScratch { .. } => ("reset_scratch", REQUEST_DEADLINE),
            SpawnerRequest::AttachScratchFrom { .. } => ("attach_scratch_from", REQUEST_DEADLINE),
            SpawnerRequest::AttachNetwork { .. } => ("attach_network", REQUEST_DEADLINE),
            SpawnerRequest::Adopt { .. } => ("adopt", REQUEST_DEADLINE),
            SpawnerRequest::Shutdown => ("shutdown", SHUTDOWN_DEADLINE),
        }
    }
}
