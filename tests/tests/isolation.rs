//! What a function can see and do inside its sandbox, observed from inside (a probe
//! function that reports what it finds) and from the host (the sandbox's cgroup).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::thread;
use std::time::Duration;

use sprout_tests::{
    body_json, cgroup_v2, host_hostname, json, require_root, sandbox_cgroup_dir, text, under_ci,
    wait_for, Env, Value, SLEEPER_PY,
};

/// Runs the probe in a fresh sandbox (`sprout invoke`) and returns its report and
/// the agent's pid.
fn probe(env: &Env) -> (Value, u32) {
    let dir = env.function("probe", &[("f.py", sprout_tests::ISOLATION_PROBE_PY)]);
    let host_paths = json!({
        "host_paths": [
            "/work", "/home", "/root/.cargo", "/etc/hostname", "/etc/shadow",
            "/run/sprout", env.state_dir(), env.work_dir(), dir,
            // The host's cgroup file system: the first on v1, the second on v2.
            "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cgroup.procs",
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
        ".sprout", "bin", "code", "deps", "dev", "etc", "fns", "lib", "lib64", "proc", "root",
        "sbin", "sys", "tmp", "usr", "workflow",
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

/// No core dumps, and no file past 1 GiB (the largest payload or scratch): a file
/// that would grow past it fails with EFBIG.
#[test]
fn no_core_dumps_and_no_file_past_one_gib() {
    let env = require_root!();
    let (p, _) = probe(&env);
    let r = &p["rlimits"];
    // 1, not 0: the one value a pipe `core_pattern` honours (no dump at all).
    assert_eq!(r["RLIMIT_CORE"], json!([1, 1]), "{p}");
    assert_eq!(r["RLIMIT_FSIZE"], json!([1u64 << 30, 1u64 << 30]), "{p}");
    assert_eq!(r["RLIMIT_NOFILE"], json!([1024, 1024]), "{p}");
    assert_eq!(p["past_fsize"], "EFBIG", "{p}");
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

/// This process's namespaces: `/proc/self/ns/<name>` → `<type>:[<inode>]`.
fn host_namespaces() -> BTreeMap<String, String> {
    fs::read_dir("/proc/self/ns")
        .expect("list /proc/self/ns")
        .map(|e| {
            let e = e.expect("read /proc/self/ns");
            let link = fs::read_link(e.path())
                .unwrap_or_else(|err| panic!("readlink {}: {err}", e.path().display()));
            (
                e.file_name().to_string_lossy().into_owned(),
                link.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// The sandbox has its own pid, ipc, uts, mount, network and cgroup namespaces: each
/// `/proc/self/ns/*` link inside names another namespace than the test's (the agent's
/// parent's) own.
#[test]
fn own_pid_ipc_uts_mount_network_and_cgroup_namespaces() {
    let env = require_root!();
    let (p, _) = probe(&env);
    let host = host_namespaces();
    let inside = p["ns"].as_object().expect("ns report");
    for name in ["pid", "ipc", "uts", "mnt", "net", "cgroup"] {
        let theirs = inside
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no /proc/self/ns/{name} inside: {inside:?}"));
        let ours = host
            .get(name)
            .unwrap_or_else(|| panic!("no /proc/self/ns/{name} on the host: {host:?}"));
        assert!(
            theirs.starts_with(&format!("{name}:[")),
            "/proc/self/ns/{name} inside is {theirs:?}, not a namespace link"
        );
        assert_ne!(
            theirs, ours,
            "the sandbox shares the host's {name} namespace (inside {inside:?}, host {host:?})"
        );
    }
    // What is true today, and not a promise: sandboxes have no user namespace of their
    // own (they run as root without capabilities) and no time namespace. The hardening
    // issue adds a user namespace; it turns the first assertion around.
    for name in ["user", "time"] {
        if let Some(ours) = host.get(name) {
            assert_eq!(
                inside.get(name).and_then(Value::as_str),
                Some(ours.as_str()),
                "{name} namespace"
            );
        }
    }
}

/// With its own cgroup namespace a sandbox sees its cgroup as the root: no
/// `/sprout/<agent>/<sandbox>` path (nor anything else of the host's tree) leaks into
/// `/proc/self/cgroup`.
#[test]
fn cgroup_namespace_shows_the_sandbox_its_cgroup_as_the_root() {
    let env = require_root!();
    let (p, _) = probe(&env);
    let lines: Vec<&str> = p["cgroup"]
        .as_array()
        .expect("cgroup report")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(!lines.is_empty(), "empty /proc/self/cgroup inside");
    for line in &lines {
        assert!(
            !line.contains("sprout"),
            "the host's cgroup path leaks into the sandbox: {line:?} (all: {lines:?})"
        );
    }
    // The hierarchies sprout limits: the sandbox's cgroup is their root. On v1 one
    // line per controller (`4:memory:/`), on v2 the one line `0::/`.
    let controllers: &[&str] = if cgroup_v2() {
        &[""]
    } else {
        &["memory", "pids", "cpu", "freezer"]
    };
    for controller in controllers {
        let line = lines
            .iter()
            .find(|l| {
                let mut parts = l.splitn(3, ':');
                let _ = parts.next();
                parts
                    .next()
                    .is_some_and(|c| c.split(',').any(|c| c == *controller))
            })
            .unwrap_or_else(|| panic!("no {controller:?} line in {lines:?}"));
        assert!(
            line.ends_with(":/"),
            "the sandbox's {controller:?} cgroup should be its namespace's root: {line:?} (all: {lines:?})"
        );
    }
}

fn read_cgroup(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// The memory, memory+swap, pids and CPU limits of a function's sandbox as the host
/// reads them, on cgroup v1 or v2, while the function runs in it.
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
    let cg = |controller: &str, file: &str| {
        read_cgroup(&sandbox_cgroup_dir(d.pid(), &sandbox, controller).join(file))
    };
    let memory = (64u64 << 20).to_string();

    thread::scope(|s| {
        let call = s.spawn(|| d.invoke("sleeper", r#"{"sleep": 1.5}"#));
        // The call has its instance once the sandbox is thawed and busy.
        let running = wait_for(Duration::from_secs(10), || {
            let thawed = if cgroup_v2() {
                cg("", "cgroup.events").lines().any(|l| l == "frozen 0")
            } else {
                cg("freezer", "freezer.state") == "THAWED"
            };
            let status = d.status();
            (thawed && status["invocations"] == 2 && status["queued"] == 0)
                .then_some(())
                .ok_or(status)
        });
        if let Err(status) = running {
            panic!("the second call did not start: {status}");
        }

        if cgroup_v2() {
            assert_eq!(cg("memory", "memory.max"), memory);
            // swap = limit in the spec is memory+swap on v1; v2 counts swap alone.
            let swap = sandbox_cgroup_dir(d.pid(), &sandbox, "memory").join("memory.swap.max");
            if swap.exists() {
                assert_eq!(read_cgroup(&swap), "0", "no swap beyond the memory limit");
            } else {
                swap_accounting_off(&swap);
            }
            assert_eq!(cg("pids", "pids.max"), "24");
            let max = cg("cpu", "cpu.max");
            let (quota, period) = max.split_once(' ').expect("cpu.max is \"quota period\"");
            let (quota, period): (f64, f64) = (quota.parse().unwrap(), period.parse().unwrap());
            assert!((quota / period - 0.5).abs() < 0.01, "cpu.max {max}");
        } else {
            assert_eq!(cg("memory", "memory.limit_in_bytes"), memory);
            // swap = limit: memory+swap may not exceed the memory limit.
            let memsw =
                sandbox_cgroup_dir(d.pid(), &sandbox, "memory").join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                assert_eq!(
                    read_cgroup(&memsw),
                    memory,
                    "no swap beyond the memory limit"
                );
            } else {
                swap_accounting_off(&memsw);
            }
            assert_eq!(cg("pids", "pids.max"), "24");
            let quota: f64 = cg("cpu", "cpu.cfs_quota_us").parse().unwrap();
            let period: f64 = cg("cpu", "cpu.cfs_period_us").parse().unwrap();
            assert!(
                (quota / period - 0.5).abs() < 0.01,
                "quota {quota} period {period}"
            );
        }

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

/// The kernel does not account swap (v1 without `swapaccount=1`, v2 without
/// `CONFIG_MEMCG_SWAP`), so nothing can limit it: a failure under CI, a loud notice
/// otherwise.
fn swap_accounting_off(file: &Path) {
    let msg = format!(
        "{} is missing: swap accounting is off on this kernel, so the memory+swap limit \
         cannot be checked (or enforced)",
        file.display()
    );
    if under_ci() {
        panic!("{msg} (CI is set: this is a failure)");
    }
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n{bar}\n*** NOT CHECKED: {msg}\n{bar}",
        bar = "*".repeat(72)
    );
}
