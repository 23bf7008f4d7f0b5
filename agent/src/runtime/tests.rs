//! Detection, handlers and their checks, per runtime, on temporary directories.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::PathBuf;

use super::*;

/// A canonical temporary directory holding `files` (path, contents, mode).
fn dir_with(files: &[(&str, &str, u32)]) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().canonicalize().unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    for (name, text, mode) in files {
        let p = dir.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
    }
    (t, dir)
}

const PY: &str = "def f(e): return e\n";
const JS: &str = "module.exports = async (a) => a;\n";
const SH: &str = "#!/bin/sh\nexit 0\n";

fn config(runtime: Option<&str>, handler: Option<&str>) -> FunctionConfig {
    FunctionConfig {
        runtime: runtime.map(str::to_owned),
        handler: handler.map(str::to_owned),
        ..Default::default()
    }
}

/// The runtime chosen for `dir`, and the handler parsed and checked for it.
fn choose(
    dir: &Path,
    runtime: Option<&str>,
    handler: Option<&str>,
) -> Result<(Runtime, Handler), String> {
    let run = || {
        let r = of(&config(runtime, handler), dir)?;
        let h = r.parse_handler(handler, dir)?;
        r.check_handler(dir, &h)?;
        r.check_readable(dir, &h)?;
        Ok::<_, Error>((r, h))
    };
    run().map_err(|e| ipc::chain(&e))
}

fn h(module: &str, function: &str) -> Handler {
    Handler {
        module: module.to_owned(),
        function: function.to_owned(),
    }
}

/// A directory's files (path, contents, mode) and handler, and what is chosen for them.
type Shape<'a> = (
    &'a [(&'a str, &'a str, u32)],
    Option<&'a str>,
    Runtime,
    Handler,
);

