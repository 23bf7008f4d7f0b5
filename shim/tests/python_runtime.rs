//! Runs the Python runtime's own unit tests (`shim/runtime/python/test_sprout_runtime.py`)
//! and the replay of its fuzz corpus (`test_fuzz_corpus.py`),
//! which drive the real zygote as a subprocess, with the interpreter the sandbox uses.

use std::path::Path;
use std::process::Command;

/// Debian's interpreter, as in the rootfs; `python3` on PATH may be a pyenv shim.
const PYTHON: &str = "/usr/bin/python3";

#[test]
fn python_runtime_unit_tests_pass() {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} does not exist: the Python runtime tests need Debian's python3 (apt-get install python3)"
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/python");
    let out = Command::new(PYTHON)
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
        .unwrap_or_else(|e| panic!("cannot run {PYTHON} in {}: {e}", dir.display()));
    assert!(
        out.status.success(),
        "python runtime tests failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}
