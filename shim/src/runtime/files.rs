//! What every runtime's module uses: the zygote command's shape and writing the
//! runtime's files readable by the sandbox's unprivileged user.

use std::io;
use std::path::Path;

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

/// Creates `dir` (and its parents), readable by everyone.
pub(super) fn make_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    set_mode(dir, 0o755)
}

/// Writes `path`, readable by everyone.
pub(super) fn write_file(path: &Path, content: &[u8]) -> io::Result<()> {
    std::fs::write(path, content)?;
    set_mode(path, 0o644)
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
