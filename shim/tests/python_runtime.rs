//! Runs the Python runtime's own unit tests (`shim/runtime/python/test_sprout_runtime.py`)
//! and the replay of its fuzz corpus (`test_fuzz_corpus.py`),
//! which drive the real zygote as a subprocess, with the interpreter the sandbox uses.

use std::path::Path;
use std::process::Command;

/// Debian's interpreter, as in the rootfs; `python3` on PATH may be a pyenv shim.
const PYTHON: &str = "/usr/bin/python3";

/// The whole run takes seconds; a test that waits for a reply that never comes
/// would otherwise hold CI until its own limit. coreutils' `timeout` runs the
/// tests in a process group of their own and kills all of it (the zygotes they
/// started too) when the time is up.
const TIMEOUT: &str = "300";

#[test]
fn python_runtime_unit_tests_pass() {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} does not exist: the Python runtime tests need Debian's python3 (apt-get install python3)"
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/python");
    let out = Command::new("timeout")
        .args(["--kill-after=10", TIMEOUT, PYTHON])
        .args([
            "-B",
            "-m",
            "unittest",
            "-v",
            "test_sprout_runtime",
            "test_fuzz_corpus",
        ])
        .current_dir(&dir)
        // Keep the caller's Python settings out: PYTHONSAFEPATH would drop the
        // current directory from sys.path, PYTHONPATH/PYTHONHOME could shadow the stdlib.
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env_remove("PYTHONSAFEPATH")
        .output()
        .unwrap_or_else(|e| panic!("cannot run timeout {PYTHON} in {}: {e}", dir.display()));
    // `timeout` exits with 124 when it stopped the run (137 when it had to kill).
    let timed_out = matches!(out.status.code(), Some(124 | 137));
    assert!(
        out.status.success(),
        "python runtime tests {} ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        if timed_out {
            format!("did not finish within {TIMEOUT} s")
        } else {
            "failed".to_owned()
        },
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}
