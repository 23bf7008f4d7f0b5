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

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pool::SandboxState;

use crate::agent::{lock, Inner};
use crate::instance::Instance;
use crate::scheduler::StemCell;

/// Waits after a failed stem cell creation, doubling up to the maximum.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

pub(crate) fn run(inner: &Inner) {
    let cfg = inner.config.pool;
    let stem_mb = inner.config.defaults.memory_mb;
    let mut retry = RETRY_FIRST;
    let mut retry_at: Option<Instant> = None;
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

fn make_frozen_stem_cell(inner: &Inner) -> Result<StemCell, crate::Error> {
    let mut stem = inner.new_stem_cell()?;
    if let Err(e) = stem.sandbox.freeze() {
        inner.destroy_sandbox(&mut stem.sandbox, stem.reserved_mb);
        return Err(e.into());
    }
    tracing::debug!(sandbox_id = stem.sandbox.id(), "stem cell ready");
    Ok(stem)
}
