//! OpenWhisk's REST API (`/api/v1`) on the TCP listener: actions put, read, listed
//! and deleted, with OpenWhisk's error shapes and statuses, kept across a restart;
//! and OpenWhisk's official JavaScript client (the `openwhisk` npm package,
//! installed by `.ci/setup` into `/opt/sprout-ci/openwhisk-client`) driving a node.
//! Loopback addresses only, port 0.

use std::io::{Cursor, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use sprout_tests::{body_json, json, require_root, text, Daemon, Env, Value};

const ALPHA: &str =
    "3f2c7a1e-0001-4c4e-9a55-000000000001:alpha-secret-0123456789abcdef0123456789ab";
const BETA: &str = "3f2c7a1e-0002-4c4e-9a55-000000000002:beta-secret-0123456789abcdef0123456789abc";
const WRONG: &str = "3f2c7a1e-0001-4c4e-9a55-000000000001:not-the-secret-0123456789abcdef012345678";

const CLIENT_DIR: &str = "/opt/sprout-ci/openwhisk-client/node_modules";

fn keys(env: &Env) -> PathBuf {
    sprout_tests::invoker::key_file(env, "keys", &format!("alpha {ALPHA}\nbeta {BETA}\n"), 0o600)
}

fn daemon(env: &Env, data: &Path) -> Daemon {
    let auth = keys(env);
    Daemon::start_on(
        env,
        data,
        &[
            "--stem-cells",
            "0",
            "--listen",
            "127.0.0.1:0",
            "--auth",
            auth.to_str().unwrap(),
        ],
    )
}

/// Base64 of a zip of `files`.
fn zip_b64(files: &[(&str, &str)]) -> String {
    let mut out = Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut out);
        for (path, body) in files {
            w.start_file(*path, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(body.as_bytes()).unwrap();
        }
        w.finish().unwrap();
    }
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

#[track_caller]
fn call(d: &Daemon, key: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let r = d
        .tcp_client(Some(key), None)
        .request(method, path, Some("application/json"), bytes.as_bytes())
        .unwrap();
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!(text(&r)));
    (r.status, v)
}

#[track_caller]
fn ow_error(v: &Value) -> &str {
    let code = v["code"].as_str().unwrap_or_default();
    assert!(
        code.len() == 32 && code.chars().all(|c| c.is_ascii_hexdigit()),
        "OpenWhisk's error shape: {v}"
    );
    v["error"].as_str().unwrap()
}

const PY: &str =
    "def main(args):\n    return {\"greeting\": \"hello \" + args.get(\"name\", \"?\")}\n";

