//! The OCI runtime spec of a sandbox.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde_json::json;

use crate::{
    seccomp, Error, CODE_DIR, DEPS_DIR, FUNCTIONS_DIR, MAX_FILE_SIZE, RUNTIME_DIR, SHIM_PATH,
    WORKFLOW_DIR,
};

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPU bandwidth in cores (1.0 = one full core).
    pub cpus: f64,
}

/// The umask of every sandbox process: none, so files are 0666 and directories 0777
/// unless a function asks for less. Siblings of a workflow run are each their own
/// uid, and share the run's scratch as they did when they shared one: each can read
/// and overwrite the files the others make there. Everything else a sandbox can
/// write (`/tmp`, `/dev/shm`) is its own, out of reach of other uids.
pub const SANDBOX_UMASK: u32 = 0;

/// Size of the writable `/tmp` (it is charged to the memory limit too).
const TMP_SIZE: &str = "size=64m";
const CPU_PERIOD_US: u64 = 100_000;

/// Everything a sandbox's spec is built from. Host paths must be absolute.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub id: String,
    /// The skeleton root (see [`crate::Skeleton`]).
    pub root: PathBuf,
    /// Cgroup path from the hierarchy root, e.g. `/sprout/1234/sprout-1234-1`.
    pub cgroups_path: PathBuf,
    /// Host directory mounted at [`RUNTIME_DIR`]; holds an empty file `shim` as the
    /// mount point for [`SandboxConfig::shim`].
    pub runtime_dir: PathBuf,
    /// Host path of the `sprout-shim` binary, mounted at [`SHIM_PATH`].
    pub shim: PathBuf,
    /// Host directory with the function's code, mounted at [`CODE_DIR`].
    pub code: Option<PathBuf>,
    pub limits: Limits,
    /// Extra `KEY=value` environment for the shim.
    pub env: Vec<String>,
}

/// The host user and group every process of one sandbox runs as (shim, zygote,
/// instances), with no supplementary groups.
///
/// Not root, and one per sandbox ([`SandboxUsers`] hands them out from a
/// [`SandboxUids`] range): per-user kernel limits (pipe buffer pages, inotify
/// instances, `RLIMIT_NPROC`, `RLIMIT_SIGPENDING`, `RLIMIT_MSGQUEUE`) and same-user
/// access (`/proc/<pid>/mem`, `pidfd_getfd`) never reach another sandbox. A host file
/// is open to a function only through its "other" permission bits. There is no user
/// namespace (see `docs/security.md` for why): the ids are host ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxUser {
    pub uid: u32,
    pub gid: u32,
}

impl SandboxUser {
    /// `uid` and `gid`, refusing root (0) and the kernel's "no id" (`u32::MAX`).
    pub fn new(uid: u32, gid: u32) -> Result<SandboxUser, Error> {
        for (field, value) in [("sandbox_uid", uid), ("sandbox_gid", gid)] {
            if value == 0 || value == u32::MAX {
                return Err(Error::SandboxUser { field, value });
            }
        }
        Ok(SandboxUser { uid, gid })
    }
}

/// The range of host ids sandboxes run as: `count` ids from `base`; a sandbox's uid
/// and gid are `base + slot`. Two agents on one host need ranges that do not overlap,
/// and no host account may use an id in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxUids {
    pub base: u32,
    pub count: u32,
}

impl SandboxUids {
    /// 0x7000_0000: far above normal users (1000..) and the usual subordinate id
    /// ranges (from 100000).
    pub const DEFAULT_BASE: u32 = 0x7000_0000;
    /// At most this many sandboxes of one agent at once.
    pub const DEFAULT_COUNT: u32 = 65536;
    /// The highest id a sandbox may have (`u32::MAX` is the kernel's "no id").
    pub const MAX_ID: u32 = u32::MAX - 1;
    /// The largest range (its bitmap is 128 KiB).
    pub const MAX_COUNT: u32 = 1 << 20;
    pub const DEFAULT: SandboxUids = SandboxUids {
        base: SandboxUids::DEFAULT_BASE,
        count: SandboxUids::DEFAULT_COUNT,
    };

    /// `count` ids from `base`, refusing a range that is empty, larger than
    /// [`SandboxUids::MAX_COUNT`], includes root (0) or goes past
    /// [`SandboxUids::MAX_ID`].
    pub fn new(base: u32, count: u32) -> Result<SandboxUids, Error> {
        let fits = base >= 1
            && (1..=Self::MAX_COUNT).contains(&count)
            && u64::from(base) + u64::from(count) - 1 <= u64::from(Self::MAX_ID);
        if !fits {
            return Err(Error::SandboxUids { base, count });
        }
        Ok(SandboxUids { base, count })
    }

