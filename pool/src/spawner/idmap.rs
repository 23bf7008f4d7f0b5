//! The spawner as its own `newuidmap` and `newgidmap`.
//!
//! A fork server's user namespace maps its root to one host user and the rest of the
//! sandbox uid range to itself: three lines. libcontainer writes a map of one line
//! to `/proc/<pid>/uid_map` itself, but a longer one only by running `newuidmap` /
//! `newgidmap` from `PATH` (shadow's setuid helpers, which allow only the ranges
//! `/etc/subuid` gives the caller, and may not be installed). The spawner is root
//! and may write any map, so it puts links named `newuidmap` and `newgidmap` to its
//! own executable first on its `PATH` ([`install`]); run under those names it writes
//! the map it is given in one `write` and exits ([`main_if_invoked`]).
//! libcontainer does not look at the helper's exit status: a map that could not be
//! written shows as the container's init failing to become root in its namespace.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The kernel's limit on lines in an id map.
const MAX_LINES: usize = 340;

/// Makes `dir` with links `newuidmap` and `newgidmap` to this executable and puts it
/// first on this process's `PATH`. Call it while the process has one thread.
pub(super) fn install(dir: &Path) -> std::io::Result<()> {
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    for name in ["newuidmap", "newgidmap"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&exe, &link)?;
    }
    let mut path = vec![dir.to_path_buf()];
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let joined = std::env::join_paths(path).map_err(std::io::Error::other)?;
    std::env::set_var("PATH", joined);
    Ok(())
}

/// When this process was run as `newuidmap` or `newgidmap` (`<pid> <inside> <outside>
/// <count> ...`), writes the map and returns the exit code.
pub(super) fn main_if_invoked() -> Option<ExitCode> {
    let mut args = std::env::args_os();
    let argv0 = PathBuf::from(args.next()?);
    let file = match argv0.file_name()?.to_str()? {
        "newuidmap" => "uid_map",
        "newgidmap" => "gid_map",
        _ => return None,
    };
    let args: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    Some(match write_map(file, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sprout-spawner as {}: {e}", argv0.display());
            ExitCode::from(1)
        }
    })
}

/// The map text for `args` (`<pid> <inside> <outside> <count> ...`), and the pid.
fn map_text(args: &[String]) -> Result<(i32, String), String> {
    let (pid, ids) = args.split_first().ok_or("no pid")?;
    let pid: i32 = pid
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("pid {pid:?} is not a process id"))?;
    if ids.is_empty() || ids.len() % 3 != 0 || ids.len() / 3 > MAX_LINES {
        return Err(format!(
            "{} ids are not 1 to {MAX_LINES} triples of inside, outside, count",
            ids.len()
        ));
    }
    let mut text = String::new();
    for line in ids.chunks(3) {
        for id in line {
            id.parse::<u32>()
                .map_err(|_| format!("{id:?} is not an id"))?;
        }
        text.push_str(&format!("{} {} {}\n", line[0], line[1], line[2]));
    }
    Ok((pid, text))
}

fn write_map(file: &str, args: &[String]) -> Result<(), String> {
    let (pid, text) = map_text(args)?;
    let path = format!("/proc/{pid}/{file}");
    // One write: the kernel takes a map whole, once.
    std::fs::write(&path, text.as_bytes()).map_err(|e| format!("write {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn a_map_is_whole_triples_of_ids_for_one_pid() {
        assert_eq!(
            map_text(&args("42 0 1003 1 1000 1000 3 1004 1004 6")).unwrap(),
            (42, "0 1003 1\n1000 1000 3\n1004 1004 6\n".to_owned())
        );
        for (bad, want) in [
            ("", "no pid"),
            ("x 0 1 1", "pid \"x\""),
            ("-3 0 1 1", "pid \"-3\""),
            ("42", "0 ids"),
            ("42 0 1", "2 ids"),
            ("42 0 1 y", "\"y\" is not an id"),
            ("42 0 1 4294967296", "is not an id"),
        ] {
            let e = map_text(&args(bad)).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }
}
