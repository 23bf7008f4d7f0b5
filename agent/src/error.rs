//! The agent's error type, and its one mapping to the API's error shape.

use std::path::PathBuf;

use ipc::api::{ErrorDetail, Logs};
use ipc::proto::FunctionError;

/// The rule for namespace names, as error messages state it (checked by
/// [`crate::names::validate_namespace`]).
pub const NAMESPACE_RULE: &str = "1 to 256 characters of A-Z a-z 0-9 _ @ . -, the first a letter, digit or _; \"_\" alone is reserved (OpenWhisk's \"the caller's own namespace\")";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid event JSON")]
    InvalidEvent(#[source] serde_json::Error),
    #[error(
        "invalid function name {name:?}: use 1-64 of [A-Za-z0-9_.-] (an OpenWhisk name's '/', '@' and ' ' written ~2f, ~40, ~20), not starting with '.' or '-'"
    )]
    InvalidName { name: String },
    #[error("invalid namespace {namespace:?}: use {rule}", rule = NAMESPACE_RULE)]
    InvalidNamespace { namespace: String },
    /// The same text whether the name exists in another namespace or nowhere.
    #[error("function {name:?} is not registered in namespace {namespace:?}")]
    NotFound { namespace: String, name: String },
    #[error("function directory {path}")]
    FunctionDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handler {handler} needs {file} in {dir}, which does not exist")]
    HandlerFileMissing {
        handler: String,
        file: String,
        dir: PathBuf,
    },
    #[error("function directory {}{} is not allowed: {reason}", .path.display(), resolves_to(.path, .resolved))]
    ForbiddenDir {
        path: PathBuf,
        /// `path` canonicalised (symlinks resolved).
        resolved: PathBuf,
        reason: String,
    },
    #[error("handler {handler}: {file} resolves to {}, outside the function directory {}", .resolved.display(), .dir.display())]
    HandlerOutsideDir {
        handler: String,
        file: String,
        resolved: PathBuf,
        dir: PathBuf,
    },
    #[error("{field} {value} is out of range: {min} to {max}{}", .note.map(|n| format!(" ({n})")).unwrap_or_default())]
    LimitOutOfRange {
        field: &'static str,
        value: String,
        min: String,
        max: String,
        /// What sets the range, when it is not obvious.
        note: Option<&'static str>,
    },
    #[error("{0}")]
    InvalidConfig(String),
    /// A bad OpenWhisk activation (its parameters, environment or context fields).
    #[error("invalid OpenWhisk activation")]
    OpenWhisk(#[from] crate::openwhisk::error::Error),
    /// An OpenWhisk action refused ([`crate::openwhisk::action`]).
    #[error(transparent)]
    Action(Box<crate::openwhisk::action::Error>),
    /// `PUT` of an action that exists, without `overwrite` (OpenWhisk's text).
    #[error("resource already exists")]
    ActionExists { namespace: String, name: String },
    #[error("function {function}'s packages")]
    Packages {
        function: String,
        #[source]
        source: Box<crate::packages::Error>,
    },
    /// Listing or collecting the node's package cache (`GET /packages`, `POST
    /// /packages/gc`).
    #[error("the package cache")]
    PackageCache(#[source] Box<crate::packages::Error>),
    #[error("unpack function archive into {path}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: crate::upload::Error,
    },
    #[error("function {function}: handler {handler} failed to load: {}: {}", error.kind, error.message)]
    LoadFailed {
        function: String,
        handler: String,
        error: FunctionError,
    },
    #[error("function {function} raised {}: {}", error.kind, error.message)]
    Handler {
        function: String,
        error: FunctionError,
        logs: Logs,
    },
    #[error("function {function} timed out after {timeout_ms} ms")]
    Timeout {
        function: String,
        timeout_ms: u64,
        logs: Logs,
    },
    #[error("function {function} ran out of memory (limit {limit_mb} MiB)")]
    OutOfMemory {
        function: String,
        limit_mb: u64,
        logs: Logs,
    },
    #[error("function {function} returned a result that is not JSON")]
    BadResult {
        function: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("function {function}'s instance (pid {pid} in sandbox {sandbox}) exited during the invocation")]
    InstanceDied {
        function: String,
        sandbox: String,
        pid: i32,
        logs: Logs,
    },
    #[error("sandbox {sandbox}: shim could not start an instance of {function}: {message}")]
    Spawn {
        sandbox: String,
        function: String,
        message: String,
    },
    #[error("sandbox {sandbox}: talking to {peer}")]
    Protocol {
        sandbox: String,
        peer: &'static str,
        #[source]
        source: ipc::Error,
    },
    #[error(transparent)]
    Pool(#[from] pool::Error),
    #[error("state directory {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("function {function} does not accept {method} on /run: its ol.yaml's triggers.http allows only [{}]", allowed.join(" "))]
    MethodNotAllowed {
        function: String,
        method: String,
        allowed: Vec<String>,
    },
    #[error("function {function} answered an HTTP response that cannot be sent: {why}")]
    BadHttpResponse { function: String, why: String },
    #[error("function {function} returned bytes: only a function called through `sprout` may return bytes")]
    BytesResult { function: String },
    #[error("function {function} returned a result of {len} bytes, over the limit of {max} bytes for a result")]
    ResultTooLarge {
        function: String,
        len: usize,
        max: usize,
    },
    #[error("call to {function} failed: {message}")]
    CallFailed { function: String, message: String },
    #[error("function {function} was stopped: its workflow ended (another step failed or timed out, or its caller went away)")]
    Cancelled { function: String },
    #[error("function {function}: no instance free after waiting {waited_ms} ms (all {max_instances} busy)")]
    QueueTimeout {
        function: String,
        waited_ms: u64,
        max_instances: usize,
    },
    /// The function's queue holds `max_queue` waiting requests already (OpenLambda's
    /// worker: "queue is full"). The request never entered it.
    #[error("function {function}: queue is full ({max_queue} requests waiting, the most max_queue allows)")]
    QueueFull { function: String, max_queue: usize },
    #[error("namespace {namespace:?} has too many invocations in flight: its limit is {limit} concurrent")]
    ConcurrencyLimit { namespace: String, limit: u64 },
    #[error("namespace {namespace:?} is over its limit of {limit} invocations per minute")]
    RateLimit { namespace: String, limit: u64 },
    #[error("workflow {name:?} is not registered in namespace {namespace:?}")]
    WorkflowNotFound { namespace: String, name: String },
    #[error("invalid workflow: {0}")]
    InvalidWorkflow(String),
    #[error("workflow {workflow:?} failed at step {step}")]
    Workflow {
        workflow: String,
        /// Where the step is in the workflow file, and what it is.
        step: String,
        #[source]
        source: Box<Error>,
    },
    #[error("workflow {workflow:?} timed out after {timeout_ms} ms at step {step}")]
    WorkflowTimeout {
        workflow: String,
        timeout_ms: u64,
        step: String,
    },
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The same text whether the id is unknown, removed or of another namespace.
    #[error("activation {id} is not recorded here (unknown, removed by retention, or not in the caller's namespace)")]
    ActivationNotFound { id: ipc::api::ActivationId },
    #[error("activation {id} was accepted and has not finished yet")]
    ActivationPending { id: ipc::api::ActivationId },
    #[error("this agent keeps no activation records (it has no data directory, or runs with --no-records)")]
    RecordsOff,
    #[error("asynchronous invocations need activation records, and this agent keeps none (no data directory, or --no-records)")]
    AsyncNeedsRecords,
    #[error(transparent)]
    Records(#[from] crate::activations::Error),
    #[error("{}", crate::activations::LOST_AT_SHUTDOWN)]
    NotStarted,
    #[error(transparent)]
    DataDir(#[from] crate::data_dir::Error),
    #[error(transparent)]
    Registrations(#[from] crate::registrations::Error),
}

/// ` (resolves to <resolved>)` when a path is not already canonical.
fn resolves_to(path: &std::path::Path, resolved: &std::path::Path) -> String {
    if path == resolved {
        String::new()
    } else {
        format!(" (resolves to {})", resolved.display())
    }
}

/// What kind of failure an error is: decides the HTTP status and the CLI exit code,
/// here and nowhere else ([`ErrorKind::http_status`], [`ErrorKind::exit_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter)]
pub enum ErrorKind {
    /// The request was wrong (400).
    BadRequest,
    /// The function does not exist (404).
    NotFound,
    /// The function does not accept the request's method on `/run` (405).
    MethodNotAllowed,
    /// The function ran and failed: raised, ran out of memory (502).
    Function,
    /// The function (or the wait for an instance) took too long (504).
    Timeout,
    /// sprout itself failed (500).
    Internal,
    /// sprout is going away or has no room (503).
    Unavailable,
    /// The resource exists and the request did not say to replace it (409).
    Conflict,
    /// A limit refused the request before it was queued: a full function queue, a
    /// namespace's concurrent or per-minute invocations (429). Try again later.
    TooManyRequests,
}

/// The CLI's exit code when a function failed or timed out.
pub const EXIT_FUNCTION: u8 = 1;
/// The CLI's exit code when the request was wrong or named nothing that exists.
pub const EXIT_BAD_REQUEST: u8 = 2;
/// The CLI's exit code when sprout itself failed.
pub const EXIT_INTERNAL: u8 = 3;
/// The CLI's exit code when a limit refused the request (429): nothing ran, and the
/// same request may succeed later.
pub const EXIT_LIMITED: u8 = 4;

impl ErrorKind {
    /// The HTTP status the API answers this kind of error with.
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Function => 502,
            ErrorKind::Timeout => 504,
            ErrorKind::Internal => 500,
            ErrorKind::Unavailable => 503,
            ErrorKind::TooManyRequests => 429,
            ErrorKind::Conflict => 409,
        }
    }

    /// The kind an HTTP error status stands for, as a client of the API reads it back:
    /// the kind whose [`ErrorKind::http_status`] it is, else the nearest (any other
    /// 4xx is the request's fault, anything else sprout's).
    pub fn from_http_status(status: u16) -> ErrorKind {
        use strum::IntoEnumIterator;
        ErrorKind::iter()
            .find(|k| k.http_status() == status)
            .unwrap_or(match status {
                400..=499 => ErrorKind::BadRequest,
                _ => ErrorKind::Internal,
            })
    }

    /// The `sprout` CLI's exit code for this kind of error.
    pub const fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Function | ErrorKind::Timeout => EXIT_FUNCTION,
            ErrorKind::BadRequest
            | ErrorKind::NotFound
            | ErrorKind::MethodNotAllowed
            | ErrorKind::Conflict => EXIT_BAD_REQUEST,
            ErrorKind::Internal | ErrorKind::Unavailable => EXIT_INTERNAL,
            ErrorKind::TooManyRequests => EXIT_LIMITED,
        }
    }
}

