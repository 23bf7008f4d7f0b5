//! The runtime seam: what differs between the language runtimes a sandbox can run.
//!
//! For each [`Runtime`] of the protocol it says which interpreter must be on the host
//! (sandboxes see the host's `/usr`), what the agent installs for it under
//! `/.sprout`, and how the shim makes its instances: forked from a zygote (Python,
//! [`zygote_command`]) or each started by an instance host (`sprout-shim host`,
//! Node.js and native executables). A runtime is a module beside [`python`] and one
//! arm in each match here.

mod files;
pub mod installer;
pub mod nodejs;
pub mod python;

use std::io;
use std::path::Path;

pub use files::ZygoteCommand;
pub use ipc::proto::Runtime;

use files::{make_dir, write_file};

/// The interpreter `runtime` runs on: the same path on the host and in a sandbox.
/// `None`: the function brings its own executable (native).
pub fn interpreter(runtime: Runtime) -> Option<&'static str> {
    match runtime {
        Runtime::Python => Some(python::INTERPRETER),
        Runtime::Nodejs => Some(nodejs::INTERPRETER),
        Runtime::Native => None,
    }
}

/// The command that starts `runtime`'s zygote in a sandbox; `None` for a runtime
/// whose instances are each started by an instance host.
pub fn zygote_command(runtime: Runtime) -> Option<ZygoteCommand> {
    match runtime {
        Runtime::Python => Some(python::zygote_command()),
        Runtime::Nodejs | Runtime::Native => None,
    }
}

/// The environment variable that names a sandbox's runtime to its shim.
pub const RUNTIME_ENV: &str = "SPROUT_RUNTIME";

/// Set (to `1`) in a sandbox that serves one command's instances (the one-shot CLI):
/// its Python zygote imports nothing ahead of need (`errors.LAZY_STDLIB`), which a zygote
/// forking many instances imports once for all of them.
pub const ZYGOTE_LAZY_ENV: &str = "SPROUT_ZYGOTE_LAZY";

/// Writes every runtime's files into `dir` (the host side of `/.sprout`), plus an
/// empty `shim` file that the shim binary is bind-mounted over.
/// Modes are set explicitly, whatever the umask: the sandbox's processes are an
/// unprivileged user that must read them.
pub fn install(dir: &Path) -> io::Result<()> {
    make_dir(dir)?;
    python::install(dir)?;
    nodejs::install(dir)?;
    installer::install(dir)?;
    write_file(&dir.join("shim"), b"")
}
