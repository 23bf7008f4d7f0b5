//! `sprout invoke DIR`: the embedded agent, no daemon.

use std::fs;

use sprout_tests::{example, json, require_root, ECHO_LOGS_PY};

#[test]
fn hello_prints_the_greeting() {
    let env = require_root!();
    let run = env
        .sprout()
        .arg("invoke")
        .arg(example("hello"))
        .arg(r#"{"name":"Alice"}"#)
        .run();
    run.success();
    assert_eq!(run.stdout, "\"Hello, Alice!\"\n", "{run}");
    assert!(
        !run.stderr.contains("sprout:"),
        "a successful invoke prints no diagnostics:\n{run}"
    );
    env.assert_clean(run.pid);
}

#[test]
fn event_defaults_to_an_empty_object() {
    let env = require_root!();
    let run = env.sprout().arg("invoke").arg(example("hello")).run();
    run.success();
    assert_eq!(run.json(), json!("Hello, world!"), "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn event_from_stdin() {
    let env = require_root!();
    let run = env
        .sprout()
        .arg("invoke")
        .arg(example("hello"))
        .arg("-")
        .stdin(r#"{"name": "Stdin"}"#)
        .run();
    run.success();
    assert_eq!(run.json(), json!("Hello, Stdin!"), "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn openwhisk_style_main_handler() {
    let env = require_root!();
    let run = env
        .sprout()
        .arg("invoke")
        .arg(example("owhello"))
        .arg(r#"{"name":"Alice"}"#)
        .args(["--handler", "__main__:main"])
        .run();
    run.success();
    assert_eq!(run.json(), json!({"greeting": "Hello, Alice!"}), "{run}");
    env.assert_clean(run.pid);

    let run = env
        .sprout()
        .arg("invoke")
        .arg(example("owhello"))
        .args(["--handler", "__main__:main"])
        .run();
    run.success();
    assert_eq!(run.json(), json!({"greeting": "Hello, stranger!"}), "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn requirements_txt_is_installed_before_the_first_invoke_and_mounted_read_only() {
    let env = require_root!();
    let dir = env.function(
        "withreqs",
        &[
            (
                "f.py",
                "import os, six\n\
                 def f(event):\n\
                 \x20   d = os.path.dirname(six.__file__)\n\
                 \x20   try:\n\
                 \x20       open(os.path.join(d, 'planted.py'), 'w')\n\
                 \x20       writable = True\n\
                 \x20   except OSError:\n\
                 \x20       writable = False\n\
                 \x20   return {'version': six.__version__, 'dir': d, 'writable': writable}\n",
            ),
            (
                "requirements.txt",
                "# a tiny pure-Python wheel\nsix==1.16.0\n",
            ),
        ],
    );
    let run = env.sprout().arg("invoke").arg(&dir).run();
    run.success();
    let out = run.json();
    assert_eq!(out["version"], "1.16.0", "{run}");
    let deps = out["dir"].as_str().unwrap();
    assert!(deps.starts_with("/deps/six-1.16.0-cpython-"), "{run}");
    assert_eq!(
        out["writable"], false,
        "packages are mounted read-only: {run}"
    );
    // Installed once into the cache, root's.
    let cache = env.work_dir().join("package-cache/python");
    let entries: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        entries
            .iter()
            .any(|e| e.starts_with("six-1.16.0-") && e.ends_with(".json")),
        "{entries:?}"
    );
    env.assert_clean(run.pid);
}

#[test]
fn logs_flag_shows_stdout_and_stderr() {
    let env = require_root!();
    let dir = env.function("echologs", &[("f.py", ECHO_LOGS_PY)]);
    let event = json!({"out": "printed-to-stdout-42", "err": "printed-to-stderr-43", "ret": 7});
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .arg(event.to_string())
        .arg("--logs")
        .run();
    run.success();
    assert_eq!(
        run.json(),
        json!(7),
        "the result alone is on stdout:\n{run}"
    );
    assert!(run.stderr.contains("printed-to-stdout-42"), "{run}");
    assert!(run.stderr.contains("printed-to-stderr-43"), "{run}");
    env.assert_clean(run.pid);

    // Without --logs the function's output is not shown anywhere.
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .arg(event.to_string())
        .run();
    run.success();
    assert_eq!(run.stdout, "7\n", "{run}");
    assert!(!run.stderr.contains("printed-to"), "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn logs_flag_shows_output_of_a_failed_invocation() {
    let env = require_root!();
    let dir = env.function("echologs", &[("f.py", ECHO_LOGS_PY)]);
    let event = json!({"out": "before-the-crash", "raise": "boom"});
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .arg(event.to_string())
        .arg("--logs")
        .run();
    run.expect_code(1);
    assert!(run.stderr.contains("before-the-crash"), "{run}");
    assert_eq!(run.error()["type"], "RuntimeError", "{run}");
    env.assert_clean(run.pid);
}

#[test]
fn limits_are_accepted() {
    let env = require_root!();
    let run = env
        .sprout()
        .arg("invoke")
        .arg(example("hello"))
        .arg(r#"{"name":"Limits"}"#)
        .args([
            "--memory",
            "96",
            "--timeout",
            "5000",
            "--pids",
            "16",
            "--cpus",
            "0.5",
        ])
        .run();
    run.success();
    assert_eq!(run.json(), json!("Hello, Limits!"), "{run}");
    env.assert_clean(run.pid);
}
