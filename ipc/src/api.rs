//! JSON bodies of the agent's HTTP API (`docs/api.md`), shared by server and clients.
//!
//! Every function and workflow belongs to a namespace (the tenant boundary):
//! `/functions/...` and `/workflows/...` act in [`DEFAULT_NAMESPACE`],
//! `/namespaces/{ns}/functions/...` and `/namespaces/{ns}/workflows/...` in `ns`;
//! [`function_path`] and [`workflow_path`] build them.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The namespace of everything registered without one.
pub const DEFAULT_NAMESPACE: &str = "default";

fn is_default_namespace(ns: &str) -> bool {
    ns == DEFAULT_NAMESPACE
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

/// What a listing from an agent that predates runtimes runs: Python.
fn default_runtime() -> String {
    "python".to_owned()
}

/// The network of a function in a listing from an agent that predates networks.
fn default_network() -> String {
    "none".to_owned()
}

/// The API path of function `name` in `namespace` followed by `rest` (`""`,
/// `"/invoke"`): `/functions/{name}{rest}` in the default namespace (so existing
/// clients and routes stay as they were), `/namespaces/{ns}/functions/{name}{rest}`
/// otherwise. An empty `name` gives the namespace's listing, `/functions`.
pub fn function_path(namespace: &str, name: &str, rest: &str) -> String {
    scoped_path(namespace, "functions", name, rest)
}

/// [`function_path`] for workflows: `/workflows/{name}{rest}` or
/// `/namespaces/{ns}/workflows/{name}{rest}`.
pub fn workflow_path(namespace: &str, name: &str, rest: &str) -> String {
    scoped_path(namespace, "workflows", name, rest)
}

/// What is percent-encoded in a path segment: all but letters, digits and `-._~@`
/// (so a name holding `%`, `/` or `?` reaches the agent as written, and is refused
/// there by the name rules, instead of being decoded into another name).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@');

fn scoped_path(namespace: &str, collection: &str, name: &str, rest: &str) -> String {
    let prefix = if is_default_namespace(namespace) {
        String::new()
    } else {
        format!(
            "/namespaces/{}",
            percent_encoding::utf8_percent_encode(namespace, SEGMENT)
        )
    };
    if name.is_empty() {
        format!("{prefix}/{collection}{rest}")
    } else {
        let name = percent_encoding::utf8_percent_encode(name, SEGMENT);
        format!("{prefix}/{collection}/{name}{rest}")
    }
}

/// Per-function settings; every field is optional on input and filled with the
/// agent's defaults on output. Names follow OpenWhisk's `wsk` limits.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// The language runtime: `python`, `nodejs` or `native`, optionally with a
    /// version that must match the installed one (`python:3.11`, `nodejs:20`,
    /// `nodejs:default`, `nodejs:latest`). Default: detected from the directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// `none` (default: only the sandbox's own loopback) or `egress` (outbound IPv4
    /// through the host, and the host's DNS configuration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
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
    /// The namespace to register in. Optional: the path's namespace (`default` for
    /// `/functions/{name}`) is used, and a different one here is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(flatten)]
    pub config: FunctionConfig,
}

/// A registered function, as listed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FunctionInfo {
    /// The tenant it belongs to (`default` unless registered elsewhere).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub name: String,
    /// The runtime that runs it (`python`, `nodejs`, `native`), as named or detected
    /// at registration.
    #[serde(default = "default_runtime")]
    pub runtime: String,
    /// Its network: `none` (its sandbox's own loopback only) or `egress`.
    #[serde(default = "default_network")]
    pub network: String,
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
    /// Its packages as resolved when it was registered (`name==version`,
    /// `name@version`), fixed until it is registered again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
}

