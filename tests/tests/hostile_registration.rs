//! A hostile tenant registering functions (issue 9, findings 7 and 9): a function
//! directory that is the host's root, a system tree, a link to one, sprout's own
//! state, or a kernel file system is refused with a 400 that names it, and nothing is
//! attached or started; a directory is attached without the mounts below it; a
//! handler must resolve inside its directory; limits the kernel or the machine would
//! not honour are refused naming the field and the accepted range, over HTTP and in
//! the embedded CLI (exit 2). Legitimate registrations (examples, uploads, limits at
//! the bounds) still run.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use sprout_tests::{
    body_json, example, json, require_root, tar_files, text, ClientResponse, Daemon, Env, Run,
    Value, HELLO_PY,
};

/// `PUT /functions/{name}` with a JSON body, whatever the answer.
fn put(d: &Daemon, name: &str, body: Value) -> ClientResponse {
    d.request(
        "PUT",
        &format!("/functions/{name}"),
        Some("application/json"),
        body.to_string().as_bytes(),
    )
}

/// Asserts a 400 whose error message contains every one of `texts`; returns the
/// message.
#[track_caller]
fn assert_refused(r: &ClientResponse, kind: &str, texts: &[&str]) -> String {
    assert_eq!(r.status, 400, "expected a 400: {}", text(r));
    let err = &body_json(r)["error"];
    assert_eq!(err["kind"], kind, "{}", text(r));
    let message = err["message"].as_str().unwrap_or_default().to_owned();
    for t in texts {
        assert!(
            message.contains(t),
            "message should contain {t:?}: {message}"
        );
    }
    message
}

/// Asserts that the daemon has no function registered and never started a sandbox.
#[track_caller]
fn assert_nothing_registered_or_started(d: &Daemon) {
    let r = d.request("GET", "/functions", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!([]), "functions are registered");
    let status = d.status();
    assert_eq!(status["functions"], 0, "{status}");
    assert_eq!(status["sandboxes"], 0, "{status}");
    assert_eq!(status["reserved_mb"], 0, "{status}");
    assert_eq!(d.sandboxes(), Vec::<String>::new(), "sandbox cgroups exist");
}

/// A directory `/tmp/sprout_hostile_XXXX/` holding `f.py` (returns what `/code`
/// shows of the host), named so that its path from `/` is a dotted Python module
/// (`tmp.sprout_hostile_XXXX.f`). Removed on drop.
fn planted_module() -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix("sprout_hostile_")
        .tempdir_in("/tmp")
        .expect("create a directory in /tmp");
    fs::write(
        dir.path().join("f.py"),
        "import os\n\ndef f(event):\n    return {'shadow': os.path.exists('/code/etc/shadow'), \
         'host_proc': len(os.listdir('/code/proc'))}\n",
    )
    .unwrap();
    let module = dir
        .path()
        .strip_prefix("/")
        .unwrap()
        .to_str()
        .unwrap()
        .replace('/', ".");
    (dir, format!("{module}.f:f"))
}

