//! Hostile packages (issue 13): package code runs only in install sandboxes, and
//! this proves the sandbox holds. The test serves a package index of its own (PEP 503,
//! `sprout serve --package-index`) from a network namespace it makes, reached from
//! install sandboxes through the egress NAT. Its packages are source distributions
//! whose build backend (`hostile_packages/backend.py`: the code pip runs to prepare
//! an sdist's metadata while resolving and installing, and to build it) probes the
//! boundary from inside, reports to the index and builds its findings into the
//! package, which a function then imports and returns. Two more packages leave a
//! FIFO in their output or make it a link; their install fails and leaves nothing.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sprout_tests::netns::TestNetns;
use sprout_tests::{all_pids, body_json, cmdline, json, require_root, text, wait_for, Value};

/// The tests here take turns: each checks the host's processes by user.
static TURN: Mutex<()> = Mutex::new(());

const BACKEND: &str = include_str!("hostile_packages/backend.py");
/// The agent's default sandbox uid range (`--sandbox-uid-base`, `--sandbox-uids`).
const UIDS: std::ops::Range<u32> = 0x7000_0000..0x7000_0000 + 65536;
const SLEEPER: &str = "sprout-hostile-sleeper";

/// What the index serves (path → body) and what probes reported to it.
#[derive(Default)]
struct Served {
    files: HashMap<String, (Vec<u8>, &'static str)>,
    reports: Vec<Value>,
}

/// A package index of the test's own: a network namespace ([`TestNetns`],
/// `sprout-p<n>` on the host, 10.233/16), and an HTTP server on port 8080 of that
/// namespace, run by a thread of the test on a listener bound there. Removed when
/// dropped.
struct Index {
    netns: Option<TestNetns>,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    served: Arc<Mutex<Served>>,
    /// `10.233.x.y:8080`.
    addr: String,
    /// The host side's address.
    host_side: String,
}

impl Index {
    fn new() -> Index {
        let netns = TestNetns::new('p', 233, &["sleep", "3600"]);
        let nspath = netns.path();
        let mut index = Index {
            stop: Arc::new(AtomicBool::new(false)),
            server: None,
            served: Arc::default(),
            addr: format!("{}:8080", netns.addr),
            host_side: netns.host_addr.clone(),
            netns: Some(netns),
        };
        // A thread that joins the namespace binds the listener there; the socket
        // stays in it whichever thread serves it.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(nspath).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            tx.send(TcpListener::bind("0.0.0.0:8080").unwrap()).unwrap();
        })
        .join()
        .unwrap();
        let listener = rx.recv().unwrap();
        listener.set_nonblocking(true).unwrap();
        let (stop, served) = (index.stop.clone(), index.served.clone());
        index.server = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let served = served.clone();
                        std::thread::spawn(move || serve(conn, &served));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }));
        let ready = wait_for(Duration::from_secs(10), || {
            TcpStream::connect_timeout(&index.addr.parse().unwrap(), Duration::from_millis(200))
        });
        assert!(ready.is_ok(), "the index at {} never answered", index.addr);
        index
    }

    /// `--package-index`.
    fn url(&self) -> String {
        format!("http://{}/simple/", self.addr)
    }

    /// Adds the sdist `archive` of `name` (its file name `file`) to the index.
    fn add(&self, name: &str, file: &str, archive: Vec<u8>) {
        let sha = sha256_hex(&archive);
        let page = format!(
            "<!DOCTYPE html><html><body><a href=\"/files/{file}#sha256={sha}\">{file}</a></body></html>\n"
        );
        let mut served = self.served.lock().unwrap();
        served
            .files
            .insert(format!("/simple/{name}/"), (page.into_bytes(), "text/html"));
        served.files.insert(
            format!("/files/{file}"),
            (archive, "application/octet-stream"),
        );
    }

    fn reports(&self) -> Vec<Value> {
        self.served.lock().unwrap().reports.clone()
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
        self.netns.take();
    }
}

