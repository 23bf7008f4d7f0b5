//! Durable registrations (issue 14): a daemon restarted on the same data directory
//! serves the functions and workflows registered before, by path and by upload,
//! with the packages they were registered with; a removal survives a restart;
//! versions keep growing; a `kill -9` in the middle of a registration leaves nothing
//! that the next daemon serves or keeps.

use std::fs;
use std::path::Path;
use std::time::Duration;

use sprout_tests::*;

const HELLO_PY: &str = "def f(event):\n    return 'hello ' + event['name']\n";
const SIX_PY: &str = "import six\ndef f(event):\n    return six.__version__\n";

/// The entries of `dir`, sorted (empty when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|it| {
            it.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The version in each uploaded code directory of `name` (`code/<name>-<version>`).
fn upload_versions(data: &Path, name: &str) -> Vec<u64> {
    entries(&data.join("code"))
        .iter()
        .filter_map(|e| e.strip_prefix(&format!("{name}-"))?.parse().ok())
        .collect()
}

fn daemon_on(env: &Env, data: &Path) -> Daemon {
    Daemon::start_on(env, data, &["--stem-cells", "0"])
}

#[track_caller]
fn upload(d: &Daemon, name: &str, files: &[(&str, &str)]) -> Value {
    let r = d.request(
        "PUT",
        &format!("/functions/{name}"),
        Some("application/x-tar"),
        &tar_files(files),
    );
    assert_eq!(r.status, 200, "upload {name}: {}", text(&r));
    body_json(&r)
}

#[track_caller]
fn says_hello(d: &Daemon, name: &str) {
    let r = d.invoke(name, r#"{"name":"again"}"#);
    assert_eq!(
        (r.status, body_json(&r)),
        (200, json!("hello again")),
        "{name}: {}\n{}",
        text(&r),
        d.log()
    );
}

/// `GET /functions` without the counts that change with use.
fn listed(d: &Daemon) -> Value {
    let mut v = body_json(&d.request("GET", "/functions", None, b""));
    for f in v.as_array_mut().unwrap() {
        f.as_object_mut().unwrap().remove("warm_instances");
    }
    v
}

fn put_workflow(d: &Daemon, name: &str, doc: &Value) -> ClientResponse {
    d.request(
        "PUT",
        &format!("/workflows/{name}"),
        Some("application/json"),
        doc.to_string().as_bytes(),
    )
}

fn run_workflow(d: &Daemon, name: &str) -> ClientResponse {
    d.request(
        "POST",
        &format!("/workflows/{name}/invoke"),
        Some("application/json"),
        br#"{"name":"flow"}"#,
    )
}

#[test]
fn a_restart_serves_functions_by_path_and_by_upload_and_workflows() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let dir = env.function("p", &[("f.py", HELLO_PY)]);
    let mut d = daemon_on(&env, &data);
    d.register(
        "p",
        &dir,
        json!({"memory_mb": 64, "timeout_ms": 5000, "max_instances": 3}),
    );
    upload(&d, "u", &[("f.py", HELLO_PY)]);
    let r = d.request(
        "PUT",
        "/namespaces/other/functions/p",
        Some("application/json"),
        json!({"path": dir, "cpus": 0.5}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let doc = json!({"timeout_ms": 20000,
                     "steps": [{"type": "parallel", "branches": [
                         {"type": "task", "function": "p"},
                         {"type": "task", "function": "u"}]}]});
    let r = put_workflow(&d, "w", &doc);
    assert_eq!(r.status, 200, "{}", text(&r));
    let before = listed(&d);
    let other_before = body_json(&d.request("GET", "/namespaces/other/functions", None, b""));
    let workflows_before = body_json(&d.request("GET", "/workflows", None, b""));
    let u_version = upload_versions(&data, "u");
    assert_eq!(u_version.len(), 1, "{:?}", entries(&data.join("code")));
    d.terminate();
    env.assert_clean(d.pid());
    // A clean stop keeps the uploaded code: a row names it.
    assert_eq!(upload_versions(&data, "u"), u_version);

    let d = daemon_on(&env, &data);
    assert_eq!(listed(&d), before, "{}", d.log());
    assert_eq!(
        body_json(&d.request("GET", "/namespaces/other/functions", None, b"")),
        other_before
    );
    assert_eq!(
        body_json(&d.request("GET", "/workflows", None, b"")),
        workflows_before
    );
    says_hello(&d, "p");
    says_hello(&d, "u");
    let r = run_workflow(&d, "w");
    assert_eq!(
        (r.status, body_json(&r)),
        (200, json!(["hello flow", "hello flow"])),
        "{}",
        text(&r)
    );
    assert_eq!(d.status()["functions"], json!(3));

    // Versions keep growing across restarts: a new upload of u gets a higher one,
    // and its old code goes.
    upload(&d, "u", &[("f.py", HELLO_PY)]);
    let now = upload_versions(&data, "u");
    assert_eq!(now.len(), 1, "{:?}", entries(&data.join("code")));
    assert!(now[0] > u_version[0], "{now:?} after {u_version:?}");
    says_hello(&d, "u");
}

#[test]
fn removals_survive_a_restart_and_versions_never_repeat() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let dir = env.function("p", &[("f.py", HELLO_PY)]);
    let mut versions = Vec::new();
    for round in 0..3 {
        let mut d = daemon_on(&env, &data);
        if round == 0 {
            d.register("p", &dir, json!({}));
            upload(&d, "gone", &[("f.py", HELLO_PY)]);
            let r = put_workflow(
                &d,
                "w",
                &json!({"steps": [{"type": "task", "function": "p"}]}),
            );
            assert_eq!(r.status, 200, "{}", text(&r));
        }
        if round == 1 {
            // Served after the first restart, then removed.
            says_hello(&d, "gone");
            assert_eq!(
                d.request("DELETE", "/functions/gone", None, b"").status,
                200
            );
            assert_eq!(d.request("DELETE", "/workflows/w", None, b"").status, 200);
            assert_eq!(d.request("DELETE", "/functions/p", None, b"").status, 200);
            assert!(upload_versions(&data, "gone").is_empty());
        }
        if round == 2 {
            let names: Vec<Value> = listed(&d)
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].clone())
                .collect();
            assert_eq!(names, [json!("v0"), json!("v1")], "{}", d.log());
            assert_eq!(
                body_json(&d.request("GET", "/workflows", None, b"")),
                json!([])
            );
            assert_eq!(d.invoke("gone", "{}").status, 404);
            assert!(upload_versions(&data, "gone").is_empty());
            says_hello(&d, "v0");
        }
        // Each daemon's uploads take versions none before it took.
        upload(&d, &format!("v{round}"), &[("f.py", HELLO_PY)]);
        versions.extend(upload_versions(&data, &format!("v{round}")));
        d.terminate();
        env.assert_clean(d.pid());
    }
    assert_eq!(versions.len(), 3, "{versions:?}");
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions grow: {versions:?}"
    );
}

