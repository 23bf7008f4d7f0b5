//! Functions' packages (issue 13): `requirements.txt` resolved and installed once per
//! node from the package index, in install sandboxes, into a cache shared by every
//! function that pins the same archive, mounted read-only under `/deps`; refused
//! requirement lines; failures that leave nothing behind; concurrent registrations
//! that share one install; `sprout pkg ls|gc`. Real packages from PyPI: small ones
//! where a big one proves nothing, numpy and pandas where the issue names them.

use std::fs;
use std::path::Path;

use sprout_tests::{body_json, json, require_root, text, Daemon, Value};

/// Invokes `name` with `{}`, asserts 200, returns the result.
#[track_caller]
fn call(d: &Daemon, name: &str) -> Value {
    let r = d.invoke(name, "{}");
    assert_eq!(r.status, 200, "{name}: {}\n{}", text(&r), d.log());
    body_json(&r)
}

/// The entries (names) of `dir`, sorted; empty when it does not exist.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

const VERSION_PY: &str = "import sys\n\
import numpy\n\
def f(event):\n\
\x20   a = numpy.array([[1, 2], [3, 4]])\n\
\x20   return {'version': numpy.__version__, 'sum': int(a.sum()), 'file': numpy.__file__,\n\
\x20           'path': [p for p in sys.path if p.startswith('/deps/')]}\n";

#[test]
fn two_numpy_versions_run_side_by_side_each_seeing_its_own() {
    let env = require_root!();
    let d = env.daemon();
    for (name, pin) in [("np21", "numpy==2.1.3"), ("np22", "numpy==2.2.6")] {
        let dir = env.function(
            name,
            &[
                ("f.py", VERSION_PY),
                ("requirements.txt", &format!("{pin}\n")),
            ],
        );
        let info = d.register(name, &dir, json!({}));
        assert_eq!(info["packages"], json!([pin]), "{info}");
    }
    for (name, version) in [("np21", "2.1.3"), ("np22", "2.2.6")] {
        let out = call(&d, name);
        assert_eq!(out["version"], version, "{out}");
        assert_eq!(out["sum"], 10, "{out}");
        let file = out["file"].as_str().unwrap();
        assert!(
            file.starts_with(&format!("/deps/numpy-{version}-cpython-")),
            "{out}"
        );
        // Exactly its own packages on its import path.
        assert_eq!(out["path"].as_array().unwrap().len(), 1, "{out}");
    }
    let status = d.status();
    assert_eq!(status["packages_installed"], 2, "{status}");
    let cache = d.data_dir().join("packages/python");
    let dirs: Vec<_> = entries(&cache)
        .into_iter()
        .filter(|e| !e.ends_with(".json"))
        .collect();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    assert!(dirs[0].starts_with("numpy-2.1.3-") && dirs[1].starts_with("numpy-2.2.6-"));
}

#[test]
fn unpinned_requirements_are_resolved_once_and_recorded_with_the_function() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function(
        "req",
        &[
            (
                "f.py",
                "import requests\ndef f(event):\n    return {'version': requests.__version__, 'file': requests.__file__}\n",
            ),
            ("requirements.txt", "requests>=2.31,<3  # and its four dependencies\n"),
        ],
    );
    let info = d.register("req", &dir, json!({}));
    let pins: Vec<&str> = info["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        pins.len(),
        5,
        "requests, certifi, charset-normalizer, idna, urllib3: {info}"
    );
    let requests = pins.iter().find(|p| p.starts_with("requests==")).unwrap();
    let out = call(&d, "req");
    assert_eq!(
        format!("requests=={}", out["version"].as_str().unwrap()),
        *requests,
        "{out}"
    );
    assert!(out["file"].as_str().unwrap().starts_with("/deps/requests-"));
    // The resolution is the function's: listing it shows the same pins.
    let listed = d.request("GET", "/functions", None, b"");
    let listed = body_json(&listed);
    assert_eq!(listed[0]["packages"], info["packages"], "{listed}");
}

