//! Where things are inside a sandbox: the one definition the agent, the spawner, the
//! rootfs builder and the shim share.
//!
//! A called function's code is attached at `/fns/<name>-<version>`;
//! [`callee_dir`] builds that path and [`parse_callee_dir`] reads it back.

/// Where the function's own code appears (read-only).
pub const CODE_DIR: &str = "/code";
/// The workflow scratch directory (`SPROUT_WORKFLOW_DIR`).
pub const WORKFLOW_DIR: &str = "/workflow";
/// Where the code of functions called inside a sandbox is attached, one directory each.
pub const FUNCTIONS_DIR: &str = "/fns";
/// Where a function's installed packages appear, one read-only directory each
/// ([`deps_dir`]); in an install sandbox, the installer's writable output.
pub const DEPS_DIR: &str = "/deps";
/// Where the agent's runtime directory (shim, language runtimes, call socket) appears.
pub const RUNTIME_DIR: &str = "/.sprout";
/// The shim binary (PID 1 of every sandbox).
pub const SHIM_PATH: &str = "/.sprout/shim";

/// Where the code of function `name`, version `version`, is attached in a sandbox
/// that calls it.
pub fn callee_dir(name: &str, version: u64) -> String {
    format!("{FUNCTIONS_DIR}/{name}-{version}")
}

/// Where the installed package `key` (a package cache entry's name) is attached in a
/// sandbox.
pub fn deps_dir(key: &str) -> String {
    format!("{DEPS_DIR}/{key}")
}

/// The function name and version a [`callee_dir`] path stands for, or `None` when
/// `path` is not one.
pub fn parse_callee_dir(path: &str) -> Option<(&str, u64)> {
    let (name, version) = path
        .strip_prefix(FUNCTIONS_DIR)?
        .strip_prefix('/')?
        .rsplit_once('-')?;
    if name.is_empty() || name.contains('/') {
        return None;
    }
    Some((name, version.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callee_dirs_read_back() {
        let dir = callee_dir("resize-img", 7);
        assert_eq!(dir, "/fns/resize-img-7");
        assert_eq!(parse_callee_dir(&dir), Some(("resize-img", 7)));
    }

    #[test]
    fn other_paths_are_not_callee_dirs() {
        for bad in [
            "/fns/x",
            "/fns/-1",
            "/code/x-1",
            "/fns/a/b-1",
            "/fnsx-1",
            "/fns/x-y",
        ] {
            assert_eq!(parse_callee_dir(bad), None, "{bad}");
        }
    }
}
