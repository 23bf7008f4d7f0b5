//! Compiles an OCI `linux.seccomp` section into the classic BPF program the kernel
//! loads (`struct sock_filter[]`), for a process that installs a sandbox's filter
//! itself: a forked sandbox's first process, which gets no runtime to do it (see
//! `docs/design.md`, "Sandboxes"). libseccomp (as libcontainer uses it) does the
//! compiling, for the native architecture only.
//!
//! Only what sprout's filters use is accepted: default action allow; rules that
//! fail with an errno (`SCMP_ACT_ERRNO` and its `errnoRet`), unconditionally or on
//! `SCMP_CMP_MASKED_EQ` of an argument. Anything else is refused by name, so that a
//! filter that would be compiled differently from what libcontainer loads is never
//! installed.

use std::io::{Read, Seek, SeekFrom};

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};

use crate::{io_err, Error};

/// The size of one `struct sock_filter` (u16 code, u8 jt, u8 jf, u32 k).
pub const BPF_INSTRUCTION_SIZE: usize = 8;

/// `filter` as a classic BPF program: `struct sock_filter` instructions, native byte
/// order, for the native architecture (any other architecture is killed). Load it with
/// `prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &sock_fprog { len: bytes / 8, filter })`
/// after `PR_SET_NO_NEW_PRIVS`.
pub fn seccomp_bpf(filter: &LinuxSeccomp) -> Result<Vec<u8>, Error> {
    let unsupported = |what: String| Err(Error::SeccompUnsupported { what });
    if filter.default_action() != LinuxSeccompAction::ScmpActAllow {
        return unsupported(format!(
            "default action {:?} (only SCMP_ACT_ALLOW)",
            filter.default_action()
        ));
    }
    if filter
        .architectures()
        .as_ref()
        .is_some_and(|a| !a.is_empty())
    {
        return unsupported("architectures (the native one only)".into());
    }
    if filter.flags().as_ref().is_some_and(|f| !f.is_empty()) {
        return unsupported("flags".into());
    }
    if filter.listener_path().is_some() {
        return unsupported("a listener path".into());
    }
    let lib = |op: &'static str| move |source| Error::Seccomp { op, source };
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(lib("new filter"))?;
    // The loader sets no_new_privs itself; the program does not depend on it.
    ctx.set_ctl_nnp(false).map_err(lib("no_new_privs off"))?;
    for rule in filter.syscalls().as_deref().unwrap_or_default() {
        let names = rule.names().join(", ");
        if rule.action() != LinuxSeccompAction::ScmpActErrno {
            return unsupported(format!(
                "action {:?} for {names} (only SCMP_ACT_ERRNO)",
                rule.action()
            ));
        }
        let errno = match rule.errno_ret() {
            Some(e) if e <= u32::from(u16::MAX) => e as i32,
            Some(e) => return unsupported(format!("errnoRet {e} for {names} (at most 65535)")),
            None => libc::EPERM,
        };
        let mut conditions = Vec::new();
        for arg in rule.args().as_deref().unwrap_or_default() {
            if arg.op() != LinuxSeccompOperator::ScmpCmpMaskedEq {
                return unsupported(format!(
                    "operator {:?} for {names} (only SCMP_CMP_MASKED_EQ)",
                    arg.op()
                ));
            }
            if arg.index() > 5 {
                return unsupported(format!("argument index {} for {names}", arg.index()));
            }
            // OCI: `value` is the mask, `valueTwo` the value the masked argument equals.
            let datum = arg.value_two().unwrap_or(0);
            conditions.push(ScmpArgCompare::new(
                arg.index() as u32,
                ScmpCompareOp::MaskedEqual(arg.value()),
                datum,
            ));
        }
        for name in rule.names() {
            let syscall = ScmpSyscall::from_name(name).map_err(|source| Error::SeccompSyscall {
                name: name.clone(),
                source,
            })?;
            let action = ScmpAction::Errno(errno);
            if conditions.is_empty() {
                ctx.add_rule(action, syscall)
            } else {
                ctx.add_rule_conditional(action, syscall, &conditions)
            }
            .map_err(|source| Error::SeccompSyscall {
                name: name.clone(),
                source,
            })?;
        }
    }
    let memfd = rustix::fs::memfd_create("sprout-seccomp-bpf", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| io_err("create a memfd for", "the BPF program")(e.into()))?;
    ctx.export_bpf(&memfd).map_err(lib("export BPF"))?;
    let mut file = std::fs::File::from(memfd);
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(io_err("read back", "the exported BPF program"))?;
    if bytes.is_empty() || bytes.len() % BPF_INSTRUCTION_SIZE != 0 {
        return Err(Error::SeccompUnsupported {
            what: format!(
                "an exported program of {} bytes (not a whole number of instructions)",
                bytes.len()
            ),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(filter: serde_json::Value) -> Vec<u8> {
        seccomp_bpf(&serde_json::from_value(filter).unwrap()).unwrap()
    }

    /// What each probe returned under the program `bytes`, loaded in a forked child:
    /// 0, or the errno.
    fn probe(bytes: &[u8]) -> [i32; 6] {
        let prog = libc::sock_fprog {
            len: (bytes.len() / BPF_INSTRUCTION_SIZE) as u16,
            filter: bytes.as_ptr() as *mut libc::sock_filter,
        };
        let (r, w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only makes raw system calls and `_exit`s: nothing that
        // takes a lock another thread of the test process may hold.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => unsafe {
                // SAFETY: raw system calls on valid arguments (null pointers where a
                // probe needs the kernel to fail on them); `prog` outlives the load.
                let errno = |ret: libc::c_long| {
                    if ret < 0 {
                        *libc::__errno_location()
                    } else {
                        0
                    }
                };
                let mut out = [0i32; 6];
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0
                {
                    libc::_exit(99);
                }
                out[0] = errno(libc::syscall(libc::SYS_getpid));
                // unshare(0) changes nothing: only the filter can fail it.
                out[1] = errno(libc::syscall(libc::SYS_unshare, 0));
                out[2] = errno(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUTS));
                out[3] = errno(libc::syscall(libc::SYS_clone3, 0, 0));
                // Without the filter: EFAULT (no target path), before any permission check.
                out[4] = errno(libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0));
                // A namespace flag with flags the kernel refuses (EINVAL) if let through.
                let bad = libc::CLONE_NEWNET | libc::CLONE_SIGHAND;
                out[5] = errno(libc::syscall(libc::SYS_clone, bad, 0, 0, 0, 0));
                libc::write(
                    std::os::fd::AsRawFd::as_raw_fd(&w),
                    out.as_ptr().cast(),
                    std::mem::size_of_val(&out),
                );
                libc::_exit(0);
            },
            nix::unistd::ForkResult::Parent { child } => {
                drop(w);
                let mut buf = Vec::new();
                std::fs::File::from(r).read_to_end(&mut buf).unwrap();
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "the child could not load the program"
                );
                let mut out = [0i32; 6];
                for (i, v) in buf.chunks_exact(4).enumerate() {
                    out[i] = i32::from_ne_bytes(v.try_into().unwrap());
                }
                out
            }
        }
    }

    #[test]
    fn the_sandbox_filter_denies_namespaces_mount_and_clone3() {
        let started = std::time::Instant::now();
        let bytes = compile(rootfs::default_filter());
        eprintln!("compiled {} bytes in {:?}", bytes.len(), started.elapsed());
        assert_eq!(bytes.len() % BPF_INSTRUCTION_SIZE, 0);
        let [getpid, unshare0, unshare_uts, clone3, mount, clone_ns] = probe(&bytes);
        assert_eq!(getpid, 0, "getpid works");
        assert_eq!(unshare0, libc::EPERM, "unshare(0)");
        assert_eq!(unshare_uts, libc::EPERM, "unshare(CLONE_NEWUTS)");
        assert_eq!(clone3, libc::ENOSYS, "clone3");
        assert_eq!(mount, libc::EPERM, "mount");
        assert_eq!(clone_ns, libc::EPERM, "clone(CLONE_NEWNET)");
    }

    #[test]
    fn the_zygote_filter_lets_unshare_and_mount_through_only() {
        let [getpid, unshare0, _, clone3, mount, clone_ns] =
            probe(&compile(rootfs::zygote_filter()));
        assert_eq!(getpid, 0, "getpid works");
        assert_eq!(unshare0, 0, "unshare(0) is let through");
        assert_eq!(mount, libc::EFAULT, "mount is let through");
        assert_eq!(clone3, libc::ENOSYS, "clone3");
        assert_eq!(clone_ns, libc::EPERM, "clone(CLONE_NEWNET)");
    }

    #[test]
    fn what_sprout_does_not_use_is_refused_by_name() {
        let base = rootfs::default_filter();
        let mut cases = Vec::new();
        let mut v = base.clone();
        v["defaultAction"] = "SCMP_ACT_KILL".into();
        cases.push((v, "default action ScmpActKill"));
        let mut v = base.clone();
        v["syscalls"][0]["action"] = "SCMP_ACT_TRACE".into();
        cases.push((v, "action ScmpActTrace for mount"));
        let mut v = base.clone();
        v["syscalls"][2]["args"][0]["op"] = "SCMP_CMP_GT".into();
        cases.push((v, "operator ScmpCmpGt for clone"));
        let mut v = base.clone();
        v["architectures"] = serde_json::json!(["SCMP_ARCH_X86"]);
        cases.push((v, "architectures"));
        let mut v = base.clone();
        v["syscalls"][1]["names"] = serde_json::json!(["no_such_syscall"]);
        cases.push((v, "syscall no_such_syscall"));
        for (filter, want) in cases {
            let e = seccomp_bpf(&serde_json::from_value(filter).unwrap()).unwrap_err();
            assert!(e.to_string().contains(want), "{e} (wanted {want})");
        }
    }
}
