//! The one request enum and one response enum every transport goes through: the
//! embedded CLI, the Unix-socket HTTP API and a controller linking this library.

use std::path::PathBuf;
use std::time::Duration;

use ipc::api::{ActivationId, FunctionConfig, FunctionInfo, Logs, Status};

/// Every request names the namespace it acts in (`default` unless the client said
/// otherwise): names are looked up, registered and listed only there.
#[derive(Debug)]
pub enum Request {
    /// Registers (or replaces) a function. Replacing retires its warm instances.
    RegisterFunction {
        namespace: String,
        name: String,
        source: FunctionSource,
        config: FunctionConfig,
    },
    /// The functions of one namespace.
    ListFunctions {
        namespace: String,
    },
    RemoveFunction {
        namespace: String,
        name: String,
    },
    /// `event` is the raw JSON body; it is validated before any sandbox is touched.
    /// `activation_id`: the caller's id for it (a controller's), else the agent makes
    /// one. `blocking: false` makes its acceptance durable and answers
    /// [`Response::Accepted`] at once; it then waits in the function's queue.
    Invoke {
        namespace: String,
        name: String,
        event: Vec<u8>,
        activation_id: Option<ActivationId>,
        blocking: bool,
    },
    /// Creates or (with `overwrite`) replaces an OpenWhisk action: a function of
    /// `namespace` named by [`crate::names::from_openwhisk`] of `name` (`action` or
    /// `package/action`), with the action's parameters, annotations and kind kept.
    PutAction {
        namespace: String,
        name: String,
        action: Box<ipc::openwhisk::action::Action>,
        overwrite: bool,
    },
    /// An OpenWhisk action as `GET` shows it (`name`: OpenWhisk's, `pkg/act`).
    GetAction {
        namespace: String,
        name: String,
    },
    /// A namespace's actions (every function of it), by name: `skip` first, then at
    /// most `limit` (0: [`crate::openwhisk::action::MAX_LIST`]).
    ListActions {
        namespace: String,
        limit: u64,
        skip: u64,
    },
    /// Removes an action; answers it as it was.
    DeleteAction {
        namespace: String,
        name: String,
    },
    /// Invokes an action through OpenWhisk's API: the action's default parameters
    /// merged under the call's ([`crate::openwhisk::action::invocation`]), then
    /// [`Request::Activate`].
    InvokeAction {
        namespace: String,
        name: String,
        call: Box<crate::openwhisk::action::Invocation>,
    },
    /// Finished records in OpenWhisk's shape, newest first; without `docs`, no result
    /// and no logs (a listing's summary).
    WhiskActivations {
        query: crate::activations::Query,
        docs: bool,
    },
    /// One record in OpenWhisk's shape (answered [`Response::Activated`]).
    GetWhiskActivation {
        namespace: Option<String>,
        id: ActivationId,
    },
    /// An OpenWhisk activation: its action semantics (default parameters, `__OW_*`
    /// environment, result rules, OpenWhisk's texts for failures).
    Activate(Box<crate::openwhisk::Activate>),
    /// An OpenWhisk controller's activation (the invoker contract, `POST /invoke`):
    /// its action fetched from the `whisks` database when configured and needed, run
    /// as one [`Request::Activate`], answered [`Response::Acknowledged`] whatever
    /// the outcome.
    Invoker(Box<ipc::openwhisk::invoker::ActivationMessage>),
    /// OpenLambda's `/run/{name}[/path]`, any method: an HTTP app (its instance said
    /// so when it loaded) gets the whole request; a plain function gets the body as
    /// its event (empty: `{}`). Methods are checked against the function's
    /// `triggers.http` first.
    Run {
        namespace: String,
        name: String,
        run: RunRequest,
        activation_id: Option<ActivationId>,
    },
    /// One activation's record, or its result or logs alone. `namespace` is the scope
    /// the caller may read (`None`: every namespace); a record outside it is not found.
    GetActivation {
        namespace: Option<String>,
        id: ActivationId,
        part: ActivationPart,
    },
    /// Finished records, newest first (`query.namespace`: the scope, `None` every one).
    ListActivations {
        query: crate::activations::Query,
    },
    Status,
    /// A namespace's usage since the agent started.
    Usage {
        namespace: String,
    },
    /// The node's metrics in Prometheus' text format.
    Metrics,
    /// Registers (or replaces) a declarative workflow; its tasks' functions must exist
    /// in its namespace.
    RegisterWorkflow {
        namespace: String,
        name: String,
        workflow: crate::workflow::spec::Workflow,
    },
    /// The workflows of one namespace.
    ListWorkflows {
        namespace: String,
    },
    RemoveWorkflow {
        namespace: String,
        name: String,
    },
    /// The node's package cache, with the functions using each package.
    ListPackages,
    /// Removes every cached package no registered function uses.
    CollectPackages,
    /// Runs a registered workflow on `input` (JSON text, validated first).
    RunWorkflow {
        namespace: String,
        name: String,
        input: Vec<u8>,
    },
}

