//! Namespaces are the tenant boundary (issue 9, finding 6): a function of one
//! namespace cannot run, see or get attached the code of another namespace's
//! function, whatever way it asks (`sprout.call` in its sandbox, `call_async` and
//! `map` in siblings, a workflow step); it is told `not_found` in exactly the words
//! used for a name that exists nowhere. The same name in two namespaces is two
//! functions. Within a namespace, calls work as before.
//!
//! The hostile functions are `tests/functions/ns-secret` (an `API_KEY` line in its
//! code) and `tests/functions/ns-thief` (asks for a target every way, then searches
//! `/fns`, `/workflow` and its mount table for what it may have been given).

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use sprout_tests::{
    body_json, require_root, sandbox_cgroup_dir, text, workspace_root, Daemon, Value,
};

/// The secret in `ns-secret/f.py`.
const API_KEY: &str = "sprout-ns-secret-4f1c9e";
/// A name no namespace has.
const NOSUCH: &str = "sprout-ns-nosuch";

fn hostile(name: &str) -> PathBuf {
    workspace_root().join("tests/functions").join(name)
}

fn json(body: &Value) -> Vec<u8> {
    body.to_string().into_bytes()
}

/// `PUT /namespaces/{ns}/functions/{name}`; asserts 200 and that the answer names
/// the namespace.
#[track_caller]
fn register_in(d: &Daemon, ns: &str, name: &str, dir: &std::path::Path) {
    let path = format!("/namespaces/{ns}/functions/{name}");
    let body = serde_json::json!({ "path": dir.to_str().unwrap() });
    let r = d.request("PUT", &path, Some("application/json"), &json(&body));
    assert_eq!(r.status, 200, "PUT {path}: {}", text(&r));
    let info = body_json(&r);
    assert_eq!(
        (info["namespace"].as_str(), info["name"].as_str()),
        (Some(ns), Some(name)),
        "{info}"
    );
}

#[track_caller]
fn invoke_in(d: &Daemon, ns: &str, name: &str, event: &Value) -> sprout_tests::ClientResponse {
    let path = format!("/namespaces/{ns}/functions/{name}/invoke");
    d.request("POST", &path, Some("application/json"), &json(event))
}

/// The thief's report for `target`, run in namespace `ns`.
#[track_caller]
fn thief_report(d: &Daemon, ns: &str, target: &str) -> Value {
    let r = invoke_in(d, ns, "thief", &serde_json::json!({ "target": target }));
    assert_eq!(r.status, 200, "thief in {ns} -> {target}: {}", text(&r));
    body_json(&r)
}

/// The `/fns/...` mounts in the mount tables of every process of the daemon's
/// sandboxes, read from the host (the sandboxes' pids from their cgroups, v1 or v2):
/// how many processes were read, the sandboxes with such a mount, and the lines.
fn sandbox_fns_mounts(d: &Daemon) -> (usize, BTreeSet<String>, Vec<String>) {
    let mut seen = 0;
    let mut with_fns = BTreeSet::new();
    let mut lines = Vec::new();
    for sandbox in d.sandboxes() {
        let procs = sandbox_cgroup_dir(d.pid(), &sandbox, "pids").join("cgroup.procs");
        let Ok(pids) = fs::read_to_string(&procs) else {
            continue;
        };
        for pid in pids.lines().filter_map(|p| p.trim().parse::<u32>().ok()) {
            if let Some(table) = sprout_tests::mountinfo(pid) {
                seen += 1;
                for l in table.lines().filter(|l| l.contains("/fns/")) {
                    with_fns.insert(sandbox.clone());
                    lines.push(format!("{sandbox} pid {pid}: {l}"));
                }
            }
        }
    }
    (seen, with_fns, lines)
}