#[test]
fn actions_are_functions_put_read_listed_deleted_and_kept() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let mut d = daemon(&env, &data);
    let base = "/api/v1/namespaces/_/actions";
    let py = json!({"exec": {"kind": "python:3", "code": PY, "main": "main"},
                    "parameters": [{"key": "name", "value": "d"},
                                   {"key": "TOKEN", "value": "t", "init": true}],
                    "annotations": [{"key": "provide-api-key", "value": false}],
                    "limits": {"timeout": 5000, "memory": 128, "logs": 2}});
    let (s, v) = call(&d, ALPHA, "PUT", &format!("{base}/hello"), Some(py.clone()));
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            &v["namespace"],
            &v["name"],
            &v["version"],
            &v["exec"]["kind"]
        ),
        (
            &json!("alpha"),
            &json!("hello"),
            &v["version"],
            &json!("python:3")
        )
    );
    assert_eq!(
        v["limits"],
        json!({"timeout": 5000, "memory": 128, "logs": 2, "concurrency": 1})
    );
    // The action is a function of its namespace, by sprout's API too.
    let r = d.request("GET", "/namespaces/alpha/functions", None, b"");
    let listed = body_json(&r);
    assert_eq!(listed[0]["name"], json!("hello"), "{listed}");
    assert_eq!(listed[0]["handler"], json!("main__:main"));

    // Without overwrite: 409 in OpenWhisk's shape; with it, a new version.
    let (s, v) = call(&d, ALPHA, "PUT", &format!("{base}/hello"), Some(py.clone()));
    assert_eq!((s, ow_error(&v)), (409, "resource already exists"));
    let (s, v2) = call(
        &d,
        ALPHA,
        "PUT",
        &format!("{base}/hello?overwrite=true"),
        Some(py),
    );
    assert_eq!(s, 200, "{v2}");
    assert_ne!(v2["version"], v["version"]);

    // A package's action, as the npm client sends it and percent-encoded.
    let node = json!({"exec": {"kind": "nodejs:20",
                               "code": zip_b64(&[("index.js", "exports.main = p => p")]),
                               "binary": true}});
    let (s, v) = call(&d, ALPHA, "PUT", &format!("{base}/pkg/echo"), Some(node));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], json!("pkg/echo"));
    let (s, v) = call(&d, ALPHA, "GET", &format!("{base}/pkg%2Fecho"), None);
    assert_eq!((s, &v["exec"]["binary"]), (200, &json!(true)), "{v}");

    // Refusals with OpenWhisk's texts.
    for (body, says) in [
        (
            json!({"exec": {"kind": "python:3", "code": zip_b64(&[("x.py", "")]), "binary": true}}),
            "Zip file does not include __main__.py",
        ),
        (
            json!({"exec": {"kind": "nodejs:20", "code": zip_b64(&[("x.js", "")]), "binary": true}}),
            "Zipped actions must contain either package.json or index.js at the root.",
        ),
        (
            json!({"exec": {"kind": "java:8", "code": "x"}}),
            "'java:8' is not supported",
        ),
        (
            json!({"exec": {"kind": "blackbox", "image": "me/img"}}),
            "exec.image",
        ),
    ] {
        let (s, v) = call(&d, ALPHA, "PUT", &format!("{base}/bad"), Some(body));
        assert_eq!(s, 400, "{v}");
        assert!(ow_error(&v).contains(says), "{v}");
    }
    let (s, v) = call(&d, ALPHA, "GET", &format!("{base}/nope"), None);
    assert_eq!(
        (s, ow_error(&v)),
        (404, "The requested resource does not exist.")
    );
    // Keys: a wrong one is 401, another namespace's 403, both in OpenWhisk's shape.
    let (s, v) = call(&d, WRONG, "GET", base, None);
    assert_eq!(s, 401, "{v}");
    ow_error(&v);
    let (s, v) = call(&d, BETA, "GET", "/api/v1/namespaces/alpha/actions", None);
    assert_eq!(s, 403, "{v}");
    ow_error(&v);
    let (s, v) = call(&d, BETA, "GET", "/api/v1/namespaces", None);
    assert_eq!((s, v), (200, json!(["beta"])));

    let (s, listed) = call(&d, ALPHA, "GET", base, None);
    assert_eq!(s, 200);
    let names: Vec<&Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["name"])
        .collect();
    assert_eq!(names, [&json!("hello"), &json!("pkg/echo")]);
    let (_, one) = call(&d, ALPHA, "GET", &format!("{base}?limit=1&skip=1"), None);
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["name"], json!("pkg/echo"));

    // A restart keeps the action whole: parameters, annotations, code, limits.
    let (_, before) = call(&d, ALPHA, "GET", &format!("{base}/hello"), None);
    assert_eq!(before["exec"]["code"], json!(PY));
    assert_eq!(
        before["parameters"][1],
        json!({"key": "TOKEN", "value": "t", "init": true})
    );
    d.terminate();
    env.assert_clean(d.pid());
    let mut d = daemon(&env, &data);
    let (s, after) = call(&d, ALPHA, "GET", &format!("{base}/hello"), None);
    assert_eq!((s, &after), (200, &before));

    let (s, v) = call(&d, ALPHA, "DELETE", &format!("{base}/pkg/echo"), None);
    assert_eq!((s, &v["name"]), (200, &json!("pkg/echo")), "{v}");
    let (s, _) = call(&d, ALPHA, "GET", &format!("{base}/pkg/echo"), None);
    assert_eq!(s, 404);
    d.terminate();
    env.assert_clean(d.pid());
}

