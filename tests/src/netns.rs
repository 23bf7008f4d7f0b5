//! Network namespaces of a test's own, joined to the host by a veth pair: a
//! server the sandboxes should or should not reach, a package index, a sprout node
//! with a listener of its own.
//!
//! The namespace belongs to a process the test started under `unshare --net`, so it
//! goes with that process: a namespace named in `/run/netns` would be a host mount
//! naming sprout, which every test running meanwhile takes for a leftover. The host
//! side of the pair is `sprout-<letter><n>` (`.ci/check-clean` reports any left),
//! the inside is `eth0`; the pair is deleted when the [`TestNetns`] is dropped,
//! before its process is killed.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{wait_for, KillOnDrop};

/// One namespace: `10.<net>.<pid % 256>.<4n + 1>/30` on the host side, `.2` inside.
pub struct TestNetns {
    link: String,
    holder: Option<KillOnDrop>,
    /// The host side's address.
    pub host_addr: String,
    /// The address of `eth0` inside.
    pub addr: String,
    /// `(pid % 256, 4n)`: the third octet and the base of the fourth, for more
    /// addresses of the same shape (say in `169.254/16`).
    pub slot: (u32, u32),
}

/// Runs `program args`, panicking with its stderr unless it succeeds.
#[track_caller]
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestNetns {
    /// Starts `holder` (a program and its arguments) in a new network namespace,
    /// links it to the host as `sprout-<letter><n>` with the addresses of
    /// `10.<net>.0.0/16`, and brings `eth0` and `lo` up inside.
    pub fn new(letter: char, net: u8, holder: &[&str]) -> TestNetns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let link = format!("sprout-{letter}{}", pid % 10_000 * 10 + n % 10);
        let slot = (pid % 256, 4 * (n % 60));
        let process = KillOnDrop::spawn(Command::new("unshare").arg("--net").args(holder));
        let ns = process.pid().to_string();
        // `unshare` has made its namespace once it is not the test's any more.
        let own = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
        let unshared = wait_for(Duration::from_secs(10), || {
            (own(&ns).is_some() && own(&ns) != own("self"))
                .then_some(())
                .ok_or(())
        });
        assert!(unshared.is_ok(), "{holder:?} never got its own namespace");
        let netns = TestNetns {
            link: link.clone(),
            holder: Some(process),
            host_addr: format!("10.{net}.{}.{}", slot.0, slot.1 + 1),
            addr: format!("10.{net}.{}.{}", slot.0, slot.1 + 2),
            slot,
        };
        run(
            "ip",
            &[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        );
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", netns.host_addr),
                "dev",
                &link,
            ],
        );
        run("ip", &["link", "set", &link, "up"]);
        netns.ip_inside(&["addr", "add", &format!("{}/30", netns.addr), "dev", "eth0"]);
        netns.ip_inside(&["link", "set", "eth0", "up"]);
        netns.ip_inside(&["link", "set", "lo", "up"]);
        netns
    }

    /// The pid of the process that holds the namespace.
    pub fn pid(&self) -> u32 {
        self.holder.as_ref().expect("the holder").pid()
    }

    /// The namespace's file, for `setns` or `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.pid())
    }

    /// The host side of the veth pair.
    pub fn link(&self) -> &str {
        &self.link
    }

    /// `ip ARGS` inside the namespace.
    #[track_caller]
    pub fn ip_inside(&self, args: &[&str]) {
        let ns = self.pid().to_string();
        let mut all = vec!["-t", &ns, "-n", "ip"];
        all.extend_from_slice(args);
        run("nsenter", &all);
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // The link is deleted first so that it is gone when the test checks; the
        // namespace goes with its last process.
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        self.holder.take();
    }
}