#[test]
fn registering_the_host_root_is_refused_and_nothing_is_attached() {
    let env = require_root!();
    let d = env.daemon();
    let (_planted, handler) = planted_module();

    // Finding 7: the whole host at /code.
    let r = put(&d, "root", json!({"path": "/", "handler": handler}));
    assert_refused(
        &r,
        "invalid_function",
        &[
            "function directory / is not allowed",
            "the host's root directory",
        ],
    );
    // The same through a symlink, named with what it resolves to.
    let link = env.work_dir().join("sprout-root-link");
    symlink("/", &link).unwrap();
    let r = put(
        &d,
        "rootlink",
        json!({"path": link.to_str().unwrap(), "handler": handler}),
    );
    assert_refused(
        &r,
        "invalid_function",
        &[
            &format!("function directory {} (resolves to /)", link.display()),
            "the host's root directory",
        ],
    );
    // System trees, in them and above them.
    for (path, tree) in [
        ("/etc", "/etc"),
        ("/proc", "/proc"),
        ("/proc/self/root", "the host's root directory"),
        ("/sys/fs/cgroup", "/sys"),
        ("/usr/lib", "/usr"),
        ("/dev", "/dev"),
        ("/var", "/var/lib/sprout"),
    ] {
        let r = put(&d, "system", json!({"path": path}));
        let m = assert_refused(&r, "invalid_function", &[tree]);
        assert!(
            m.starts_with(&format!("function directory {path}")) && m.contains("not allowed"),
            "{path}: {m}"
        );
    }
    // A handler that leaves its directory through a link, or with `..`.
    let escape = env.function("escape", &[]);
    symlink("/etc/shadow", escape.join("f.py")).unwrap();
    let r = put(&d, "escape", json!({"path": escape.to_str().unwrap()}));
    assert_refused(
        &r,
        "invalid_function",
        &[
            "handler f:f: f.py resolves to /etc/shadow",
            "outside the function directory",
        ],
    );
    let hello = env.function("hello", &[("f.py", HELLO_PY)]);
    for handler in ["..f:f", "../../etc/f:f", "/tmp/f:f"] {
        let r = put(
            &d,
            "dots",
            json!({"path": hello.to_str().unwrap(), "handler": handler}),
        );
        assert_refused(&r, "bad_request", &["is not a Python module name"]);
    }

    assert_nothing_registered_or_started(&d);
    let r = d.invoke("root", "{}");
    assert_eq!(r.status, 404, "{}", text(&r));
}

