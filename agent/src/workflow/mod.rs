//! Declarative workflows: the file format ([`spec`]: parsing, checking, [`Workflow`])
//! apart from the runner that executes one ([`runner`]).

mod runner;
pub mod spec;

pub(crate) use runner::run;
pub use spec::Workflow;
