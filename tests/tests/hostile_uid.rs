//! A hostile tenant and the host's users (issue 9, findings 10 and its review): every
//! process of a sandbox (shim, zygote, instances and what they start) is an
//! unprivileged host user of its own, from the agent's range
//! (`--sandbox-uid-base`, `--sandbox-uids`; uid = gid = base + slot), with no
//! supplementary groups; two live sandboxes never share a uid, a freed one is reused
//! and one more than the range holds is refused naming the flag. So per-user kernel
//! limits one sandbox exhausts (inotify instances, pipe buffer pages) leave another
//! untouched. The agent's state directory is closed to host accounts (no listing,
//! no uploaded code, no call socket), and a process in a sandbox's cgroup is heard
//! on the call socket only as that sandbox's uid. A root-only file a mount exposes
//! cannot be read; `/tmp` and `/workflow` are writable and `/fns` is not; calls in
//! and out of the sandbox (1 MiB payloads, through memfds), siblings sharing
//! `/workflow`, the shim's reaping and killing, uploads and the examples all still
//! work; a handler "other" cannot read is refused at registration with a 400 naming
//! the file and the permission it needs.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sprout_tests::{
    body_json, example, json, require_root, sandbox_cgroup_dir, tar_files, text, wait_for,
    ClientResponse, Daemon, Env, KillOnDrop, Value, HELLO_PY,
};

/// The default range: 65536 ids from 0x7000_0000.
const BASE: u32 = 0x7000_0000;
const COUNT: u32 = 65536;

fn in_range(uid: &Value) -> bool {
    uid.as_u64()
        .is_some_and(|u| u >= BASE as u64 && u < BASE as u64 + COUNT as u64)
}

/// What a process of a sandbox is to the host: `/proc/<pid>/status`'s `Uid:` and
/// `Gid:` (real, effective, saved, filesystem) and `Groups:`.
#[derive(Debug, PartialEq)]
struct Ids {
    uid: Vec<u32>,
    gid: Vec<u32>,
    groups: Vec<u32>,
}

fn host_ids(pid: u32) -> Option<Ids> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    Some(Ids {
        uid: field("Uid:"),
        gid: field("Gid:"),
        groups: field("Groups:"),
    })
}