/// The error every way of calling reported: (failed, message) per way.
fn refusals(report: &Value) -> Vec<(String, String)> {
    ["call", "call_async", "map"]
        .iter()
        .map(|way| {
            let e = &report[way]["error"];
            assert!(
                e.is_object() && report[way].get("ok").is_none(),
                "{way} was not refused: {report}"
            );
            assert_eq!(e["failed"], true, "{way}: {report}");
            (
                way.to_string(),
                e["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn another_namespaces_function_cannot_be_called_seen_or_attached() {
    let env = require_root!();
    let d = env.daemon();
    register_in(&d, "a", "secret", &hostile("ns-secret"));
    register_in(&d, "b", "thief", &hostile("ns-thief"));
    // The control: the same thief in the secret's own namespace reaches it every way,
    // and the probes below see what it was given (they are not blind).
    register_in(&d, "a", "thief", &hostile("ns-thief"));

    let own = thief_report(&d, "a", "secret");
    for way in ["call", "call_async"] {
        assert_eq!(own[way]["ok"]["secret"], API_KEY, "{way} in a: {own}");
    }
    assert_eq!(own["map"]["ok"][0]["secret"], API_KEY, "map in a: {own}");
    let attached = own["api_keys"].as_array().unwrap();
    assert!(
        attached
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("/fns/secret-")),
        "the in-sandbox call in a did not attach secret under /fns: {own}"
    );
    let (seen, attached_before, lines) = sandbox_fns_mounts(&d);
    assert!(
        seen > 0,
        "no sandbox process found to read the mount table of"
    );
    // a's thief's sandbox, and only it (secret's own siblings attach nothing).
    assert_eq!(attached_before.len(), 1, "{lines:#?}");
    assert!(
        lines.iter().all(|l| l.contains("/fns/secret-")),
        "the host sees no /fns/secret mount in a's sandbox: {lines:#?}"
    );

    // The attack, from b: every way is refused, as for a name that exists nowhere.
    let stolen = thief_report(&d, "b", "secret");
    let nowhere = thief_report(&d, "b", NOSUCH);
    let stolen_refusals = refusals(&stolen);
    let nowhere_refusals = refusals(&nowhere);
    for ((way, got), (_, none)) in stolen_refusals.iter().zip(&nowhere_refusals) {
        assert_eq!(
            got.replace("\"secret\"", "\"NAME\""),
            none.replace(&format!("\"{NOSUCH}\""), "\"NAME\""),
            "{way}: the refusal tells an existing name in another namespace apart"
        );
        assert!(
            got.contains("function \"secret\" is not registered in namespace \"b\""),
            "{way}: {got}"
        );
    }
    for report in [&stolen, &nowhere] {
        assert_eq!(report["fns"], serde_json::json!([]), "/fns in b: {report}");
        assert_eq!(report["api_keys"], serde_json::json!([]), "{report}");
        assert_eq!(report["fns_mounts"], serde_json::json!([]), "{report}");
    }
    // From the host: b's sandbox has nothing of secret's mounted (a's still has).
    let status = d.status();
    let ns_b = status["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["namespace"] == "b")
        .cloned()
        .unwrap_or_else(|| panic!("no namespace b in /status: {status}"));
    assert!(ns_b["sandboxes"].as_u64() >= Some(1), "{status}");
    let (_, attached_after, lines) = sandbox_fns_mounts(&d);
    assert_eq!(
        attached_after, attached_before,
        "a sandbox of b got a /fns mount: {lines:#?}"
    );

    // A client gets the same answer as a function: not_found, the same words.
    for name in ["secret", NOSUCH] {
        let r = invoke_in(&d, "b", name, &serde_json::json!({}));
        assert_eq!(r.status, 404, "{}", text(&r));
        let e = body_json(&r);
        assert_eq!(e["error"]["kind"], "not_found", "{e}");
        assert_eq!(
            e["error"]["message"],
            format!("function \"{name}\" is not registered in namespace \"b\""),
        );
    }

    // Workflows resolve their steps in their namespace: b cannot name secret.
    let flow = serde_json::json!({"steps": [{"type": "task", "function": "secret"}]});
    let r = d.request(
        "PUT",
        "/namespaces/b/workflows/steal",
        Some("application/json"),
        &json(&flow),
    );
    assert_eq!(r.status, 400, "{}", text(&r));
    assert!(
        text(&r).contains("functions not registered"),
        "{}",
        text(&r)
    );
    let r = d.request(
        "PUT",
        "/namespaces/a/workflows/fetch",
        Some("application/json"),
        &json(&flow),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r)["namespace"], "a");
    let r = d.request("POST", "/namespaces/a/workflows/fetch/invoke", None, b"{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r)["secret"], API_KEY);
    let r = d.request("POST", "/workflows/fetch/invoke", None, b"{}");
    assert_eq!(r.status, 404, "{}", text(&r));
    assert!(
        text(&r).contains("not registered in namespace \\\"default\\\""),
        "{}",
        text(&r)
    );
}

#[test]
fn the_same_name_in_two_namespaces_is_two_functions() {
    let env = require_root!();
    let d = env.daemon();
    let mine = env.function(
        "twin-default",
        &[("f.py", "def f(e):\n    return 'default'\n")],
    );
    let theirs = env.function("twin-t", &[("f.py", "def f(e):\n    return 't'\n")]);
    // `/functions/{name}` acts in `default`.
    let info = d.register("twin", &mine, serde_json::json!({}));
    assert_eq!(info["namespace"], "default");
    register_in(&d, "t", "twin", &theirs);
    // Several times each: cold, then warm (the event loop's fast path), interleaved.
    for _ in 0..3 {
        let r = d.invoke("twin", "{}");
        assert_eq!((r.status, text(&r)), (200, "\"default\"".to_owned()));
        let r = invoke_in(&d, "t", "twin", &serde_json::json!({}));
        assert_eq!((r.status, text(&r)), (200, "\"t\"".to_owned()));
        let r = d.request(
            "POST",
            "/namespaces/default/functions/twin/invoke",
            None,
            b"{}",
        );
        assert_eq!((r.status, text(&r)), (200, "\"default\"".to_owned()));
    }
    // Listings are per namespace and say which.
    let list = body_json(&d.request("GET", "/functions", None, b""));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        (list[0]["namespace"].as_str(), list[0]["path"].as_str()),
        (Some("default"), mine.canonicalize().unwrap().to_str())
    );
    let list = body_json(&d.request("GET", "/namespaces/t/functions", None, b""));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["namespace"], "t");
    let status = d.status();
    let names: Vec<&str> = status["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "t"], "{status}");
    assert_eq!(status["functions"], 2, "{status}");
    // Removing one leaves the other.
    let r = d.request("DELETE", "/namespaces/t/functions/twin", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        body_json(&r),
        serde_json::json!({"removed": "twin", "namespace": "t"})
    );
    let r = invoke_in(&d, "t", "twin", &serde_json::json!({}));
    assert_eq!(r.status, 404, "{}", text(&r));
    let r = d.invoke("twin", "{}");
    assert_eq!((r.status, text(&r)), (200, "\"default\"".to_owned()));
}

#[test]
fn bad_namespace_names_are_refused_naming_the_rule() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function("ok", &[("f.py", "def f(e):\n    return 1\n")]);
    let body = json(&serde_json::json!({ "path": dir.to_str().unwrap() }));
    let long = "n".repeat(257);
    for ns in ["_", "-x", ".x", "@x", "a%20b", "a%2Fb", long.as_str()] {
        for (method, path, body) in [
            (
                "PUT",
                format!("/namespaces/{ns}/functions/f"),
                body.as_slice(),
            ),
            (
                "POST",
                format!("/namespaces/{ns}/functions/f/invoke"),
                b"{}".as_slice(),
            ),
            ("GET", format!("/namespaces/{ns}/functions"), b"".as_slice()),
            ("GET", format!("/namespaces/{ns}/workflows"), b"".as_slice()),
        ] {
            let r = d.request(method, &path, Some("application/json"), body);
            assert_eq!(r.status, 400, "{method} {path}: {}", text(&r));
            let e = body_json(&r);
            let message = e["error"]["message"].as_str().unwrap();
            assert_eq!(e["error"]["kind"], "bad_request", "{e}");
            assert!(
                message.starts_with("invalid namespace")
                    && message.contains("1 to 256 characters of A-Z a-z 0-9 _ @ . -"),
                "{method} {path}: {message}"
            );
        }
    }
    // A body naming another namespace than its path.
    let both = json(&serde_json::json!({ "path": dir.to_str().unwrap(), "namespace": "t" }));
    let r = d.request("PUT", "/functions/f", Some("application/json"), &both);
    assert_eq!(r.status, 400, "{}", text(&r));
    assert!(
        text(&r).contains("is not the path's namespace"),
        "{}",
        text(&r)
    );
    let r = d.request(
        "PUT",
        "/namespaces/t/functions/f",
        Some("application/json"),
        &both,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    // OpenWhisk-style names are fine.
    register_in(&d, "user@example.com_dev", "f", &dir);
    let r = invoke_in(&d, "user@example.com_dev", "f", &serde_json::json!({}));
    assert_eq!((r.status, text(&r)), (200, "1".to_owned()));
    assert_eq!(d.status()["functions"], 2);
}

#[test]
fn the_cli_takes_a_namespace_on_the_daemon_and_embedded() {
    let env = require_root!();
    let d = env.daemon();
    let secret = hostile("ns-secret");
    d.cli(&env)
        .args(["fn", "add", "secret"])
        .arg(&secret)
        .args(["--namespace", "a"])
        .run()
        .success();
    let out = d
        .cli(&env)
        .args(["invoke", "secret", "{\"n\": 1}", "--namespace", "a"])
        .run();
    out.success();
    assert_eq!(out.json()["secret"], API_KEY, "{out}");
    // Not in the default namespace, nor in another.
    for ns in [None, Some("b")] {
        let mut cmd = d.cli(&env).args(["invoke", "secret"]);
        if let Some(ns) = ns {
            cmd = cmd.args(["--namespace", ns]);
        }
        let out = cmd.run();
        out.expect_code(2);
        let want = format!(
            "function \"secret\" is not registered in namespace \"{}\"",
            ns.unwrap_or("default")
        );
        assert!(out.stderr.contains(&want), "{out}");
    }
    let out = d.cli(&env).args(["fn", "ls", "--namespace", "a"]).run();
    out.success();
    let listing = out.stdout.clone();
    assert!(
        listing
            .lines()
            .next()
            .is_some_and(|h| h.starts_with("NAME ") && h.contains(" NAMESPACE ")),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["secret", "a"])),
        "{listing}"
    );
    let out = d.cli(&env).args(["fn", "ls"]).run();
    out.success();
    assert!(!out.stdout.clone().contains("secret"), "{out}");
    let out = d
        .cli(&env)
        .args(["invoke", "secret", "--namespace", "bad ns"])
        .run();
    out.expect_code(2);
    assert!(
        out.stderr.clone().contains("invalid namespace \"bad ns\""),
        "{out}"
    );
    d.cli(&env)
        .args(["fn", "rm", "secret", "--namespace", "a"])
        .run()
        .success();
    assert_eq!(d.status()["functions"], 0);
    // An upload goes to the namespace too.
    d.cli(&env)
        .args(["fn", "add", "up"])
        .arg(&secret)
        .args(["--upload", "--memory", "64", "--namespace", "u"])
        .run()
        .success();
    let out = d.cli(&env).args(["invoke", "up", "--namespace", "u"]).run();
    out.success();
    assert_eq!(out.json()["secret"], API_KEY, "{out}");
    d.cli(&env).args(["invoke", "up"]).run().expect_code(2);

    // Embedded: the function and its --with callees are registered in the namespace.
    let pinger = workspace_root().join("examples/pinger");
    let ponger = workspace_root().join("examples/ponger");
    let out = env
        .sprout()
        .arg("invoke")
        .arg(&pinger)
        .arg("\"ponger\"")
        .arg("--with")
        .arg(&ponger)
        .args(["--namespace", "t"])
        .run();
    out.success();
    assert!(out.stdout.clone().contains("pong from ponger"), "{out}");
    let out = env
        .sprout()
        .arg("invoke")
        .arg(&pinger)
        .args(["--namespace", "_"])
        .run();
    out.expect_code(2);
    assert!(
        out.stderr.clone().contains("invalid namespace \"_\""),
        "{out}"
    );
}