/// Answers one request: GET of a served path, or POST /report (a probe's findings).
fn serve(mut conn: TcpStream, served: &Mutex<Served>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let (method, path, body_at, length) = loop {
        let Ok(n) = conn.read(&mut chunk) else { return };
        if n == 0 || buf.len() > 1 << 20 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(at)) = req.parse(&buf) {
            let length = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0usize);
            break (
                req.method.unwrap_or("").to_owned(),
                req.path.unwrap_or("").to_owned(),
                at,
                length,
            );
        }
    };
    while buf.len() < body_at + length {
        match conn.read(&mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
    let (status, body, kind) = if method == "POST" && path == "/report" {
        if let Ok(v) = serde_json::from_slice(&buf[body_at..body_at + length]) {
            served.lock().unwrap().reports.push(v);
        }
        ("200 OK", Vec::new(), "text/plain")
    } else {
        let path = path.split('#').next().unwrap_or_default().to_owned();
        match served.lock().unwrap().files.get(&path) {
            Some((body, kind)) => ("200 OK", body.clone(), *kind),
            None => ("404 Not Found", b"not here\n".to_vec(), "text/plain"),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(&body);
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The sdist `name-1.0` (`<name with _>-1.0.tar`) whose build backend is
/// [`BACKEND`] with `config` (plus name, version and the module it makes).
fn sdist(name: &str, module: &str, mut config: Value) -> (String, Vec<u8>) {
    let dist = name.replace('-', "_");
    let top = format!("{dist}-1.0");
    config["name"] = json!(name);
    config["version"] = json!("1.0");
    config["module"] = json!(module);
    let backend = BACKEND.replace("@CONFIG@", &config.to_string());
    assert!(!config.to_string().contains("'''"));
    let pyproject =
        "[build-system]\nrequires = []\nbuild-backend = \"backend\"\nbackend-path = [\".\"]\n";
    let pkg_info = format!("Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n");
    let archive = sprout_tests::tar_files(&[
        (&format!("{top}/PKG-INFO"), &pkg_info),
        (&format!("{top}/pyproject.toml"), pyproject),
        (&format!("{top}/backend.py"), &backend),
    ]);
    (format!("{top}.tar"), archive)
}

/// (pid, uid, command line) of every process on the host but those in another
/// agent's cgroups (other agents on this machine use the same uids): the processes
/// of agent `agent`'s sandboxes, and any that left a sandbox's cgroup.
fn processes(agent: u32) -> Vec<(u32, u32, String)> {
    let ours = format!("/sprout/{agent}/");
    all_pids()
        .into_iter()
        .filter_map(|p| {
            let cgroup = std::fs::read_to_string(format!("/proc/{p}/cgroup")).ok()?;
            if cgroup.contains("/sprout/") && !cgroup.contains(&ours) {
                return None;
            }
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((p, uid, cmdline(p)))
        })
        .collect()
}

/// Every entry under `dir` (links not followed), `dir` included.
fn walk(dir: &Path) -> Vec<(std::path::PathBuf, std::fs::Metadata)> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        all.push((p, m));
    }
    all
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

/// Checks one probe's findings (`f`, from package code in an install sandbox).
#[track_caller]
fn assert_held(f: &Value) {
    let at = format!("{} at {}", f["package"], f["phase"]);
    let uid = f["uid"].as_u64().unwrap() as u32;
    assert!(
        UIDS.contains(&uid),
        "{at}: uid {uid} is not a sandbox's: {f}"
    );
    assert_eq!(f["euid"], f["uid"], "{at}: {f}");
    assert_eq!(f["gid"], f["uid"], "{at}: {f}");
    assert_eq!(f["groups"], json!([]), "{at}: {f}");
    let status = &f["status"];
    for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status[cap], "0000000000000000", "{at}: {cap}: {f}");
    }
    assert_eq!(status["NoNewPrivs"], "1", "{at}: {f}");
    assert_eq!(status["Seccomp"], "2", "{at}: {f}");
    for (path, outcome) in f["write"].as_object().unwrap() {
        let writable = matches!(path.as_str(), "/deps" | "/tmp");
        assert_eq!(
            outcome == "written",
            writable,
            "{at}: writing in {path}: {outcome}"
        );
    }
    assert_eq!(f["read"]["/etc/shadow"], "ENOENT", "{at}: {f}");
    assert_eq!(f["list"]["/root"], json!([]), "{at}: {f}");
    let gateway = f["gateway"].as_str().unwrap_or_default();
    assert!(gateway.starts_with("10.231."), "{at}: egress gateway: {f}");
    let tried = f["connect"].as_object().unwrap();
    assert!(
        tried.keys().any(|t| t.starts_with(gateway)),
        "{at}: the gateway was tried: {f}"
    );
    for (target, outcome) in tried {
        assert_ne!(outcome, "connected", "{at}: reached {target}: {f}");
    }
    assert_eq!(f["index"], "connected", "{at}: the index is reachable: {f}");
    assert_eq!(f["api_socket"]["exists"], false, "{at}: {f}");
    assert_eq!(f["api_socket"]["connect"], "ENOENT", "{at}: {f}");
    let call = f["call_socket"].as_str().unwrap();
    assert!(
        !call.starts_with("answered"),
        "{at}: the call socket answered an install sandbox: {f}"
    );
    assert_eq!(f["sleeper"], "left", "{at}: {f}");
}

#[test]
fn hostile_sdists_stay_inside_their_install_sandboxes() {
    let env = require_root!();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    // What the host listens on: its loopback, and all its addresses.
    let host_lo = TcpListener::bind("127.0.0.1:0").unwrap();
    let host_any = TcpListener::bind("0.0.0.0:0").unwrap();
    for l in [&host_lo, &host_any] {
        l.set_nonblocking(true).unwrap();
    }
    let ports = [
        host_lo.local_addr().unwrap().port(),
        host_any.local_addr().unwrap().port(),
    ];
    let index = Index::new();
    let d = env.daemon_with(&["--stem-cells", "0", "--package-index", &index.url()]);
    let config = json!({
        "host_ports": ports,
        "host_side": index.host_side,
        "index_at": index.addr,
        "report": format!("http://{}/report", index.addr),
        "api_socket": d.socket(),
    });
    let with = |extra: Value| {
        let mut c = config.clone();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let packages = [
        ("sprout-hostile-a", "hostile_a", with(json!({"mode": "a"}))),
        (
            "sprout-hostile-b",
            "hostile_b",
            with(json!({"mode": "b", "requires": ["sprout-hostile-a==1.0"],
                        "other": ["hostile_a", "sprout_hostile_a"]})),
        ),
        (
            "sprout-hostile-fifo",
            "hostile_fifo",
            with(json!({"mode": "fifo"})),
        ),
        (
            "sprout-hostile-link",
            "hostile_link",
            with(json!({"mode": "link"})),
        ),
    ];
    for (name, module, config) in packages {
        let (file, archive) = sdist(name, module, config);
        index.add(name, &file, archive);
    }

    // Two hostile packages in one requirements.txt; the second depends on the
    // first, so the first is installed (and committed) before the second builds.
    let dir = env.function(
        "hostile",
        &[
            (
                "f.py",
                "import hostile_a, hostile_b\n\
                 from hostile_a.findings import FINDINGS as A\n\
                 from hostile_b.findings import FINDINGS as B\n\
                 def f(event):\n\
                 \x20   return {'a': A, 'b': B, 'mark': hostile_a.MARK}\n",
            ),
            (
                "requirements.txt",
                "sprout-hostile-a==1.0\nsprout-hostile-b==1.0\n",
            ),
        ],
    );
    let info = d.register("hostile", &dir, json!({}));
    assert_eq!(
        info["packages"],
        json!(["sprout-hostile-a==1.0", "sprout-hostile-b==1.0"]),
        "{info}"
    );
    // The registration is done: every install sandbox is gone, and what their
    // package code left running with them.
    let after = processes(d.pid());
    let sleepers: Vec<_> = after.iter().filter(|p| p.2.contains(SLEEPER)).collect();
    assert!(sleepers.is_empty(), "left running: {sleepers:?}");

    let r = d.invoke("hostile", "{}");
    assert_eq!(r.status, 200, "{}\n{}", text(&r), d.log());
    let out = body_json(&r);
    assert_eq!(out["mark"], "original", "the first package's files changed");
    let (a, b) = (&out["a"], &out["b"]);
    assert_eq!(
        (&a["phase"], &b["phase"]),
        (&json!("build"), &json!("build"))
    );
    assert_held(a);
    assert_held(b);
    assert_eq!(
        b["other_package"],
        json!([]),
        "the second build saw the first's files: {b}"
    );
    // The probes that ran while pip prepared metadata, resolving and installing.
    let reports = index.reports();
    for f in &reports {
        assert_held(f);
    }
    for (package, phase) in [
        ("sprout-hostile-a", "metadata"),
        ("sprout-hostile-b", "metadata"),
        ("sprout-hostile-a", "build"),
        ("sprout-hostile-b", "build"),
    ] {
        assert!(
            reports
                .iter()
                .any(|f| f["package"] == package && f["phase"] == phase),
            "no report from {package} at {phase}: {reports:?}"
        );
    }
    // No process of any install sandbox's user outlived the registration.
    let mut users: Vec<u32> = reports
        .iter()
        .chain([a, b])
        .map(|f| f["uid"].as_u64().unwrap() as u32)
        .collect();
    users.sort();
    users.dedup();
    for uid in &users {
        let left: Vec<_> = after.iter().filter(|p| p.1 == *uid).collect();
        assert!(left.is_empty(), "uid {uid} still ran {left:?}");
    }
    for (what, l) in [("loopback", &host_lo), ("addresses", &host_any)] {
        assert!(
            l.accept().is_err(),
            "the host's {what} saw a connection from package code"
        );
    }

    // The cache's files are root's and nobody else may write them.
    let cache = d.data_dir().join("packages");
    let python = cache.join("python");
    let installed: Vec<String> = names(&python)
        .into_iter()
        .filter(|n| !n.ends_with(".json"))
        .collect();
    assert_eq!(installed.len(), 2, "{installed:?}");
    for entry in &installed {
        for (path, m) in walk(&python.join(entry)) {
            assert_eq!((m.uid(), m.gid()), (0, 0), "{}", path.display());
            if !m.file_type().is_symlink() {
                assert_eq!(m.mode() & 0o6022, 0, "{}: {:o}", path.display(), m.mode());
            }
            assert!(
                m.is_dir() || m.is_file() || m.file_type().is_symlink(),
                "{}",
                path.display()
            );
        }
    }

    // A build that leaves a FIFO in its output, or makes its output a link (to the
    // sandbox's /tmp, which on the host is the host's): refused, nothing kept.
    for (name, says) in [
        (
            "sprout-hostile-fifo",
            "\"trap\": the installer left a special file",
        ),
        (
            "sprout-hostile-link",
            "its output: the installer's output is not a directory",
        ),
    ] {
        let dir = env.function(
            name,
            &[
                ("f.py", "def f(event):\n    return 1\n"),
                ("requirements.txt", &format!("{name}==1.0\n")),
            ],
        );
        let (status, body) = d.try_register(name, &dir);
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"]["kind"], "package_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("could not install {name}==1.0: {says}")),
            "{name}: {body}"
        );
        let listed = body_json(&d.request("GET", "/functions", None, b""));
        assert_eq!(
            listed.as_array().unwrap().len(),
            1,
            "{name} was registered: {listed}"
        );
    }
    assert_eq!(
        names(&python).len(),
        4,
        "only a and b: {:?}",
        names(&python)
    );
    assert!(
        names(&cache.join("work")).is_empty(),
        "{:?}",
        names(&cache.join("work"))
    );
    assert_eq!(d.status()["packages_installed"], 2);
    drop(d);
    drop(index);
}