    /// The user of slot `slot` (below `count`).
    pub fn user(&self, slot: u32) -> SandboxUser {
        debug_assert!(slot < self.count);
        let id = self.base + slot;
        SandboxUser { uid: id, gid: id }
    }

    /// Whether `uid` is one of this range's.
    pub fn contains(&self, uid: u32) -> bool {
        uid >= self.base && uid - self.base < self.count
    }
}

impl Default for SandboxUids {
    fn default() -> Self {
        SandboxUids::DEFAULT
    }
}

/// Hands out one [`SandboxUids`] slot per live sandbox: a bitmap of used slots,
/// searched from after the last one given (so a released slot is the last to be
/// reused), and which sandbox holds which. A slot is free again only when
/// [`SandboxUsers::release`] is called, after its sandbox is destroyed.
#[derive(Debug)]
pub struct SandboxUsers {
    range: SandboxUids,
    slots: parking_lot::Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    /// Bit `i % 64` of word `i / 64`: slot `i` is in use.
    used: Vec<u64>,
    by_sandbox: std::collections::HashMap<String, u32>,
    /// Where the next search starts.
    next: u32,
}

impl SandboxUsers {
    pub fn new(range: SandboxUids) -> SandboxUsers {
        SandboxUsers {
            range,
            slots: parking_lot::Mutex::new(Slots {
                used: vec![0; range.count.div_ceil(64) as usize],
                ..Slots::default()
            }),
        }
    }

    pub fn range(&self) -> SandboxUids {
        self.range
    }

    /// A free slot's user for `sandbox` (the one it holds already, if any); an
    /// error when every slot is in use.
    pub fn assign(&self, sandbox: &str) -> Result<SandboxUser, Error> {
        self.assign_in(sandbox, 0..self.range.count)
    }

    /// [`SandboxUsers::assign`] within the slots `window` (searched from after the
    /// last slot given when that is in the window, else from its start); an error
    /// naming the window when all of it is in use. Forked sandboxes and created
    /// ones take uids from windows of their own, so that the fork server's user
    /// namespace maps only the former.
    pub fn assign_in(
        &self,
        sandbox: &str,
        window: std::ops::Range<u32>,
    ) -> Result<SandboxUser, Error> {
        let mut s = self.slots.lock();
        if let Some(&slot) = s.by_sandbox.get(sandbox) {
            return Ok(self.range.user(slot));
        }
        let (lo, hi) = (window.start, window.end.min(self.range.count));
        let start = if (lo..hi).contains(&s.next) {
            s.next
        } else {
            lo
        };
        // From the start to the window's end, then from its beginning to the start; a
        // full word is skipped with one comparison.
        for (from, to) in [(start, hi), (lo, start)] {
            let mut slot = from;
            while slot < to {
                let word = s.used[(slot / 64) as usize];
                if word == u64::MAX {
                    slot = (slot / 64 + 1) * 64;
                    continue;
                }
                if word & (1 << (slot % 64)) == 0 {
                    s.used[(slot / 64) as usize] |= 1 << (slot % 64);
                    s.by_sandbox.insert(sandbox.to_owned(), slot);
                    s.next = (slot + 1) % self.range.count;
                    return Ok(self.range.user(slot));
                }
                slot += 1;
            }
        }
        Err(Error::NoSandboxUid {
            count: hi.saturating_sub(lo),
            base: self.range.base + lo.min(hi),
        })
    }

    /// Frees `sandbox`'s slot (call it once the sandbox's processes are gone);
    /// its user, if it held one.
    pub fn release(&self, sandbox: &str) -> Option<SandboxUser> {
        let mut s = self.slots.lock();
        let slot = s.by_sandbox.remove(sandbox)?;
        s.used[(slot / 64) as usize] &= !(1 << (slot % 64));
        Some(self.range.user(slot))
    }

    /// The user `sandbox` runs as, if it holds a slot.
    pub fn user_of(&self, sandbox: &str) -> Option<SandboxUser> {
        let s = self.slots.lock();
        s.by_sandbox.get(sandbox).map(|&slot| self.range.user(slot))
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.slots.lock().by_sandbox.len()
    }
}