#[test]
fn a_function_whose_directory_is_gone_is_kept_but_not_served_until_it_is_back() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let dir = env.function("p", &[("f.py", HELLO_PY)]);
    let moved = env.work_dir().join("moved");
    let mut d = daemon_on(&env, &data);
    d.register("p", &dir, json!({}));
    upload(&d, "u", &[("f.py", HELLO_PY)]);
    d.terminate();

    fs::rename(&dir, &moved).unwrap();
    let mut d = daemon_on(&env, &data);
    let names: Vec<Value> = listed(&d)
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].clone())
        .collect();
    assert_eq!(names, [json!("u")]);
    assert_eq!(d.invoke("p", "{}").status, 404);
    let log = d.log();
    assert!(
        log.contains("registered function not served after the restart")
            && log.contains("default/p")
            && log.contains(&dir.display().to_string()),
        "the log names it and why:\n{log}"
    );
    d.terminate();

    // Kept: back when its directory is.
    fs::rename(&moved, &dir).unwrap();
    let mut d = daemon_on(&env, &data);
    says_hello(&d, "p");
    d.terminate();

    // Removing one that is not served removes its registration too.
    fs::rename(&dir, &moved).unwrap();
    let mut d = daemon_on(&env, &data);
    assert_eq!(d.request("DELETE", "/functions/p", None, b"").status, 200);
    assert_eq!(d.request("DELETE", "/functions/p", None, b"").status, 404);
    d.terminate();
    fs::rename(&moved, &dir).unwrap();
    let d = daemon_on(&env, &data);
    assert_eq!(d.invoke("p", "{}").status, 404);
    says_hello(&d, "u");
}