#[test]
fn pandas_imports_with_its_dependencies() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function(
        "pd",
        &[
            (
                "f.py",
                "import pandas\ndef f(event):\n    df = pandas.DataFrame([[0, 1, 2], [3, 4, 5]])\n    return {'sum': int(df.values.sum()), 'version': pandas.__version__}\n",
            ),
            ("requirements.txt", "pandas==2.2.3\n"),
        ],
    );
    d.register("pd", &dir, json!({"memory_mb": 256}));
    let out = call(&d, "pd");
    assert_eq!(out, json!({"sum": 15, "version": "2.2.3"}));
}

#[test]
fn an_install_failure_names_the_package_quotes_pip_and_registers_nothing() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function(
        "bad",
        &[
            ("f.py", "def f(event):\n    return 1\n"),
            (
                "requirements.txt",
                "six==1.16.0\nsprout-no-such-package-xyzzy==1.0\n",
            ),
        ],
    );
    let (status, body) = d.try_register("bad", &dir);
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("sprout-no-such-package-xyzzy"), "{body}");
    assert!(
        message.contains("No matching distribution") || message.contains("Could not find"),
        "pip's own message: {body}"
    );
    assert_eq!(body["error"]["kind"], "package_error", "{body}");
    assert_eq!(d.request("GET", "/functions", None, b"").body, b"[]");
    // Resolution failed: nothing was installed, and no work is left over.
    let cache = d.data_dir().join("packages");
    assert!(entries(&cache.join("python")).is_empty());
    assert!(entries(&cache.join("work")).is_empty());
}

#[test]
fn lines_that_change_where_packages_come_from_are_refused() {
    let env = require_root!();
    let d = env.daemon();
    for (n, line) in [
        "--extra-index-url https://example.invalid/simple",
        "six @ https://example.invalid/six.whl",
        "git+https://example.invalid/six.git",
        "./vendored/six",
    ]
    .iter()
    .enumerate()
    {
        let dir = env.function(
            "refused",
            &[
                ("f.py", "def f(event):\n    return 1\n"),
                (
                    "requirements.txt",
                    &format!("# pinned\nsix==1.16.0\n{line}\n"),
                ),
            ],
        );
        let (status, body) = d.try_register("refused", &dir);
        assert_eq!(status, 400, "{line}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("requirements.txt line 3"), "{n}: {body}");
        assert!(
            message.starts_with("function default/refused's packages"),
            "{body}"
        );
    }
    assert_eq!(d.status()["packages_installed"], 0);
}

#[test]
fn concurrent_registrations_share_one_install() {
    let env = require_root!();
    let d = env.daemon();
    let dirs: Vec<_> = (0..2)
        .map(|i| {
            env.function(
                &format!("six{i}"),
                &[
                    (
                        "f.py",
                        "import six\ndef f(event):\n    return six.__version__\n",
                    ),
                    ("requirements.txt", "six==1.16.0\n"),
                ],
            )
        })
        .collect();
    std::thread::scope(|s| {
        for (i, dir) in dirs.iter().enumerate() {
            let d = &d;
            s.spawn(move || d.register(&format!("six{i}"), dir, json!({})));
        }
    });
    let status = d.status();
    assert_eq!(status["packages_installed"], 1, "{status}");
    assert_eq!(status["package_cache_hits"], 1, "{status}");
    for i in 0..2 {
        assert_eq!(call(&d, &format!("six{i}")), json!("1.16.0"));
    }
}

#[test]
fn pkg_ls_shows_size_and_users_and_pkg_gc_removes_only_unused_packages() {
    let env = require_root!();
    let d = env.daemon();
    for (name, pin) in [("a", "six==1.16.0"), ("b", "idna==3.7")] {
        let dir = env.function(
            name,
            &[
                ("f.py", "def f(event):\n    return 1\n"),
                ("requirements.txt", &format!("{pin}\n")),
            ],
        );
        d.register(name, &dir, json!({}));
    }
    let sprout = |args: &[&str]| {
        env.sprout()
            .arg("--socket")
            .arg(d.socket())
            .args(args)
            .run()
    };
    let ls = sprout(&["pkg", "ls"]);
    ls.success();
    assert!(
        ls.stdout.contains("six") && ls.stdout.contains("default/a"),
        "{ls}"
    );
    assert!(
        ls.stdout.contains("idna") && ls.stdout.contains("default/b"),
        "{ls}"
    );
    assert!(ls.stdout.contains("KiB"), "sizes: {ls}");
    let r = d.request("DELETE", "/functions/b", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    let gc = sprout(&["pkg", "gc"]);
    gc.success();
    assert!(gc.stdout.contains("removed 1 packages"), "{gc}");
    assert!(gc.stdout.contains("idna"), "{gc}");
    let listed = body_json(&d.request("GET", "/packages", None, b""));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "six");
    assert_eq!(listed[0]["users"], json!(["default/a"]));
    assert_eq!(call(&d, "a"), json!(1));
}

/// OpenLambda's `flask-test` example, unchanged: a Flask view answering 418 with a
/// header and a body, and its `ol.yaml` limiting `/run` to GET and POST.
const FLASK_APP: &str = "from flask import Flask, request\n\
app = Flask(__name__)\n\
@app.route('/')\n\
def hi():\n\
\x20   return 'hi\\n', 418, {'A': 'B'}\n\
@app.route('/echo', methods=['POST'])\n\
def echo():\n\
\x20   return request.get_data()\n";

#[test]
fn a_flask_app_behind_run_answers_exactly_as_flask_did() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function(
        "flask-test",
        &[
            ("f.py", FLASK_APP),
            ("requirements.txt", "flask==3.0.3\n"),
            (
                "ol.yaml",
                "triggers:\n  http:\n    - method: GET\n    - method: POST\n",
            ),
        ],
    );
    d.register("flask-test", &dir, json!({}));
    let r = d.request("GET", "/run/flask-test", None, b"");
    assert_eq!(r.status, 418, "{}\n{}", text(&r), d.log());
    assert_eq!(r.header("a"), Some("B"));
    assert_eq!(r.body, b"hi\n");
    let r = d.request(
        "POST",
        "/run/flask-test/echo",
        Some("text/plain"),
        b"echo me",
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.body, b"echo me");
    let r = d.request("PUT", "/run/flask-test", None, b"");
    assert_eq!(r.status, 405);
    assert_eq!(
        r.body,
        b"HTTP method not allowed. Sent: PUT, Allowed: [GET POST]\n"
    );
}