fn absolute<'a>(what: &'static str, p: &'a Path) -> Result<&'a Path, Error> {
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(Error::RelativePath {
            what,
            path: p.to_path_buf(),
        })
    }
}

fn bind_ro(source: &Path, destination: &str) -> serde_json::Value {
    json!({
        "destination": destination, "type": "bind", "source": source,
        "options": ["rbind", "ro", "nosuid", "nodev"],
    })
}

/// Builds the sandbox's spec: its own pid, ipc, uts, mount, network and cgroup
/// namespaces; memory, pids and cpu limits; a read-only root with a tmpfs `/tmp`;
/// no capabilities, `no_new_privs` and [the default seccomp filter](crate::seccomp);
/// its processes run as the first user of the default [`SandboxUids`] range.
pub fn bundle_spec(cfg: &SandboxConfig) -> Result<Spec, Error> {
    bundle_spec_as(cfg, SandboxUids::DEFAULT.user(0))
}

/// [`bundle_spec`] with the sandbox's processes running as `user` (refused if root).
pub fn bundle_spec_as(cfg: &SandboxConfig, user: SandboxUser) -> Result<Spec, Error> {
    let user = SandboxUser::new(user.uid, user.gid)?;
    let root = absolute("root", &cfg.root)?;
    let runtime_dir = absolute("runtime", &cfg.runtime_dir)?;
    let shim = absolute("shim", &cfg.shim)?;
    let cgroups_path = absolute("cgroups", &cfg.cgroups_path)?;

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        // No /sys/fs/cgroup below it: on cgroup v1 libcontainer would mount it writable.
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=1777", TMP_SIZE]}),
        // The workflow scratch: the sandbox's own until a workflow's is attached over it.
        // Not sticky: the sandboxes of one run are different users of one tenant and
        // rewrite each other's files (a sticky directory with the host's
        // `fs.protected_regular` set refuses an `O_CREAT` open of another user's file).
        json!({"destination": WORKFLOW_DIR, "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=0777", TMP_SIZE]}),
        // Mount points for the code of functions called in this sandbox. Owned by
        // root, not the sandbox user: the sandbox can neither make entries in it nor
        // chmod it; the spawner makes the mount points as its owner (in a forked
        // sandbox, its user namespace's root).
        json!({"destination": FUNCTIONS_DIR, "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=0755", "uid=0", "gid=0", "size=1m"]}),
        // Mount points for the function's installed packages, one per package: root's
        // too, for the same reasons.
        json!({"destination": DEPS_DIR, "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=0755", "uid=0", "gid=0", "size=1m"]}),
        bind_ro(Path::new("/usr"), "/usr"),
        bind_ro(runtime_dir, RUNTIME_DIR),
        bind_ro(shim, SHIM_PATH),
    ];
    if let Some(code) = &cfg.code {
        mounts.push(bind_ro(absolute("code", code)?, CODE_DIR));
    }

    let mut env = vec![
        "PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
        "HOME=/tmp".to_owned(),
        "LANG=C.UTF-8".to_owned(),
        format!("SPROUT_SANDBOX={}", cfg.id),
        format!("SPROUT_WORKFLOW_DIR={WORKFLOW_DIR}"),
    ];
    env.extend(cfg.env.iter().cloned());

    let value = json!({
        "ociVersion": "1.0.2",
        "root": { "path": root, "readonly": true },
        "hostname": cfg.id,
        "mounts": mounts,
        "process": {
            "terminal": false,
            // Not root, no supplementary groups. libcontainer makes every mount
            // above as root and switches to this user just before exec. The umask
            // is fixed, not the agent's (see SANDBOX_UMASK).
            "user": { "uid": user.uid, "gid": user.gid, "additionalGids": [], "umask": SANDBOX_UMASK },
            "args": [SHIM_PATH],
            "env": env,
            "cwd": "/",
            "capabilities": { "bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": [] },
            "rlimits": [
                { "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 },
                // No core dumps: 1, not 0, because with a pipe `core_pattern`
                // (systemd-coredump, apport) the kernel ignores the limit except
                // for the value 1, and would start the host's helper for every
                // crash. And no file larger than the largest payload or scratch.
                { "type": "RLIMIT_CORE", "hard": 1, "soft": 1 },
                { "type": "RLIMIT_FSIZE", "hard": MAX_FILE_SIZE, "soft": MAX_FILE_SIZE },
            ],
            "noNewPrivileges": true,
        },
        "linux": {
            "cgroupsPath": cgroups_path,
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "network"}, {"type": "cgroup"},
            ],
            "resources": resources_json(&cfg.limits),
            "maskedPaths": oci_spec::runtime::get_default_maskedpaths(),
            "readonlyPaths": oci_spec::runtime::get_default_readonly_paths(),
            "seccomp": seccomp::default_filter(),
        },
    });
    serde_json::from_value(value).map_err(Error::Spec)
}