/// Runs `client.js MODE` against `d`; its steps, one JSON value each.
fn npm_client(d: &Daemon, mode: &str) -> Vec<Value> {
    let node_modules = Path::new(CLIENT_DIR);
    if !node_modules.join("openwhisk").exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{CLIENT_DIR}/openwhisk is missing: run .ci/setup"
        );
        eprintln!("skipped: {CLIENT_DIR}/openwhisk is missing (run .ci/setup)");
        return Vec::new();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openwhisk/client.js");
    let out = Command::new("/usr/bin/node")
        .arg(&script)
        .arg(mode)
        .env("NODE_PATH", node_modules)
        .env("SPROUT_URL", d.tcp_url())
        .env("SPROUT_KEY", ALPHA)
        .env("SPROUT_WRONG_KEY", WRONG)
        .env(
            "SPROUT_ZIP_NODE",
            zip_b64(&[
                ("package.json", r#"{"main": "lib/app.js"}"#),
                ("lib/app.js", "exports.main = p => { console.log('hello stdout'); return {greeting: 'hello ' + p.name, dflt: p.dflt} }"),
            ]),
        )
        .env(
            "SPROUT_ZIP_PY",
            zip_b64(&[
                ("__main__.py", "from helper import greet\ndef main(args):\n    print('hello stdout')\n    return {'greeting': greet(args.get('name')), 'dflt': args.get('dflt')}\n"),
                ("helper.py", "def greet(n):\n    return 'hello ' + str(n)\n"),
            ]),
        )
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client.js {mode} failed: {}\nstdout:\n{stdout}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn steps<'a>(all: &'a [Value], step: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|s| s["step"] == json!(step))
        .map(|s| &s["value"])
        .collect()
}

#[test]
fn the_npm_client_creates_reads_and_lists_actions_and_a_wrong_key_is_refused() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let mut d = daemon(&env, &data);
    let all = npm_client(&d, "actions");
    if !all.is_empty() {
        assert_eq!(
            steps(&all, "created"),
            [
                &json!("pyinline"),
                &json!("jsinline"),
                &json!("pkg/jszip"),
                &json!("pyzip")
            ]
        );
        assert_eq!(
            steps(&all, "listed"),
            [&json!(["jsinline", "pkg/jszip", "pyinline", "pyzip"])]
        );
        assert_eq!(steps(&all, "conflict"), [&json!(409)]);
        assert_eq!(steps(&all, "wrong key"), [&json!(401)]);
    }
    d.terminate();
    env.assert_clean(d.pid());
}

/// Needs `Request::Activate` (issue 15's core semantics, another branch) to run
/// activations: until it is merged the agent answers 400 "not served yet".
#[test]
fn the_npm_client_invokes_and_reads_activations() {
    let env = require_root!();
    let data = env.work_dir().join("data");
    let mut d = daemon(&env, &data);
    let all = npm_client(&d, "invokes");
    if !all.is_empty() {
        for b in steps(&all, "blocking") {
            assert_eq!(b["result"]["greeting"], json!("hello ow"), "{b}");
            // The action's default parameter, merged under the invocation's.
            assert_eq!(b["result"]["dflt"], json!("d"), "{b}");
            assert_eq!(b["logs"], json!(true), "{b}");
        }
        for r in steps(&all, "result") {
            assert_eq!(r["result"]["greeting"], json!("hello r"), "{r}");
        }
        let activations = steps(&all, "activation");
        assert_eq!(activations.len(), 4);
        for a in activations {
            assert_eq!(a["result"]["greeting"], json!("hello nb"), "{a}");
            assert_eq!(
                (&a["success"], &a["logs"]),
                (&json!(true), &json!(true)),
                "{a}"
            );
        }
        assert!(steps(&all, "activations")[0].as_u64().unwrap() >= 4);
        assert_eq!(steps(&all, "deleted").len(), 4);
    }
    d.terminate();
    env.assert_clean(d.pid());
}
