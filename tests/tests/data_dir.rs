//! The data directory (`--data-dir`): what outlives a daemon, locked by one daemon at
//! a time, with a format version, apart from the per-process state that crash
//! clean-up removes.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::json;
use sprout_tests::*;

const HELLO_PY: &str = "def f(event):\n    return 'hello ' + event['name']\n";

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

/// Registers `hello` as an uploaded archive.
fn upload_hello(d: &Daemon) {
    let r = d.request(
        "PUT",
        "/functions/hello",
        Some("application/x-tar"),
        &tar_files(&[("f.py", HELLO_PY)]),
    );
    assert_eq!(r.status, 200, "{}", text(&r));
}

/// `sprout serve` on `data`, expected to refuse to start: returns its stderr.
fn serve_refused(env: &Env, data: &Path) -> String {
    let run = env
        .sprout()
        .arg("--socket")
        .arg(env.work_dir().join("refused.sock"))
        .arg("serve")
        .arg("--stem-cells")
        .arg("0")
        .arg("--data-dir")
        .arg(data)
        .run();
    run.expect_code(3);
    assert!(
        !env.work_dir().join("refused.sock").exists(),
        "the refused daemon bound its socket"
    );
    env.assert_clean(run.pid);
    run.stderr.clone()
}

#[test]
fn a_data_directory_in_use_is_refused_and_left_as_it_was() {
    let env = require_root!();
    let d = env.daemon();
    let data = d.data_dir().to_path_buf();
    upload_hello(&d);
    let code = entries(&data.join("code"));
    assert_eq!(code.len(), 1, "{code:?}");

    let stderr = serve_refused(&env, &data);
    assert!(
        stderr.contains(&format!(
            "data directory {} is in use by another agent (pid {})",
            data.display(),
            d.pid()
        )),
        "{stderr}"
    );
    // The first daemon's uploaded code and service are untouched.
    assert_eq!(entries(&data.join("code")), code);
    let r = d.invoke("hello", r#"{"name":"a"}"#);
    assert_eq!(
        (r.status, body_json(&r)),
        (200, json!("hello a")),
        "{}",
        text(&r)
    );
}

#[test]
fn the_layout_is_made_with_its_version_and_code_no_registration_names_is_not_kept() {
    let env = require_root!();
    let data = env.work_dir().join("data-kept");
    let mut d = Daemon::start_on(&env, &data, &["--stem-cells", "0"]);
    assert_eq!(
        entries(&data),
        [
            "activations",
            "code",
            "format",
            "lock",
            "packages",
            "registrations"
        ]
    );
    assert_eq!(fs::read_to_string(data.join("format")).unwrap().trim(), "1");
    for dir in ["", "code", "activations", "packages", "registrations"] {
        let meta = fs::metadata(data.join(dir)).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o700, 0), "{dir}");
    }
    upload_hello(&d);
    // Removing a function removes its uploaded code.
    let r = d.request("DELETE", "/functions/hello", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(entries(&data.join("code")), Vec::<String>::new());
    d.terminate();
    env.assert_clean(d.pid());

    // Code no registration names (an upload whose registration a crash cut short)
    // is not kept.
    fs::create_dir_all(data.join("code/hello-7")).unwrap();
    fs::write(data.join("code/hello-7/f.py"), HELLO_PY).unwrap();
    let d = Daemon::start_on(&env, &data, &["--stem-cells", "0"]);
    assert_eq!(entries(&data.join("code")), Vec::<String>::new());
    assert_eq!(d.status()["functions"], json!(0));
}

#[test]
fn a_data_directory_of_another_format_is_refused_before_its_layout_is_made() {
    let env = require_root!();
    let data = env.work_dir().join("data-v2");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("format"), "2\n").unwrap();
    let stderr = serve_refused(&env, &data);
    assert!(
        stderr.contains(&format!(
            "data directory {} has format version \"2\", this sprout reads version 1",
            data.display()
        )),
        "{stderr}"
    );
    assert_eq!(entries(&data), ["format", "lock"]);
}