/// The host's certificate authorities (Debian's `ca-certificates`), read-only in
/// install sandboxes; not the rest of `/etc/ssl` (`private/` holds keys).
const HOST_CERTIFICATES: &str = "/etc/ssl/certs";

/// What an install sandbox may use.
#[derive(Debug, Clone)]
pub struct InstallSpec {
    /// The host directory the installer writes into, bound read-write at
    /// [`DEPS_DIR`] (it must belong to the sandbox's user).
    pub out: PathBuf,
    /// The installer's program and arguments (inside the sandbox).
    pub args: Vec<String>,
    /// The largest file the installer may write (`RLIMIT_FSIZE`).
    pub max_file_bytes: u64,
}

/// An install sandbox's spec: [`bundle_spec_as`]`(cfg, user)` with `install.args` as
/// its process, `install.out` read-write at [`DEPS_DIR`] instead of the sandbox's
/// tmpfs (everything else stays read-only or the sandbox's own), and files up to
/// `install.max_file_bytes`. It runs package code (builds, metadata hooks): it gets
/// the same namespaces, limits, user, seccomp filter and lack of privileges as a
/// function's sandbox.
pub fn install_spec(
    cfg: &SandboxConfig,
    user: SandboxUser,
    install: &InstallSpec,
) -> Result<Spec, Error> {
    let out = absolute("install output", &install.out)?;
    if install.args.is_empty() {
        return Err(Error::NoInstaller);
    }
    let spec = bundle_spec_as(cfg, user)?;
    let mut value = serde_json::to_value(&spec).map_err(Error::Spec)?;
    value["process"]["args"] = json!(install.args);
    if let Some(mounts) = value["mounts"].as_array_mut() {
        mounts.retain(|m| m["destination"] != DEPS_DIR);
        mounts.push(json!({
            "destination": DEPS_DIR, "type": "bind", "source": out,
            "options": ["rbind", "rw", "nosuid", "nodev"],
        }));
        // The host's certificate authorities, for the index's TLS.
        if Path::new(HOST_CERTIFICATES).is_dir() {
            mounts.push(bind_ro(Path::new(HOST_CERTIFICATES), HOST_CERTIFICATES));
        }
    }
    if let Some(rlimits) = value["process"]["rlimits"].as_array_mut() {
        for r in rlimits.iter_mut().filter(|r| r["type"] == "RLIMIT_FSIZE") {
            r["hard"] = json!(install.max_file_bytes);
            r["soft"] = json!(install.max_file_bytes);
        }
    }
    serde_json::from_value(value).map_err(Error::Spec)
}

/// The fork server's spec: [`bundle_spec_as`]`(cfg, zygote)` (its own namespaces,
/// the sandbox's mounts, limits and rlimits, no capabilities, `no_new_privs`, the
/// host user `zygote`), with `SHIM_PATH fork-server` as its process,
/// [`seccomp::zygote_filter`] (the sandbox filter minus `unshare` and `mount`), and
/// no masked or read-only `/proc` paths: its zygote moves into a user namespace of
/// its own whose children make new sandboxes, and their mount namespaces hold locked
/// copies of its mounts, under which the kernel lets them mount a new `/proc` only
/// when no part of the old one is hidden (they mask their own). A `zygote` user
/// outside `uids` is refused: the agent maps the range from it.
pub fn zygote_spec(
    cfg: &SandboxConfig,
    zygote: SandboxUser,
    uids: SandboxUids,
) -> Result<Spec, Error> {
    let uids = SandboxUids::new(uids.base, uids.count)?;
    if !uids.contains(zygote.uid) || !uids.contains(zygote.gid) {
        return Err(Error::ZygoteUser {
            uid: zygote.uid,
            gid: zygote.gid,
            base: uids.base,
            count: uids.count,
        });
    }
    let spec = bundle_spec_as(cfg, zygote)?;
    let mut value = serde_json::to_value(&spec).map_err(Error::Spec)?;
    value["process"]["args"] = json!([SHIM_PATH, "fork-server"]);
    let linux = &mut value["linux"];
    linux["maskedPaths"] = json!([]);
    linux["readonlyPaths"] = json!([]);
    linux["seccomp"] = seccomp::zygote_filter();
    serde_json::from_value(value).map_err(Error::Spec)
}

