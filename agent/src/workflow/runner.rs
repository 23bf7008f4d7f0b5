//! The runner of declarative workflows ([`super::spec::Workflow`]).
//!
//! Where the steps run:
//! - a **sequence** runs in one sandbox: the first task takes an instance of its
//!   function (the sequence's *context*), and later tasks run in that sandbox, forked
//!   from its zygote by its shim (the code is attached at `/fns/<name>-<version>`);
//!   a task whose function has other limits runs in a sandbox of its own;
//! - each **parallel** branch and each **map** item runs in a sibling sandbox of its
//!   own (performance isolation), with an array of their outputs as the step's output;
//! - every sandbox of a run has the run's scratch tmpfs on `/workflow`
//!   (`SPROUT_WORKFLOW_DIR`), removed when the run ends.
//!
//! A failing step fails the run, naming the step (`steps[1].branches[0] (task "b")`);
//! it cancels every other step still running, whose sandboxes are destroyed. The run's
//! `timeout_ms` (default: the agent's function timeout) bounds all of it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc::Payload;
use pool::{SandboxState, Scratch};

use crate::config::Config;
use crate::error::Error;
use crate::instance::{Answer, CallFailure, Instance};
use crate::invoke::{CallOpts, Invoker};
use crate::names::FunctionKey;
use crate::registry::Registry;
use crate::request::WorkflowOutput;
use crate::run::Run;
use crate::workflow::spec::{Kind, Step};

/// Size limit of a run's scratch tmpfs (its pages are charged to the sandboxes that
/// write them, within their memory limits).
const SCRATCH_MB: u64 = 1024;
/// Map items running at once.
const MAP_CONCURRENCY: usize = 64;

/// Runs the registered workflow `key` on `input`. Its steps resolve in its namespace.
pub fn run(
    invoker: &Invoker,
    registry: &Registry,
    config: &Config,
    key: &FunctionKey,
    input: &[u8],
) -> Result<WorkflowOutput, Error> {
    serde_json::from_slice::<serde::de::IgnoredAny>(input).map_err(Error::InvalidEvent)?;
    let name = key.name.as_str();
    let workflow = registry.workflow(key)?;
    let started = Instant::now();
    let scratch = Scratch::new_tmpfs(SCRATCH_MB).map_err(|source| Error::State {
        path: PathBuf::from("workflow scratch tmpfs"),
        source,
    })?;
    let run = Arc::new(
        Run::with_scratch(invoker.new_run_id(), scratch).map_err(|source| Error::State {
            path: PathBuf::from("workflow cancel pipe"),
            source,
        })?,
    );
    let timeout_ms = workflow.timeout_ms.unwrap_or(config.defaults.timeout_ms);
    let runner = Runner {
        invoker,
        registry,
        log_limit: config.log_limit,
        workflow: name,
        namespace: &key.namespace,
        run: &run,
        timeout_ms,
        deadline: started + Duration::from_millis(timeout_ms),
        tasks: AtomicU64::new(0),
    };
    let span = tracing::debug_span!("workflow", workflow = name, run = run.id);
    let _g = span.enter();
    let mut context = None;
    let out = runner.step(
        &workflow.root,
        Payload::Inline(input.to_vec()),
        &mut context,
    );
    runner.release(context, out.is_ok());
    // Calls its functions started and did not wait for end with it.
    run.cancel.fire();
    let result = out?.into_vec();
    Ok(WorkflowOutput {
        result,
        duration: started.elapsed(),
        tasks: runner.tasks.load(Ordering::Relaxed),
    })
}

struct Runner<'a> {
    invoker: &'a Invoker,
    /// Where its tasks' functions are looked up.
    registry: &'a Registry,
    /// Captured output kept per stream per task.
    log_limit: usize,
    workflow: &'a str,
    /// The workflow's namespace: where its tasks' functions are looked up.
    namespace: &'a str,
    run: &'a Arc<Run>,
    timeout_ms: u64,
    deadline: Instant,
    tasks: AtomicU64,
}

