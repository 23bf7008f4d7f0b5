//! Declarative workflows: a file of `task`, `sequence`, `parallel` and `map` steps,
//! each step's output feeding the next, and the runner that executes one.
//!
//! ```json
//! {"timeout_ms": 10000,
//!  "functions": {"inc": "./inc"},
//!  "steps": [
//!    {"type": "task", "function": "inc"},
//!    {"type": "parallel", "branches": [{"type": "task", "function": "a"},
//!                                      {"type": "task", "function": "b"}]},
//!    {"type": "map", "items": "/urls", "step": {"type": "task", "function": "fetch"}}]}
//! ```
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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc::api::WorkflowInfo;
use ipc::Payload;
use pool::{SandboxState, Scratch};
use serde::Deserialize;

use crate::agent::{lock, CallOpts, Inner};
use crate::error::Error;
use crate::instance::{Answer, CallFailure, Instance};
use crate::registry::FunctionKey;
use crate::request::WorkflowOutput;
use crate::run::Run;

/// Size limit of a run's scratch tmpfs (its pages are charged to the sandboxes that
/// write them, within their memory limits).
const SCRATCH_MB: u64 = 1024;
/// Map items running at once.
const MAP_CONCURRENCY: usize = 64;
/// Nesting of steps in a file.
const MAX_NESTING: usize = 32;

/// A parsed, checked workflow.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub timeout_ms: Option<u64>,
    /// Function directories by name, relative to the file (for `sprout workflow run`).
    pub functions: BTreeMap<String, PathBuf>,
    /// The top-level steps, as a sequence.
    pub root: Step,
}

#[derive(Debug, Clone)]
pub struct Step {
    /// Where it is in the file, e.g. `steps[1].branches[0]`.
    pub path: String,
    pub name: Option<String>,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Task {
        function: String,
    },
    Sequence(Vec<Step>),
    Parallel(Vec<Step>),
    /// Runs `step` on every element of the array at JSON pointer `items` in the input.
    Map {
        items: String,
        step: Box<Step>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    functions: BTreeMap<String, PathBuf>,
    steps: Vec<StepDoc>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum StepDoc {
    Task {
        function: String,
        #[serde(default)]
        name: Option<String>,
    },
    Sequence {
        steps: Vec<StepDoc>,
        #[serde(default)]
        name: Option<String>,
    },
    Parallel {
        branches: Vec<StepDoc>,
        #[serde(default)]
        name: Option<String>,
    },
    Map {
        #[serde(default)]
        items: String,
        step: Box<StepDoc>,
        #[serde(default)]
        name: Option<String>,
    },
}

impl Workflow {
    /// Parses and checks a workflow file; the error names the problem and its place.
    pub fn parse(text: &[u8]) -> Result<Workflow, Error> {
        let doc: FileDoc =
            serde_json::from_slice(text).map_err(|e| Error::InvalidWorkflow(e.to_string()))?;
        if doc.timeout_ms == Some(0) {
            return Err(Error::InvalidWorkflow("timeout_ms must be positive".into()));
        }
        for name in doc.functions.keys() {
            crate::registry::validate_name(name)
                .map_err(|e| Error::InvalidWorkflow(format!("functions: {e}")))?;
        }
        let root = Step {
            path: "steps".into(),
            name: None,
            kind: Kind::Sequence(steps("steps", doc.steps, 0)?),
        };
        Ok(Workflow {
            timeout_ms: doc.timeout_ms,
            functions: doc.functions,
            root,
        })
    }

    /// Checks that every task's function is registered.
    pub fn check_functions(&self, registered: impl Fn(&str) -> bool) -> Result<(), Error> {
        let mut missing = Vec::new();
        self.root.each_task(&mut |step, f| {
            if !registered(f) {
                missing.push(format!("{} needs function {f:?}", step.path));
            }
        });
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidWorkflow(format!(
                "functions not registered: {}",
                missing.join("; ")
            )))
        }
    }

    pub fn info(&self, key: &crate::registry::FunctionKey) -> WorkflowInfo {
        let mut tasks = 0;
        let mut functions = Vec::new();
        self.root.each_task(&mut |_, f| {
            tasks += 1;
            if !functions.iter().any(|g| g == f) {
                functions.push(f.to_owned());
            }
        });
        WorkflowInfo {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            tasks,
            functions,
            timeout_ms: self.timeout_ms.unwrap_or(0),
        }
    }
}

