//! The pool manager: one background thread that keeps the warm pool in shape, off
//! the request path.
//!
//! Each pass, under the scheduler lock: idle instances past the idle TTL are taken
//! out for destruction; idle instances past the pause grace are frozen; while the
//! memory reserved by sandboxes' limits exceeds the budget, the least recently used
//! idle instances (then stem cells) are taken out; and if stem cells are missing and
//! fit in the budget, one is made. Destroying and creating happen outside the lock.
//! Then it sleeps until the next grace or TTL deadline, or until woken (a request took
//! a stem cell, an instance went idle, shutdown).
//!
//! Every [`SHIM_CHECK`] a pass also takes out idle instances and stem cells whose shim
//! died (see [`take_dead`]), so the next request gets a fresh sandbox instead of a
//! dead one.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pool::SandboxState;

use crate::agent::{lock, Inner};
use crate::instance::Instance;
use crate::scheduler::StemCell;

/// How often idle sandboxes are checked for a dead shim: one `poll` over their
/// channels (and, on cgroup v1, a look at each frozen shim's pending signals).
pub(crate) const SHIM_CHECK: Duration = Duration::from_millis(250);

/// Waits after a failed stem cell creation, doubling up to the maximum.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

pub(crate) fn run(inner: &Inner) {
    let cfg = inner.config.pool;
    let stem_mb = inner.config.defaults.memory_mb;
    let mut retry = RETRY_FIRST;
    let mut retry_at: Option<Instant> = None;
    let mut shim_check_at = Instant::now() + SHIM_CHECK;
    let mut sched = lock(&inner.sched);
    loop {
        if inner.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let mut next: Option<Instant> = retry_at;
        let mut soonest = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        let mut doomed: Vec<Instance> = Vec::new();
        let mut doomed_stems: Vec<StemCell> = Vec::new();
        if shim_check_at <= now {
            shim_check_at = now + SHIM_CHECK;
            let v1 = inner.cgroups.version() == pool::CgroupVersion::V1;
            take_dead(&mut sched, v1, &mut doomed, &mut doomed_stems);
        }
        soonest(shim_check_at);

        for pool in sched.functions.values_mut() {
            let expired: Vec<Instance> = pool
                .idle
                .extract_if(.., |i| i.last_used + cfg.idle_ttl <= now)
                .collect();
            pool.live -= expired.len();
            doomed.extend(expired);
            let mut failed = Vec::new();
            for (i, inst) in pool.idle.iter_mut().enumerate() {
                soonest(inst.last_used + cfg.idle_ttl);
                if inst.sandbox.state() != SandboxState::Bound {
                    continue;
                }
                let freeze_at = inst.last_used + cfg.pause_grace;
                if freeze_at > now {
                    soonest(freeze_at);
                } else if let Err(e) = inst.sandbox.freeze() {
                    tracing::warn!(sandbox_id = inst.sandbox.id(), error = %ipc::chain(&e), "freeze failed; destroying");
                    failed.push(i);
                }
            }
            for i in failed.into_iter().rev() {
                pool.live -= 1;
                doomed.push(pool.idle.remove(i));
            }
        }

        let mut reserved = inner.reserved_mb.load(Ordering::Relaxed)
            - doomed.iter().map(|i| i.reserved_mb).sum::<u64>();
        while reserved > cfg.memory_budget_mb {
            if let Some(inst) = sched.take_lru_idle() {
                tracing::debug!(sandbox_id = inst.sandbox.id(), function = %inst.function, "evicted over the memory budget");
                reserved -= inst.reserved_mb;
                doomed.push(inst);
            } else if !sched.stem_cells.is_empty() {
                let stem = sched.stem_cells.remove(0);
                reserved -= stem.reserved_mb;
                doomed_stems.push(stem);
            } else {
                break;
            }
        }

        let missing = cfg
            .stem_cells
            .saturating_sub(sched.stem_cells.len() + sched.stem_starting);
        let refill = missing > 0
            && reserved + stem_mb <= cfg.memory_budget_mb
            && retry_at.is_none_or(|t| t <= now);
        if refill {
            sched.stem_starting += 1;
        }

        if doomed.is_empty() && doomed_stems.is_empty() && !refill {
            sched.manager_deadline = next;
            sched = match next {
                Some(t) => {
                    inner
                        .wake
                        .wait_timeout(sched, t.saturating_duration_since(now))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => inner.wake.wait(sched).unwrap_or_else(|p| p.into_inner()),
            };
            continue;
        }

        drop(sched);
        for inst in doomed {
            inner.destroy(inst);
        }
        for mut stem in doomed_stems {
            inner.destroy_sandbox(&mut stem.sandbox, stem.reserved_mb);
        }
        let made = if refill {
            Some(make_frozen_stem_cell(inner))
        } else {
            None
        };
        sched = lock(&inner.sched);
        match made {
            Some(Ok(stem)) => {
                sched.stem_starting -= 1;
                sched.stem_cells.push(stem);
                retry = RETRY_FIRST;
                retry_at = None;
            }
            Some(Err(e)) => {
                sched.stem_starting -= 1;
                tracing::error!(error = %ipc::chain(&e), retry_in = ?retry, "could not make a stem cell");
                retry_at = Some(Instant::now() + retry);
                retry = (retry * 2).min(RETRY_MAX);
            }
            None => {}
        }
    }
}

/// Moves the idle instances and stem cells whose shim is dead (or, `v1`, frozen with a
/// SIGKILL pending: on cgroup v1 a frozen task dies only once thawed) to `doomed`.
/// The shim is the sandbox's PID 1: when it dies, the kernel kills every process in
/// the sandbox, so its channel and the instance's hang up.
fn take_dead(
    sched: &mut crate::scheduler::Sched,
    v1: bool,
    doomed: &mut Vec<Instance>,
    doomed_stems: &mut Vec<StemCell>,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = Vec::new();
    for pool in sched.functions.values() {
        for inst in &pool.idle {
            fds.push(PollFd::new(inst.shim.0.as_fd(), PollFlags::empty()));
            fds.push(PollFd::new(inst.link.0.as_fd(), PollFlags::empty()));
        }
    }
    for stem in &sched.stem_cells {
        fds.push(PollFd::new(stem.shim.0.as_fd(), PollFlags::empty()));
    }
    if fds.is_empty() {
        return;
    }
    // POLLHUP and POLLERR are reported whatever is asked for.
    let hung: Vec<bool> = match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds.iter().map(|f| f.any().unwrap_or(false)).collect(),
        Err(_) => return,
    };
    drop(fds);
    let dead = |sandbox: &pool::Sandbox, hung: bool| {
        let killed =
            !hung && v1 && sandbox.state() == SandboxState::Frozen && kill_pending(sandbox.pid());
        if hung || killed {
            tracing::debug!(
                sandbox_id = sandbox.id(),
                shim_pid = sandbox.pid(),
                hung,
                killed,
                "dead shim"
            );
        }
        hung || killed
    };
    let mut at = 0;
    for pool in sched.functions.values_mut() {
        let mut i = 0;
        while i < pool.idle.len() {
            let inst = &pool.idle[i];
            let hung = hung[at] || hung[at + 1];
            at += 2;
            if dead(&inst.sandbox, hung) {
                let inst = pool.idle.remove(i);
                tracing::warn!(sandbox_id = inst.sandbox.id(), function = %inst.function, "the shim of an idle sandbox died; removing it");
                pool.live -= 1;
                doomed.push(inst);
            } else {
                i += 1;
            }
        }
    }
    let mut i = 0;
    while i < sched.stem_cells.len() {
        let hung = hung[at];
        at += 1;
        if dead(&sched.stem_cells[i].sandbox, hung) {
            let stem = sched.stem_cells.remove(i);
            tracing::warn!(
                sandbox_id = stem.sandbox.id(),
                "the shim of a stem cell died; removing it"
            );
            doomed_stems.push(stem);
        } else {
            i += 1;
        }
    }
}

