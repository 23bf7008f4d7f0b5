//! The pool manager: one background thread that keeps the warm pool in shape, off
//! the request path.
//!
//! Each pass, under the scheduler's lock: idle instances past the idle TTL are taken
//! out for destruction; idle instances past the pause grace are frozen; while the
//! memory reserved by sandboxes' limits exceeds the budget, the least recently used
//! idle instances (then stem cells) are taken out; and if stem cells of a runtime are
//! missing (each runtime has its own count, [`crate::config::StemCells`]) and fit in
//! the budget, one is made, for the first such runtime in [`Runtime::ALL`]'s order. Destroying and creating happen outside the lock.
//! Then it sleeps until the next grace or TTL deadline, or until woken (a request took
//! a stem cell, an instance went idle, shutdown).
//!
//! A pass with nothing else to do looks after the package zygotes: it does what
//! the policy ([`crate::zygotes::Policy::next`]) says (evict; a package zygote to
//! make is handed to the zygote maker, a thread of the manager's that makes one at a
//! time, so that an import, which may take up to the boot timeout, holds up no pass),
//! then forks a stem cell from a package zygote short of its `--package-stem-cells`
//! (one per pass, within the memory budget), and passes again at once if it did
//! anything.
//!
//! Every [`SHIM_CHECK`] a pass also takes out idle instances and stem cells whose shim
//! died (its channel hung up, or, on cgroup v1, it is frozen with a SIGKILL pending:
//! a frozen task dies only once thawed; `/proc` is read outside the lock), so the next
//! request gets a fresh sandbox instead of a dead one. The shim is the sandbox's
//! PID 1: when it dies, the kernel kills every process in the sandbox, so its channel
//! and the instance's hang up.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::MutexGuard;

use crate::config::PoolConfig;
use crate::instance::Instance;
use crate::packages::Package;
use crate::runtime::Runtime;
use crate::sandboxes::Sandboxes;
use crate::scheduler::{Sched, Scheduler, StemCell};
use crate::zygotes::{Policy, SetKey, Step, ZygoteTag};

/// How often idle sandboxes are checked for a dead shim: one `poll` over their
/// channels (and, on cgroup v1, a look at each frozen shim's pending signals).
pub(crate) const SHIM_CHECK: Duration = Duration::from_millis(250);

/// Waits after a failed stem cell creation, doubling up to the maximum (each
/// runtime its own).
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// A package zygote for the zygote maker to make.
type Make = (SetKey, Vec<Package>);

/// Runs the pool manager until the scheduler closes. `destroy` destroys an idle
/// instance taken out of the pool (and whatever the agent keeps of it); stem cells
/// are bound to nothing, and `sandboxes` destroys them. With package zygotes on, the
/// zygote maker runs beside it, and ends with it.
pub(crate) fn run(
    scheduler: &Scheduler,
    sandboxes: &Sandboxes,
    zygotes: &Policy,
    cfg: &PoolConfig,
    stem_mb: u64,
    destroy: impl Fn(Instance),
) {
    std::thread::scope(|scope| {
        let maker = sandboxes.package_zygotes_on().then(|| {
            let (tx, rx) = mpsc::channel::<Make>();
            std::thread::Builder::new()
                .name("sprout-zygotes".into())
                .spawn_scoped(scope, move || make_zygotes(&rx, scheduler, sandboxes, zygotes))
                .map(|_| tx)
                .map_err(|e| tracing::error!(error = %e, "could not start the package zygote maker; no package zygotes"))
                .ok()
        });
        manage(
            scheduler,
            sandboxes,
            zygotes,
            cfg,
            stem_mb,
            maker.flatten(),
            destroy,
        );
    });
}

/// The zygote maker: makes each package zygote the manager hands it, one at a
/// time, and tells the policy how it went; ends when the manager does.
fn make_zygotes(
    rx: &mpsc::Receiver<Make>,
    scheduler: &Scheduler,
    sandboxes: &Sandboxes,
    zygotes: &Policy,
) {
    while let Ok((key, packages)) = rx.recv() {
        if scheduler.is_closed() {
            zygotes.failed(&key, Instant::now());
            continue;
        }
        match sandboxes.start_package_zygote(&key.namespace, packages) {
            Ok((tag, limit_mb)) => {
                zygotes.made(&key, limit_mb, Instant::now());
                if !zygotes.fits_alone(limit_mb) {
                    tracing::warn!(
                        zygote = tag.id,
                        limit_mb,
                        "a package zygote alone exceeds --package-zygotes-mb; evicted"
                    );
                    let _ = sandboxes.evict_package_zygote(tag.id, Vec::new());
                }
            }
            Err(e) => {
                let retry_in = zygotes.failed(&key, Instant::now());
                tracing::error!(namespace = %key.namespace, packages = ?key.keys, error = %ipc::chain(&e), ?retry_in, "could not make a package zygote");
            }
        }
        // Its stem cells, or the next one.
        scheduler.wake_manager_now();
    }
}

