//! The default seccomp filter: allow by default, deny what functions never need.
//!
//! Modelled on Docker's default profile (moby `profiles/seccomp/default.json`), which
//! is an allow-list; sprout keeps the same denials as a deny-list so that runtimes
//! added later (Node.js, native executables) are not broken by a missing entry.

use serde_json::{json, Value};

/// Denied with `EPERM`.
const DENIED: &[&str] = &[
    // Filesystem and namespace administration.
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "setns",
    "unshare",
    "name_to_handle_at",
    "open_by_handle_at",
    // Tracing and other processes' memory.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    // Kernel, modules, keys, BPF, perf.
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "lookup_dcookie",
    "userfaultfd",
    "syslog",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // Machine state.
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "vhangup",
    "personality",
];

/// `clone` flags that create namespaces (`CLONE_NEWNS` … `CLONE_NEWNET`).
const CLONE_NAMESPACE_FLAGS: &[u64] = &[
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The `linux.seccomp` section of the spec.
pub fn default_filter() -> Value {
    filter_allowing(&[])
}

/// The `linux.seccomp` section of the fork server's spec: the sandbox filter with
/// `unshare` and `mount` allowed, so that its zygote's children can make a new
/// sandbox's namespaces and mounts (inside the fork server's user namespace, where
/// its capabilities hold). Everything else stays denied, `clone`'s namespace flags
/// and `clone3` included.
pub fn zygote_filter() -> Value {
    filter_allowing(&["unshare", "mount"])
}

/// The sandbox filter minus the denials of the syscalls named in `allowed`.
fn filter_allowing(allowed: &[&str]) -> Value {
    let denied: Vec<&str> = DENIED
        .iter()
        .copied()
        .filter(|name| !allowed.contains(name))
        .collect();
    let mut syscalls = vec![json!({
        "names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
    })];
    // clone3 passes its flags in memory where seccomp cannot see them: make libc
    // fall back to clone, whose namespace flags are checked below.
    syscalls.push(json!({ "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS }));
    for flag in CLONE_NAMESPACE_FLAGS {
        syscalls.push(json!({
            "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
            "args": [{ "index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ" }],
        }));
    }
    json!({ "defaultAction": "SCMP_ACT_ALLOW", "syscalls": syscalls })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every syscall name a filter denies, each once per rule, with its errno.
    fn denials(filter: &Value) -> Vec<(String, u64, bool)> {
        let mut out = Vec::new();
        for rule in filter["syscalls"].as_array().unwrap() {
            for name in rule["names"].as_array().unwrap() {
                out.push((
                    name.as_str().unwrap().to_owned(),
                    rule["errnoRet"].as_u64().unwrap(),
                    rule.get("args").is_some(),
                ));
            }
        }
        out
    }

    #[test]
    fn the_zygote_filter_is_the_sandbox_filter_without_unshare_and_mount() {
        let sandbox = denials(&default_filter());
        let zygote = denials(&zygote_filter());
        for name in ["unshare", "mount"] {
            assert!(sandbox.iter().any(|(n, ..)| n == name), "{name}");
            assert!(
                !zygote.iter().any(|(n, ..)| n == name),
                "{name} still denied"
            );
        }
        let expected: Vec<_> = sandbox
            .iter()
            .filter(|(n, ..)| n != "unshare" && n != "mount")
            .cloned()
            .collect();
        assert_eq!(
            zygote, expected,
            "everything else is denied as in a sandbox"
        );
        assert!(zygote.contains(&("clone3".into(), ENOSYS.into(), false)));
        assert!(zygote.contains(&("setns".into(), EPERM.into(), false)));
        assert_eq!(
            zygote
                .iter()
                .filter(|(n, _, args)| n == "clone" && *args)
                .count(),
            7
        );
        assert_eq!(zygote_filter()["defaultAction"], "SCMP_ACT_ALLOW");
    }
}
