//! Choosing a function's runtime: detection from the directory's files, runtimes and
//! versions named at registration, every refusal's message, and stem cells per
//! runtime. (Running Node.js and native functions is the runtimes' own tests' part;
//! here the runtime chosen is read from the listing, or from a load error naming it.)

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use sprout_tests::{body_json, json, require_root, text, wait_for, Daemon, Env, Value, HELLO_PY};

const JS: &str = "module.exports = async (arg) => arg;\n";
const SH: &str = "#!/bin/sh\nexit 0\n";

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// `PUT /functions/{name}` with `{"path": dir, ...extra}`, as answered.
fn put(d: &Daemon, name: &str, dir: &Path, extra: Value) -> (u16, Value) {
    let mut body = json!({ "path": dir.to_str().unwrap() });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let r = d.request(
        "PUT",
        &format!("/functions/{name}"),
        Some("application/json"),
        body.to_string().as_bytes(),
    );
    let status = r.status;
    (status, body_json(&r))
}

/// The listed runtime and handler of function `name`.
fn listed(d: &Daemon, name: &str) -> (String, String) {
    let list = body_json(&d.request("GET", "/functions", None, b""));
    let f = list
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {list}"));
    (
        f["runtime"].as_str().unwrap().to_owned(),
        f["handler"].as_str().unwrap().to_owned(),
    )
}

/// A function's name, files and handler, and the runtime and handler it is listed with.
type Shape<'a> = (
    &'a str,
    &'a [(&'a str, &'a str)],
    Option<&'a str>,
    &'a str,
    &'a str,
);