/// Whether process `pid` has a SIGKILL pending (`/proc/<pid>/status`, `SigPnd` and
/// `ShdPnd`), or is gone.
fn kill_pending(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    pending_kill_in_status(&status)
}

fn pending_kill_in_status(status: &str) -> bool {
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    status.lines().any(|l| {
        let Some((key, mask)) = l.split_once(':') else {
            return false;
        };
        matches!(key, "SigPnd" | "ShdPnd")
            && u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & SIGKILL_BIT != 0)
    })
}

fn make_frozen_stem_cell(inner: &Inner) -> Result<StemCell, crate::Error> {
    let mut stem = inner.new_stem_cell()?;
    if let Err(e) = stem.sandbox.freeze() {
        inner.destroy_sandbox(&mut stem.sandbox, stem.reserved_mb);
        return Err(e.into());
    }
    tracing::debug!(sandbox_id = stem.sandbox.id(), "stem cell ready");
    Ok(stem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_sigkill_is_read_from_proc_status() {
        let status = |sig: u64, shd: u64| {
            format!(
                "Name:\tsprout-shim\nState:\tD (disk sleep)\nSigPnd:\t{sig:016x}\n\
                 ShdPnd:\t{shd:016x}\nSigBlk:\t0000000000000100\n"
            )
        };
        // SIGKILL blocked (`SigBlk`, which cannot happen) is not pending.
        assert!(!pending_kill_in_status(&status(0, 0)));
        // Pending for the thread or for the process.
        assert!(pending_kill_in_status(&status(0, 0x100)));
        assert!(pending_kill_in_status(&status(0x100, 0)));
        // SIGTERM (15) pending is not a kill.
        assert!(!pending_kill_in_status(&status(0x4000, 0)));
        // This process has none, and a process that is gone counts as dead.
        assert!(!kill_pending(std::process::id() as i32));
        assert!(kill_pending(i32::MAX));
    }
}