#[test]
fn packages_are_reattached_from_their_pins_and_installed_again_if_the_cache_lost_them() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let dir = env.function(
        "six",
        &[("f.py", SIX_PY), ("requirements.txt", "six>=1.16,<1.17\n")],
    );
    let mut d = daemon_on(&env, &data);
    let info = d.register("six", &dir, json!({}));
    assert_eq!(info["packages"], json!(["six==1.16.0"]), "{info}");
    let uploaded = upload(
        &d,
        "up",
        &[("f.py", SIX_PY), ("requirements.txt", "six==1.16.0\n")],
    );
    assert_eq!(uploaded["packages"], json!(["six==1.16.0"]));
    d.terminate();

    // The function's requirements change on the host: the restart does not resolve
    // them again; it keeps the pins it was registered with, from the cache.
    fs::write(dir.join("requirements.txt"), "six==1.15.0\n").unwrap();
    let mut d = daemon_on(&env, &data);
    let list = listed(&d);
    assert_eq!(list[0]["name"], "six", "{list}");
    assert_eq!(list[0]["packages"], json!(["six==1.16.0"]), "{list}");
    for name in ["six", "up"] {
        let r = d.invoke(name, "{}");
        assert_eq!(
            (r.status, body_json(&r)),
            (200, json!("1.16.0")),
            "{}",
            d.log()
        );
    }
    let status = d.status();
    assert_eq!(status["packages_installed"], 0, "{status}");
    assert_eq!(status["package_cache_hits"], 2, "{status}");
    d.terminate();

    // The cache lost it: installed again from the pin, once for both.
    let python = data.join("packages/python");
    for e in entries(&python) {
        let p = python.join(&e);
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    let d = daemon_on(&env, &data);
    let status = d.status();
    assert_eq!(status["packages_installed"], 1, "{status}\n{}", d.log());
    for name in ["six", "up"] {
        let r = d.invoke(name, "{}");
        assert_eq!(
            (r.status, body_json(&r)),
            (200, json!("1.16.0")),
            "{}",
            d.log()
        );
    }
}

/// SIGKILL while an upload's packages install: the registration was never
/// acknowledged, so the next daemon neither serves it nor keeps its code; what was
/// acknowledged before is served.
#[test]
fn kill_9_in_the_middle_of_a_registration_leaves_nothing_half_made() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let mut d = daemon_on(&env, &data);
    upload(&d, "kept", &[("f.py", HELLO_PY)]);
    let kept = upload_versions(&data, "kept");
    let socket = d.socket().to_path_buf();
    let slow = std::thread::spawn(move || {
        Client::connect(&socket).and_then(|mut c| {
            c.request(
                "PUT",
                "/functions/half",
                Some("application/x-tar"),
                &tar_files(&[("f.py", SIX_PY), ("requirements.txt", "six==1.16.0\n")]),
            )
        })
    });
    // Unpacked, its packages being resolved: kill it there.
    let unpacked = wait_for(Duration::from_secs(30), || {
        let v = upload_versions(&data, "half");
        if v.is_empty() {
            Err(())
        } else {
            Ok(v)
        }
    });
    assert!(
        unpacked.is_ok(),
        "the upload was never unpacked\n{}",
        d.log()
    );
    d.kill();
    let answer = slow.join().unwrap();
    assert!(
        answer.is_err(),
        "the registration finished before the kill: {:?}",
        answer.map(|r| text(&r))
    );
    assert_eq!(upload_versions(&data, "half").len(), 1);

    let d2 = daemon_on(&env, &data);
    // The killed daemon's sandboxes, install sandbox included, are gone.
    env.assert_clean_within(d.pid(), Duration::from_secs(10));
    assert!(upload_versions(&data, "half").is_empty());
    assert_eq!(upload_versions(&data, "kept"), kept);
    assert_eq!(d2.invoke("half", "{}").status, 404);
    let names: Vec<Value> = listed(&d2)
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].clone())
        .collect();
    assert_eq!(names, [json!("kept")]);
    says_hello(&d2, "kept");
    // Its version is not given again.
    upload(&d2, "half", &[("f.py", HELLO_PY)]);
    let again = upload_versions(&data, "half");
    assert!(again[0] > unpacked.unwrap()[0], "{again:?}");
    says_hello(&d2, "half");
}

/// SIGKILL right after a registration was acknowledged: it is served after the
/// restart.
#[test]
fn kill_9_after_an_acknowledged_registration_loses_nothing() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let dir = env.function("p", &[("f.py", HELLO_PY)]);
    let mut d = daemon_on(&env, &data);
    d.register("p", &dir, json!({}));
    upload(&d, "u", &[("f.py", HELLO_PY)]);
    let r = put_workflow(
        &d,
        "w",
        &json!({"steps": [{"type": "task", "function": "p"}]}),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    d.kill();
    let d2 = daemon_on(&env, &data);
    env.assert_clean_within(d.pid(), Duration::from_secs(10));
    says_hello(&d2, "p");
    says_hello(&d2, "u");
    let r = run_workflow(&d2, "w");
    assert_eq!(
        (r.status, body_json(&r)),
        (200, json!("hello flow")),
        "{}",
        text(&r)
    );
}

