//! The runtime seam: what differs between the language runtimes a sandbox can run.
//!
//! For each [`Runtime`] of the protocol it says which interpreter must be on the host
//! (sandboxes see the host's `/usr`), what the agent installs for it under
//! `/.sprout`, and what command the shim runs as its zygote. Python is the only one;
//! another is a module beside [`python`] and one more arm in each match here.

mod files;
pub mod python;

use std::io;
use std::path::Path;

pub use files::ZygoteCommand;
pub use ipc::proto::Runtime;

use files::{make_dir, write_file};

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