#[test]
fn each_shape_is_detected() {
    let cases: &[Shape] = &[
        (&[("f.py", PY, 0o644)], None, Runtime::Python, h("f", "f")),
        (
            &[("lambda_function.py", PY, 0o644)],
            Some("lambda_function:lambda_handler"),
            Runtime::Python,
            h("lambda_function", "lambda_handler"),
        ),
        (
            &[("pkg/__init__.py", PY, 0o644)],
            Some("pkg:run"),
            Runtime::Python,
            h("pkg", "run"),
        ),
        (&[("index.js", JS, 0o644)], None, Runtime::Nodejs, h("", "")),
        (&[("main.js", JS, 0o644)], None, Runtime::Nodejs, h("", "")),
        (
            &[("index.js", JS, 0o644)],
            Some("index.handler"),
            Runtime::Nodejs,
            h("index", "handler"),
        ),
        (
            &[("other.js", JS, 0o644)],
            Some("other.niam"),
            Runtime::Nodejs,
            h("other", "niam"),
        ),
        (
            &[("other.js", JS, 0o644)],
            Some("other.niam.xyz"),
            Runtime::Nodejs,
            h("other", "niam.xyz"),
        ),
        (
            &[("lib/app.mjs", JS, 0o644)],
            Some("lib/app:handler"),
            Runtime::Nodejs,
            h("lib/app", "handler"),
        ),
        (
            &[
                ("package.json", r#"{"main": "src/start.js"}"#, 0o644),
                ("src/start.js", JS, 0o644),
            ],
            None,
            Runtime::Nodejs,
            h("", ""),
        ),
        (
            &[
                ("package.json", r#"{"name": "x"}"#, 0o644),
                ("index.js", JS, 0o644),
            ],
            None,
            Runtime::Nodejs,
            h("", ""),
        ),
        (
            &[
                (
                    "activity.json",
                    r#"{"name":"ponger","runtime":"nodejs:latest"}"#,
                    0o644,
                ),
                ("main.js", JS, 0o644),
            ],
            None,
            Runtime::Nodejs,
            h("", ""),
        ),
        (
            &[
                ("activity.json", r#"{"name":"echo"}"#, 0o644),
                ("main.js", JS, 0o644),
            ],
            None,
            Runtime::Nodejs,
            h("", ""),
        ),
        (&[("exec", SH, 0o755)], None, Runtime::Native, h("exec", "")),
        (
            &[("bootstrap", "\x7fELF....", 0o755)],
            None,
            Runtime::Native,
            h("bootstrap", ""),
        ),
        (
            &[("exec", SH, 0o755), ("bootstrap", SH, 0o755)],
            None,
            Runtime::Native,
            h("exec", ""),
        ),
        (
            &[("mybin", SH, 0o755)],
            Some("mybin"),
            Runtime::Native,
            h("mybin", ""),
        ),
        // The handler's own file comes before the markers: a Node.js handler next to
        // a stray f.py.
        (
            &[("f.py", PY, 0o644), ("app.js", JS, 0o644)],
            Some("app.handler"),
            Runtime::Nodejs,
            h("app", "handler"),
        ),
        // And f.py before the other markers.
        (
            &[("f.py", PY, 0o644), ("index.js", JS, 0o644)],
            None,
            Runtime::Python,
            h("f", "f"),
        ),
    ];
    for (files, handler, runtime, handler_want) in cases {
        let (_t, dir) = dir_with(files);
        let got = choose(&dir, None, *handler);
        assert_eq!(
            got,
            Ok((*runtime, handler_want.clone())),
            "{files:?} {handler:?}"
        );
    }
    // An explicit runtime wins over every file.
    let (_t, dir) = dir_with(&[("f.py", PY, 0o644), ("index.js", JS, 0o644)]);
    assert_eq!(
        choose(&dir, Some("nodejs"), None),
        Ok((Runtime::Nodejs, h("", "")))
    );
    assert_eq!(
        choose(&dir, Some("nodejs:default"), Some("index.main")),
        Ok((Runtime::Nodejs, h("index", "main")))
    );
}

#[test]
fn nothing_to_go_by_names_every_file_looked_for() {
    let (_t, dir) = dir_with(&[("README", "hi", 0o644)]);
    let e = choose(&dir, None, None).unwrap_err();
    for file in [
        "f.py",
        "package.json",
        "index.js",
        "main.js",
        "activity.json",
        "exec",
        "bootstrap",
        "--runtime",
    ] {
        assert!(e.contains(file), "{file}: {e}");
    }
    assert!(
        e.starts_with(&format!("cannot tell which runtime runs {}", dir.display())),
        "{e}"
    );
    let e = choose(&dir, None, Some("app:main")).unwrap_err();
    assert!(
        e.contains("app.py") && e.contains("app/__init__.py") && e.contains("f.py"),
        "{e}"
    );
    let e = choose(&dir, None, Some("app.handler")).unwrap_err();
    assert!(e.contains("app.js") && e.contains("--runtime"), "{e}");
}

#[test]
fn an_activity_json_runtime_is_checked_like_an_explicit_one() {
    let (_t, dir) = dir_with(&[
        ("activity.json", r#"{"runtime":"nodejs:1"}"#, 0o644),
        ("main.js", JS, 0o644),
    ]);
    let e = choose(&dir, None, None).unwrap_err();
    assert!(
        e.starts_with(
            "activity.json: runtime \"nodejs:1\" is not installed: /usr/bin/node is Node.js "
        ),
        "{e}"
    );
    for (text, says) in [
        (r#"{"runtime":"cobol"}"#, "unknown runtime \"cobol\""),
        (r#"{"runtime":7}"#, "not a runtime name"),
        ("{", "not valid JSON"),
    ] {
        fs::write(dir.join("activity.json"), text).unwrap();
        let e = choose(&dir, None, None).unwrap_err();
        assert!(e.contains(says), "{text}: {e}");
    }
    // One that leaves the directory is not read.
    fs::remove_file(dir.join("activity.json")).unwrap();
    symlink("/etc/passwd", dir.join("activity.json")).unwrap();
    let e = choose(&dir, None, None).unwrap_err();
    assert!(
        e.contains("resolves to /etc/passwd, outside the function directory"),
        "{e}"
    );
}

#[test]
fn nodejs_handlers_are_parsed_and_refused() {
    let p = |t| nodejs::parse_handler(Some(t));
    assert_eq!(p("index.handler").unwrap(), h("index", "handler"));
    assert_eq!(p("index:handler").unwrap(), h("index", "handler"));
    assert_eq!(p("other.niam.xyz").unwrap(), h("other", "niam.xyz"));
    assert_eq!(p("src/app:$main").unwrap(), h("src/app", "$main"));
    assert_eq!(p("index").unwrap(), h("index", ""));
    assert_eq!(p("src/app.handler").unwrap(), h("src/app", "handler"));
    assert_eq!(nodejs::parse_handler(None).unwrap(), h("", ""));
    for (bad, says) in [
        ("../x.main", "not a relative path"),
        ("/etc/x:main", "not a relative path"),
        ("a/../b:main", "not a relative path"),
        ("index.1x", "not a JavaScript export name"),
        ("index:a-b", "not a JavaScript export name"),
        ("index.a..b", "not a JavaScript export name"),
    ] {
        let e = p(bad).unwrap_err().to_string();
        assert!(e.contains(says), "{bad}: {e}");
    }
    assert!(p(&"a".repeat(300))
        .unwrap_err()
        .to_string()
        .contains("bytes long"));
}

#[test]
fn nodejs_modules_must_exist_inside_and_be_readable() {
    let (_t, dir) = dir_with(&[("index.js", JS, 0o600), ("README", "", 0o644)]);
    let e = choose(&dir, Some("nodejs"), Some("app.main")).unwrap_err();
    assert!(
        e.contains("handler app:main needs app (or app.js") && e.contains("which does not exist"),
        "{e}"
    );
    let e = choose(&dir, Some("nodejs"), None).unwrap_err();
    assert!(
        e.contains("index.js is not readable by sandboxes") && e.contains("o+r"),
        "{e}"
    );
    fs::remove_file(dir.join("index.js")).unwrap();
    let e = choose(&dir, Some("nodejs"), None).unwrap_err();
    assert!(
        e.contains("looked for package.json's \"main\", index.js and main.js"),
        "{e}"
    );
    symlink("/etc/hostname", dir.join("host.js")).unwrap();
    let e = choose(&dir, Some("nodejs"), Some("host.main")).unwrap_err();
    assert!(
        e.contains("host.js resolves to") && e.contains("outside the function directory"),
        "{e}"
    );
    for (main, says) in [
        ("../../etc/hostname", "outside the function directory"),
        ("../nowhere/x.js", "outside the function directory"),
        ("a/../../x.js", "outside the function directory"),
        ("/etc/hostname", "outside the function directory"),
        ("missing.js", "names no file"),
    ] {
        fs::write(dir.join("package.json"), format!(r#"{{"main": "{main}"}}"#)).unwrap();
        let e = choose(&dir, Some("nodejs"), None).unwrap_err();
        assert!(
            e.contains("package.json's main") && e.contains(says),
            "{main}: {e}"
        );
    }
    fs::write(dir.join("package.json"), "{not json").unwrap();
    let e = choose(&dir, Some("nodejs"), None).unwrap_err();
    assert!(
        e.contains("package.json") && e.contains("not valid JSON"),
        "{e}"
    );
}

#[test]
fn native_executables_must_be_executable_files() {
    let (_t, dir) = dir_with(&[
        ("exec", "plain text\n", 0o755),
        ("bootstrap", SH, 0o700),
        ("elf", "\x7fELF", 0o755),
        ("empty", "", 0o755),
    ]);
    let e = choose(&dir, Some("native"), None).unwrap_err();
    assert!(
        e.contains("neither an ELF executable nor a script starting with #!"),
        "{e}"
    );
    let e = choose(&dir, Some("native"), Some("bootstrap")).unwrap_err();
    assert!(e.contains("bootstrap is not readable by sandboxes"), "{e}");
    fs::set_permissions(dir.join("bootstrap"), fs::Permissions::from_mode(0o744)).unwrap();
    let e = choose(&dir, Some("native"), Some("bootstrap")).unwrap_err();
    assert!(
        e.contains("is not executable by sandboxes") && e.contains("o+rx"),
        "{e}"
    );
    assert_eq!(
        choose(&dir, Some("native"), Some("elf")),
        Ok((Runtime::Native, h("elf", "")))
    );
    let e = choose(&dir, Some("native"), Some("empty")).unwrap_err();
    assert!(e.contains("neither an ELF"), "{e}");
    let e = choose(&dir, Some("native"), Some("nothere")).unwrap_err();
    assert!(
        e.contains("handler nothere needs nothere in") && e.contains("does not exist"),
        "{e}"
    );
    for bad in ["a/b", "..", ".", ""] {
        let e = choose(&dir, Some("native"), Some(bad)).unwrap_err();
        assert!(e.contains("the executable's file name"), "{bad:?}: {e}");
    }
    fs::create_dir(dir.join("sub")).unwrap();
    let e = choose(&dir, Some("native"), Some("sub")).unwrap_err();
    assert!(e.contains("does not exist"), "{e}");
    symlink("/bin/sh", dir.join("sh")).unwrap();
    let e = choose(&dir, Some("native"), Some("sh")).unwrap_err();
    assert!(e.contains("outside the function directory"), "{e}");
    // Lambda's runtime API is for `bootstrap` alone: the handler's module says it.
    let (r, handler) = choose(&dir, Some("native"), Some("elf")).unwrap();
    assert_eq!((r, handler.module.as_str()), (Runtime::Native, "elf"));
    assert_ne!(handler.module, native::LAMBDA_BOOTSTRAP);
}

#[test]
fn explicit_runtimes_are_checked() {
    let (_t, dir) = dir_with(&[("f.py", PY, 0o644)]);
    for (runtime, says) in [
        ("ruby", "unknown runtime \"ruby\""),
        (
            "python:2.7",
            "runtime \"python:2.7\" is not installed: /usr/bin/python3 is Python 3.",
        ),
        (
            "nodejs:1",
            "runtime \"nodejs:1\" is not installed: /usr/bin/node is Node.js ",
        ),
    ] {
        let e = choose(&dir, Some(runtime), None).unwrap_err();
        assert!(e.contains(says), "{runtime}: {e}");
    }
    assert_eq!(
        choose(&dir, Some("python:3"), None),
        Ok((Runtime::Python, h("f", "f")))
    );
}

#[test]
fn a_callee_runs_in_its_callers_sandbox_only_with_the_same_runtime() {
    for caller in Runtime::ALL {
        for callee in Runtime::ALL {
            assert_eq!(
                caller.runs_callee(callee),
                caller == callee,
                "{caller:?} → {callee:?}"
            );
        }
    }
    assert_eq!(Runtime::Python.name(), "python");
    let h = Runtime::Python.parse_handler(None, Path::new("/")).unwrap();
    assert_eq!(h.to_string(), python::DEFAULT_HANDLER);
}

#[test]
fn a_node_functions_dependencies_are_its_checked_manifest_and_lock() {
    let seam = Runtime::Nodejs;
    let (_t, dir) = dir_with(&[(
        "package.json",
        r#"{"dependencies": {"sprout": "*"}}"#,
        0o644,
    )]);
    assert_eq!(
        seam.dependencies(&dir, &crate::packages::Sources::default())
            .unwrap(),
        None,
        "sprout is provided"
    );
    let (_t, dir) = dir_with(&[("index.js", JS, 0o644)]);
    assert_eq!(
        seam.dependencies(&dir, &crate::packages::Sources::default())
            .unwrap(),
        None
    );
    let lock = r#"{"lockfileVersion": 3, "packages": {"": {}, "node_modules/sprout": {},
        "node_modules/a": {"version": "1.0.0", "resolved": "https://registry.npmjs.org/a/-/a-1.0.0.tgz"}}}"#;
    let (_t, dir) = dir_with(&[
        (
            "package.json",
            r#"{"name": "f", "dependencies": {"a": "1.0.0"}}"#,
            0o644,
        ),
        ("package-lock.json", lock, 0o644),
    ]);
    match seam
        .dependencies(&dir, &crate::packages::Sources::default())
        .unwrap()
    {
        Some(crate::packages::Dependencies::Npm {
            manifest,
            lock: Some(lock),
        }) => {
            assert_eq!(manifest["dependencies"], serde_json::json!({"a": "1.0.0"}));
            assert!(
                lock["packages"].get("node_modules/sprout").is_none(),
                "{lock}"
            );
        }
        other => panic!("{other:?}"),
    }
    let (_t, dir) = dir_with(&[
        ("package.json", r#"{"dependencies": {"a": "1.0.0"}}"#, 0o644),
        (
            "package-lock.json",
            &lock.replace("registry.npmjs.org", "evil.example"),
            0o644,
        ),
    ]);
    let e = seam
        .dependencies(&dir, &crate::packages::Sources::default())
        .unwrap_err();
    assert_eq!(e.name(), "package_error", "{e}");
    let e = ipc::chain(&e);
    assert!(
        e.contains("node_modules/a") && e.contains("evil.example"),
        "{e}"
    );
    let (_t, dir) = dir_with(&[
        ("package-lock.json", "{", 0o644),
        ("package.json", r#"{"dependencies": {"a": "1"}}"#, 0o644),
    ]);
    let e = ipc::chain(
        &seam
            .dependencies(&dir, &crate::packages::Sources::default())
            .unwrap_err(),
    );
    assert!(
        e.contains("package-lock.json") && e.contains("not JSON"),
        "{e}"
    );
}