/// A package whose import leaves a process running: its package zygote is refused
/// and destroyed (the zygote counts only its own threads; a process beside it would
/// grow outside what was measured), and the namespace waits before another try.
#[test]
fn a_package_zygote_whose_imports_leave_a_process_is_refused() {
    let env = require_root!();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let index = Index::new();
    let (file, archive) = sdist(
        "sprout-hostile-daemon",
        "hostile_daemon",
        json!({"mode": "daemon"}),
    );
    index.add("sprout-hostile-daemon", &file, archive);
    let d = env.daemon_with(&["--stem-cells", "0", "--package-index", &index.url()]);
    let dir = env.function(
        "daemon",
        &[
            (
                "f.py",
                "import hostile_daemon\ndef f(event):\n    return hostile_daemon.MARK\n",
            ),
            ("requirements.txt", "sprout-hostile-daemon==1.0\n"),
        ],
    );
    d.register("daemon", &dir, json!({}));
    // A plain cold start (its own sandbox may keep the process): it wants a zygote.
    let r = d.invoke("daemon", "{}");
    assert_eq!(r.status, 200, "{}\n{}", text(&r), d.log());
    assert_eq!(r.header("X-Sprout-Start"), Some("new_sandbox"));
    // Without the check the zygote was made (and counted in /status) here.
    wait_for(Duration::from_secs(60), || {
        let log = d.log();
        match log.contains("could not make a package zygote")
            && log.contains("package code left a process running")
        {
            true => Ok(()),
            false => Err(log),
        }
    })
    .unwrap_or_else(|log| panic!("the zygote was not refused:\n{log}"));
    assert_eq!(d.status()["package_zygotes"], 0);
    let cgroups = sprout_tests::agent_cgroup_dir(d.pid(), "memory");
    let prefix = format!("sprout-{}.pz-", d.pid());
    let left: Vec<String> = names(&cgroups)
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "package fork servers left: {left:?}");
    // The namespace waits: another cold start does not start from a zygote.
    d.register("daemon2", &dir, json!({}));
    let r = d.invoke("daemon2", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.header("X-Sprout-Start"), Some("new_sandbox"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        d.log().matches("could not make a package zygote").count(),
        1
    );
    drop(d);
    drop(index);
}

#[test]
fn package_sources_must_be_http_urls_without_credentials() {
    let env = require_root!();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    for (flag, url, says) in [
        (
            "--package-index",
            "ftp://mirror.example/simple/",
            "not an http:// or https:// URL",
        ),
        (
            "--npm-registry",
            "https://user:secret@registry.example/",
            "carries credentials",
        ),
        (
            "--package-index",
            "https://mirror.example/simple/?x=1",
            "query",
        ),
    ] {
        let socket = env.work_dir().join("never.sock");
        let run = env
            .sprout()
            .args(["serve", "--socket"])
            .arg(&socket)
            .args([flag, url])
            .run();
        run.expect_code(2);
        assert!(
            run.stderr.contains(flag) && run.stderr.contains(says),
            "{flag} {url}: {run}"
        );
        assert!(!socket.exists());
    }
}
