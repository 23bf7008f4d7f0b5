//! The raw process calls the pool needs; the only `unsafe` in this crate.

use std::ffi::CStr;

use nix::unistd::ForkResult;

/// Forks. The caller must have checked that the process is single-threaded.
pub fn fork_single_threaded() -> nix::Result<ForkResult> {
    // SAFETY: the only caller (`Spawner::start`) verified via /proc/self/status that
    // this process has exactly one thread, so the child gets a consistent copy of
    // every lock and allocator state and may run arbitrary code.
    unsafe { nix::unistd::fork() }
}

/// Names the calling process (as shown by `ps -o comm`).
pub fn set_process_name(name: &CStr) {
    // Best effort: a failure only changes what `ps` shows.
    let _ = nix::sys::prctl::set_name(name);
}

/// Ignores SIGINT: terminal signals go to the agent, which shuts down cleanly, and
/// the spawner follows when the agent closes its channel.
pub fn ignore_sigint() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_IGN installs no handler code, so no async-signal-safety rules apply.
    let _ = unsafe { signal(Signal::SIGINT, SigHandler::SigIgn) };
}

/// Leaves immediately without running the parent's atexit handlers or destructors.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and takes no pointers; nothing after it runs.
    unsafe { libc::_exit(code) }
}

/// Threads in this process, from /proc/self/status.
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(usize::MAX)
}