fn steps(path: &str, docs: Vec<StepDoc>, nesting: usize) -> Result<Vec<Step>, Error> {
    if docs.is_empty() {
        return Err(Error::InvalidWorkflow(format!("{path} is empty")));
    }
    docs.into_iter()
        .enumerate()
        .map(|(i, d)| step(format!("{path}[{i}]"), d, nesting + 1))
        .collect()
}

fn step(path: String, doc: StepDoc, nesting: usize) -> Result<Step, Error> {
    if nesting > MAX_NESTING {
        return Err(Error::InvalidWorkflow(format!(
            "{path}: steps nest deeper than {MAX_NESTING}"
        )));
    }
    let (name, kind) = match doc {
        StepDoc::Task { function, name } => {
            crate::registry::validate_name(&function)
                .map_err(|e| Error::InvalidWorkflow(format!("{path}: {e}")))?;
            (name, Kind::Task { function })
        }
        StepDoc::Sequence { steps: s, name } => (
            name,
            Kind::Sequence(steps(&format!("{path}.steps"), s, nesting)?),
        ),
        StepDoc::Parallel { branches, name } => (
            name,
            Kind::Parallel(steps(&format!("{path}.branches"), branches, nesting)?),
        ),
        StepDoc::Map {
            items,
            step: s,
            name,
        } => {
            if !items.is_empty() && !items.starts_with('/') {
                return Err(Error::InvalidWorkflow(format!(
                    "{path}: items {items:?} is not a JSON pointer (\"\" or \"/a/b\")"
                )));
            }
            let inner = step(format!("{path}.step"), *s, nesting + 1)?;
            (
                name,
                Kind::Map {
                    items,
                    step: Box::new(inner),
                },
            )
        }
    };
    Ok(Step { path, name, kind })
}

impl Step {
    fn each_task<'a>(&'a self, f: &mut impl FnMut(&'a Step, &'a str)) {
        match &self.kind {
            Kind::Task { function } => f(self, function),
            Kind::Sequence(s) | Kind::Parallel(s) => s.iter().for_each(|c| c.each_task(f)),
            Kind::Map { step, .. } => step.each_task(f),
        }
    }

    /// How errors name it: `steps[1].branches[0] (task "b")`.
    fn describe(&self) -> String {
        let (kind, what) = match &self.kind {
            Kind::Task { function } => ("task", Some(function.as_str())),
            Kind::Sequence(_) => ("sequence", None),
            Kind::Parallel(_) => ("parallel", None),
            Kind::Map { .. } => ("map", None),
        };
        match (self.name.as_deref().or(what), kind) {
            (Some(n), k) => format!("{} ({k} {n:?})", self.path),
            (None, k) => format!("{} ({k})", self.path),
        }
    }
}