/// An npm tree is keyed by the function's manifest: found in the cache at a restart,
/// installed again from the manifest if the cache lost it, and a manifest changed
/// since the registration is not served (its tree would not be the registered one).
#[test]
fn npm_packages_are_reattached_and_a_changed_manifest_is_not_served() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let manifest = r#"{"name": "pad", "version": "1.0.0", "dependencies": {"left-pad": "1.3.0"}}"#;
    let dir = env.function(
        "pad",
        &[
            (
                "index.js",
                "exports.main = () => ({padded: require('left-pad')('7', 3, '0')});\n",
            ),
            ("package.json", manifest),
        ],
    );
    let mut d = daemon_on(&env, &data);
    let info = d.register("pad", &dir, json!({"runtime": "nodejs"}));
    assert_eq!(info["packages"], json!(["pad@1.0.0"]), "{info}");
    d.terminate();

    let padded = |d: &Daemon| {
        let r = d.invoke("pad", "{}");
        assert_eq!(r.status, 200, "{}\n{}", text(&r), d.log());
        body_json(&r)["padded"].clone()
    };
    let mut d = daemon_on(&env, &data);
    assert_eq!(padded(&d), json!("007"));
    assert_eq!(d.status()["packages_installed"], 0);
    d.terminate();

    fs::remove_dir_all(data.join("packages/npm")).unwrap();
    let mut d = daemon_on(&env, &data);
    assert_eq!(d.status()["packages_installed"], 1, "{}", d.log());
    assert_eq!(padded(&d), json!("007"));
    d.terminate();

    fs::write(dir.join("package.json"), manifest.replace("1.3.0", "1.2.0")).unwrap();
    let npm = entries(&data.join("packages/npm"));
    let d = daemon_on(&env, &data);
    assert_eq!(d.invoke("pad", "{}").status, 404);
    let log = d.log();
    assert!(
        log.contains("default/pad") && log.contains("changed since it was registered"),
        "{log}"
    );
    // Refused before anything was installed.
    assert_eq!(entries(&data.join("packages/npm")), npm);
    assert_eq!(d.status()["packages_installed"], 0);
}

/// Registrations of one name racing each other: the one the daemon serves is the one
/// a restart serves, and only its code is kept.
#[test]
fn racing_registrations_of_one_name_leave_the_store_and_the_daemon_agreeing() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let mut d = daemon_on(&env, &data);
    std::thread::scope(|s| {
        for i in 0..8 {
            let d = &d;
            s.spawn(move || {
                let code = format!("def f(event):\n    return {i}\n");
                upload(d, "same", &[("f.py", &code)]);
            });
        }
    });
    let answer = |d: &Daemon| {
        let r = d.invoke("same", "{}");
        assert_eq!(r.status, 200, "{}", text(&r));
        body_json(&r)
    };
    let served = answer(&d);
    assert_eq!(upload_versions(&data, "same").len(), 1);
    d.terminate();
    let d = daemon_on(&env, &data);
    assert_eq!(answer(&d), served);
    assert_eq!(upload_versions(&data, "same").len(), 1);
}

/// A registrations database of another schema version stops the daemon before it
/// starts anything, naming the file and both versions, and is left as it was.
#[test]
fn a_registrations_database_of_another_schema_is_refused_and_left_alone() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let mut d = daemon_on(&env, &data);
    upload(&d, "u", &[("f.py", HELLO_PY)]);
    d.terminate();
    let db = data.join("registrations/registry.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE schema_version SET version = 2", [])
        .unwrap();
    drop(conn);
    let code = entries(&data.join("code"));

    let run = env
        .sprout()
        .arg("--socket")
        .arg(env.work_dir().join("refused.sock"))
        .arg("serve")
        .arg("--stem-cells")
        .arg("0")
        .arg("--data-dir")
        .arg(&data)
        .run();
    run.expect_code(3);
    assert!(
        run.stderr.contains(&format!(
            "registrations database {} has schema version 2, this sprout reads version 1",
            db.display()
        )),
        "{run}"
    );
    env.assert_clean(run.pid);
    assert!(!env.work_dir().join("refused.sock").exists());
    assert_eq!(entries(&data.join("code")), code);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (version, functions): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT version FROM schema_version), (SELECT count(*) FROM functions)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((version, functions), (2, 1));
}
