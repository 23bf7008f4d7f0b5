//! Which function each sandbox is bound to, what code is attached in it for calls,
//! and which workflow run it takes part in.
//!
//! A sandbox is bound when an instance starts in it and forgotten when it is
//! destroyed. A callee's code is attached (at `/fns/<name>-<version>`) only into a
//! sandbox of its own namespace and limits; a run's scratch is attached into every
//! sandbox that joins the run. The spawner's mounts are made through
//! [`Sandboxes`]; what is mounted where is kept here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ipc::proto::CallSpec;
use parking_lot::Mutex;
use pool::SandboxState;

use crate::error::Error;
use crate::instance::Instance;
use crate::names::FunctionKey;
use crate::registry::{Function, Registry};
use crate::run::{Run, Scratch};
use crate::sandboxes::Sandboxes;

/// A sandbox bound to a function, as the call server and workflows see it.
#[derive(Debug)]
struct BoundSandbox {
    function: Arc<Function>,
    /// Code attached under `/fns` (`name-version`).
    attached: HashSet<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Runs {
    /// Bound sandboxes by id.
    bound: Mutex<HashMap<String, BoundSandbox>>,
    /// Held while the spawner attaches a callee's code somewhere.
    attaching: Mutex<()>,
    /// The workflow run each sandbox taking part in one belongs to, by sandbox id.
    runs: Mutex<HashMap<String, Arc<Run>>>,
    next_run: AtomicU64,
}

impl Runs {
    /// Sandbox `id` now runs `function`.
    pub fn bind(&self, id: &str, function: &Function) {
        self.bound.lock().insert(
            id.to_owned(),
            BoundSandbox {
                function: Arc::new(function.clone()),
                attached: Default::default(),
            },
        );
    }

    /// Sandbox `id` is destroyed: it is bound to nothing and leaves its run; a run
    /// rooted there is cancelled (its calls in flight are of no use any more).
    pub fn forget(&self, id: &str) {
        self.bound.lock().remove(id);
        if let Some(run) = self.runs.lock().remove(id) {
            if run.is_root(id) {
                run.cancel.fire();
            }
        }
    }

    pub fn is_bound(&self, id: &str) -> bool {
        self.bound.lock().contains_key(id)
    }

    /// The namespace of each bound sandbox's function.
    /// The functions live sandboxes are bound to (a retired version's too).
    pub fn bound_functions(&self) -> Vec<Arc<Function>> {
        self.bound
            .lock()
            .values()
            .map(|b| b.function.clone())
            .collect()
    }

    pub fn namespaces(&self) -> Vec<String> {
        self.bound
            .lock()
            .values()
            .map(|b| b.function.namespace.clone())
            .collect()
    }