impl Runner<'_> {
    /// Runs `step` on `input`. `context` is the sandbox the enclosing sequence runs in
    /// (taken by its first task, given back by whoever made it).
    fn step(
        &self,
        step: &Step,
        input: Payload,
        context: &mut Option<Instance>,
    ) -> Result<Payload, Error> {
        if Instant::now() >= self.deadline {
            return Err(self.timed_out(step));
        }
        match &step.kind {
            Kind::Task { function } => self.task(step, function, input, context),
            Kind::Sequence(steps) => {
                let mut data = input;
                for s in steps {
                    data = self.step(s, data, context)?;
                }
                Ok(data)
            }
            Kind::Parallel(branches) => {
                let inputs = branches.iter().map(|_| Payload::Inline(input.to_vec()));
                self.fan_out(branches.iter().zip(inputs).collect())
            }
            Kind::Map { items, step: each } => {
                let value: serde_json::Value = serde_json::from_slice(&input)
                    .map_err(|e| self.failed(step, Error::InvalidEvent(e)))?;
                let array = value
                    .pointer(items)
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| {
                        self.failed(
                            step,
                            Error::InvalidConfig(format!(
                                "its input has no array at {:?}",
                                if items.is_empty() { "" } else { items }
                            )),
                        )
                    })?;
                let mut out = Vec::with_capacity(array.len());
                for chunk in array.chunks(MAP_CONCURRENCY) {
                    let work = chunk
                        .iter()
                        .map(|item| (&**each, Payload::Inline(item.to_string().into_bytes())))
                        .collect();
                    let part = self.fan_out(work)?;
                    let part: Vec<Box<serde_json::value::RawValue>> =
                        serde_json::from_slice(&part).expect("fan_out builds a JSON array");
                    out.extend(part);
                }
                Ok(Payload::Inline(
                    serde_json::to_vec(&out).expect("raw values serialise"),
                ))
            }
        }
    }

    /// Runs each `(step, input)` in a sandbox of its own, at once; the output is the
    /// array of their outputs. The first failure cancels the rest of the run.
    fn fan_out(&self, work: Vec<(&Step, Payload)>) -> Result<Payload, Error> {
        let results: Vec<Result<Payload, Error>> = std::thread::scope(|scope| {
            let handles: Vec<_> = work
                .into_iter()
                .map(|(step, input)| {
                    scope.spawn(move || {
                        let mut context = None;
                        let out = self.step(step, input, &mut context);
                        self.release(context, out.is_ok());
                        if out.is_err() {
                            self.run.cancel.fire();
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("workflow branch panicked"))
                .collect()
        });
        let mut outputs = Vec::with_capacity(results.len());
        let mut first_error: Option<Error> = None;
        for r in results {
            match r {
                Ok(p) => outputs.push(p),
                // The root cause, not a step it cancelled.
                Err(e) => {
                    let cancelled = is_cancellation(&e);
                    if first_error
                        .as_ref()
                        .is_none_or(|f| is_cancellation(f) && !cancelled)
                    {
                        first_error = Some(e);
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let mut array = Vec::with_capacity(outputs.iter().map(|p| p.len() + 1).sum::<usize>() + 2);
        array.push(b'[');
        for (i, p) in outputs.iter().enumerate() {
            if i > 0 {
                array.push(b',');
            }
            array.extend_from_slice(p);
        }
        array.push(b']');
        Ok(Payload::Inline(array))
    }

    fn task(
        &self,
        step: &Step,
        name: &str,
        input: Payload,
        context: &mut Option<Instance>,
    ) -> Result<Payload, Error> {
        if self.run.cancel.fired() {
            return Err(self.failed(
                step,
                Error::Cancelled {
                    function: name.to_owned(),
                },
            ));
        }
        self.tasks.fetch_add(1, Ordering::Relaxed);
        let invoker = self.invoker;
        let key = FunctionKey {
            namespace: self.namespace.to_owned(),
            name: name.to_owned(),
        };
        let function = self.registry.get(&key).map_err(|e| self.failed(step, e))?;
        let log_limit = self.log_limit;
        let cancel = Some(self.run.cancel.fd());
        let deadline = self
            .deadline
            .min(Instant::now() + Duration::from_millis(function.timeout_ms));
        if context.is_none() {
            let (mut inst, _, _) = invoker
                .acquire(&key, Some(self.deadline), Some(&self.run.cancel))
                .map_err(|e| self.failed_or_timed_out(step, e))?;
            let joined = (|| {
                if inst.sandbox.state() == SandboxState::Frozen {
                    inst.sandbox.thaw()?;
                }
                invoker.join_run(&inst, self.run)
            })();
            if let Err(e) = joined {
                invoker.release(inst, false);
                return Err(self.failed(step, e));
            }
            *context = Some(inst);
        }
        let inst = context.as_mut().expect("a context");
        let id = invoker.next_id();
        let outcome = if function.is(&inst.function) && inst.function_version == function.version {
            // The calls the task makes end with it (the agent's call book).
            invoker.as_invocation(inst, |inst| {
                inst.begin(id, &input, 0, false)
                    .and_then(|()| inst.finish(id, deadline, log_limit, cancel))
            })
        } else {
            match invoker
                .attach_callee(inst.sandbox.id(), &function)
                .map_err(|e| self.failed(step, e))?
            {
                Some(spec) => invoker.as_invocation(inst, |inst| {
                    inst.shim_call(id, &spec, &input, deadline, log_limit, cancel)
                }),
                None => {
                    // Other limits: a sandbox of its own, in this run.
                    let opts = CallOpts {
                        run: Some(self.run),
                        cancel: Some(&self.run.cancel),
                        deadline: Some(self.deadline),
                        ..CallOpts::default()
                    };
                    let inv = invoker
                        .invoke_with(&key, &input, &opts)
                        .map_err(|e| self.failed_or_timed_out(step, e))?;
                    return Ok(inv.result);
                }
            }
        };
        match outcome {
            Ok(Answer { raw: true, .. }) => Err(self.failed(
                step,
                Error::BytesResult {
                    function: name.to_owned(),
                },
            )),
            Ok(Answer { payload, .. }) => {
                serde_json::from_slice::<serde::de::IgnoredAny>(&payload).map_err(|source| {
                    self.failed(
                        step,
                        Error::BadResult {
                            function: name.to_owned(),
                            source,
                        },
                    )
                })?;
                Ok(payload)
            }
            Err(failure) => {
                let logs = inst.take_logs();
                let healthy = matches!(failure, CallFailure::Raised(_));
                let err = invoker.failure(inst, &function, failure, logs);
                if !healthy {
                    // Whatever ran in it may still run: the sandbox goes.
                    self.release(context.take(), false);
                }
                Err(self.failed_or_timed_out(step, err))
            }
        }
    }

    /// Gives a context back: it leaves the run (its scratch is detached) and returns
    /// to the pool, or is destroyed.
    fn release(&self, context: Option<Instance>, healthy: bool) {
        if let Some(inst) = context {
            self.invoker
                .leave_and_release(inst, Some(self.run), healthy);
        }
    }

    fn failed(&self, step: &Step, source: Error) -> Error {
        if matches!(
            source,
            Error::Workflow { .. } | Error::WorkflowTimeout { .. }
        ) {
            return source;
        }
        Error::Workflow {
            workflow: self.workflow.to_owned(),
            step: step.describe(),
            source: Box::new(source),
        }
    }

    fn failed_or_timed_out(&self, step: &Step, source: Error) -> Error {
        let run_over = Instant::now() >= self.deadline;
        let timed_out = matches!(
            source,
            Error::Timeout { .. } | Error::Cancelled { .. } | Error::QueueTimeout { .. }
        );
        if run_over && timed_out {
            return self.timed_out(step);
        }
        self.failed(step, source)
    }

    fn timed_out(&self, step: &Step) -> Error {
        self.run.cancel.fire();
        Error::WorkflowTimeout {
            workflow: self.workflow.to_owned(),
            timeout_ms: self.timeout_ms,
            step: step.describe(),
        }
    }
}

fn is_cancellation(e: &Error) -> bool {
    match e {
        Error::Cancelled { .. } => true,
        Error::Workflow { source, .. } => is_cancellation(source),
        _ => false,
    }
}