impl Error {
    /// The one "no such function" error, for a client and a calling function alike: it
    /// names the name and the namespace asked in, and says nothing about others.
    pub fn not_found_in(namespace: &str, name: &str) -> Error {
        Error::NotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        use Error::*;
        match self {
            InvalidEvent(_)
            | InvalidName { .. }
            | InvalidNamespace { .. }
            | FunctionDir { .. }
            | HandlerFileMissing { .. }
            | ForbiddenDir { .. }
            | HandlerOutsideDir { .. }
            | LimitOutOfRange { .. }
            | InvalidConfig(_)
            | OpenWhisk(_)
            | InvalidWorkflow(_)
            | Unpack { .. }
            | Action(_) => ErrorKind::BadRequest,
            ActionExists { .. } => ErrorKind::Conflict,
            NotFound { .. }
            | WorkflowNotFound { .. }
            | ActivationNotFound { .. }
            | ActivationPending { .. }
            | RecordsOff => ErrorKind::NotFound,
            AsyncNeedsRecords => ErrorKind::BadRequest,
            Records(crate::activations::Error::IdInUse { .. }) => ErrorKind::BadRequest,
            Records(_) => ErrorKind::Internal,
            MethodNotAllowed { .. } => ErrorKind::MethodNotAllowed,
            Workflow { source, .. } => source.kind(),
            WorkflowTimeout { .. } | QueueTimeout { .. } => ErrorKind::Timeout,
            BytesResult { .. }
            | ResultTooLarge { .. }
            | BadHttpResponse { .. }
            | CallFailed { .. }
            | Cancelled { .. } => ErrorKind::Function,
            LoadFailed { .. }
            | Handler { .. }
            | OutOfMemory { .. }
            | BadResult { .. }
            | InstanceDied { .. } => ErrorKind::Function,
            Timeout { .. } => ErrorKind::Timeout,
            Packages { source, .. } if source.is_bad_request() => ErrorKind::BadRequest,
            Packages { source, .. } if matches!(**source, crate::packages::Error::Busy(_)) => {
                ErrorKind::Unavailable
            }
            Spawn { .. }
            | Protocol { .. }
            | Pool(_)
            | State { .. }
            | DataDir(_)
            | Registrations(_)
            | Packages { .. }
            | PackageCache(_) => ErrorKind::Internal,
            ShuttingDown | NotStarted => ErrorKind::Unavailable,
            QueueFull { .. } | ConcurrencyLimit { .. } | RateLimit { .. } => {
                ErrorKind::TooManyRequests
            }
        }
    }