/// The manager's loop (see the module's doc); `maker`: the zygote maker's inbox.
fn manage(
    scheduler: &Scheduler,
    sandboxes: &Sandboxes,
    zygotes: &Policy,
    cfg: &PoolConfig,
    stem_mb: u64,
    maker: Option<mpsc::Sender<Make>>,
    destroy: impl Fn(Instance),
) {
    let v1 = sandboxes.cgroup_version() == pool::CgroupVersion::V1;
    // Per runtime (by `Runtime as usize`): one that fails to start does not hold
    // back the others' stem cells.
    let mut retry = [RETRY_FIRST; Runtime::ALL.len()];
    let mut retry_at: [Option<Instant>; Runtime::ALL.len()] = [None; Runtime::ALL.len()];
    let mut shim_check_at = Instant::now() + SHIM_CHECK;
    // Package zygotes a stem cell could not be forked from lately, until when.
    let mut package_retry: HashMap<u64, Instant> = HashMap::new();
    let mut sched = scheduler.lock();
    loop {
        if scheduler.is_closed() {
            return;
        }
        let now = Instant::now();
        // A retry time already past is not waited for (it is acted on in this pass,
        // or the stem cell is not wanted or does not fit now).
        let mut next: Option<Instant> = retry_at
            .iter()
            .flatten()
            .filter(|t| **t > now)
            .min()
            .copied();
        let soonest =
            |next: &mut Option<Instant>, t: Instant| *next = Some(next.map_or(t, |n| n.min(t)));
        let mut doomed: Vec<Instance> = Vec::new();
        let mut doomed_stems: Vec<StemCell> = Vec::new();
        if shim_check_at <= now {
            shim_check_at = now + SHIM_CHECK;
            let (mut dead, frozen) = sched.hung_shims(v1);
            if !frozen.is_empty() {
                // `/proc` is read without the scheduler's lock; what is still idle
                // afterwards is taken out.
                let killed: Vec<String> = MutexGuard::unlocked(&mut sched, || {
                    frozen
                        .into_iter()
                        .filter(|f| kill_pending(f.pid))
                        .map(|f| {
                            tracing::debug!(
                                sandbox_id = %f.sandbox_id,
                                shim_pid = f.pid,
                                hung = false,
                                killed = true,
                                "dead shim"
                            );
                            f.sandbox_id
                        })
                        .collect()
                });
                dead.extend(killed);
            }
            if !dead.is_empty() {
                let (instances, stems) = sched.take_dead(&dead);
                doomed.extend(instances);
                doomed_stems.extend(stems);
            }
        }
        soonest(&mut next, shim_check_at);
        doomed.extend(sched.sweep_idle(now, cfg, |t| soonest(&mut next, t)));

        let mut reserved =
            sandboxes.reserved_mb() - doomed.iter().map(|i| i.reserved_mb).sum::<u64>();
        while reserved > cfg.memory_budget_mb {
            if let Some(inst) = sched.take_lru_idle() {
                tracing::debug!(sandbox_id = inst.sandbox.id(), function = %inst.function, "evicted over the memory budget");
                reserved -= inst.reserved_mb;
                doomed.push(inst);
            } else if let Some(stem) = sched.take_oldest_stem() {
                reserved -= stem.reserved_mb;
                doomed_stems.push(stem);
            } else {
                break;
            }
        }

        // Each runtime's stem cells in turn (`Runtime::ALL`'s order), one per pass.
        let refill = Runtime::ALL.into_iter().find(|runtime| {
            sched.stem_cells_missing(*runtime, cfg.stem_cells.get(*runtime)) > 0
                && reserved + stem_mb <= cfg.memory_budget_mb
                && retry_at[*runtime as usize].is_none_or(|t| t <= now)
        });
        if let Some(runtime) = refill {
            sched.stem_starting(runtime);
        }

        if doomed.is_empty() && doomed_stems.is_empty() && refill.is_none() {
            if let Some(maker) = &maker {
                if package_pass(
                    &mut sched,
                    sandboxes,
                    zygotes,
                    cfg,
                    stem_mb,
                    maker,
                    &mut package_retry,
                ) {
                    continue;
                }
            }
            sched.set_manager_deadline(next);
            scheduler.wait(&mut sched, next);
            continue;
        }

        let made = MutexGuard::unlocked(&mut sched, || {
            for inst in doomed {
                destroy(inst);
            }
            for mut stem in doomed_stems {
                sandboxes.destroy(&mut stem.sandbox, stem.reserved_mb);
            }
            refill.map(|runtime| (runtime, make_frozen_stem_cell(sandboxes, runtime)))
        });
        match made {
            Some((runtime, Ok(stem))) => {
                sched.stem_made(runtime, Some(stem));
                retry[runtime as usize] = RETRY_FIRST;
                retry_at[runtime as usize] = None;
            }
            Some((runtime, Err(e))) => {
                sched.stem_made(runtime, None);
                let wait = &mut retry[runtime as usize];
                tracing::error!(error = %ipc::chain(&e), runtime = runtime.name(), retry_in = ?wait, "could not make a stem cell");
                retry_at[runtime as usize] = Some(Instant::now() + *wait);
                *wait = (*wait * 2).min(RETRY_MAX);
            }
            None => {}
        }
    }
}

