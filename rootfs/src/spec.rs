//! The OCI runtime spec of a sandbox.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde_json::json;

use crate::{
    seccomp, Error, CODE_DIR, FUNCTIONS_DIR, MAX_FILE_SIZE, RUNTIME_DIR, SHIM_PATH, WORKFLOW_DIR,
};

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPU bandwidth in cores (1.0 = one full core).
    pub cpus: f64,
}

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
/// no capabilities, `no_new_privs` and [the default seccomp filter](crate::seccomp).
pub fn bundle_spec(cfg: &SandboxConfig) -> Result<Spec, Error> {
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
        json!({"destination": WORKFLOW_DIR, "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=1777", TMP_SIZE]}),
        // Mount points for the code of functions called in this sandbox. Owned by
        // nobody: without capabilities the sandbox can neither make entries in it nor
        // chmod it; the spawner (with them) makes the mount points.
        json!({"destination": FUNCTIONS_DIR, "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=0555", "uid=65534", "gid=65534", "size=1m"]}),
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
            "user": { "uid": 0, "gid": 0 },
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
