//! The spawner: the one single-threaded process that calls libcontainer.
//!
//! The `sprout-spawner` executable ([`spawner_main`], in [`server`]), started by the
//! agent ([`Spawner`], in [`client`], one process at a time in [`process`]) with nothing of the agent's but its control
//! socket (descriptor 3) and its stdout and stderr. The two speak the request and
//! reply enums of [`protocol`]. The spawner creates a sandbox by building and starting
//! a libcontainer container whose stdin is one end of a fresh socket pair (the shim's
//! channel) and hands the other end to the agent. A sandbox's init (the shim) is the
//! spawner's child, so the spawner reaps it when it destroys the sandbox. A sandbox
//! forked from a fork server is not built here but adopted: the spawner is told its
//! first process and cgroup, checks one is in the other, and from then on enters,
//! networks and destroys it by them ([`live`]). When the
//! agent's end of the control channel closes without a `shutdown`, the agent died:
//! the spawner destroys every sandbox and removes the agent's cgroups and state
//! directory itself.
//!
//! Every descriptor the spawner holds is inherited by the container processes
//! libcontainer clones from it until they exec the shim, so it holds as few as it
//! can: no state-directory lock, no descriptor into the state directory, its own
//! mount namespace only during a mount operation ([`live`]); its control socket is
//! close-on-exec. Any such process left half-built when the spawner dies is found by
//! its cgroup or by the control socket it still holds, and killed.
//!
//! On the agent's side every request has a deadline ([`CREATE_DEADLINE`],
//! [`REQUEST_DEADLINE`], [`SHUTDOWN_DEADLINE`]; a spawner that misses one is killed)
//! and the spawner's death is seen at once through a pidfd: requests in flight or
//! waiting fail with [`Error::SpawnerDied`], its sandboxes are killed and removed,
//! and a new spawner is started.

mod client;
mod live;
mod process;
mod protocol;
mod server;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use client::Spawner;
pub use server::spawner_main;

use crate::Error;

/// The name of the spawner's executable.
pub const SPAWNER_EXE: &str = "sprout-spawner";
/// The descriptor on which the spawner finds its control channel.
const CONTROL_FD: RawFd = 3;
/// How long the agent waits for a sandbox to be created, counted from when the
/// request is sent (tens of ms idle, seconds on a machine busy building and testing),
/// before it takes the spawner for stuck and kills it.
pub const CREATE_DEADLINE: Duration = Duration::from_secs(30);
/// The same for every other request (destroy, mount operations).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long a request may wait for its turn behind others. A stuck spawner is caught
/// by the deadline of the request it is stuck on (and then every waiter fails at
/// once), so this only bounds a queue that is long but moving: 64 parallel cold
/// starts queue behind each other here.
pub const TURN_DEADLINE: Duration = Duration::from_secs(120);
/// How long a clean shutdown (the spawner destroys the sandboxes left) may take.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// The spawner executable to run: `explicit` when given (it must exist), else
/// [`SPAWNER_EXE`] next to the running executable or in its parent directory (test
/// and bench binaries run from `target/<profile>/deps`). The error names every path
/// tried.
pub fn find_spawner(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => {
            let exe = std::env::current_exe().map_err(|source| Error::Io {
                op: "find the running executable",
                path: PathBuf::from("/proc/self/exe"),
                source,
            })?;
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(|d| d.join(SPAWNER_EXE))
                .collect()
        }
    };
    match candidates.iter().find(|p| p.is_file()) {
        // Absolute, so that a restart later does not depend on the working directory.
        Some(p) => Ok(p.canonicalize().unwrap_or_else(|_| p.clone())),
        None => Err(Error::SpawnerMissing { tried: candidates }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_spawner_is_named_with_every_path_tried() {
        let err = find_spawner(Some(Path::new("/nonexistent/sprout-spawner"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no sprout-spawner executable: tried /nonexistent/sprout-spawner"
        );
        if let Err(Error::SpawnerMissing { tried }) = find_spawner(None) {
            // From target/<profile>/deps: both it and target/<profile> were tried.
            assert_eq!(tried.len(), 2, "{tried:?}");
            assert!(tried.iter().all(|p| p.ends_with(SPAWNER_EXE)), "{tried:?}");
        }
    }
}
