//! Who is calling: the sandbox a connection on the call socket comes from, told by
//! its peer's cgroup and checked against that sandbox's own uid, so that a function
//! cannot speak for another sandbox (nor a host process for any).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::runs::Runs;
use crate::sandboxes::Sandboxes;

/// The bound sandbox the peer of `stream` runs in, from its cgroup, and only if the
/// peer's uid (fixed when it connected, unlike its pid, which may be reused by the
/// time the cgroup is read) is that sandbox's own.
pub(super) fn caller_sandbox(
    runs: &Runs,
    sandboxes: &Sandboxes,
    stream: &UnixStream,
) -> Result<String, String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(|e| format!("peer credentials: {e}"))?;
    let (pid, uid) = (cred.pid(), cred.uid());
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    let id = sandbox_in_cgroups(&text, sandboxes.cgroup_parent())
        .ok_or_else(|| format!("process {pid} is not in a sandbox of this agent"))?;
    if !runs.is_bound(&id) {
        return Err(format!(
            "sandbox {id} (process {pid}) is not bound to a function"
        ));
    }
    peer_is_sandbox_user(uid, sandboxes.user_of(&id))
        .map_err(|why| format!("process {pid} of sandbox {id}: {why}"))?;
    Ok(id)
}

/// Whether a peer with uid `uid` (from `SO_PEERCRED`) is the sandbox whose user is
/// `user` (`None`: the sandbox holds no uid, it is not live).
fn peer_is_sandbox_user(uid: u32, user: Option<rootfs::SandboxUser>) -> Result<(), String> {
    match user {
        Some(user) if user.uid == uid => Ok(()),
        Some(user) => Err(format!(
            "connected as uid {uid}, not the sandbox's uid {}",
            user.uid
        )),
        None => Err(format!("connected as uid {uid}; the sandbox holds no uid")),
    }
}

/// The sandbox id in a `/proc/<pid>/cgroup` text whose cgroups live under `parent`.
fn sandbox_in_cgroups(text: &str, parent: &Path) -> Option<String> {
    text.lines().find_map(|line| {
        let path = PathBuf::from(line.splitn(3, ':').nth(2)?);
        let rest = path.strip_prefix(parent).ok()?;
        let first = rest.components().next()?;
        Some(first.as_os_str().to_string_lossy().into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_sandbox_own_uid_is_heard() {
        let user = rootfs::SandboxUser {
            uid: 0x7000_0003,
            gid: 0x7000_0003,
        };
        peer_is_sandbox_user(0x7000_0003, Some(user)).unwrap();
        // A process of another sandbox (or of the host) that got a reused pid.
        let e = peer_is_sandbox_user(0x7000_0004, Some(user)).unwrap_err();
        assert!(
            e.contains("uid 1879048196, not the sandbox's uid 1879048195"),
            "{e}"
        );
        assert!(
            peer_is_sandbox_user(0, Some(user)).is_err(),
            "root is not a sandbox"
        );
        assert!(peer_is_sandbox_user(0x7000_0003, None).is_err());
    }

    #[test]
    fn the_caller_sandbox_comes_from_its_cgroup_path() {
        let parent = Path::new("/sprout/42");
        let v1 = "12:freezer:/sprout/42/sprout-42-7\n11:memory:/sprout/42/sprout-42-7\n";
        assert_eq!(
            sandbox_in_cgroups(v1, parent).as_deref(),
            Some("sprout-42-7")
        );
        let v2 = "0::/sprout/42/sprout-42-9\n";
        assert_eq!(
            sandbox_in_cgroups(v2, parent).as_deref(),
            Some("sprout-42-9")
        );
        assert_eq!(sandbox_in_cgroups("0::/user.slice\n", parent), None);
        assert_eq!(
            sandbox_in_cgroups("0::/sprout/43/sprout-43-1\n", parent),
            None
        );
    }
}