/// An HTTP request on `/run`: its method, paths, query and headers as an HTTP app
/// sees them, and its body.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    pub request: ipc::proto::HttpRequest,
    pub body: Vec<u8>,
}

/// What of an activation's record [`Request::GetActivation`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationPart {
    Record,
    Result,
    Logs,
}

#[derive(Debug)]
pub enum FunctionSource {
    /// A directory on the agent's host, read in place.
    Dir(PathBuf),
    /// A tar archive of the function's directory; the agent unpacks it under its state dir.
    Tar(Vec<u8>),
}

#[derive(Debug)]
pub enum Response {
    Registered(FunctionInfo),
    Functions(Vec<FunctionInfo>),
    Removed {
        namespace: String,
        name: String,
    },
    Invoked(Invocation),
    Status(Status),
    Usage(ipc::api::NamespaceUsage),
    /// Prometheus' text format 0.0.4 ([`crate::metrics::CONTENT_TYPE`]).
    Metrics(String),
    WorkflowRegistered(ipc::api::WorkflowInfo),
    Workflows(Vec<ipc::api::WorkflowInfo>),
    WorkflowRan(WorkflowOutput),
    /// The cached packages (`ListPackages`), or those removed (`CollectPackages`).
    Packages(Vec<ipc::api::PackageInfo>),
    /// An asynchronous invocation's acceptance is durable: it will run.
    Accepted(ActivationId),
    Activation(Box<ipc::api::ActivationRecord>),
    ActivationResult(ipc::api::ActivationResult),
    ActivationLogs(ipc::api::ActivationLogs),
    Activations(Vec<ipc::api::ActivationRecord>),
    /// A blocking OpenWhisk activation, finished.
    Activated(Box<ipc::openwhisk::activation::WhiskActivation>),
    /// An OpenWhisk action (put, read or deleted).
    Action(Box<ipc::openwhisk::action::Action>),
    Actions(Vec<ipc::openwhisk::action::Action>),
    WhiskActivations(Vec<ipc::openwhisk::activation::WhiskActivation>),
    /// An invoker's acknowledgement of a [`Request::Invoker`].
    Acknowledged(Box<ipc::openwhisk::invoker::Acknowledgement>),
}

/// A completed workflow run.
#[derive(Debug)]
pub struct WorkflowOutput {
    /// The last step's output, as JSON text.
    pub result: Vec<u8>,
    pub duration: Duration,
    /// Task steps run (each map item counts).
    pub tasks: u64,
}

/// Largest result an invocation answered over HTTP may return (the same as the
/// request body limit); a larger one is refused, 502 `bad_result`.
pub const MAX_RESULT: usize = 64 << 20;

/// A completed invocation.
#[derive(Debug)]
pub struct Invocation {
    /// Its activation's id (its record's).
    pub activation_id: ActivationId,
    /// The function's result, as JSON text: as it came from the instance (a shared
    /// result is the instance's sealed memfd, not a copy).
    pub result: ipc::Payload,
    /// The result is bytes (only for a caller that is a function), not JSON.
    pub raw: bool,
    pub logs: Logs,
    pub duration: Duration,
    pub start: Start,
    /// An HTTP app's status and headers (checked: [`crate::invoke`]); the result is
    /// then its body, not JSON.
    pub http: Option<ipc::proto::HttpHead>,
}

/// How the instance that ran an invocation was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Start {
    /// A warm, running instance.
    Warm,
    /// A warm instance whose sandbox was frozen and was thawed.
    Thawed,
    /// A new instance in a prewarmed stem cell.
    StemCell,
    /// A new instance in a sandbox created for it (no stem cell was ready).
    NewSandbox,
    /// A new instance in a sandbox forked from a package zygote (its stem cell, or a
    /// new fork): some of its packages were imported already.
    PackageZygote,
}

impl Start {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Whether a new instance had to be started.
    pub fn is_cold(self) -> bool {
        matches!(
            self,
            Start::StemCell | Start::NewSandbox | Start::PackageZygote
        )
    }
}
