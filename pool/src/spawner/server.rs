//! The spawner process: [`spawner_main`] takes its control socket, then [`serve`]
//! answers the agent's requests one at a time, creating and destroying containers
//! through libcontainer and running mount operations inside them ([`super::live`]).
//! When the agent goes away without a `shutdown`, it removes everything the agent had.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ipc::Channel;

use super::live::Live;
use super::protocol::{SpawnerReply, SpawnerRequest};
use super::CONTROL_FD;
use crate::{sys, Cgroups};

/// What the spawner needs to clean up after an agent that died.
struct Orphaned {
    state_dir: PathBuf,
    cgroup_parent: PathBuf,
    cgroups: Cgroups,
}

/// The `sprout-spawner` executable's `main`: started by the agent with its control
/// channel on descriptor 3 and `--state-dir DIR --cgroup-parent CGROUP`; serves
/// requests until the agent says `shutdown` or goes away (then it destroys every
/// sandbox and removes the agent's cgroups and state directory itself). Its logs go
/// to stderr through whatever `tracing` subscriber the executable installed.
pub fn spawner_main() -> ExitCode {
    let usage = "usage: sprout-spawner --state-dir DIR --cgroup-parent CGROUP (started by the sprout agent, with its control socket on descriptor 3)";
    let mut state_dir = None;
    let mut cgroup_parent = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let slot = match arg.to_str() {
            Some("--state-dir") => &mut state_dir,
            Some("--cgroup-parent") => &mut cgroup_parent,
            _ => {
                eprintln!("sprout-spawner: unknown argument {arg:?}\n{usage}");
                return ExitCode::from(2);
            }
        };
        *slot = args.next().map(PathBuf::from);
    }
    let (Some(state_dir), Some(cgroup_parent)) = (state_dir, cgroup_parent) else {
        eprintln!("sprout-spawner: missing arguments\n{usage}");
        return ExitCode::from(2);
    };
    // Nothing but stdin, stdout, stderr and the control socket may reach a container.
    if let Err(e) = sys::close_from(CONTROL_FD + 1) {
        eprintln!("sprout-spawner: close inherited descriptors: {e}");
        return ExitCode::from(1);
    }
    let channel = match sys::take_inherited_socket(CONTROL_FD) {
        Ok(fd) => Channel::from_fd(fd),
        Err(e) => {
            eprintln!("sprout-spawner: control socket on descriptor {CONTROL_FD}: {e}\n{usage}");
            return ExitCode::from(2);
        }
    };
    sys::set_process_name(c"sprout-spawner");
    sys::reset_signals();
    let cgroups = match Cgroups::detect() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %ipc::chain(&e), "sprout-spawner: cgroups");
            return ExitCode::from(1);
        }
    };
    let agent_id = state_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let live = Live::new(
        state_dir.join("containers"),
        cgroups.clone(),
        cgroup_parent.clone(),
        agent_id,
    );
    let orphaned = Orphaned {
        state_dir,
        cgroup_parent,
        cgroups,
    };
    ExitCode::from(serve(channel, live, orphaned) as u8)
}

/// The spawner's loop: one request at a time, until the agent says `shutdown` or
/// goes away. Returns its exit code.
fn serve(mut channel: Channel, mut live: Live, orphaned: Orphaned) -> i32 {
    let clean_exit = loop {
        let (req, mut fds) = match channel.recv::<SpawnerRequest>() {
            Ok(m) => (m.header, m.fds),
            Err(e) if e.is_peer_gone() => break false,
            Err(e) => {
                tracing::error!(error = %ipc::chain(&e), "spawner: bad request; exiting");
                break false;
            }
        };
        let done = match req {
            SpawnerRequest::Create { id, bundle } => match live.create(id, &bundle, fds.pop()) {
                Ok((pid, agent_end)) => {
                    channel.send(&SpawnerReply::Created { pid }, b"", &[agent_end.as_fd()])
                }
                Err(message) => channel.send(&SpawnerReply::Failed { message }, b"", &[]),
            },
            SpawnerRequest::Destroy { id } => match live.destroy(&id) {
                Ok(()) => channel.send(&SpawnerReply::Destroyed, b"", &[]),
                Err(message) => channel.send(&SpawnerReply::Failed { message }, b"", &[]),
            },
            SpawnerRequest::AttachCode { id, dir, target } => {
                reply_done(&channel, live.attach_code(&id, &dir, &target))
            }
            SpawnerRequest::AttachScratch { id } => {
                reply_done(&channel, live.attach_scratch(id, fds.pop()))
            }
            SpawnerRequest::DetachScratch { id } => reply_done(&channel, live.detach_scratch(&id)),
            SpawnerRequest::ResetScratch { id } => reply_done(&channel, live.reset_scratch(&id)),
            SpawnerRequest::AttachScratchFrom { id, from } => {
                reply_done(&channel, live.attach_scratch_from(id, &from))
            }
            SpawnerRequest::AttachNetwork { id } => reply_done(&channel, live.attach_network(&id)),
            SpawnerRequest::Adopt { id, pid, cgroup } => {
                reply_done(&channel, live.adopt(id, pid, &cgroup))
            }
            SpawnerRequest::Shutdown => break true,
        };
        if let Err(e) = done {
            tracing::error!(error = %ipc::chain(&e), "spawner: reply failed; exiting");
            break false;
        }
    };
    live.destroy_all();
    if !clean_exit {
        tracing::warn!(state_dir = %orphaned.state_dir.display(), "agent went away; spawner removed its sandboxes and state");
        if let Err(e) = orphaned.cgroups.remove_tree(&orphaned.cgroup_parent) {
            tracing::error!(error = %ipc::chain(&e), "spawner: remove cgroups");
        }
        orphaned
            .cgroups
            .remove_if_unused(Path::new(crate::state::CGROUP_PARENT));
        let _ = std::fs::remove_dir_all(&orphaned.state_dir);
        if let Some(root) = orphaned.state_dir.parent() {
            let _ = std::fs::remove_dir(root);
        }
    }
    0
}

/// Answers a request whose reply is `done` or `failed`.
fn reply_done(channel: &Channel, done: Result<(), String>) -> Result<(), ipc::Error> {
    match done {
        Ok(()) => channel.send(&SpawnerReply::Done, b"", &[]),
        Err(message) => channel.send(&SpawnerReply::Failed { message }, b"", &[]),
    }
}