/// One package of the node's package cache (`GET /packages`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PackageInfo {
    /// `python` or `npm`.
    pub kind: String,
    /// The cache entry: `<name>-<version>-<interpreter>-<archive hash>` (Python),
    /// `npm-<hash of the lock or manifest>`.
    pub key: String,
    pub name: String,
    pub version: String,
    /// SHA-256 of the archive installed (npm: of the lock or manifest).
    pub sha256: String,
    /// Top-level modules (Python).
    #[serde(default)]
    pub modules: Vec<String>,
    /// Bytes of its files.
    pub bytes: u64,
    /// Registered functions using it, `namespace/name`.
    #[serde(default)]
    pub users: Vec<String>,
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

/// How an activation ended: OpenWhisk's four statuses, with its codes (0–3) and the
/// names its `statusForCode` gives them, which are also the serde names.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ActivationStatus {
    /// The function returned a result.
    Success,
    /// The function reported an error of its own (raised, or answered one).
    ApplicationError,
    /// The function failed as a program: it timed out, ran out of memory, crashed,
    /// failed to load or answered something that is not a result.
    ActionDeveloperError,
    /// sprout failed, or the activation was lost with the agent (a crash).
    WhiskInternalError,
}

impl ActivationStatus {
    /// Every status, by code.
    pub const ALL: [ActivationStatus; 4] = [
        ActivationStatus::Success,
        ActivationStatus::ApplicationError,
        ActivationStatus::ActionDeveloperError,
        ActivationStatus::WhiskInternalError,
    ];

    /// OpenWhisk's status code: 0 success, 1 application error, 2 developer error,
    /// 3 internal error.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The status of an OpenWhisk code, if it is one.
    pub fn from_code(code: u8) -> Option<ActivationStatus> {
        ActivationStatus::ALL.get(code as usize).copied()
    }

    /// OpenWhisk's name of the status (`statusForCode`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ActivationStatus::Success => "success",
            ActivationStatus::ApplicationError => "application_error",
            ActivationStatus::ActionDeveloperError => "action_developer_error",
            ActivationStatus::WhiskInternalError => "whisk_internal_error",
        }
    }
}

/// The response header that carries an invocation's activation id, on success and
/// on failure.
pub const ACTIVATION_ID_HEADER: &str = "X-Sprout-Activation-Id";

/// An activation's id: 128 bits written as 32 lowercase hex digits, the form of
/// OpenWhisk's activation ids. A caller may choose it (a controller sends its own);
/// the agent makes a random one otherwise.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActivationId(u128);

/// A text that is not an activation id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid activation id {0:?}: an activation id is 32 lowercase hex digits")]
pub struct InvalidActivationId(pub String);

impl ActivationId {
    pub const fn from_u128(bits: u128) -> ActivationId {
        ActivationId(bits)
    }

    pub const fn as_u128(self) -> u128 {
        self.0
    }

    /// Parses exactly 32 lowercase hex digits.
    pub fn parse(text: &str) -> Result<ActivationId, InvalidActivationId> {
        let bad = || InvalidActivationId(text.chars().take(64).collect());
        if text.len() != 32 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        u128::from_str_radix(text, 16)
            .map(ActivationId)
            .map_err(|_| bad())
    }
}

impl std::fmt::Display for ActivationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::fmt::Debug for ActivationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ActivationId({self})")
    }
}

impl std::str::FromStr for ActivationId {
    type Err = InvalidActivationId;
    fn from_str(s: &str) -> Result<ActivationId, InvalidActivationId> {
        ActivationId::parse(s)
    }
}

