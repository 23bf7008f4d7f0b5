//! The runtime seam: what differs between the language runtimes a sandbox can run.
//!
//! For each [`Runtime`] of the protocol it says which interpreter must be on the host
//! (sandboxes see the host's `/usr`), what the agent installs for it under
//! `/.sprout`, and what command the shim runs as its zygote. Python is the only one;
//! another is a module beside [`python`] and one more arm in each match here.

pub mod python;

use std::io;
use std::path::Path;

pub use ipc::proto::Runtime;

/// How the shim starts a runtime's zygote. The zygote takes its channel to the shim
/// on descriptor 3; its stdin is `/dev/null` and its output the sandbox's pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZygoteCommand {
    /// The interpreter, an absolute path inside the sandbox.
    pub program: &'static str,
    pub args: Vec<String>,
    /// Set in the zygote's environment, on top of the shim's.
    pub env: Vec<(&'static str, String)>,
}

/// The interpreter `runtime` runs on: the same path on the host and in a sandbox.
pub fn interpreter(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Python => python::INTERPRETER,
    }
}

/// The command that starts `runtime`'s zygote in a sandbox.
pub fn zygote_command(runtime: Runtime) -> ZygoteCommand {
    match runtime {
        Runtime::Python => python::zygote_command(),
    }
}

/// Writes every runtime's files into `dir` (the host side of `/.sprout`), plus an
/// empty `shim` file that the shim binary is bind-mounted over.
/// Modes are set explicitly, whatever the umask: the sandbox's processes are an
/// unprivileged user that must read them.
pub fn install(dir: &Path) -> io::Result<()> {
    make_dir(dir)?;
    python::install(dir)?;
    write_file(&dir.join("shim"), b"")
}

/// Creates `dir` (and its parents), readable by everyone.
fn make_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    set_mode(dir, 0o755)
}

/// Writes `path`, readable by everyone.
fn write_file(path: &Path, content: &[u8]) -> io::Result<()> {
    std::fs::write(path, content)?;
    set_mode(path, 0o644)
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