    /// The activation status this error gives an invocation's record (OpenWhisk's
    /// meaning): the function's own error is an application error; the function
    /// failing as a program (timeout, out of memory, a crash, a load failure, a result
    /// that is not one) a developer error; a request refused before it ran (bad input,
    /// no such function, no room) and sprout's own failures an internal error.
    pub fn activation_status(&self) -> ipc::api::ActivationStatus {
        use ipc::api::ActivationStatus as S;
        use Error::*;
        match self {
            Workflow { source, .. } => source.activation_status(),
            Handler { .. } => S::ApplicationError,
            LoadFailed { .. }
            | OutOfMemory { .. }
            | BadResult { .. }
            | InstanceDied { .. }
            | BytesResult { .. }
            | ResultTooLarge { .. }
            | BadHttpResponse { .. }
            | CallFailed { .. }
            | Timeout { .. }
            | WorkflowTimeout { .. } => S::ActionDeveloperError,
            _ => S::WhiskInternalError,
        }
    }

    /// The stable name of this error in API bodies.
    pub fn name(&self) -> &'static str {
        use Error::*;
        match self {
            InvalidEvent(_) => "invalid_event",
            InvalidName { .. }
            | InvalidNamespace { .. }
            | InvalidConfig(_)
            | OpenWhisk(_)
            | LimitOutOfRange { .. }
            | Action(_) => "bad_request",
            ActionExists { .. } => "conflict",
            InvalidWorkflow(_) => "invalid_workflow",
            WorkflowNotFound { .. } => "not_found",
            Workflow { source, .. } => source.name(),
            WorkflowTimeout { .. } | QueueTimeout { .. } => "timeout",
            BytesResult { .. } | ResultTooLarge { .. } | BadHttpResponse { .. } => "bad_result",
            MethodNotAllowed { .. } => "method_not_allowed",
            CallFailed { .. } => "call_failed",
            Cancelled { .. } => "cancelled",
            FunctionDir { .. }
            | HandlerFileMissing { .. }
            | ForbiddenDir { .. }
            | HandlerOutsideDir { .. }
            | Unpack { .. } => "invalid_function",
            Packages { source, .. } if source.is_bad_request() => "package_error",
            Packages { source, .. } if matches!(**source, crate::packages::Error::Busy(_)) => {
                "unavailable"
            }
            NotFound { .. } | ActivationNotFound { .. } => "not_found",
            ActivationPending { .. } => "pending",
            RecordsOff => "records_off",
            AsyncNeedsRecords => "bad_request",
            Records(crate::activations::Error::IdInUse { .. }) => "bad_request",
            Records(_) => "internal",
            LoadFailed { .. } => "load_error",
            Handler { .. } => "handler_error",
            Timeout { .. } => "timeout",
            OutOfMemory { .. } => "out_of_memory",
            BadResult { .. } => "bad_result",
            InstanceDied { .. } => "instance_died",
            Spawn { .. }
            | Protocol { .. }
            | Pool(_)
            | State { .. }
            | DataDir(_)
            | Registrations(_)
            | Packages { .. }
            | PackageCache(_) => "internal",
            ShuttingDown | NotStarted => "unavailable",
            QueueFull { .. } | ConcurrencyLimit { .. } | RateLimit { .. } => "too_many_requests",
        }
    }

    /// OpenLambda's answer to a method its `triggers.http` does not allow, the text
    /// its clients test for: `HTTP method not allowed. Sent: PUT, Allowed: [GET POST]`
    /// and a newline. `None` for any other error.
    pub fn openlambda_text(&self) -> Option<String> {
        match self {
            Error::MethodNotAllowed {
                method, allowed, ..
            } => Some(format!(
                "HTTP method not allowed. Sent: {method}, Allowed: [{}]\n",
                allowed.join(" ")
            )),
            _ => None,
        }
    }

    /// The error as the API and the CLI show it; the message is the whole cause chain.
    pub fn detail(&self) -> ErrorDetail {
        let inner = match self {
            Error::Workflow { source, .. } => source,
            other => other,
        };
        let (exception, traceback) = match inner {
            Error::Handler { error, .. } | Error::LoadFailed { error, .. } => {
                (Some(error.kind.clone()), Some(error.traceback.clone()))
            }
            _ => (None, None),
        };
        let logs = match inner {
            Error::Handler { logs, .. }
            | Error::Timeout { logs, .. }
            | Error::OutOfMemory { logs, .. }
            | Error::InstanceDied { logs, .. } => Some(logs.clone()),
            _ => None,
        };
        ErrorDetail {
            kind: self.name().to_owned(),
            message: ipc::chain(self),
            exception,
            traceback,
            logs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    #[test]
    fn every_kind_reads_back_from_its_own_status() {
        for kind in ErrorKind::iter() {
            assert_eq!(ErrorKind::from_http_status(kind.http_status()), kind);
        }
        assert_eq!(ErrorKind::from_http_status(413), ErrorKind::BadRequest);
        assert_eq!(ErrorKind::from_http_status(501), ErrorKind::Internal);
    }

    #[test]
    fn package_errors_are_the_registrations_fault_unless_the_node_failed_or_was_busy() {
        let of = |source| Error::Packages {
            function: "default/f".into(),
            source: Box::new(source),
        };
        let refused = of(crate::packages::Error::Manifest("x".into()));
        assert_eq!(
            (refused.kind(), refused.name()),
            (ErrorKind::BadRequest, "package_error")
        );
        let busy = of(crate::packages::Error::Busy(
            std::time::Duration::from_secs(1),
        ));
        assert_eq!(
            (busy.kind(), busy.name()),
            (ErrorKind::Unavailable, "unavailable")
        );
        let broken = of(crate::packages::Error::Sandbox("spawner died".into()));
        assert_eq!(
            (broken.kind(), broken.name()),
            (ErrorKind::Internal, "internal")
        );
        let cache = Error::PackageCache(Box::new(crate::packages::Error::Sandbox("x".into())));
        assert_eq!(cache.to_string(), "the package cache");
    }

    #[test]
    fn exit_codes_group_kinds_by_whose_fault() {
        assert_eq!(ErrorKind::Timeout.exit_code(), EXIT_FUNCTION);
        assert_eq!(ErrorKind::NotFound.exit_code(), EXIT_BAD_REQUEST);
        assert_eq!(ErrorKind::Unavailable.exit_code(), EXIT_INTERNAL);
        assert_eq!(ErrorKind::TooManyRequests.exit_code(), EXIT_LIMITED);
    }

    #[test]
    fn a_full_queue_says_so_and_is_a_429() {
        let e = Error::QueueFull {
            function: "ns/f".into(),
            max_queue: 8,
        };
        assert_eq!(e.kind().http_status(), 429);
        assert_eq!(e.name(), "too_many_requests");
        assert_eq!(
            e.to_string(),
            "function ns/f: queue is full (8 requests waiting, the most max_queue allows)"
        );
    }
}