fn resources_json(limits: &Limits) -> serde_json::Value {
    let quota = (limits.cpus * CPU_PERIOD_US as f64).round() as i64;
    json!({
        "devices": [{ "allow": false, "access": "rwm" }],
        // swap = limit: no swap beyond the memory limit.
        "memory": { "limit": limits.memory_bytes, "swap": limits.memory_bytes },
        "pids": { "limit": limits.pids },
        "cpu": { "quota": quota, "period": CPU_PERIOD_US },
    })
}

/// The cgroup limits of a sandbox, as in its spec; also used to change a running
/// sandbox's limits when a stem cell is bound to a function with its own.
pub fn resources(limits: &Limits) -> Result<oci_spec::runtime::LinuxResources, Error> {
    serde_json::from_value(resources_json(limits)).map_err(Error::Spec)
}

/// Writes `spec` as `bundle/config.json`.
pub fn write_bundle(bundle: &Path, spec: &Spec) -> Result<(), Error> {
    std::fs::create_dir_all(bundle).map_err(|source| Error::Create {
        path: bundle.to_path_buf(),
        source,
    })?;
    let path = bundle.join("config.json");
    spec.save(&path)
        .map_err(|source| Error::Save { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxNamespaceType, LinuxSeccompAction};

    fn config() -> SandboxConfig {
        SandboxConfig {
            id: "sprout-1-1".into(),
            root: "/run/sprout/1/rootfs".into(),
            cgroups_path: "/sprout/1/sprout-1-1".into(),
            runtime_dir: "/run/sprout/1/runtime".into(),
            shim: "/opt/sprout/sprout-shim".into(),
            code: Some("/srv/fn/hello".into()),
            limits: Limits {
                memory_bytes: 128 << 20,
                pids: 64,
                cpus: 1.5,
            },
            env: vec!["X=1".into()],
        }
    }

    #[test]
    fn namespaces_limits_and_privileges() {
        let spec = bundle_spec(&config()).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let ns: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        for want in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Cgroup,
        ] {
            assert!(ns.contains(&want), "{want:?} missing");
        }
        assert_eq!(ns.len(), 6, "exactly these namespaces: {ns:?}");
        assert!(!ns.contains(&LinuxNamespaceType::User));
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/sprout/1/sprout-1-1"))
        );
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.memory().unwrap().limit(), Some(128 << 20));
        assert_eq!(res.memory().unwrap().swap(), Some(128 << 20));
        assert_eq!(res.pids().unwrap().limit(), 64);
        assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(150_000));

        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(true));
        let rlimits: Vec<_> = process
            .rlimits()
            .as_ref()
            .unwrap()
            .iter()
            .map(|r| (format!("{:?}", r.typ()), r.soft(), r.hard()))
            .collect();
        for want in [
            ("RlimitNofile".to_owned(), 1024, 1024),
            ("RlimitCore".to_owned(), 1, 1),
            ("RlimitFsize".to_owned(), 1 << 30, 1 << 30),
        ] {
            assert!(rlimits.contains(&want), "{want:?} not in {rlimits:?}");
        }
        let caps = process.capabilities().as_ref().unwrap();
        assert!(caps.bounding().as_ref().unwrap().is_empty());
        assert!(caps.effective().as_ref().unwrap().is_empty());
        assert!(process
            .env()
            .as_ref()
            .unwrap()
            .contains(&"SPROUT_SANDBOX=sprout-1-1".to_owned()));
        assert_eq!(spec.hostname().as_deref(), Some("sprout-1-1"));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
    }

    #[test]
    fn mounts_are_read_only_except_tmp_and_leave_out_the_cgroup_fs() {
        let spec = bundle_spec(&config()).unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        let find = |d: &str| mounts.iter().find(|m| m.destination() == Path::new(d));
        assert!(mounts
            .iter()
            .all(|m| !m.destination().starts_with("/sys/fs/cgroup")));
        for ro in ["/usr", "/code", RUNTIME_DIR, SHIM_PATH, "/sys"] {
            let opts = find(ro)
                .unwrap_or_else(|| panic!("{ro} not mounted"))
                .options()
                .clone()
                .unwrap();
            assert!(opts.contains(&"ro".to_owned()), "{ro} not read-only");
        }
        assert_eq!(
            find("/code").unwrap().source().as_deref(),
            Some(Path::new("/srv/fn/hello"))
        );
        let tmp = find("/tmp").unwrap();
        assert_eq!(tmp.typ().as_deref(), Some("tmpfs"));
        assert!(!tmp.options().clone().unwrap().contains(&"ro".to_owned()));
    }

    #[test]
    fn seccomp_denies_administration_and_namespace_creation() {
        let spec = bundle_spec(&config()).unwrap();
        let sc = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        assert_eq!(sc.default_action(), LinuxSeccompAction::ScmpActAllow);
        let denied: Vec<&String> = sc
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|s| s.action() == LinuxSeccompAction::ScmpActErrno && s.args().is_none())
            .flat_map(|s| s.names())
            .collect();
        for name in [
            "mount",
            "ptrace",
            "bpf",
            "keyctl",
            "kexec_load",
            "unshare",
            "setns",
        ] {
            assert!(denied.iter().any(|d| *d == name), "{name} not denied");
        }
        let clone_rules = sc
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|s| s.names() == &["clone"])
            .count();
        assert_eq!(clone_rules, 7, "one rule per namespace flag");
    }

    /// The limits a running sandbox is changed to are the configured ones, in the
    /// kernel's units, and the same as in a new sandbox's spec.
    #[test]
    fn resources_are_the_configured_limits() {
        for (mib, pids, cpus, quota) in [
            (128u64, 64i64, 1.5f64, 150_000i64),
            (64, 16, 0.5, 50_000),
            (2048, 1024, 2.0, 200_000),
            (1, 1, 0.01, 1_000),
        ] {
            let limits = Limits {
                memory_bytes: mib << 20,
                pids: pids as u64,
                cpus,
            };
            let res = resources(&limits).unwrap();
            let what = format!("{mib} MiB, {pids} pids, {cpus} cpus");
            let memory = res.memory().unwrap();
            let bytes = mib as i64 * 1024 * 1024;
            assert_eq!(memory.limit(), Some(bytes), "memory limit for {what}");
            assert_eq!(
                memory.swap(),
                Some(bytes),
                "memory+swap equals the memory limit (no swap) for {what}"
            );
            assert_eq!(res.pids().unwrap().limit(), pids, "pids for {what}");
            let cpu = res.cpu().as_ref().unwrap();
            assert_eq!(cpu.period(), Some(100_000), "cpu period for {what}");
            assert_eq!(cpu.quota(), Some(quota), "cpu quota for {what}");
            let devices = res.devices().as_ref().unwrap();
            assert_eq!(devices.len(), 1, "{devices:?}");
            assert!(!devices[0].allow(), "every device is denied: {devices:?}");
            assert_eq!(devices[0].access().as_deref(), Some("rwm"));

            let mut c = config();
            c.limits = limits;
            let spec = bundle_spec(&c).unwrap();
            let in_spec = spec.linux().as_ref().unwrap().resources().clone().unwrap();
            assert_eq!(in_spec, res, "the spec's limits for {what}");
        }
    }

    /// Every process of a sandbox is an unprivileged host user without supplementary
    /// groups; root is refused; `/fns` stays root's so the sandbox cannot add to it.
    #[test]
    fn the_sandbox_runs_as_an_unprivileged_user() {
        let user_of = |spec: &Spec| {
            let u = spec.process().as_ref().unwrap().user().clone();
            (
                u.uid(),
                u.gid(),
                u.additional_gids().clone().unwrap_or_default(),
            )
        };
        assert_eq!(
            user_of(&bundle_spec(&config()).unwrap()),
            (0x7000_0000, 0x7000_0000, vec![])
        );
        let spec = bundle_spec_as(
            &config(),
            SandboxUser {
                uid: 1234,
                gid: 5678,
            },
        )
        .unwrap();
        assert_eq!(user_of(&spec), (1234, 5678, vec![]));
        assert_eq!(
            spec.process().as_ref().unwrap().user().umask(),
            Some(0),
            "not the agent's umask"
        );
        for (uid, gid, field) in [(0, 5678, "sandbox_uid 0"), (1234, 0, "sandbox_gid 0")] {
            let e = bundle_spec_as(&config(), SandboxUser { uid, gid }).unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
        let mounts = spec.mounts().as_ref().unwrap();
        let opts = |d: &str| {
            mounts
                .iter()
                .find(|m| m.destination() == Path::new(d))
                .and_then(|m| m.options().clone())
                .unwrap_or_else(|| panic!("{d} not mounted"))
        };
        for want in ["mode=0755", "uid=0", "gid=0"] {
            assert!(opts(FUNCTIONS_DIR).contains(&want.to_owned()), "{want}");
        }
        // What the sandbox user writes to: writable by everyone; sticky where only
        // the sandbox's own user writes, not where a run's sandboxes share files.
        for d in ["/tmp", "/dev/shm"] {
            assert!(opts(d).contains(&"mode=1777".to_owned()), "{d}");
        }
        assert!(opts(WORKFLOW_DIR).contains(&"mode=0777".to_owned()));
        let ns = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(ns.iter().all(|n| n.typ() != LinuxNamespaceType::User));
    }

    /// The shim as fork server, the zygote filter, no masked paths; no capability,
    /// no user namespace (its zygote makes its own); the rest as a sandbox's.
    #[test]
    fn the_fork_server_is_a_sandbox_with_the_zygote_filter_and_an_unmasked_proc() {
        let uids = SandboxUids::new(1000, 10).unwrap();
        let user = SandboxUser {
            uid: 1003,
            gid: 1003,
        };
        let spec = zygote_spec(&config(), user, uids).unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(
            process.args().as_ref().unwrap(),
            &[SHIM_PATH, "fork-server"]
        );
        let u = process.user();
        assert_eq!((u.uid(), u.gid(), u.umask()), (1003, 1003, Some(0)));
        let caps = process.capabilities().as_ref().unwrap();
        assert!(caps.bounding().as_ref().unwrap().is_empty());
        assert!(caps.effective().as_ref().unwrap().is_empty());
        assert!(caps.permitted().as_ref().unwrap().is_empty());
        assert_eq!(process.no_new_privileges(), Some(true));
        let linux = spec.linux().as_ref().unwrap();
        let ns: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert_eq!(ns.len(), 6, "{ns:?}");
        assert!(!ns.contains(&LinuxNamespaceType::User));
        assert!(linux.uid_mappings().is_none() && linux.gid_mappings().is_none());
        assert_eq!(linux.masked_paths().as_deref(), Some(&[][..]));
        assert_eq!(linux.readonly_paths().as_deref(), Some(&[][..]));
        let seccomp = serde_json::to_value(linux.seccomp().as_ref().unwrap()).unwrap();
        let filter: Spec = serde_json::from_value(json!({
            "ociVersion": "1.0.2", "linux": { "seccomp": crate::seccomp::zygote_filter() }
        }))
        .unwrap();
        assert_eq!(
            seccomp,
            serde_json::to_value(filter.linux().as_ref().unwrap().seccomp().as_ref().unwrap())
                .unwrap()
        );
        // Everything else is a sandbox's.
        let sandbox = bundle_spec_as(&config(), user).unwrap();
        assert_eq!(spec.mounts(), sandbox.mounts());
        assert_eq!(spec.root(), sandbox.root());
        assert_eq!(
            process.rlimits(),
            sandbox.process().as_ref().unwrap().rlimits()
        );
        assert_eq!(process.env(), sandbox.process().as_ref().unwrap().env());
        let s = sandbox.linux().as_ref().unwrap();
        assert_eq!(linux.resources(), s.resources());
        assert_eq!(linux.cgroups_path(), s.cgroups_path());
        for (uid, gid) in [(999, 1000), (1000, 1010), (0, 0)] {
            let e = zygote_spec(&config(), SandboxUser { uid, gid }, uids)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("uid {uid}, gid {gid}")), "{e}");
            assert!(e.contains("1000 to 1009"), "{e}");
        }
    }

    #[test]
    fn slots_are_given_within_a_window_and_a_full_window_names_itself() {
        let users = SandboxUsers::new(SandboxUids::new(1000, 10).unwrap());
        assert_eq!(users.assign_in("a", 5..10).unwrap().uid, 1005);
        assert_eq!(users.assign_in("b", 0..5).unwrap().uid, 1000);
        assert_eq!(users.assign_in("c", 5..10).unwrap().uid, 1006);
        assert_eq!(
            users.assign_in("a", 0..5).unwrap().uid,
            1005,
            "held already"
        );
        for n in 0..3 {
            users.assign_in(&format!("d{n}"), 5..10).unwrap();
        }
        let e = users.assign_in("e", 5..10).unwrap_err().to_string();
        assert!(e.contains("all 5 sandbox uids (from 1005)"), "{e}");
        assert_eq!(users.assign_in("e", 0..5).unwrap().uid, 1001);
        users.release("c");
        assert_eq!(users.assign_in("f", 5..10).unwrap().uid, 1006);
    }

    #[test]
    fn uid_ranges_refuse_root_overflow_and_emptiness() {
        let r = SandboxUids::new(1000, 10).unwrap();
        assert_eq!(
            r.user(0),
            SandboxUser {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(
            r.user(9),
            SandboxUser {
                uid: 1009,
                gid: 1009
            }
        );
        assert!(r.contains(1000) && r.contains(1009));
        assert!(!r.contains(999) && !r.contains(1010) && !r.contains(0));
        assert_eq!(
            SandboxUids::default(),
            SandboxUids::new(0x7000_0000, 65536).unwrap()
        );
        // The last accepted range ends at 4294967294.
        SandboxUids::new(u32::MAX - 1, 1).unwrap();
        SandboxUids::new(1, 1 << 20).unwrap();
        SandboxUids::new(u32::MAX - (1 << 20), 1 << 20).unwrap();
        for (base, count) in [
            (0, 10),
            (1, 0),
            (u32::MAX, 1),
            (u32::MAX - 1, 2),
            (1, (1 << 20) + 1),
            (u32::MAX - (1 << 20) + 1, 1 << 20),
        ] {
            let e = SandboxUids::new(base, count).unwrap_err().to_string();
            assert!(e.contains(&format!("{count} ids from {base}")), "{e}");
            assert!(
                e.contains("accepted: base 1 to 4294967294, count 1 to 1048576"),
                "{e}"
            );
        }
    }

    #[test]
    fn every_live_sandbox_holds_its_own_slot_until_released() {
        let users = SandboxUsers::new(SandboxUids::new(5000, 3).unwrap());
        let a = users.assign("a").unwrap();
        let b = users.assign("b").unwrap();
        let c = users.assign("c").unwrap();
        let mut uids = vec![a.uid, b.uid, c.uid];
        uids.sort();
        assert_eq!(uids, vec![5000, 5001, 5002]);
        assert_eq!(a.uid, a.gid);
        assert_eq!(
            users.assign("a").unwrap(),
            a,
            "the same sandbox, the same slot"
        );
        let e = users.assign("d").unwrap_err().to_string();
        assert!(
            e.contains("all 3 sandbox uids (from 5000) are in use"),
            "{e}"
        );
        assert!(e.contains("--sandbox-uids"), "{e}");
        assert_eq!(users.user_of("b"), Some(b));
        assert_eq!(users.release("b"), Some(b));
        assert_eq!(users.release("b"), None);
        assert_eq!(users.user_of("b"), None);
        assert_eq!(users.in_use(), 2);
        // Only the released slot is free: the next sandbox gets it.
        assert_eq!(users.assign("d").unwrap(), b);
        assert!(users.assign("e").is_err());
    }

    #[test]
    fn slots_are_handed_out_round_the_range_across_words() {
        let users = SandboxUsers::new(SandboxUids::new(1, 130).unwrap());
        for i in 0..130 {
            assert_eq!(users.assign(&format!("s{i}")).unwrap().uid, 1 + i);
        }
        assert!(users.assign("full").is_err());
        users.release("s3");
        users.release("s100");
        // The search goes on after the last slot given, wrapping round.
        assert_eq!(users.assign("x").unwrap().uid, 4);
        assert_eq!(users.assign("y").unwrap().uid, 101);
        assert!(users.assign("z").is_err());
        users.release("s129");
        users.release("s0");
        assert_eq!(
            users.assign("z").unwrap().uid,
            130,
            "after 101 comes 130 before 1"
        );
        assert_eq!(users.assign("w").unwrap().uid, 1);
        assert_eq!(users.in_use(), 130);
    }

    #[test]
    fn relative_paths_are_refused_by_name() {
        let mut c = config();
        c.code = Some("fn/hello".into());
        let err = bundle_spec(&c).unwrap_err().to_string();
        assert!(err.contains("code path fn/hello must be absolute"), "{err}");
    }

    #[test]
    fn bundle_round_trips_through_config_json() {
        let t = tempfile::tempdir().unwrap();
        let spec = bundle_spec(&config()).unwrap();
        write_bundle(t.path(), &spec).unwrap();
        let back = Spec::load(t.path().join("config.json")).unwrap();
        assert_eq!(back, spec);
    }
}