#[test]
fn sprouts_own_state_cannot_be_registered_but_uploads_and_examples_run() {
    let env = require_root!();
    let d = env.daemon();

    // Legitimate registrations: examples by path (default and OpenWhisk handlers)
    // and an upload, which the agent unpacks under its data directory.
    d.register("hello", &example("hello"), json!({}));
    d.register(
        "ow",
        &example("owhello"),
        json!({"handler": "__main__:main"}),
    );
    let r = d.request(
        "PUT",
        "/functions/up",
        Some("application/x-tar"),
        &tar_files(&[("f.py", HELLO_PY)]),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let unpacked = PathBuf::from(body_json(&r)["path"].as_str().unwrap());
    assert!(unpacked.starts_with(d.data_dir()), "{}", unpacked.display());
    for (name, want) in [
        ("hello", "Hello, Reg!"),
        ("ow", "Hello, Reg!"),
        ("up", "Hello, Reg!"),
    ] {
        let r = d.invoke(name, r#"{"name":"Reg"}"#);
        assert_eq!(r.status, 200, "{name}: {}", text(&r));
        let v = body_json(&r);
        let got = v.as_str().or(v["greeting"].as_str()).unwrap_or_default();
        assert_eq!(got, want, "{name}: {v}");
    }

    // Another function's unpacked code, the data directory, the agent's runtime
    // files, its state directory and the state root: all sprout's, none registrable
    // by path.
    let agent_state = env.state_dir().join(d.pid().to_string());
    for dir in [
        unpacked.clone(),
        d.data_dir().join("code"),
        d.data_dir().to_path_buf(),
        agent_state.join("runtime"),
        agent_state.clone(),
        env.state_dir().to_path_buf(),
    ] {
        assert!(dir.is_dir(), "{} is missing", dir.display());
        let r = put(
            &d,
            "steal",
            json!({"path": dir.to_str().unwrap(), "handler": "f:f"}),
        );
        assert_refused(
            &r,
            "invalid_function",
            &[
                &format!("function directory {}", dir.display()),
                "not allowed",
            ],
        );
    }
    let r = d.request("GET", "/functions", None, b"");
    let names: Vec<String> = body_json(&r)
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["hello", "ow", "up"]);
}

#[test]
fn limits_out_of_range_are_refused_naming_the_field_and_range() {
    let env = require_root!();
    // A budget of its own, so the memory range is known.
    let d = env.daemon_with(&["--stem-cells", "0", "--memory-budget", "2048"]);
    let cpus = machine_cpus();
    let hello = env.function("hello", &[("f.py", HELLO_PY)]);
    let path = hello.to_str().unwrap();

    // Finding 9: every invoke of the first failed with a 500 (cfs_quota 10, EINVAL);
    // the second's reservation evicted every other warm sandbox.
    let refused = [
        (
            json!({"path": path, "cpus": 0.0001}),
            format!("cpus 0.0001 is out of range: 0.01 to {cpus}"),
        ),
        (
            json!({"path": path, "cpus": cpus + 1}),
            format!("cpus {} is out of range: 0.01 to {cpus}", cpus + 1),
        ),
        (
            json!({"path": path, "memory_mb": 1048576}),
            "memory_mb 1048576 is out of range: 16 to 2048 (at most the agent's memory budget)"
                .to_owned(),
        ),
        (
            json!({"path": path, "memory_mb": 4}),
            "memory_mb 4 is out of range: 16 to 2048".to_owned(),
        ),
        (
            json!({"path": path, "pids": 1}),
            "pids 1 is out of range: 8 to 4096".to_owned(),
        ),
        (
            json!({"path": path, "pids": 1u64 << 22}),
            "pids 4194304 is out of range: 8 to 4096".to_owned(),
        ),
        (
            json!({"path": path, "timeout_ms": 0}),
            "timeout_ms 0 is out of range: 1 to 3600000".to_owned(),
        ),
        (
            json!({"path": path, "max_instances": 0}),
            "max_instances 0 is out of range: 1 to 1024".to_owned(),
        ),
    ];
    for (body, message) in &refused {
        let r = put(&d, "limits", body.clone());
        assert_refused(&r, "bad_request", &[message]);
    }
    // An upload with limits in its query string: refused the same, and its unpacked
    // copy is not left behind.
    let r = d.request(
        "PUT",
        "/functions/limits?cpus=0.0001",
        Some("application/x-tar"),
        &tar_files(&[("f.py", HELLO_PY)]),
    );
    assert_refused(
        &r,
        "bad_request",
        &[&format!("cpus 0.0001 is out of range: 0.01 to {cpus}")],
    );
    let uploads = d.data_dir().join("code");
    let left: Vec<PathBuf> = fs::read_dir(&uploads)
        .map(|it| it.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(left, Vec::<PathBuf>::new(), "unpacked uploads left behind");
    assert_nothing_registered_or_started(&d);

    // The bounds themselves register and run: the smallest memory, pids and CPU
    // share (1 ms per 100 ms) start the hello function.
    d.register(
        "least",
        &hello,
        json!({"memory_mb": 16, "pids": 8, "cpus": 0.01, "timeout_ms": 30000}),
    );
    let r = d.invoke("least", r#"{"name":"Least"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r), json!("Hello, Least!"));
    let info = d.register(
        "most",
        &hello,
        json!({"memory_mb": 2048, "pids": 4096, "cpus": cpus, "max_instances": 1024}),
    );
    assert_eq!(info["memory_mb"], 2048);
}

/// The machine's online CPUs, as the agent counts them.
fn machine_cpus() -> u64 {
    let list = fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    list.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// The state directory of a dead agent, planted before a command runs: any agent
/// that starts removes it (as it removes every stopped agent's leftovers), so while
/// it is there, no agent started.
const CANARY: &str = "999999998";

#[track_caller]
fn assert_no_agent_started(env: &Env, run: &Run) {
    let entries: Vec<_> = fs::read_dir(env.state_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries, [CANARY], "an agent was started:\n{run}");
    fs::remove_dir_all(env.state_dir().join(CANARY)).unwrap();
    env.assert_clean(run.pid);
}

#[test]
fn the_embedded_cli_refuses_the_same_before_starting_anything() {
    let env = require_root!();
    let (_planted, handler) = planted_module();
    let hello = env.function("hello", &[("f.py", HELLO_PY)]);
    let cpus = machine_cpus();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["/".into(), "{}".into(), "--handler".into(), handler.clone()],
            "function directory / is not allowed: it is the host's root directory".into(),
        ),
        (
            vec![
                hello.to_str().unwrap().into(),
                "{}".into(),
                "--cpus".into(),
                "0.0001".into(),
            ],
            format!("cpus 0.0001 is out of range: 0.01 to {cpus}"),
        ),
        (
            vec![
                hello.to_str().unwrap().into(),
                "{}".into(),
                "--memory".into(),
                "1048576".into(),
            ],
            "memory_mb 1048576 is out of range: 16 to".into(),
        ),
    ];
    for (args, message) in cases {
        fs::create_dir_all(env.state_dir().join(CANARY)).unwrap();
        fs::write(env.state_dir().join(CANARY).join("lock"), "").unwrap();
        let run = env.sprout().arg("invoke").args(&args).run();
        run.expect_code(2);
        assert!(
            run.stderr.contains(&format!("sprout: {message}")),
            "stderr should name the problem ({message:?}):\n{run}"
        );
        assert_no_agent_started(&env, &run);
    }
    // And a legitimate run at the bounds still works.
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&hello)
        .arg(r#"{"name":"Bounds"}"#)
        .args(["--memory", "16", "--pids", "8", "--cpus", "0.01"])
        .run();
    run.success();
    assert_eq!(run.json(), json!("Hello, Bounds!"), "{run}");
    env.assert_clean(run.pid);
}

/// Runs `body` on a thread of its own in a private mount namespace (so what it
/// mounts never reaches the host's table, and dies with the thread); a daemon it
/// starts lives in that namespace too.
fn in_private_mount_ns<T: Send>(body: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                .expect("unshare the mount namespace");
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect("make every mount private");
            body()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Unmounts `0` when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn mount_fs(fstype: &str, target: &Path) -> Unmount {
    fs::create_dir_all(target).unwrap();
    nix::mount::mount(
        Some("sprout-test"),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("mount {fstype} on {}: {e}", target.display()));
    Unmount(target.to_path_buf())
}

#[test]
fn a_function_directory_is_attached_without_the_mounts_below_it() {
    let env = require_root!();
    let lister = "import os\n\ndef f(event):\n    return sorted(os.listdir('/code/inner'))\n";
    let dir = env.function(
        "lister",
        &[("f.py", lister), ("inner/under-the-mount.txt", "")],
    );
    let inner = dir.join("inner");
    let proc_dir = env.work_dir().join("sprout-proc");
    in_private_mount_ns(|| {
        // A tmpfs over `inner` with a file of its own, and a proc elsewhere.
        let _tmpfs = mount_fs("tmpfs", &inner);
        fs::write(inner.join("on-the-mount.txt"), "").unwrap();
        let _proc = mount_fs("proc", &proc_dir);
        let d = env.daemon();
        d.register("lister", &dir, json!({}));
        let r = d.invoke("lister", "{}");
        assert_eq!(r.status, 200, "{}", text(&r));
        assert_eq!(
            body_json(&r),
            json!(["under-the-mount.txt"]),
            "the function sees the mount below its directory"
        );
        // A kernel file system is refused wherever it is mounted.
        let r = put(
            &d,
            "proc",
            json!({"path": proc_dir.to_str().unwrap(), "handler": "self.fd:f"}),
        );
        assert_refused(
            &r,
            "invalid_function",
            &["is not allowed: it is on a proc file system"],
        );
        drop(d);
    });
    // The host never saw either mount.
    let host = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host.contains(inner.to_str().unwrap()) && !host.contains(proc_dir.to_str().unwrap()),
        "a test mount reached the host's table"
    );
}

/// A directory checked at registration cannot be swapped for a link before it is
/// attached: the attach opens the (canonical) path refusing every symbolic link, so
/// the swapped-in directory is never seen at `/code` and the invoke fails instead.
#[test]
fn a_directory_swapped_for_a_link_after_registration_is_not_attached() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function(
        "swapped",
        &[("f.py", "def f(e):\n    return 'registered'\n")],
    );
    let other = env.function("other", &[("f.py", "def f(e):\n    return 'swapped in'\n")]);
    d.register("swapped", &dir, json!({}));
    // The registered directory is replaced by a link to another one (as someone with
    // write access on the host could do between registration and a cold start).
    fs::rename(&dir, dir.with_extension("old")).unwrap();
    symlink(&other, &dir).unwrap();
    let r = d.invoke("swapped", "{}");
    assert_ne!(
        body_json(&r),
        json!("swapped in"),
        "the link was followed when the code was attached: {}",
        text(&r)
    );
    assert_eq!(r.status, 500, "{}", text(&r));
    assert!(
        text(&r).contains("symbolic links"),
        "the error should name the link: {}",
        text(&r)
    );
    // Nothing stays: the sandbox the attach failed in is gone.
    assert!(d.sandboxes().is_empty(), "{:?}", d.sandboxes());
}
