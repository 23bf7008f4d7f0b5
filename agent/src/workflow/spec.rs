//! The declarative workflow file format: a file of `task`, `sequence`, `parallel`
//! and `map` steps, each step's output feeding the next; parsing and checking it into
//! a [`Workflow`]. What runs one is [`super::runner`]; this module imports nothing of it.
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

use std::collections::BTreeMap;
use std::path::PathBuf;

use ipc::api::WorkflowInfo;
use serde::Deserialize;

use crate::error::Error;
use crate::names::FunctionKey;

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
    /// The file it was parsed from (kept by the registrations store).
    pub text: String,
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
            crate::names::validate_name(name)
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
            // It parsed as JSON: it is UTF-8.
            text: String::from_utf8_lossy(text).into_owned(),
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

    pub fn info(&self, key: &FunctionKey) -> WorkflowInfo {
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
            crate::names::validate_name(&function)
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
    pub fn describe(&self) -> String {
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