/// Every shape a runtime is detected from, registered without a runtime.
#[test]
fn each_shape_is_detected() {
    let env = require_root!();
    let d = env.daemon();
    let cases: &[Shape] = &[
        ("openlambda", &[("f.py", HELLO_PY)], None, "python", "f:f"),
        (
            "lambda-py",
            &[(
                "lambda_function.py",
                "def lambda_handler(e, c):\n    return e\n",
            )],
            Some("lambda_function:lambda_handler"),
            "python",
            "lambda_function:lambda_handler",
        ),
        ("index", &[("index.js", JS)], None, "nodejs", ""),
        (
            "zeep",
            &[
                ("main.js", JS),
                (
                    "activity.json",
                    r#"{"name":"echo","runtime":"nodejs:latest"}"#,
                ),
            ],
            None,
            "nodejs",
            "",
        ),
        (
            "pkg",
            &[
                ("package.json", r#"{"main":"lib/start.js"}"#),
                ("lib/start.js", JS),
            ],
            None,
            "nodejs",
            "",
        ),
        (
            "aws-js",
            &[("index.js", JS)],
            Some("index.handler"),
            "nodejs",
            "index:handler",
        ),
        (
            "dotted",
            &[("other.js", JS)],
            Some("other.niam"),
            "nodejs",
            "other:niam",
        ),
        ("actionloop", &[("exec", SH)], None, "native", "exec"),
        (
            "lambda-rt",
            &[("bootstrap", SH)],
            None,
            "native",
            "bootstrap",
        ),
    ];
    for (name, files, handler, runtime, shown) in cases {
        let dir = env.function(name, files);
        for exe in ["exec", "bootstrap"] {
            if dir.join(exe).exists() {
                chmod(&dir.join(exe), 0o755);
            }
        }
        let extra = handler.map_or(json!({}), |h| json!({ "handler": h }));
        let (status, body) = put(&d, name, &dir, extra);
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(
            listed(&d, name),
            ((*runtime).to_owned(), (*shown).to_owned()),
            "{name}"
        );
    }
    // The listing on the command line shows it too.
    let run = d.cli(&env).args(["fn", "ls"]).run();
    run.success();
    let line = |name: &str| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .map(|l| l.split_whitespace().nth(2).unwrap_or("").to_owned())
    };
    assert!(
        run.stdout.lines().next().unwrap().contains(" RUNTIME "),
        "{run}"
    );
    assert_eq!(line("zeep").as_deref(), Some("nodejs"), "{run}");
    assert_eq!(line("actionloop").as_deref(), Some("native"), "{run}");
    assert_eq!(line("openlambda").as_deref(), Some("python"), "{run}");
    // An explicit runtime wins over the files.
    let both = env.function("both", &[("f.py", HELLO_PY), ("index.js", JS)]);
    assert_eq!(put(&d, "both", &both, json!({})).0, 200);
    assert_eq!(listed(&d, "both").0, "python");
    let (status, body) = put(&d, "both", &both, json!({"runtime": "nodejs:default"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(listed(&d, "both").0, "nodejs");
}

/// `sprout invoke DIR` chooses the runtime the same way: Python runs, and a Node.js
/// or native directory reaches its runtime (which names itself if it cannot load yet).
#[test]
fn sprout_invoke_detects_the_runtime() {
    let env = require_root!();
    let py = env.function("py", &[("f.py", HELLO_PY)]);
    let run = env.sprout().arg("invoke").arg(&py).run();
    run.success();
    let node = env.function(
        "node",
        &[("main.js", "module.exports = async () => 'from node';\n")],
    );
    let run = env.sprout().arg("invoke").arg(&node).run();
    assert!(
        run.stdout.contains("from node") || run.stderr.contains("Node.js runtime is not built yet"),
        "{run}"
    );
    let native = env.function("native", &[("exec", SH)]);
    chmod(&native.join("exec"), 0o755);
    let run = env.sprout().arg("invoke").arg(&native).run();
    assert!(
        run.stderr.contains("native runtime is not built yet") || run.code() != Some(2),
        "{run}"
    );
    assert!(!run.stderr.contains("cannot tell which runtime"), "{run}");
}

/// Each refusal names what is wrong, and nothing is registered.
#[test]
fn refusals_name_the_problem() {
    let env = require_root!();
    let d = env.daemon();
    let empty = env.function("empty", &[("README", "nothing to run\n")]);
    let hello = env.function("hello", &[("f.py", HELLO_PY)]);
    let node = env.function("node", &[("index.js", JS)]);
    let escape = env.function(
        "escape",
        &[("package.json", r#"{"main":"../../../etc/hostname"}"#)],
    );
    let nomain = env.function("nomain", &[("package.json", r#"{"main":"gone.js"}"#)]);
    let text_exec = env.function("textexec", &[("exec", "echo hi\n")]);
    chmod(&text_exec.join("exec"), 0o755);
    let private_exec = env.function("privexec", &[("exec", SH)]);
    chmod(&private_exec.join("exec"), 0o700);
    let zeep_old = env.function(
        "zeepold",
        &[
            ("main.js", JS),
            ("activity.json", r#"{"runtime":"nodejs:1"}"#),
        ],
    );
    let cases: Vec<(&Path, Value, Vec<&str>)> = vec![
        (
            &empty,
            json!({}),
            vec![
                "cannot tell which runtime runs",
                "f.py, package.json, index.js, main.js, activity.json, exec, bootstrap",
                "--runtime",
            ],
        ),
        (
            &hello,
            json!({"runtime": "ruby"}),
            vec!["unknown runtime \"ruby\""],
        ),
        (
            &hello,
            json!({"runtime": "python:2.7"}),
            vec!["runtime \"python:2.7\" is not installed: /usr/bin/python3 is Python 3."],
        ),
        (
            &node,
            json!({"runtime": "nodejs:1"}),
            vec!["runtime \"nodejs:1\" is not installed: /usr/bin/node is Node.js "],
        ),
        (
            &node,
            json!({"runtime": "nodejs:x"}),
            vec!["\"x\" is not a version"],
        ),
        (
            &zeep_old,
            json!({}),
            vec!["activity.json: runtime \"nodejs:1\" is not installed"],
        ),
        (
            &node,
            json!({"handler": "missing.handler"}),
            vec![
                "handler missing:handler needs missing",
                "which does not exist",
            ],
        ),
        (
            &node,
            json!({"runtime": "nodejs", "handler": "../x.main"}),
            vec!["not a relative path"],
        ),
        (
            &escape,
            json!({"runtime": "nodejs"}),
            vec!["package.json's main", "outside the function directory"],
        ),
        (
            &nomain,
            json!({}),
            vec!["package.json's main \"gone.js\" names no file"],
        ),
        (
            &text_exec,
            json!({}),
            vec!["neither an ELF executable nor a script starting with #!"],
        ),
        (&private_exec, json!({}), vec!["not readable by sandboxes"]),
        (
            &hello,
            json!({"runtime": "native"}),
            vec!["handler exec needs exec", "does not exist"],
        ),
    ];
    for (dir, extra, says) in cases {
        let (status, body) = put(&d, "refused", dir, extra.clone());
        assert_eq!(status, 400, "{extra}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        for s in says {
            assert!(
                message.contains(s),
                "{extra} in {}: {s:?} not in {message}",
                dir.display()
            );
        }
    }
    assert_eq!(
        body_json(&d.request("GET", "/functions", None, b"")),
        json!([])
    );
    // The same from the command line, before anything starts.
    let run = env.sprout().arg("invoke").arg(&empty).run();
    run.expect_code(2);
    assert!(
        run.stderr.contains("cannot tell which runtime runs"),
        "{run}"
    );
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&node)
        .args(["--runtime", "nodejs:1"])
        .run();
    run.expect_code(2);
    assert!(
        run.stderr
            .contains("runtime \"nodejs:1\" is not installed: /usr/bin/node is Node.js "),
        "{run}"
    );
}

/// `--stem-cells python=1,nodejs=1` keeps one of each, and `status` counts them per
/// runtime.
#[test]
fn stem_cells_are_kept_per_runtime() {
    let env = require_root!();
    let d = env.daemon_with(&["--stem-cells", "python=1,nodejs=1"]);
    let status = wait_for(Duration::from_secs(30), || {
        let s = d.status();
        (s["stem_cells_by_runtime"] == json!({"python": 1, "nodejs": 1, "native": 0}))
            .then_some(s.clone())
            .ok_or(s)
    })
    .unwrap_or_else(|s| panic!("no stem cell of each runtime: {s}\n{}", d.log()));
    assert_eq!(status["stem_cells"], 2, "{status}");
    let run = d.cli(&env).arg("status").run();
    run.success();
    assert_eq!(run.json()["stem_cells_by_runtime"]["nodejs"], 1, "{run}");
    // A cold start of a Python function takes the Python one, and it is made again.
    let hello = env.function("hello", &[("f.py", HELLO_PY)]);
    d.register("hello", &hello, json!({}));
    let r = d.request(
        "POST",
        "/functions/hello/invoke?logs=true",
        Some("application/json"),
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r)["start"], "stem_cell", "{}", text(&r));
    wait_for(Duration::from_secs(30), || {
        let s = d.status();
        (s["stem_cells_by_runtime"]["python"] == 1 && s["stem_cells_by_runtime"]["nodejs"] == 1)
            .then_some(())
            .ok_or(s)
    })
    .unwrap_or_else(|s| panic!("the Python stem cell is not made again: {s}"));
}

/// A bad `--stem-cells` stops `sprout serve` before it starts, saying why.
#[test]
fn bad_stem_cells_are_refused() {
    let env = require_root!();
    for (flag, says) in [
        ("ruby=1", "unknown runtime \"ruby\""),
        ("python=x", "give a number"),
        ("python=1,nodejs", "give RUNTIME=N"),
    ] {
        let socket = env.work_dir().join("never.sock");
        let run = env
            .sprout()
            .arg("--socket")
            .arg(&socket)
            .args(["serve", "--stem-cells", flag])
            .run();
        run.expect_code(2);
        assert!(run.stderr.contains(says), "{flag}: {run}");
        assert!(!socket.exists());
    }
    check_env_clean(&env);
}

fn check_env_clean(env: &Env) {
    assert!(fs::read_dir(env.state_dir()).map_or(true, |mut d| d.next().is_none()));
}