/// Runs the registered workflow `key` on `input`. Its steps resolve in its namespace.
pub fn run(inner: &Inner, key: &FunctionKey, input: &[u8]) -> Result<WorkflowOutput, Error> {
    serde_json::from_slice::<serde::de::IgnoredAny>(input).map_err(Error::InvalidEvent)?;
    let name = key.name.as_str();
    let workflow =
        lock(&inner.workflows)
            .get(key)
            .cloned()
            .ok_or_else(|| Error::WorkflowNotFound {
                namespace: key.namespace.clone(),
                name: name.to_owned(),
            })?;
    let started = Instant::now();
    let scratch = Scratch::new_tmpfs(SCRATCH_MB).map_err(|source| Error::State {
        path: PathBuf::from("workflow scratch tmpfs"),
        source,
    })?;
    let run = Arc::new(
        Run::with_scratch(inner.next_id(), scratch).map_err(|source| Error::State {
            path: PathBuf::from("workflow cancel pipe"),
            source,
        })?,
    );
    let timeout_ms = workflow
        .timeout_ms
        .unwrap_or(inner.config.defaults.timeout_ms);
    let runner = Runner {
        inner,
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
    inner: &'a Inner,
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
        let inner = self.inner;
        let key = FunctionKey {
            namespace: self.namespace.to_owned(),
            name: name.to_owned(),
        };
        let function = inner.function(&key).map_err(|e| self.failed(step, e))?;
        let log_limit = inner.config.log_limit;
        let cancel = Some(self.run.cancel.fd());
        let deadline = self
            .deadline
            .min(Instant::now() + Duration::from_millis(function.timeout_ms));
        if context.is_none() {
            let (mut inst, _, _) = inner
                .acquire(&key, Some(self.deadline), Some(&self.run.cancel))
                .map_err(|e| self.failed_or_timed_out(step, e))?;
            let joined = (|| {
                if inst.sandbox.state() == SandboxState::Frozen {
                    inst.sandbox.thaw()?;
                }
                inner.join_run(&inst, self.run)
            })();
            if let Err(e) = joined {
                inner.release(inst, false);
                return Err(self.failed(step, e));
            }
            *context = Some(inst);
        }
        let inst = context.as_mut().expect("a context");
        let id = inner.next_id();
        let outcome = if function.is(&inst.function) && inst.function_version == function.version {
            // The calls the task makes end with it (the agent's call book).
            inner.calls.begin(inst.sandbox.id(), 0);
            let outcome = inst
                .begin(id, &input, 0, false)
                .and_then(|()| inst.finish(id, deadline, log_limit, cancel));
            inner.calls.end(inst.sandbox.id());
            outcome
        } else {
            match inner
                .attach_callee(inst.sandbox.id(), &function)
                .map_err(|e| self.failed(step, e))?
            {
                Some(spec) => {
                    inner.calls.begin(inst.sandbox.id(), 0);
                    let outcome = inst.shim_call(id, &spec, &input, deadline, log_limit, cancel);
                    inner.calls.end(inst.sandbox.id());
                    outcome
                }
                None => {
                    // Other limits: a sandbox of its own, in this run.
                    let opts = CallOpts {
                        run: Some(self.run),
                        cancel: Some(&self.run.cancel),
                        deadline: Some(self.deadline),
                        ..CallOpts::default()
                    };
                    let inv = inner
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
                let err = inner.failure(inst, &function, failure, logs);
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
            self.inner.leave_and_release(inst, Some(self.run), healthy);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Workflow, String> {
        Workflow::parse(s.as_bytes()).map_err(|e| ipc::chain(&e))
    }

    #[test]
    fn a_workflow_file_parses_into_named_steps() {
        let w = parse(
            r#"{"timeout_ms": 500, "functions": {"a": "./a"}, "steps": [
                {"type": "task", "function": "a"},
                {"type": "parallel", "branches": [{"type": "task", "function": "b", "name": "bee"},
                                                  {"type": "sequence", "steps": [{"type": "task", "function": "a"}]}]},
                {"type": "map", "items": "/xs", "step": {"type": "task", "function": "c"}}]}"#,
        )
        .unwrap();
        assert_eq!(w.timeout_ms, Some(500));
        let info = w.info(&FunctionKey::in_default("w").unwrap());
        assert_eq!(info.tasks, 4);
        assert_eq!(info.functions, ["a", "b", "c"]);
        let Kind::Sequence(top) = &w.root.kind else {
            panic!()
        };
        let Kind::Parallel(branches) = &top[1].kind else {
            panic!()
        };
        assert_eq!(
            branches[0].describe(),
            r#"steps[1].branches[0] (task "bee")"#
        );
        assert_eq!(branches[1].describe(), "steps[1].branches[1] (sequence)");
        let Kind::Map { step, items } = &top[2].kind else {
            panic!()
        };
        assert_eq!(
            (items.as_str(), step.path.as_str()),
            ("/xs", "steps[2].step")
        );
        let err = w.check_functions(|f| f == "a").unwrap_err();
        assert!(
            ipc::chain(&err).contains(r#"steps[1].branches[0] needs function "b""#),
            "{}",
            ipc::chain(&err)
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, want) in [
            (r#"{"steps": []}"#, "steps is empty"),
            (r#"{"steps": [{"type": "loop"}]}"#, "unknown variant"),
            (
                r#"{"steps": [{"type": "task"}]}"#,
                "missing field `function`",
            ),
            (
                r#"{"steps": [{"type": "task", "function": "../x"}]}"#,
                "steps[0]: invalid function name",
            ),
            (
                r#"{"steps": [{"type": "parallel", "branches": []}]}"#,
                "steps[0].branches is empty",
            ),
            (
                r#"{"steps": [{"type": "map", "items": "xs", "step": {"type": "task", "function": "f"}}]}"#,
                "not a JSON pointer",
            ),
            (
                r#"{"steps": [{"type": "task", "function": "f", "retries": 3}]}"#,
                "unknown field `retries`",
            ),
            (
                r#"{"steps": [{"type": "task", "function": "f"}], "timeout_ms": 0}"#,
                "timeout_ms must be positive",
            ),
            ("[1]", "invalid"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