/// The pids in sandbox `sandbox`'s cgroup (v1 memory hierarchy, or the v2 one).
fn sandbox_pids(d: &Daemon, sandbox: &str) -> Vec<u32> {
    let procs = sandbox_cgroup_dir(d.pid(), sandbox, "memory").join("cgroup.procs");
    fs::read_to_string(&procs)
        .unwrap_or_else(|e| panic!("read {}: {e}", procs.display()))
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

/// The sandbox whose instance is running `HOLD_PY` (its /tmp holds the "ready" file),
/// and its shim's host pid.
fn held_sandbox(d: &Daemon) -> (String, u32) {
    wait_for(Duration::from_secs(20), || {
        for sandbox in d.sandboxes() {
            for pid in sandbox_pids(d, &sandbox) {
                let ready = PathBuf::from(format!("/proc/{pid}/root/tmp/sprout-ready"));
                if sprout_tests::cmdline(pid) == "/.sprout/shim" && ready.exists() {
                    return Ok((sandbox, pid));
                }
            }
        }
        Err("no sandbox with a running instance")
    })
    .unwrap_or_else(|e| panic!("{e}; daemon log:\n{}", d.log()))
}

/// Registers `files` as function `name`; asserts 200.
fn register(d: &Daemon, env: &Env, name: &str, files: &[(&str, &str)], extra: Value) -> PathBuf {
    let dir = env.function(name, files);
    d.register(name, &dir, extra);
    dir
}

#[track_caller]
fn ok_json(r: &ClientResponse) -> Value {
    assert_eq!(r.status, 200, "{}", text(r));
    body_json(r)
}

/// Reports how the function sees itself, starts a child (`sleep`) so the sandbox
/// holds a process the function made, then waits until the host creates
/// `/tmp/sprout-release` inside the sandbox (or 20 s pass).
const HOLD_PY: &str = r#"import os, subprocess, time

def status_ids():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups", "CapEff"):
            out[key] = value.split()
    return out

def f(event):
    child = subprocess.Popen(["/usr/bin/sleep", "60"])
    seen = {"sandbox": os.environ["SPROUT_SANDBOX"], "resuid": list(os.getresuid()),
            "resgid": list(os.getresgid()), "groups": os.getgroups(),
            "status": status_ids(), "child": child.pid}
    open("/tmp/sprout-ready", "w").write(seen["sandbox"])
    deadline = time.monotonic() + 20
    while not os.path.exists("/tmp/sprout-release") and time.monotonic() < deadline:
        time.sleep(0.01)
    seen["released"] = os.path.exists("/tmp/sprout-release")
    child.kill()
    child.wait()
    return seen
"#;

/// From the host, every process in a running sandbox — the shim, the zygote, the
/// instance and a child the function started — is one user of the agent's range in
/// all four uid and gid slots (gid = uid) with no supplementary groups; the function
/// sees the same and has no capabilities.
#[test]
fn every_process_of_a_sandbox_is_its_own_unprivileged_user_on_the_host() {
    let env = require_root!();
    let d = env.daemon();
    register(&d, &env, "hold", &[("f.py", HOLD_PY)], json!({}));

    let seen = std::thread::scope(|s| {
        let call = s.spawn(|| d.invoke("hold", "{}"));
        // The sandbox is the one whose /tmp holds the instance's "ready" file.
        let (sandbox, shim) = held_sandbox(&d);
        let pids = sandbox_pids(&d, &sandbox);
        // shim, zygote, instance, its child.
        assert!(
            pids.len() >= 4,
            "shim, zygote, instance and sleep: {pids:?}"
        );
        let mut checked = Vec::new();
        let uid = host_ids(shim).unwrap().uid[0];
        assert!(in_range(&json!(uid)), "shim's uid {uid}");
        for pid in &pids {
            let Some(ids) = host_ids(*pid) else { continue };
            assert_eq!(
                ids,
                Ids {
                    uid: vec![uid; 4],
                    gid: vec![uid; 4],
                    groups: vec![],
                },
                "pid {pid} ({}) as the host sees it",
                sprout_tests::cmdline(*pid)
            );
            checked.push(sprout_tests::cmdline(*pid));
        }
        assert!(checked.len() >= 4, "{checked:?}");
        assert!(checked.iter().any(|c| c.contains("sleep")), "{checked:?}");
        let release = format!("/proc/{shim}/root/tmp/sprout-release");
        sprout_tests::write_as(uid, uid, &release, "").unwrap();
        (uid, ok_json(&call.join().unwrap()))
    });
    let (uid, seen) = seen;
    assert_eq!(seen["released"], true, "{seen}");
    assert_eq!(seen["resuid"], json!([uid, uid, uid]), "{seen}");
    assert_eq!(seen["resgid"], json!([uid, uid, uid]), "{seen}");
    assert_eq!(seen["groups"], json!([]), "{seen}");
    let n = uid.to_string();
    assert_eq!(seen["status"]["Uid"], json!([n, n, n, n]), "{seen}");
    assert_eq!(seen["status"]["Gid"], json!([n, n, n, n]), "{seen}");
    assert_eq!(
        seen["status"]["CapEff"],
        json!(["0000000000000000"]),
        "{seen}"
    );
}

/// Tries what a function running as a host user could do with files root owns.
const PROBE_PY: &str = r#"import errno, os

def attempt(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]

def write(path):
    with open(path, "w") as fh:
        fh.write("sprout")

def f(event):
    out = {
        "read secret": attempt(lambda: open("/code/secret").read()),
        "list private": attempt(lambda: os.listdir("/code/private")),
        "read private file": attempt(lambda: open("/code/private/key").read()),
        "chmod secret": attempt(lambda: os.chmod("/code/secret", 0o644)),
        "write /tmp": attempt(lambda: write("/tmp/sprout-x")),
        "write /workflow": attempt(lambda: write("/workflow/sprout-x")),
        "mkdir /fns": attempt(lambda: os.mkdir("/fns/sprout-x")),
        "chmod /fns": attempt(lambda: os.chmod("/fns", 0o777)),
        "write /etc": attempt(lambda: write("/etc/sprout-x")),
        "read /etc/passwd": attempt(lambda: open("/etc/passwd").read()),
    }
    out["tmp owner"] = os.stat("/tmp/sprout-x").st_uid == os.getuid()
    out["workflow owner"] = os.stat("/workflow/sprout-x").st_uid == os.getuid()
    out["workflow file mode"] = oct(os.stat("/workflow/sprout-x").st_mode & 0o7777)
    out["fns mode"] = oct(os.stat("/fns").st_mode & 0o7777)
    return out
"#;

/// A root-owned `0600` file and `0700` directory in the function's own directory
/// (mounted at `/code`) cannot be read or listed; `/tmp` and `/workflow` take the
/// sandbox user's files; `/fns` stays root's: no entry, no chmod.
#[test]
fn a_root_only_file_a_mount_exposes_cannot_be_read() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function(
        "probe",
        &[
            ("f.py", PROBE_PY),
            ("secret", "API_KEY = sprout-secret\n"),
            ("private/key", "sprout-private\n"),
        ],
    );
    fs::set_permissions(dir.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(dir.join("private/key"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(dir.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    d.register("probe", &dir, json!({}));
    let mut out = ok_json(&d.invoke("probe", "{}"));
    // The read-only mount answers first (EROFS); without it, not the owner (EPERM).
    let chmod = out.as_object_mut().unwrap().remove("chmod secret");
    assert!(
        chmod == Some(json!("EROFS")) || chmod == Some(json!("EPERM")),
        "chmod of root's file: {chmod:?}"
    );
    assert_eq!(
        out,
        json!({
            "read secret": "EACCES",
            "list private": "EACCES",
            "read private file": "EACCES",
            "write /tmp": "ok",
            "write /workflow": "ok",
            "mkdir /fns": "EACCES",
            "chmod /fns": "EPERM",
            "write /etc": "EROFS",
            "read /etc/passwd": "ok",
            "tmp owner": true,
            "workflow owner": true,
            "workflow file mode": "0o666",
            "fns mode": "0o755",
        }),
        "{out}"
    );
}

/// Calls into the same sandbox (through the shim) and to a sibling (through the
/// agent's call socket), each carrying 1 MiB of bytes (a memfd both ways), work
/// with every side an unprivileged user: the same one in the same sandbox, another
/// in the sibling. The sibling reads and overwrites a file the caller wrote in
/// `/workflow` and makes its own there, as when they shared one uid.
#[test]
fn calls_in_and_out_of_the_sandbox_carry_a_mib_as_the_sandbox_user() {
    let env = require_root!();
    let d = env.daemon();
    let echo = "import os\ndef f(data):\n    return bytes(data) + os.getuid().to_bytes(4, 'big')\n";
    let sibling = r#"import errno, os
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
def f(name):
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    path = os.path.join(d, name)
    return {"read": open(path).read(),
            "overwrite": attempt(lambda: open(path, "w").write("overwritten")),
            "create": attempt(lambda: open(os.path.join(d, "sprout-sibling"), "w").write("y"))}
"#;
    let caller = r#"import os, sprout
def f(event):
    blob = os.urandom(1 << 20)
    near = bytes(sprout.call("echo", blob))           # this sandbox, via the shim
    far = bytes(sprout.map("echo", [blob])[0])       # a sibling, via the call socket
    d = os.environ["SPROUT_WORKFLOW_DIR"]
    open(os.path.join(d, "sprout-mine"), "w").write("mine")
    shared = sprout.map("sibling", ["sprout-mine"])[0]
    return {"me": os.getuid(),
            "near": [near[:-4] == blob, int.from_bytes(near[-4:], "big")],
            "far": [far[:-4] == blob, int.from_bytes(far[-4:], "big")],
            "shared": shared, "theirs": open(os.path.join(d, "sprout-sibling")).read(),
            "mine now": open(os.path.join(d, "sprout-mine")).read()}
"#;
    register(
        &d,
        &env,
        "echo",
        &[("f.py", echo)],
        json!({"memory_mb": 256}),
    );
    register(
        &d,
        &env,
        "caller",
        &[("f.py", caller)],
        json!({"memory_mb": 256}),
    );
    register(&d, &env, "sibling", &[("f.py", sibling)], json!({}));
    let out = ok_json(&d.invoke("caller", "{}"));
    let me = &out["me"];
    assert!(in_range(me), "{out}");
    assert_eq!(
        out["near"],
        json!([true, me]),
        "same sandbox, same uid: {out}"
    );
    assert_eq!(out["far"][0], true, "{out}");
    assert!(in_range(&out["far"][1]), "{out}");
    assert_ne!(&out["far"][1], me, "a sibling is another uid: {out}");
    assert_eq!(
        out["shared"],
        json!({"read": "mine", "overwrite": "ok", "create": "ok"}),
        "{out}"
    );
    assert_eq!(out["theirs"], "y", "{out}");
    assert_eq!(out["mine now"], "overwritten", "{out}");
}

/// The shim (PID 1, the same unprivileged user) still reaps what instances leave
/// behind and kills an instance past its timeout; the next invoke runs.
#[test]
fn the_shim_still_reaps_orphans_and_kills_a_timed_out_instance() {
    let env = require_root!();
    let d = env.daemon();
    let orphans = r#"import os, time
def f(event):
    if event.get("sleep"):
        time.sleep(event["sleep"])
    for _ in range(3):
        if os.fork() == 0:           # the child leaves a grandchild to PID 1 and exits
            if os.fork() == 0:
                os._exit(0)
            os._exit(0)
    return {"sandbox": os.environ["SPROUT_SANDBOX"], "uid": os.getuid()}
"#;
    register(
        &d,
        &env,
        "orphans",
        &[("f.py", orphans)],
        json!({"timeout_ms": 1500}),
    );
    let out = ok_json(&d.invoke("orphans", "{}"));
    assert!(in_range(&out["uid"]), "{out}");
    let sandbox = out["sandbox"].as_str().unwrap().to_owned();
    // No zombie stays in the sandbox: the shim reaped them.
    let zombies = || -> Vec<u32> {
        sandbox_pids(&d, &sandbox)
            .into_iter()
            .filter(|p| sprout_tests::stat(*p).is_some_and(|(state, _)| state == 'Z'))
            .collect()
    };
    wait_for(Duration::from_secs(10), || {
        let z = zombies();
        if z.is_empty() {
            Ok(())
        } else {
            Err(z)
        }
    })
    .unwrap_or_else(|z| panic!("zombies left in {sandbox}: {z:?}"));

    let r = d.invoke("orphans", r#"{"sleep": 30}"#);
    assert_eq!(r.status, 504, "{}", text(&r));
    assert_eq!(body_json(&r)["error"]["kind"], "timeout", "{}", text(&r));
    let out = ok_json(&d.invoke("orphans", "{}"));
    assert!(in_range(&out["uid"]), "{out}");
}

/// Asserts a 400 `invalid_function`/`bad_request` whose message holds every one of
/// `texts`, and that nothing was registered or started.
#[track_caller]
fn assert_refused(d: &Daemon, r: &ClientResponse, texts: &[&str]) {
    assert_eq!(r.status, 400, "expected a 400: {}", text(r));
    let message = body_json(r)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for t in texts {
        assert!(
            message.contains(t),
            "message should contain {t:?}: {message}"
        );
    }
    let status = d.status();
    assert_eq!(status["functions"], 0, "{status}");
    assert_eq!(status["sandboxes"], 0, "{status}");
}

fn put(d: &Daemon, name: &str, dir: &Path, handler: &str) -> ClientResponse {
    let body = json!({"path": dir, "handler": handler}).to_string();
    d.request(
        "PUT",
        &format!("/functions/{name}"),
        Some("application/json"),
        body.as_bytes(),
    )
}

/// A handler file, a package directory or the function directory "other" cannot
/// read is refused when it is registered, naming the file and the permission it
/// needs, over HTTP and in the embedded CLI (exit 2) — also when only its group may
/// read it, or when its owner is a uid of the sandbox range (owner bits never count:
/// every sandbox is another uid); made readable, it runs.
#[test]
fn a_handler_the_sandbox_user_cannot_read_is_refused_at_registration() {
    let env = require_root!();
    let d = env.daemon();
    let set =
        |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    let dir = env.function(
        "private",
        &[
            ("f.py", HELLO_PY),
            ("pkg/__init__.py", ""),
            ("pkg/mod.py", HELLO_PY),
        ],
    );
    let file = dir.join("f.py").canonicalize().unwrap();

    set(&file, 0o600);
    let r = put(&d, "private", &dir, "f:f");
    assert_refused(
        &d,
        &r,
        &[
            &format!("{} is not readable by sandboxes", file.display()),
            "mode 0600",
            "needs read permission for others",
            "chmod o+r",
        ],
    );
    let run = env.sprout().arg("invoke").arg(&dir).run();
    run.expect_code(2);
    assert!(
        run.stderr.contains("needs read permission for others"),
        "{run}"
    );
    // Group-readable only, or the first sandbox uid's own 0600 file.
    set(&file, 0o640);
    let r = put(&d, "private", &dir, "f:f");
    assert_refused(&d, &r, &["mode 0640", "needs read permission for others"]);
    std::os::unix::fs::chown(&file, Some(BASE), Some(BASE)).unwrap();
    set(&file, 0o600);
    let r = put(&d, "private", &dir, "f:f");
    assert_refused(&d, &r, &[&format!("owned by {BASE}:{BASE}"), "mode 0600"]);
    std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
    set(&file, 0o644);

    let pkg = dir.join("pkg").canonicalize().unwrap();
    set(&pkg, 0o770);
    let r = put(&d, "private", &dir, "pkg.mod:f");
    assert_refused(
        &d,
        &r,
        &[
            &format!("{} is not readable", pkg.display()),
            "needs read and execute permission for others",
        ],
    );
    set(&pkg, 0o755);

    let canonical = dir.canonicalize().unwrap();
    set(&canonical, 0o711);
    let r = put(&d, "private", &dir, "f:f");
    assert_refused(
        &d,
        &r,
        &[&format!("{} is not readable", canonical.display())],
    );
    set(&canonical, 0o755);

    let r = put(&d, "private", &dir, "pkg.mod:f");
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = d.invoke("private", r#"{"name": "nobody"}"#);
    assert_eq!(ok_json(&r), json!("Hello, nobody!"));
}

/// An uploaded archive whose entries say `0600` and `0700` is unpacked readable by
/// the sandbox user, and runs as it.
#[test]
fn an_upload_with_owner_only_modes_runs_as_the_sandbox_user() {
    let env = require_root!();
    let d = env.daemon();
    let mut b = tar::Builder::new(Vec::new());
    for (name, mode, content) in [
        ("pkg/", 0o700, ""),
        ("pkg/__init__.py", 0o600, ""),
        (
            "pkg/util.py",
            0o600,
            "import os\ndef who():\n    return os.getuid()\n",
        ),
        (
            "f.py",
            0o600,
            "from pkg import util\ndef f(event):\n    return util.who()\n",
        ),
    ] {
        let mut h = tar::Header::new_gnu();
        if name.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
        }
        h.set_size(content.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append_data(&mut h, name, content.as_bytes()).unwrap();
    }
    let archive = b.into_inner().unwrap();
    let r = d.request(
        "PUT",
        "/functions/uploaded",
        Some("application/x-tar"),
        &archive,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(in_range(&ok_json(&d.invoke("uploaded", "{}"))));
    // And the helper's archive (0644 entries) too.
    let archive = tar_files(&[("f.py", HELLO_PY)]);
    let r = d.request(
        "PUT",
        "/functions/plain",
        Some("application/x-tar"),
        &archive,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(ok_json(&d.invoke("plain", "{}")), json!("Hello, world!"));
}

/// The examples run as the sandbox user: on a daemon (with stem cells), a call
/// between them, and the wordcount workflow (siblings sharing `/workflow`).
#[test]
fn the_examples_still_run() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "1"]);
    d.register("hello", &example("hello"), json!({}));
    d.register("inc", &example("inc"), json!({}));
    d.register("noop", &example("noop"), json!({}));
    d.register(
        "owhello",
        &example("owhello"),
        json!({"handler": "__main__:main"}),
    );
    d.register("pinger", &example("pinger"), json!({}));
    d.register("ponger", &example("ponger"), json!({}));
    assert_eq!(
        ok_json(&d.invoke("hello", r#"{"name": "uid"}"#)),
        json!("Hello, uid!")
    );
    assert_eq!(ok_json(&d.invoke("inc", r#"{"n": 41}"#))["n"], 42);
    assert_eq!(d.invoke("noop", "{}").status, 200);
    assert_eq!(
        ok_json(&d.invoke("owhello", r#"{"name": "Alice"}"#)),
        json!({"greeting": "Hello, Alice!"})
    );
    assert_eq!(
        ok_json(&d.invoke("pinger", r#""ponger""#)),
        json!("ping to ponger...pong from ponger: ponged")
    );
    let run = d
        .cli(&env)
        .args(["workflow", "run"])
        .arg(example("wordcount").join("wordcount.json"))
        .arg(r#"{"text": "a b c\nd e\nf\ng h i j", "chunks": 2}"#)
        .run();
    run.success();
    assert_eq!(run.json(), json!({"words": 10, "chunks": 2}), "{run}");
}

/// `--sandbox-uid-base`/`--sandbox-uids` choose the range (gid = uid, no groups); a
/// range that includes root, is empty or goes past 4294967294 is refused before
/// anything starts (exit 2), naming the flags and the accepted range.
#[test]
fn the_uid_range_is_configurable_and_never_includes_root() {
    let env = require_root!();
    let dir = env.function(
        "ids",
        &[(
            "f.py",
            "import os\ndef f(event):\n    return [os.getuid(), os.getgid(), os.getgroups()]\n",
        )],
    );
    let run = env
        .sprout()
        .args([
            "--sandbox-uid-base",
            "4321",
            "--sandbox-uids",
            "1",
            "invoke",
        ])
        .arg(&dir)
        .run();
    run.success();
    assert_eq!(run.json(), json!([4321, 4321, []]), "{run}");

    for (base, count) in [
        ("0", "10"),
        ("5000", "0"),
        ("4294967295", "1"),
        ("4294967000", "65536"),
        ("1000000", "1048577"),
    ] {
        let run = env
            .sprout()
            .args([
                "--sandbox-uid-base",
                base,
                "--sandbox-uids",
                count,
                "invoke",
            ])
            .arg(&dir)
            .run();
        run.expect_code(2);
        let flags = format!("--sandbox-uid-base {base} --sandbox-uids {count}");
        assert!(run.stderr.contains(&flags), "{run}");
        assert!(
            run.stderr
                .contains("accepted: base 1 to 4294967294, count 1 to 1048576"),
            "{run}"
        );
    }
    let socket = env.work_dir().join("never.sock");
    let run = env
        .sprout()
        .args(["--sandbox-uid-base", "0", "serve", "--socket"])
        .arg(&socket)
        .run();
    run.expect_code(2);
    assert!(run.stderr.contains("--sandbox-uid-base 0"), "{run}");
    assert!(!socket.exists(), "a daemon started");
}

/// `[uid, gid, sandbox]` of the instance that ran.
const WHO_PY: &str = "import os\ndef f(event):\n    return [os.getuid(), os.getgid(), os.environ['SPROUT_SANDBOX']]\n";

/// With a range of two, two live sandboxes run as the two uids; a third sandbox is
/// refused naming `--sandbox-uids`, and nothing is left of it; once a sandbox is
/// destroyed its uid goes to the next one.
#[test]
fn live_sandboxes_never_share_a_uid_and_a_freed_one_is_reused() {
    let env = require_root!();
    let base: u64 = 3_000_000_000;
    // The allocator of sandbox uids, with sandboxes made by libcontainer (a fork
    // server takes the range's first uid: `forked::the_fork_server_takes_the_first_uid`).
    let d = env.daemon_with(&[
        "--stem-cells",
        "0",
        "--new-sandboxes",
        "create",
        "--sandbox-uid-base",
        "3000000000",
        "--sandbox-uids",
        "2",
    ]);
    for name in ["a", "b", "c"] {
        register(&d, &env, name, &[("f.py", WHO_PY)], json!({}));
    }
    let a = ok_json(&d.invoke("a", "{}"));
    let b = ok_json(&d.invoke("b", "{}"));
    let uid = |v: &Value| v[0].as_u64().unwrap();
    assert_eq!(a[0], a[1], "gid = uid: {a}");
    assert_eq!(b[0], b[1], "gid = uid: {b}");
    let mut both = vec![uid(&a), uid(&b)];
    both.sort();
    assert_eq!(both, vec![base, base + 1], "{a} {b}");
    assert_eq!(d.sandboxes().len(), 2, "a's and b's warm instances");

    let r = d.invoke("c", "{}");
    assert_ne!(r.status, 200, "{}", text(&r));
    let message = body_json(&r)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("all 2 sandbox uids (from 3000000000) are in use")
            && message.contains("--sandbox-uids"),
        "{}",
        text(&r)
    );
    assert_eq!(
        d.sandboxes().len(),
        2,
        "nothing left of the refused sandbox"
    );
    // The warm ones still answer, as themselves.
    assert_eq!(ok_json(&d.invoke("b", "{}")), b);

    let r = d.request("DELETE", "/functions/a", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    let sandbox_a = a[2].as_str().unwrap().to_owned();
    wait_for(Duration::from_secs(20), || {
        let live = d.sandboxes();
        if live.contains(&sandbox_a) {
            Err(live)
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|live| panic!("a's sandbox not destroyed: {live:?}"));
    let c = ok_json(&d.invoke("c", "{}"));
    assert_eq!(uid(&c), uid(&a), "c gets a's freed uid: {c}");
    assert_ne!(c[2], a[2], "in a new sandbox: {c}");
    assert_eq!(ok_json(&d.invoke("b", "{}")), b);
}

/// Holds per-user kernel resources in module globals (the instance stays warm):
/// inotify instances until the kernel refuses, and up to `big` pipes of 1 MiB (until
/// the kernel refuses to grow one past `pipe-user-pages-soft`) and default ones
/// until a new pipe is small, then
/// reports how many it got and the size of a fresh pipe. `{"release": true}`
/// closes them all. `{"measure": true}` only measures.
const HOG_PY: &str = r#"import ctypes, errno, fcntl, os
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
libc = ctypes.CDLL(None, use_errno=True)
held = []

def inotify():
    fd = libc.inotify_init1(os.O_CLOEXEC)
    return fd if fd >= 0 else -ctypes.get_errno()

def fresh_pipe():
    r, w = os.pipe()
    size = fcntl.fcntl(w, F_GETPIPE_SZ)
    os.close(r)
    os.close(w)
    return size

def f(event):
    if event.get("release"):
        for fd in held:
            os.close(fd)
        n = len(held)
        held.clear()
        return n
    if event.get("measure"):
        fd = inotify()
        if fd >= 0:
            os.close(fd)
        return {"uid": os.getuid(), "inotify": "ok" if fd >= 0 else errno.errorcode[-fd],
                "fresh_pipe": fresh_pipe()}
    instances, refused = 0, None
    while instances < 4096:
        fd = inotify()
        if fd < 0:
            refused = errno.errorcode[-fd]
            break
        held.append(fd)
        instances += 1
    # Past the soft limit the kernel refuses to grow a pipe (EPERM): stop there.
    big, grow = 0, None
    for _ in range(event["big"]):
        r, w = os.pipe()
        held.extend([r, w])
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
        except OSError as e:
            grow = errno.errorcode[e.errno]
            break
        big += 1
    # Then pipes of the default size until the uid is past the limit: a new pipe
    # gets two pages.
    for _ in range(64):
        r, w = os.pipe()
        held.extend([r, w])
        if fcntl.fcntl(w, F_GETPIPE_SZ) < 65536:
            break
    return {"uid": os.getuid(), "inotify": instances, "refused": refused,
            "big_pipes": big, "grow": grow, "fresh_pipe": fresh_pipe()}
"#;

/// The host's Python, by absolute path (not a `PATH` shim another user cannot run).
const PYTHON: &str = "/usr/bin/python3";

fn sysctl(name: &str) -> u64 {
    fs::read_to_string(format!("/proc/sys/fs/{name}"))
        .unwrap_or_else(|e| panic!("read {name}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// One sandbox exhausts its uid's inotify instances and pushes it past
/// `pipe-user-pages-soft`: in another sandbox `inotify_init` still works and a new
/// pipe still holds 64 KiB, because it is another uid. (With one uid for all, the
/// other sandbox gets EMFILE and 8 KiB pipes.)
#[test]
fn per_user_limits_one_sandbox_exhausts_leave_another_untouched() {
    let env = require_root!();
    // A range of its own: the hog starves its uid host-wide for a moment, and the
    // other tests' agents share the default range.
    let d = env.daemon_with(&[
        "--stem-cells",
        "0",
        "--sandbox-uid-base",
        "3100000000",
        "--sandbox-uids",
        "16",
    ]);
    let ours = |v: &Value| {
        v.as_u64()
            .is_some_and(|u| (3_100_000_000..3_100_000_016).contains(&u))
    };
    let max_instances = sysctl("inotify/max_user_instances");
    let soft_pages = sysctl("pipe-user-pages-soft");
    // 1 MiB pipes (256 pages of 4 KiB) past the soft limit; 0 is no limit.
    let big = if soft_pages == 0 {
        0
    } else {
        soft_pages / 256 + 1
    };
    assert!(big * 2 + max_instances < 900, "fits RLIMIT_NOFILE 1024");
    register(&d, &env, "hog", &[("f.py", HOG_PY)], json!({}));
    register(&d, &env, "victim", &[("f.py", HOG_PY)], json!({}));
    let before = ok_json(&d.invoke("victim", r#"{"measure": true}"#));
    let hog = ok_json(&d.invoke("hog", &json!({ "big": big }).to_string()));
    let victim = ok_json(&d.invoke("victim", r#"{"measure": true}"#));
    // Let go before asserting anything (with a shared uid the host's processes of
    // that uid are starved too while the hog holds on).
    let released = ok_json(&d.invoke("hog", r#"{"release": true}"#));
    assert!(released.as_u64().unwrap() > 0, "{released}");

    // The hog did exhaust its uid.
    assert_eq!(hog["refused"], "EMFILE", "{hog}");
    assert!(hog["inotify"].as_u64().unwrap() <= max_instances, "{hog}");
    if big > 0 {
        assert_eq!(hog["grow"], "EPERM", "{hog}");
    }
    let full_pipe = before["fresh_pipe"].clone();
    assert_eq!(before["inotify"], "ok", "{before}");
    if big > 0 {
        assert!(
            hog["fresh_pipe"].as_u64() < full_pipe.as_u64(),
            "past the soft limit a new pipe is small: {hog} vs {before}"
        );
    }
    // The victim did not notice.
    assert_eq!(
        (&victim["inotify"], &victim["fresh_pipe"]),
        (&json!("ok"), &full_pipe),
        "the other sandbox: {victim}; the hog: {hog}"
    );
    assert_ne!(victim["uid"], hog["uid"], "{victim} {hog}");
    assert!(ours(&victim["uid"]) && ours(&hog["uid"]), "{victim} {hog}");
}

/// Runs as a host user (argv: state directory, uploaded code file) and tries what a
/// host account could do with the agent's state directory.
const HOST_PROBE_PY: &str = r#"import errno, json, os, socket, sys
state, code = sys.argv[1], sys.argv[2]
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(state, "runtime", "agent.sock"))
print(json.dumps({
    "list state": attempt(lambda: os.listdir(state)),
    "stat runtime": attempt(lambda: os.stat(os.path.join(state, "runtime"))),
    "read code": attempt(lambda: open(code).read()),
    "connect": attempt(connect),
}))
"#;

/// Runs `HOST_PROBE_PY` as host uid and gid `id` with no groups.
fn probe_as(id: u32, state: &Path, code: &Path) -> Value {
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={id}"),
            format!("--regid={id}"),
            "--clear-groups".into(),
            "--".into(),
            PYTHON.into(),
            "-c".into(),
            HOST_PROBE_PY.into(),
        ])
        .arg(state)
        .arg(code)
        .output()
        .expect("run setpriv");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// The agent's state directory and its data directory are root's, mode 0700, even
/// under parents that are 0755: a host account — `nobody`, or one with a sandbox's
/// uid — can neither list the state nor reach the uploaded code (in the data
/// directory) or the call socket; the sandboxes still run and call (their bind
/// mounts do not walk the host's parents).
#[test]
fn the_state_directory_is_closed_to_host_accounts() {
    let env = require_root!();
    // As `/run/sprout` and `/var/lib` would be under the usual umask.
    fs::set_permissions(env.state_dir(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(env.work_dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let d = env.daemon();
    let state = env.state_dir().join(d.pid().to_string());
    for dir in [&state, &d.data_dir().to_path_buf()] {
        let meta = fs::metadata(dir).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid()),
            (0o700, 0),
            "{}",
            dir.display()
        );
    }
    let archive = tar_files(&[("f.py", WHO_PY)]);
    let r = d.request(
        "PUT",
        "/functions/uploaded",
        Some("application/x-tar"),
        &archive,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let who = ok_json(&d.invoke("uploaded", "{}"));
    let code = fs::read_dir(d.data_dir().join("code"))
        .unwrap()
        .map(|e| e.unwrap().path().join("f.py"))
        .find(|p| p.is_file())
        .expect("the uploaded code in the data directory");
    let sandbox_uid = who[0].as_u64().unwrap() as u32;
    for id in [65534, sandbox_uid] {
        assert_eq!(
            probe_as(id, &state, &code),
            json!({"list state": "EACCES", "stat runtime": "EACCES",
                   "read code": "EACCES", "connect": "EACCES"}),
            "as host uid {id}"
        );
    }
    // Root (the control) can; so can the sandboxes, calling through the socket.
    assert_eq!(
        probe_as(0, &state, &code),
        json!({"list state": "ok", "stat runtime": "ok", "read code": "ok", "connect": "ok"})
    );
    let caller = "import sprout\ndef f(e):\n    return sprout.map('uploaded', [{}])[0]\n";
    register(&d, &env, "caller", &[("f.py", caller)], json!({}));
    let far = ok_json(&d.invoke("caller", "{}"));
    assert!(in_range(&far[0]), "{far}");
}

/// Connects to the call socket at argv[1] once it reads a line on stdin, sends a
/// call of `hello`, and prints how many bytes of answer came before the agent
/// closed (or 20 s passed).
const CONNECTOR_PY: &str = r#"import json, os, socket, struct, sys
path = sys.argv[1]
# Opened (O_PATH) as root, connected to as the given user through its descriptor: a
# forked sandbox's files, seen through /proc/<pid>/root, are reachable only from its
# own user namespace or by root.
if len(sys.argv) > 2:
    fd, uid = os.open(path, os.O_PATH), int(sys.argv[2])
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    path = f"/proc/self/fd/{fd}"
sys.stdin.readline()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
hdr = json.dumps({"op": "call", "id": 1, "function": "hello", "depth": 1}).encode()
event = json.dumps({"name": "sprout"}).encode()
s.settimeout(20)
got = b""
try:
    # A refused connection may be closed before the call is even sent.
    s.sendall(struct.pack("<III", len(hdr), len(event), 0) + hdr + event)
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
        if b"Hello, sprout!" in got:
            break
except socket.timeout:
    pass
except (BrokenPipeError, ConnectionResetError):  # closed with the call unread
    pass
print(json.dumps({"bytes": len(got), "answered": b"Hello, sprout!" in got}))
"#;

/// Starts `CONNECTOR_PY` (as host uid `id`, or root), moves it into `cgroup_procs`
/// (the sandbox's cgroup), lets it connect to `socket` and returns what it printed.
fn connect_from_cgroup(id: Option<u32>, cgroup_procs: &Path, socket: &Path) -> Value {
    let mut cmd = Command::new(PYTHON);
    cmd.arg("-c").arg(CONNECTOR_PY).arg(socket);
    if let Some(id) = id {
        cmd.arg(id.to_string()); // it becomes this user itself (see CONNECTOR_PY)
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = KillOnDrop::spawn(&mut cmd);
    fs::write(cgroup_procs, child.pid().to_string())
        .unwrap_or_else(|e| panic!("move into {}: {e}", cgroup_procs.display()));
    let mut stdin = child.0.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.0.wait();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// A process in a bound sandbox's cgroup is heard on the call socket only as that
/// sandbox's own uid: a root process moved into the cgroup (what a pid reused by
/// another process between connect and accept looks like) is closed on without an
/// answer; the sandbox's uid, through the sandbox's own `/.sprout`, is answered.
#[test]
fn a_caller_in_a_sandbox_cgroup_is_heard_only_as_its_uid() {
    let env = require_root!();
    let d = env.daemon();
    register(&d, &env, "hold", &[("f.py", HOLD_PY)], json!({}));
    register(&d, &env, "hello", &[("f.py", HELLO_PY)], json!({}));
    std::thread::scope(|s| {
        let call = s.spawn(|| d.invoke("hold", "{}"));
        let (sandbox, shim) = held_sandbox(&d);
        let procs = sandbox_cgroup_dir(d.pid(), &sandbox, "memory").join("cgroup.procs");
        let host_socket = env
            .state_dir()
            .join(d.pid().to_string())
            .join("runtime/agent.sock");
        let as_root = connect_from_cgroup(None, &procs, &host_socket);
        let uid = host_ids(shim).unwrap().uid[0];
        let inside = PathBuf::from(format!("/proc/{shim}/root/.sprout/agent.sock"));
        let as_sandbox = connect_from_cgroup(Some(uid), &procs, &inside);
        let release = format!("/proc/{shim}/root/tmp/sprout-release");
        sprout_tests::write_as(uid, uid, &release, "").unwrap();
        ok_json(&call.join().unwrap());
        assert_eq!(
            as_root,
            json!({"bytes": 0, "answered": false}),
            "root in {sandbox}'s cgroup; daemon log:\n{}",
            d.log()
        );
        assert_eq!(
            as_sandbox["answered"],
            true,
            "uid {uid} in {sandbox}'s cgroup: {as_sandbox}; daemon log:\n{}",
            d.log()
        );
    });
    assert!(
        d.log()
            .contains("connected as uid 0, not the sandbox's uid"),
        "{}",
        d.log()
    );
}
