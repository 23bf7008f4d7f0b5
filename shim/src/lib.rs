//! sprout's in-sandbox side: the shim binary (`sprout-shim`, PID 1 of every sandbox)
//! and the language runtimes it starts.
//!
//! This library part only carries the runtime files the agent installs into a
//! sandbox's read-only `/.sprout` directory; the behaviour lives in the binary
//! (`src/main.rs`) and in `runtime/python/sprout_runtime.py`.

use std::fs;
use std::path::Path;

/// The Python runtime: zygote and instance loop.
pub const PYTHON_RUNTIME: &str = include_str!("../runtime/python/sprout_runtime.py");

/// Inside a sandbox: the Python interpreter (Debian's, from the host's `/usr`).
pub const PYTHON: &str = "/usr/bin/python3";
/// Inside a sandbox: where [`PYTHON_RUNTIME`] is.
pub const PYTHON_RUNTIME_PATH: &str = "/.sprout/python/sprout_runtime.py";

/// [`PYTHON_RUNTIME`] compiled by `build.rs` (unchecked-hash `.pyc`), or empty.
pub const PYTHON_RUNTIME_PYC: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sprout_runtime.pyc"));

/// What the shim runs with `python3 -I -B -c`: the runtime as `__main__`, from its
/// bytecode when that was made for this interpreter, else from source.
pub const PYTHON_BOOTSTRAP: &str = r#"import sys
from importlib.util import MAGIC_NUMBER
path = "/.sprout/python/sprout_runtime"
main = sys.modules["__main__"].__dict__
main["__file__"] = path + ".py"
try:
    with open(path + ".pyc", "rb") as f:
        data = f.read()
except OSError:
    data = b""
if data[:4] == MAGIC_NUMBER:
    import marshal
    code = marshal.loads(data[16:])
else:
    with open(path + ".py") as f:
        code = compile(f.read(), path + ".py", "exec")
del data, f
exec(code, main)
"#;

/// Writes the runtime files into `dir` (the host side of `/.sprout`), plus an empty
/// `shim` file that the shim binary is bind-mounted over.
/// Modes are set explicitly, whatever the umask: the sandbox's processes are an
/// unprivileged user that must read them.
pub fn install_runtime(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode));
    fs::create_dir_all(dir.join("python"))?;
    mode(dir, 0o755)?;
    mode(&dir.join("python"), 0o755)?;
    let mut files = vec![("python/sprout_runtime.py", PYTHON_RUNTIME.as_bytes())];
    if !PYTHON_RUNTIME_PYC.is_empty() {
        files.push(("python/sprout_runtime.pyc", PYTHON_RUNTIME_PYC));
    }
    files.push(("shim", b""));
    for (name, content) in files {
        let p = dir.join(name);
        fs::write(&p, content)?;
        mode(&p, 0o644)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_bytecode_is_for_the_sandbox_interpreter() {
        let magic = std::process::Command::new(PYTHON)
            .args([
                "-I",
                "-c",
                "import importlib.util, sys; sys.stdout.buffer.write(importlib.util.MAGIC_NUMBER)",
            ])
            .output()
            .expect("run /usr/bin/python3")
            .stdout;
        assert_eq!(PYTHON_RUNTIME_PYC.get(..4), Some(&magic[..]));
    }

    #[test]
    fn the_bootstrap_runs_the_runtime_as_main_from_bytecode_or_source() {
        for with_pyc in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            install_runtime(dir.path()).unwrap();
            if !with_pyc {
                fs::remove_file(dir.path().join("python/sprout_runtime.pyc")).unwrap();
            }
            // The same bootstrap, pointed at the temporary install; the runtime's
            // zygote fails loudly without its channel on fd 3.
            let bootstrap = PYTHON_BOOTSTRAP.replace("/.sprout", dir.path().to_str().unwrap());
            let out = std::process::Command::new(PYTHON)
                .args(["-I", "-B", "-c", &bootstrap])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{err}");
            assert!(
                err.contains("in zygote_main") && err.contains("Bad file descriptor"),
                "{err}"
            );
            // Which one ran shows in the code's file name: the bytecode names the
            // path inside a sandbox, the source the one it was read from.
            let from_pyc = err.contains(r#"File "/.sprout/python/sprout_runtime.py""#);
            assert_eq!(from_pyc, with_pyc, "{err}");
        }
    }
}
