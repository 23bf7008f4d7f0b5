//! What a function can see and do inside its sandbox, observed from inside (a probe
//! function that reports what it finds) and from the host (the sandbox's cgroup).

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use sprout_tests::{body_json, host_hostname, json, require_root, text, Env, Value, SLEEPER_PY};

/// Reports what the sandbox looks like from inside. Never raises: every
/// observation is a value.
const PROBE_PY: &str = r#"import ctypes, errno, os, socket

def _errno(n):
    return errno.errorcode.get(n, str(n))

def _try_write(path):
    try:
        with open(path, "w") as fh:
            fh.write("sprout")
        with open(path) as fh:
            return "ok:" + fh.read()
    except OSError as e:
        return _errno(e.errno)

def f(event):
    out = {"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid()}
    with open("/proc/1/cmdline", "rb") as fh:
        out["pid1_cmdline"] = fh.read().split(b"\0")[0].decode()
    out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    out["hostname"] = socket.gethostname()
    out["root"] = sorted(os.listdir("/"))
    with open("/proc/self/mountinfo") as fh:
        out["mountinfo"] = fh.read().splitlines()
    out["cgroupfs"] = sorted(os.listdir("/sys/fs/cgroup")) if os.path.isdir("/sys/fs/cgroup") else None
    out["writes"] = {p: _try_write(p) for p in ("/usr/sprout-probe", "/code/sprout-probe", "/sprout-probe", "/etc/sprout-probe", "/tmp/sprout-probe", "/fns/sprout-probe", "/workflow/sprout-probe")}
    out["ifaces"] = [n for _, n in socket.if_nameindex()]
    status = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            status[k] = v.strip()
    out["status"] = {k: status.get(k) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")}
    libc = ctypes.CDLL(None, use_errno=True)
    def call(fn):
        ctypes.set_errno(0)
        r = fn()
        return _errno(ctypes.get_errno()) if r == -1 else "returned %d" % r
    out["syscalls"] = {
        "unshare": call(lambda: libc.unshare(0x10000000)),
        "mount": call(lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
        "ptrace": call(lambda: libc.ptrace(0, 0, None, None)),
        "setns": call(lambda: libc.syscall(308, -1, 0)),
        "keyctl": call(lambda: libc.syscall(250, 0, 0, 0, 0, 0)),
        "bpf": call(lambda: libc.syscall(321, 0, 0, 0)),
        "clone3": call(lambda: libc.syscall(435, 0, 0)),
    }
    out["exists"] = {p: os.path.exists(p) for p in event.get("host_paths", [])}
    out["root_home"] = sorted(os.listdir("/root")) if os.path.isdir("/root") else None
    out["env"] = {k: os.environ.get(k) for k in ("SPROUT_FUNCTION", "SPROUT_SANDBOX")}
    try:
        s = socket.create_connection(("1.1.1.1", 53), timeout=1)
        s.close()
        out["connect"] = "connected"
    except OSError as e:
        out["connect"] = _errno(e.errno) if e.errno else type(e).__name__
    return out
"#;

/// Runs the probe in a fresh sandbox (`sprout invoke`) and returns its report and
/// the agent's pid.
fn probe(env: &Env) -> (Value, u32) {
    let dir = env.function("probe", &[("f.py", PROBE_PY)]);
    let host_paths = json!({
        "host_paths": [
            "/work", "/home", "/root/.cargo", "/etc/hostname", "/etc/shadow",
            "/run/sprout", env.state_dir(), env.work_dir(), dir, "/sys/fs/cgroup/memory",
        ]
    });
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .arg(host_paths.to_string())
        .run();
    run.success();
    let report = run.json();
    env.assert_clean(run.pid);
    (report, run.pid)
}

#[test]
fn own_pid_namespace_with_the_shim_as_init() {
    let env = require_root!();
    let (p, _) = probe(&env);
    let pid = p["pid"].as_u64().unwrap();
    assert!(
        pid < 10,
        "the function's pid should be small, is {pid}: {p}"
    );
    assert_eq!(p["pid1_cmdline"], "/.sprout/shim", "{p}");
    let pids = p["pids"].as_array().unwrap();
    assert!(
        pids.len() <= 5,
        "only the sandbox's processes are visible: {pids:?}"
    );
}

#[test]
fn hostname_is_the_sandbox_id() {
    let env = require_root!();
    let (p, agent) = probe(&env);
    let hostname = p["hostname"].as_str().unwrap();
    assert!(
        hostname.starts_with(&format!("sprout-{agent}-")),
        "hostname {hostname:?} should be the sandbox id sprout-{agent}-N"
    );
    assert_ne!(hostname, host_hostname());
    assert_eq!(p["env"]["SPROUT_SANDBOX"], hostname, "{p}");
    assert_eq!(p["env"]["SPROUT_FUNCTION"], "probe", "{p}");
}

#[test]
fn root_holds_only_the_allowed_entries() {
    let env = require_root!();
    let (p, _) = probe(&env);
    let allowed = [
        ".sprout", "bin", "code", "dev", "etc", "fns", "lib", "lib64", "proc", "root", "sbin",
        "sys", "tmp", "usr", "workflow",
    ];
    let root: Vec<&str> = p["root"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let extra: Vec<&&str> = root.iter().filter(|e| !allowed.contains(e)).collect();
    assert!(
        extra.is_empty(),
        "unexpected entries in /: {extra:?} (all: {root:?})"
    );
    for needed in ["code", "usr", "tmp", "proc", ".sprout"] {
        assert!(root.contains(&needed), "/{needed} is missing: {root:?}");
    }
}

#[test]
fn host_files_are_not_visible() {
    let env = require_root!();
    let (p, _) = probe(&env);
    let visible: Vec<(&String, &Value)> = p["exists"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.as_bool() != Some(false))
        .collect();
    assert!(
        visible.is_empty(),
        "host paths visible in the sandbox: {visible:?}"
    );
    assert_eq!(p["root_home"], json!([]), "/root is empty: {p}");
}

#[test]
fn no_cgroup_file_system() {
    let env = require_root!();
    let (p, _) = probe(&env);
    let mounts: Vec<&str> = p["mountinfo"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let cgroup_mounts: Vec<&&str> = mounts
        .iter()
        .filter(|l| l.contains("/sys/fs/cgroup") || l.contains(" - cgroup"))
        .collect();
    assert!(
        cgroup_mounts.is_empty(),
        "cgroup mounts inside: {cgroup_mounts:?}"
    );
    let listing = &p["cgroupfs"];
    assert!(
        listing.is_null() || listing == &json!([]),
        "/sys/fs/cgroup should be absent or empty: {listing}"
    );
}

#[test]
fn read_only_root_usr_and_code_writable_tmp_and_workflow() {
    let env = require_root!();
    let (p, _) = probe(&env);
    let w = &p["writes"];
    assert_eq!(w["/usr/sprout-probe"], "EROFS", "{w}");
    assert_eq!(w["/code/sprout-probe"], "EROFS", "{w}");
    assert_eq!(w["/sprout-probe"], "EROFS", "{w}");
    assert_eq!(w["/etc/sprout-probe"], "EROFS", "{w}");
    assert_eq!(w["/tmp/sprout-probe"], "ok:sprout", "{w}");
    assert_eq!(w["/workflow/sprout-probe"], "ok:sprout", "{w}");
    // Only the spawner (with capabilities) makes mount points for called functions.
    assert_eq!(w["/fns/sprout-probe"], "EACCES", "{w}");
    assert!(!Path::new("/usr/sprout-probe").exists());
    assert!(
        !env.work_dir().join("fns/probe/sprout-probe").exists(),
        "the function's code directory was written to"
    );
}

#[test]
fn only_loopback_network() {
    let env = require_root!();
    let (p, _) = probe(&env);
    assert_eq!(p["ifaces"], json!(["lo"]), "{p}");
    assert_ne!(p["connect"], "connected", "{p}");
}

#[test]
fn no_capabilities_no_new_privs_seccomp() {
    let env = require_root!();
    let (p, _) = probe(&env);
    let s = &p["status"];
    assert_eq!(s["CapEff"], "0000000000000000", "{s}");
    assert_eq!(s["CapPrm"], "0000000000000000", "{s}");
    assert_eq!(s["CapBnd"], "0000000000000000", "{s}");
    assert_eq!(s["NoNewPrivs"], "1", "{s}");
    assert_eq!(s["Seccomp"], "2", "{s}");
}

#[test]
fn seccomp_denies_administration_syscalls() {
    let env = require_root!();
    let (p, _) = probe(&env);
    let sc = &p["syscalls"];
    for name in ["unshare", "mount", "ptrace", "setns", "keyctl", "bpf"] {
        assert_eq!(sc[name], "EPERM", "{name}: {sc}");
    }
    assert_eq!(sc["clone3"], "ENOSYS", "{sc}");
}

fn read_cgroup(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn cgroup_limits_seen_from_the_host() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function("sleeper", &[("f.py", SLEEPER_PY)]);
    d.register(
        "sleeper",
        &dir,
        json!({"memory_mb": 64, "pids": 24, "cpus": 0.5}),
    );
    // A first call names the sandbox, which stays warm for the next one.
    let r = d.invoke("sleeper", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    let sandbox = body_json(&r)["sandbox"].as_str().unwrap().to_owned();
    assert!(
        sandbox.starts_with(&format!("sprout-{}-", d.pid())),
        "{sandbox}"
    );
    assert_eq!(d.sandboxes(), std::slice::from_ref(&sandbox));

    thread::scope(|s| {
        let call = s.spawn(|| d.invoke("sleeper", r#"{"sleep": 1.5}"#));
        thread::sleep(Duration::from_millis(300));

        let cg = |controller: &str, file: &str| {
            read_cgroup(
                &Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join("sprout")
                    .join(d.pid().to_string())
                    .join(&sandbox)
                    .join(file),
            )
        };
        assert_eq!(
            cg("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(cg("pids", "pids.max"), "24");
        let quota: f64 = cg("cpu", "cpu.cfs_quota_us").parse().unwrap();
        let period: f64 = cg("cpu", "cpu.cfs_period_us").parse().unwrap();
        assert!(
            (quota / period - 0.5).abs() < 0.01,
            "quota {quota} period {period}"
        );

        // The running function's processes are in that cgroup.
        let procs: Vec<u32> = cg("memory", "cgroup.procs")
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert!(procs.len() >= 3, "shim, zygote and instance: {procs:?}");
        let pids_current: u64 = cg("pids", "pids.current").parse().unwrap();
        assert!(pids_current >= 3, "pids.current {pids_current}");
        let shim: Vec<&u32> = procs
            .iter()
            .filter(|&&p| sprout_tests::cmdline(p) == "/.sprout/shim")
            .collect();
        assert_eq!(shim.len(), 1, "one shim in {procs:?}");

        let r = call.join().unwrap();
        assert_eq!(r.status, 200, "{}", text(&r));
        assert_eq!(body_json(&r)["sandbox"], sandbox.as_str());
    });
}