impl Serialize for ActivationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ActivationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ActivationId, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ActivationId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// An activation's record (`GET /activations/{id}`), in OpenWhisk's terms: times are
/// milliseconds (since the Unix epoch for `start` and `end`).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ActivationRecord {
    pub activation_id: ActivationId,
    pub namespace: String,
    /// The function's name.
    pub name: String,
    /// The function's version (its registration's count) that ran; 0 if none did.
    pub version: u64,
    /// When its instance began working on it: loading it on a cold start, else running it.
    pub start: u64,
    pub end: u64,
    /// `end - start`: includes `init_time`, as OpenWhisk's.
    pub duration: u64,
    /// From its arrival (an asynchronous one: its acceptance) to `start`: time in the
    /// function's queue.
    pub wait_time: u64,
    /// Making and loading a new instance (a cold start); 0 when warm.
    pub init_time: u64,
    /// How its instance was found (`warm`, `thawed`, `stem_cell`, `new_sandbox`,
    /// `package_zygote`); `null` if it never got one.
    pub start_path: Option<String>,
    /// OpenWhisk's name of the status.
    pub status: ActivationStatus,
    /// OpenWhisk's code of the status (0-3).
    pub status_code: u8,
    /// The result (JSON), or `{"error": {...}}` for a failure; absent from listings.
    /// A result over the record's cap is kept as `{"truncated": true, "size": N,
    /// "head": "..."}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    /// What it printed, one entry a line: `TIME stdout: text` (RFC 3339, ns);
    /// absent from listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<Vec<String>>,
    /// Set when lines were left out of `logs` (the capture limit or the record's cap).
    #[serde(default)]
    pub logs_truncated: bool,
    /// The activation of the function that made this call through the agent.
    pub cause: Option<ActivationId>,
    /// Whether its handler called other functions (the runtime's word). Calls that
    /// ran inside its own sandbox are part of this activation: their time is in its
    /// duration, their output in its logs. Calls that ran in a sandbox of their own
    /// have records of their own, whose `cause` is this activation.
    #[serde(default)]
    pub called: bool,
    /// Whether its client waited for it (`false`: `?blocking=false`).
    pub blocking: bool,
    /// The function's limits when it was activated: what its memory time is billed
    /// at (`GET /namespaces/{ns}/usage`'s `mb_ms` is the sum of `limits.memory` ×
    /// `duration` over its records).
    pub limits: ActivationLimits,
    /// An OpenWhisk activation's action kind (`python:3`, `nodejs:20`, `blackbox`);
    /// absent for sprout's own invocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// An OpenWhisk activation's subject (who invoked it); absent for sprout's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// A function's limits as an activation records them, with the names and units of
/// OpenWhisk's `annotations.limits`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ActivationLimits {
    /// Memory limit in MiB (OpenWhisk's "MB").
    pub memory: u64,
    /// Timeout in milliseconds.
    pub timeout: u64,
}

/// The answer to an asynchronous invoke (`202`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ActivationAccepted {
    #[serde(rename = "activationId")]
    pub activation_id: ActivationId,
}

/// `GET /activations/{id}/result`, OpenWhisk's shape.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ActivationResult {
    pub result: Box<RawValue>,
    pub status: ActivationStatus,
    pub success: bool,
}

/// `GET /activations/{id}/logs`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ActivationLogs {
    pub logs: Vec<String>,
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
    #[serde(default = "default_namespace")]
    pub namespace: String,
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
    /// Ready stem cells by runtime (`python`, `nodejs`, `native`: every runtime,
    /// zero included); they add up to `stem_cells`.
    #[serde(default)]
    pub stem_cells_by_runtime: std::collections::BTreeMap<String, usize>,
    /// Sandboxes made so far by forking the fork server's zygote, and by libcontainer.
    #[serde(default)]
    pub sandboxes_forked: u64,
    #[serde(default)]
    pub sandboxes_created: u64,
    /// Frozen sandboxes (stem cells and idle instances).
    pub frozen: usize,
    /// Requests waiting for an instance.
    pub queued: usize,
    /// Memory reserved by live sandboxes' limits, and the budget for it.
    pub reserved_mb: u64,
    pub memory_budget_mb: u64,
    pub invocations: u64,
    pub uptime_ms: u64,
    /// Packages this agent installed into the package cache, and packages a
    /// registration needed and found there already.
    #[serde(default)]
    pub packages_installed: u64,
    #[serde(default)]
    pub package_cache_hits: u64,
    /// Live package-aware zygotes (zygotes that imported a package set).
    #[serde(default)]
    pub package_zygotes: usize,
    /// Every namespace that has a function or a workflow, by name.
    #[serde(default)]
    pub namespaces: Vec<NamespaceStatus>,
}