/// The package zygotes' part of a pass: the policy's steps (a zygote to make goes to
/// `maker`), then at most one stem cell forked from a package zygote. Returns
/// whether it did anything.
fn package_pass(
    sched: &mut MutexGuard<'_, Sched>,
    sandboxes: &Sandboxes,
    zygotes: &Policy,
    cfg: &PoolConfig,
    stem_mb: u64,
    maker: &mpsc::Sender<Make>,
    retry: &mut HashMap<u64, Instant>,
) -> bool {
    let now = Instant::now();
    let counts = sched.package_stem_counts();
    let (live, free) = MutexGuard::unlocked(sched, || {
        sandboxes.package_zygotes(|id| counts.get(&id).copied().unwrap_or(0))
    });
    let mut did = false;
    let mut evicted = Vec::new();
    for step in zygotes.next(&live, free, now) {
        match step {
            Step::Evict(id) => {
                let stems = sched.take_package_stems(id);
                let refused =
                    MutexGuard::unlocked(sched, || sandboxes.evict_package_zygote(id, stems));
                match refused {
                    // Something was forked from it meanwhile: it stays.
                    Err(stems) => sched.put_package_stems(stems),
                    Ok(()) => {
                        retry.remove(&id);
                        evicted.push(id);
                        did = true;
                    }
                }
            }
            Step::Start(key, packages) => {
                did = true;
                if let Err(mpsc::SendError((key, _))) = maker.send((key, packages)) {
                    zygotes.failed(&key, now);
                }
            }
        }
    }
    if cfg.package_stem_cells == 0 || sandboxes.reserved_mb() + stem_mb > cfg.memory_budget_mb {
        return did;
    }
    let tags: Vec<Arc<ZygoteTag>> = live
        .iter()
        .filter(|l| !evicted.contains(&l.tag.id) && retry.get(&l.tag.id).is_none_or(|t| *t <= now))
        .map(|l| l.tag.clone())
        .collect();
    let Some(tag) = sched.package_stem_missing(&tags, cfg.package_stem_cells) else {
        return did;
    };
    sched.package_stem_starting(tag.id);
    let made = MutexGuard::unlocked(sched, || {
        let mut stem = sandboxes.fork_package_stem_cell(&tag)?;
        if let Err(e) = stem.sandbox.freeze() {
            sandboxes.destroy(&mut stem.sandbox, stem.reserved_mb);
            return Err(e.into());
        }
        tracing::debug!(
            sandbox_id = stem.sandbox.id(),
            zygote = tag.id,
            "package zygote stem cell ready"
        );
        Ok::<_, crate::error::Error>(stem)
    });
    match made {
        Ok(stem) => {
            retry.remove(&tag.id);
            sched.package_stem_made(tag.id, Some(stem));
        }
        Err(e) => {
            tracing::warn!(zygote = tag.id, error = %ipc::chain(&e), "could not fork a package zygote's stem cell");
            retry.insert(tag.id, Instant::now() + RETRY_MAX);
            sched.package_stem_made(tag.id, None);
        }
    }
    true
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

fn make_frozen_stem_cell(
    sandboxes: &Sandboxes,
    runtime: Runtime,
) -> Result<StemCell, crate::error::Error> {
    let mut stem = sandboxes.new_stem_cell(runtime)?;
    if let Err(e) = stem.sandbox.freeze() {
        sandboxes.destroy(&mut stem.sandbox, stem.reserved_mb);
        return Err(e.into());
    }
    tracing::debug!(
        sandbox_id = stem.sandbox.id(),
        runtime = runtime.name(),
        "stem cell ready"
    );
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
