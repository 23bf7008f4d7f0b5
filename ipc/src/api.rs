//! JSON bodies of the agent's HTTP API (`docs/api.md`), shared by server and clients.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Per-function settings; every field is optional on input and filled with the
/// agent's defaults on output. Names follow OpenWhisk's `wsk` limits.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// `module:function`; default `f:f` (OpenLambda's `f.py` with `def f(event)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Instances of the function at most; requests beyond wait in its queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<usize>,
}

/// Body of `PUT /functions/{name}` with `Content-Type: application/json`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterFunction {
    /// Absolute path of the function's directory on the agent's host.
    pub path: String,
    #[serde(flatten)]
    pub config: FunctionConfig,
}

/// A registered function, as listed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FunctionInfo {
    pub name: String,
    /// Where its code is read from on the agent's host.
    pub path: String,
    pub handler: String,
    pub memory_mb: u64,
    pub timeout_ms: u64,
    pub pids: u64,
    pub cpus: f64,
    pub max_instances: usize,
    /// Idle warm instances (running or frozen) kept for it right now.
    pub warm_instances: usize,
}

/// Captured output of one invocation.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Logs {
    pub stdout: String,
    pub stderr: String,
    /// Set when output beyond the capture limit was dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Body of an invoke with `?logs=true`: the result and what the function printed.
#[derive(Serialize, Deserialize, Debug)]
pub struct InvocationRecord {
    pub result: Box<RawValue>,
    pub logs: Logs,
    pub duration_us: u64,
    /// Whether the invocation needed a new instance.
    pub cold: bool,
    /// How its instance was found: `warm`, `thawed`, `stem_cell` or `new_sandbox`.
    pub start: String,
}

/// Every error response: `{"error": {...}}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorDetail {
    /// A stable machine-readable name: `handler_error`, `timeout`, `out_of_memory`,
    /// `invalid_event`, `not_found`, `bad_request`, `internal`, ...
    pub kind: String,
    /// The whole cause chain, one line.
    pub message: String,
    /// For `handler_error`: the exception's class.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub exception: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
    /// Output captured up to the failure, when the invocation ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<Logs>,
}

/// A registered workflow, as `PUT /workflows/{name}` and `GET /workflows` show it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkflowInfo {
    pub name: String,
    /// Task steps in the file (a map's step counts once).
    pub tasks: usize,
    /// The functions its tasks call.
    pub functions: Vec<String>,
    pub timeout_ms: u64,
}

/// Body of `GET /status`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Status {
    pub version: String,
    pub cgroup: String,
    pub functions: usize,
    /// Every live sandbox: stem cells, warm and running instances.
    pub sandboxes: usize,
    /// Ready stem cells.
    pub stem_cells: usize,
    /// Frozen sandboxes (stem cells and idle instances).
    pub frozen: usize,
    /// Requests waiting for an instance.
    pub queued: usize,
    /// Memory reserved by live sandboxes' limits, and the budget for it.
    pub reserved_mb: u64,
    pub memory_budget_mb: u64,
    pub invocations: u64,
    pub uptime_ms: u64,
}