/// A namespace's usage since the agent started (`GET /namespaces/{ns}/usage`): its
/// client invocations that ended (calls a function makes are part of its
/// invocation), counted when each ends.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NamespaceUsage {
    pub namespace: String,
    pub invocations: u64,
    /// Invocations whose status is not `success`.
    pub errors: u64,
    /// Execution time: each invocation's duration in whole milliseconds, summed.
    pub duration_ms: u64,
    /// Each invocation's memory limit (MiB) times its duration (ms, as in
    /// `duration_ms`), summed: exact, where `gb_seconds` is rounded.
    pub mb_ms: u64,
    /// `mb_ms` / 1024 / 1000: memory limit in GB (1024 MiB) times duration in seconds.
    pub gb_seconds: f64,
    /// Invocations by activation status (every status, zero included).
    pub statuses: std::collections::BTreeMap<String, u64>,
}

/// One namespace in [`Status`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NamespaceStatus {
    pub namespace: String,
    pub functions: usize,
    pub workflows: usize,
    /// Sandboxes bound to its functions (warm, frozen or running).
    pub sandboxes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_statuses_have_openwhisks_codes_and_names() {
        for (code, status) in ActivationStatus::ALL.into_iter().enumerate() {
            assert_eq!(status.code() as usize, code);
            assert_eq!(ActivationStatus::from_code(code as u8), Some(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert_eq!(ActivationStatus::from_code(4), None);
        assert_eq!(
            ActivationStatus::WhiskInternalError.as_str(),
            "whisk_internal_error"
        );
    }

    #[test]
    fn names_are_percent_encoded_into_paths() {
        assert_eq!(
            function_path("team@a", "a.b-c_d~e", ""),
            "/namespaces/team@a/functions/a.b-c_d~e"
        );
        // Not decoded by the agent into another (valid) name.
        assert_eq!(function_path("default", "a%41", ""), "/functions/a%2541");
        assert_eq!(
            workflow_path("x y", "a/b?c", "/invoke"),
            "/namespaces/x%20y/workflows/a%2Fb%3Fc/invoke"
        );
    }

    #[test]
    fn paths_keep_the_default_namespace_where_it_was() {
        assert_eq!(function_path("default", "f", ""), "/functions/f");
        assert_eq!(
            function_path("default", "f", "/invoke"),
            "/functions/f/invoke"
        );
        assert_eq!(function_path("default", "", ""), "/functions");
        assert_eq!(
            function_path("a@b.c", "f", "/invoke?logs=true"),
            "/namespaces/a@b.c/functions/f/invoke?logs=true"
        );
        assert_eq!(function_path("t", "", ""), "/namespaces/t/functions");
        assert_eq!(
            workflow_path("default", "w", "/invoke"),
            "/workflows/w/invoke"
        );
        assert_eq!(workflow_path("t", "w", ""), "/namespaces/t/workflows/w");
    }

    #[test]
    fn bodies_without_a_namespace_are_in_the_default_one() {
        let info: FunctionInfo = serde_json::from_str(
            r#"{"name":"f","path":"/x","handler":"f:f","memory_mb":1,"timeout_ms":1,"pids":1,"cpus":1.0,"max_instances":1,"warm_instances":0}"#,
        )
        .unwrap();
        assert_eq!(info.namespace, DEFAULT_NAMESPACE);
        let r: RegisterFunction = serde_json::from_str(r#"{"path":"/x"}"#).unwrap();
        assert_eq!(r.namespace, None);
        let r: RegisterFunction =
            serde_json::from_str(r#"{"path":"/x","namespace":"t","memory_mb":64}"#).unwrap();
        assert_eq!(
            (r.namespace.as_deref(), r.config.memory_mb),
            (Some("t"), Some(64))
        );
        assert_eq!(
            serde_json::to_string(&RegisterFunction {
                path: "/x".into(),
                ..Default::default()
            })
            .unwrap(),
            r#"{"path":"/x"}"#
        );
    }
}
