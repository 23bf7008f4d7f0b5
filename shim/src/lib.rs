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

/// Writes the runtime files into `dir` (the host side of `/.sprout`), plus an empty
/// `shim` file that the shim binary is bind-mounted over.
pub fn install_runtime(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir.join("python"))?;
    fs::write(dir.join("python/sprout_runtime.py"), PYTHON_RUNTIME)?;
    fs::write(dir.join("shim"), b"")?;
    Ok(())
}