    /// A run id.
    pub fn next_run_id(&self) -> u64 {
        self.next_run.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether `inst` has the code of function `name` of `namespace` attached (it
    /// would keep running that code after it changes).
    pub fn calls_function(&self, inst: &Instance, key: &FunctionKey) -> bool {
        // Only its namespace's sandboxes can have attached it.
        inst.function.namespace == key.namespace
            && self.bound.lock().get(inst.sandbox.id()).is_some_and(|b| {
                b.attached.iter().any(|a| {
                    ipc::sandbox_paths::parse_callee_dir(a).is_some_and(|(n, _)| n == key.name)
                })
            })
    }

    /// Whether every function attached in the sandbox (for calls) is still the
    /// registered version: its processes cache what they resolved, so a sandbox with
    /// an outdated callee must not be used again.
    pub fn callees_current(&self, sandbox_id: &str, registry: &Registry) -> bool {
        let bound = self.bound.lock();
        let Some(b) = bound.get(sandbox_id) else {
            return true;
        };
        if b.attached.is_empty() {
            return true;
        }
        let namespace = &b.function.namespace;
        // Callees are of the sandbox's own namespace.
        registry.all_current(
            namespace,
            b.attached
                .iter()
                .map(|target| ipc::sandbox_paths::parse_callee_dir(target)),
        )
    }

    /// `name` in the namespace of the function sandbox `sandbox_id` is bound to: what a
    /// call from that sandbox means. A function calls only its own namespace's
    /// functions; a name that exists only elsewhere is as unknown as one that exists
    /// nowhere.
    pub fn callee_key(&self, sandbox_id: &str, name: &str) -> Result<FunctionKey, Error> {
        let namespace = self
            .bound
            .lock()
            .get(sandbox_id)
            .map(|b| b.function.namespace.clone())
            .ok_or_else(|| Error::State {
                path: PathBuf::from(sandbox_id),
                source: std::io::Error::other("the calling sandbox is not bound to a function"),
            })?;
        FunctionKey::new(&namespace, name).map_err(|_| Error::not_found_in(&namespace, name))
    }

    /// Makes `callee`'s code visible in sandbox `sandbox_id` if the callee can run there
    /// (same runtime and limits) and returns how the shim runs it; `None` if it cannot.
    pub fn attach_callee(
        &self,
        sandbox_id: &str,
        callee: &Function,
        sandboxes: &Sandboxes,
    ) -> Result<Option<CallSpec>, Error> {
        // The tenant boundary: never another namespace's code in this sandbox. The
        // lookups that lead here already resolve in the caller's namespace; this holds
        // whatever a future caller does.
        let caller_namespace = self
            .bound
            .lock()
            .get(sandbox_id)
            .map(|b| b.function.namespace.clone());
        if let Some(ns) = caller_namespace.filter(|ns| *ns != callee.namespace) {
            return Err(Error::not_found_in(&ns, &callee.name));
        }
        let target = ipc::sandbox_paths::callee_dir(&callee.name, callee.version);
        // `None`: it cannot run there; `Some(attached)`: it can.
        let state = |bound: &HashMap<String, BoundSandbox>| {
            bound
                .get(sandbox_id)
                .filter(|b| b.function.same_limits(callee))
                .map(|b| b.attached.contains(&target))
        };
        if state(&self.bound.lock()) == Some(false) {
            // One attach at a time (the spawner does them in turn anyway), so a second
            // resolve of the same callee waits for the first instead of getting a spec
            // for a directory that is not there yet.
            let _one_at_a_time = self.attaching.lock();
            if state(&self.bound.lock()) == Some(false) {
                sandboxes.attach_code(sandbox_id, &callee.dir, Path::new(&target))?;
                if let Some(b) = self.bound.lock().get_mut(sandbox_id) {
                    b.attached.insert(target.clone());
                }
            }
        }
        if state(&self.bound.lock()).is_none() {
            return Ok(None);
        }
        Ok(Some(CallSpec {
            function: callee.name.clone(),
            version: callee.version,
            code_dir: target,
            handler: callee.handler.clone(),
            timeout_ms: callee.timeout_ms,
            namespace: callee.namespace.clone(),
            memory_mb: callee.memory_mb,
            deps: callee.deps.import_paths(),
            env: callee.env.clone(),
        }))
    }

    /// The run `sandbox` takes part in; a new one rooted there if none.
    pub fn run_of(&self, sandbox: &str) -> std::io::Result<Arc<Run>> {
        let mut runs = self.runs.lock();
        if let Some(run) = runs.get(sandbox) {
            return Ok(run.clone());
        }
        let run = Arc::new(Run::rooted_in(self.next_run_id(), sandbox)?);
        runs.insert(sandbox.to_owned(), run.clone());
        Ok(run)
    }

    /// Makes `inst`'s sandbox part of `run`: the run's scratch goes over its own
    /// `/workflow` (unless the run is rooted there) and calls made from it join the run.
    pub fn join(
        &self,
        inst: &Instance,
        run: &Arc<Run>,
        sandboxes: &Sandboxes,
    ) -> Result<(), Error> {
        let id = inst.sandbox.id();
        match &run.scratch {
            Scratch::Own(scratch) => sandboxes.attach_scratch(id, scratch)?,
            Scratch::RootedIn(root) if root != id => sandboxes.attach_scratch_from(id, root)?,
            Scratch::RootedIn(_) => {}
        }
        self.runs.lock().insert(id.to_owned(), run.clone());
        Ok(())
    }

    /// Undoes [`Runs::join`]; the sandbox sees its own `/workflow` again.
    /// `false`: the run's scratch may still be attached, so the sandbox must go.
    pub fn leave(
        &self,
        inst: &Instance,
        run: &Arc<Run>,
        healthy: bool,
        sandboxes: &Sandboxes,
    ) -> bool {
        let id = inst.sandbox.id();
        self.runs.lock().remove(id);
        if run.is_root(id) || !healthy || inst.sandbox.state() == SandboxState::Dead {
            return healthy; // an unhealthy sandbox is destroyed, mounts and all
        }
        fit_for_pool(
            id,
            "detach the workflow scratch",
            sandboxes.detach_scratch(id),
        )
    }

    /// Whether sandbox `id` started a run of its own (its function made sibling calls).
    pub fn has_root_run(&self, id: &str) -> bool {
        matches!(self.runs.lock().get(id), Some(run) if run.is_root(id))
    }

    /// After an invocation that called other functions: unless the sandbox takes part in
    /// someone else's run, its run ends. Calls still in flight are cancelled, and (if
    /// the sandbox is kept warm, `keep_warm`) the scratch is replaced by a new tmpfs
    /// (not emptied: a sibling that kept a descriptor into it reaches only the finished
    /// run's files). Returns `false` if that failed (the sandbox must go).
    pub fn end_sdk_run(&self, inst: &Instance, keep_warm: bool, sandboxes: &Sandboxes) -> bool {
        let id = inst.sandbox.id();
        {
            let mut runs = self.runs.lock();
            match runs.get(id) {
                Some(run) if run.is_root(id) => {
                    run.cancel.fire();
                    runs.remove(id);
                }
                Some(_) => return true, // a member of another run: its scratch is not ours
                None => {}
            }
        }
        if !keep_warm {
            return true; // the sandbox is destroyed next, scratch and all
        }
        fit_for_pool(
            id,
            "replace the workflow scratch",
            sandboxes.reset_scratch(id),
        )
    }
}

/// Whether a mount operation that keeps a sandbox fit for the pool worked; a failure
/// is logged (and the caller destroys the sandbox).
fn fit_for_pool(sandbox_id: &str, what: &str, done: Result<(), pool::Error>) -> bool {
    if let Err(e) = &done {
        tracing::warn!(sandbox_id, error = %ipc::chain(e), "{what}; destroying the sandbox");
    }
    done.is_ok()
}