#[test]
fn a_fastapi_app_behind_run() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function(
        "fastapi-test",
        &[
            (
                "f.py",
                "from fastapi import FastAPI\napp = FastAPI()\n@app.get('/')\ndef root():\n    return {'message': 'hello world'}\n",
            ),
            ("requirements.txt", "fastapi==0.115.6\n"),
        ],
    );
    d.register("fastapi-test", &dir, json!({"memory_mb": 256}));
    let r = d.request("GET", "/run/fastapi-test", None, b"");
    assert_eq!(r.status, 200, "{}\n{}", text(&r), d.log());
    assert_eq!(body_json(&r), json!({"message": "hello world"}));
}

/// FunctionBench's `pyaes` is published only as source: it is built (setup.py run)
/// in the install sandbox, and the function gets the built package.
#[test]
fn a_package_published_only_as_source_is_built_in_the_install_sandbox() {
    let env = require_root!();
    let d = env.daemon();
    let dir = env.function(
        "aes",
        &[
            (
                "f.py",
                "import pyaes\ndef f(event):\n    aes = pyaes.AESModeOfOperationCTR(b'k' * 32)\n    secret = aes.encrypt(b'attack at dawn')\n    back = pyaes.AESModeOfOperationCTR(b'k' * 32).decrypt(secret)\n    return {'roundtrip': back.decode(), 'file': pyaes.__file__}\n",
            ),
            ("requirements.txt", "pyaes==1.6.1\n"),
        ],
    );
    let info = d.register("aes", &dir, json!({}));
    assert_eq!(info["packages"], json!(["pyaes==1.6.1"]), "{info}");
    let out = call(&d, "aes");
    assert_eq!(out["roundtrip"], "attack at dawn", "{out}");
    assert!(
        out["file"]
            .as_str()
            .unwrap()
            .starts_with("/deps/pyaes-1.6.1-"),
        "{out}"
    );
}
