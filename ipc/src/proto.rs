//! The messages between sprout's processes and the named handshakes built on them.
//!
//! ```text
//! agent ──ShimRequest──▶ shim ──ZygoteRequest──▶ python zygote ──fork──▶ instance
//! agent ◀─ShimEvent───── shim ◀─ZygoteEvent────── zygote
//! agent ◀════════════ InstanceRequest / InstanceEvent ════════════▶ instance
//! ```
//!
//! A forked sandbox ([`SandboxSpec`]) is made by the fork server: the agent asks its
//! shim (`ShimRequest::ForkSandbox`), which asks its zygote
//! (`ZygoteRequest::ForkSandbox`); the zygote's child then speaks [`EnterEvent`] /
//! [`EnterRequest`] with the agent on the new sandbox's channel until it has made
//! the sandbox, and the new sandbox's shim takes the channel over.
//!
//! The shim hands the agent the instance's own channel (and its stdout/stderr pipes),
//! so a warm invoke goes from the agent straight to the function's process.
//! Every header is a JSON object whose `op` names the message.
//!
//! Calls between functions ([`CallRequest`] / [`CallReply`]): an instance asks its
//! shim (on its *calls channel*) to run a function whose code is attached in the
//! sandbox, or the agent (on the agent's call socket, `/.sprout/agent.sock`) to
//! resolve a name or run a call in a sibling sandbox. The agent runs a workflow's
//! sequential step in a sandbox the same way, with [`ShimRequest::Call`].

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};
use strum::IntoStaticStr;

use crate::frame::{Channel, Error, Message};
use crate::payload::Payload;

/// A language runtime a shim can start instances of. What differs between runtimes is
/// known in two seams over this one enum: the agent's (`agent::runtime`) and the
/// shim's (`shim::runtime`).
///
/// - `Python`: instances forked from a Python zygote;
/// - `Nodejs`: each instance a `node` process booted ahead of its `load`, behind an
///   instance host (the shim's executable in host mode) that speaks this protocol
///   for it (Node cannot take descriptors over a socket);
/// - `Native`: an executable of the function's own, behind an instance host: OpenWhisk's
///   actionloop protocol (`exec`), or AWS Lambda's runtime API (`bootstrap`).
#[derive(
    Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Runtime {
    Python,
    Nodejs,
    Native,
}

impl Runtime {
    /// Every runtime, in the order stem cells are made for them.
    pub const ALL: [Runtime; 3] = [Runtime::Python, Runtime::Nodejs, Runtime::Native];

    /// Its name, as on the wire.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// Where a handler lives: a module (a file `module.py` under the code directory, or a
/// package) and a callable in it. Written `module:function`; OpenLambda's default is `f:f`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    pub module: String,
    pub function: String,
}

impl Handler {
    /// Parses `module:function`. Both parts must be dotted Python identifiers.
    pub fn parse(s: &str) -> Result<Handler, String> {
        let (module, function) = s
            .split_once(':')
            .ok_or_else(|| format!("handler {s:?} is not of the form module:function"))?;
        let ident = |p: &str| {
            !p.is_empty()
                && !p.starts_with(|c: char| c.is_ascii_digit())
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if !module.split('.').all(ident) {
            return Err(format!(
                "handler module {module:?} is not a Python module name"
            ));
        }
        if !ident(function) {
            return Err(format!(
                "handler function {function:?} is not a Python identifier"
            ));
        }
        Ok(Handler {
            module: module.to_owned(),
            function: function.to_owned(),
        })
    }

    /// The file that holds the module, relative to the code directory
    /// (`pkg.mod` → `pkg/mod.py`).
    pub fn module_file(&self) -> String {
        format!("{}.py", self.module.replace('.', "/"))
    }
}

impl std::fmt::Display for Handler {
    /// `module:function`, or `module` alone when the function part is empty (a
    /// native executable, a Node.js module that is itself the handler).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.function.is_empty() {
            return write!(f, "{}", self.module);
        }
        write!(f, "{}:{}", self.module, self.function)
    }
}

/// Calls nest at most this deep (a call cycle or runaway recursion stops here).
pub const MAX_CALL_DEPTH: u32 = 16;

/// Everything a shim needs to run a function in its sandbox: the function's code is
/// attached at `code_dir`, and a call may run for `timeout_ms`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CallSpec {
    pub function: String,
    /// The registration it came from; a newer one is a different function.
    pub version: u64,
    pub code_dir: String,
    pub handler: Handler,
    pub timeout_ms: u64,
    /// The callee's namespace and memory limit, for what it learns about itself.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub memory_mb: u64,
    /// The callee's package directories ([`LoadSpec::deps`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deps: Vec<String>,
    /// The callee's environment (its `ol.yaml`'s), exported when it is loaded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

impl CallSpec {
    /// What the callee learns about itself when it is loaded from this spec.
    pub fn about(&self) -> About {
        About {
            namespace: self.namespace.clone(),
            version: self.version,
            memory_mb: self.memory_mb,
            timeout_ms: self.timeout_ms,
        }
    }
}

/// An instance → its shim (calls channel) or → the agent (call socket).
/// `Call`'s payload is the event (JSON text, or raw bytes with `raw`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum CallRequest {
    /// To the agent: can `function` run in the caller's sandbox? Answered by
    /// [`CallReply::Resolved`] (after the agent attached its code there).
    Resolve { id: u64, function: String },
    /// With `spec`, to the shim: run it in this sandbox. Without, to the agent: run it
    /// in a sibling sandbox.
    Call {
        id: u64,
        function: String,
        /// The callee's depth: 1 for a call made by a top-level invocation.
        depth: u32,
        #[serde(default, skip_serializing_if = "is_false")]
        raw: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spec: Option<CallSpec>,
    },
    /// To the shim: a direct channel to an instance of `spec` of the caller's own, for
    /// later calls of `function` (answered [`CallReply::Bound`], with the caller's end).
    Bind {
        id: u64,
        function: String,
        spec: CallSpec,
    },
    /// To the shim, unanswered: kill the callee of bind `callee` (the token of its
    /// [`CallReply::Bound`]), bound to this caller, which did not answer in time.
    Unbind { callee: u64 },
}

/// The answer to a [`CallRequest`] or a [`ShimRequest::Call`]. `CallReturned`'s
/// payload is the callee's result (JSON text, or raw bytes with `raw`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum CallReply {
    /// `spec: None`: call it through the agent (it cannot run in this sandbox).
    Resolved { id: u64, spec: Option<CallSpec> },
    CallReturned {
        id: u64,
        #[serde(default, skip_serializing_if = "is_false")]
        raw: bool,
    },
    /// The callee raised `error`.
    CallRaised {
        id: u64,
        function: String,
        error: FunctionError,
    },
    /// The call could not complete: unknown function, depth limit, timeout, the callee
    /// died. `message` says which.
    CallFailed {
        id: u64,
        function: String,
        message: String,
    },
    /// The answer to a [`CallRequest::Bind`]; the frame carries the caller's end of a
    /// socket whose other end an instance of the function serves (`docs/protocol.md`,
    /// "Direct channels"). `callee`, a token never used for another bind, names it in
    /// a later [`CallRequest::Unbind`].
    Bound { id: u64, callee: u64 },
    /// The agent refused the call at once, before running anything: `kind` names the
    /// limit (`too_many_calls`), `message` says which and its value.
    CallRefused {
        id: u64,
        function: String,
        kind: RefusalKind,
        message: String,
    },
}

/// Why the agent refused a call outright ([`CallReply::CallRefused`]).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum RefusalKind {
    /// The calling sandbox has as many calls in flight as the agent allows.
    TooManyCalls,
    /// The shim has as many direct channels bound (to this caller, or in the
    /// sandbox) as it allows: call through it instead.
    TooManyChannels,
}

impl RefusalKind {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a call at `depth` may not be made, if it may not.
pub fn check_depth(function: &str, depth: u32) -> Result<(), String> {
    if depth > MAX_CALL_DEPTH {
        return Err(format!(
            "call depth limit of {MAX_CALL_DEPTH} exceeded calling {function:?} (a call cycle or runaway recursion?)"
        ));
    }
    Ok(())
}

/// The most an OpenWhisk activation's environment ([`InstanceRequest::Invoke`]'s
/// `env`) may take as JSON: it rides in a frame header ([`crate::frame::MAX_HEADER`]).
pub const MAX_ACTIVATION_ENV: usize = 64 << 10;

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a (spare) instance is told to load, by the agent, on its own channel.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LoadSpec {
    pub function: String,
    /// Path of the function's code inside the sandbox.
    pub code_dir: String,
    pub handler: Handler,
    /// What the function may learn about itself (an AWS Lambda context, OpenWhisk's
    /// `__OW_*`): its namespace, registration version, memory limit and time limit.
    #[serde(flatten)]
    pub about: About,
    /// Directories of the function's installed packages inside the sandbox
    /// (`/deps/<package>`), in import order: the runtime puts them on the import path
    /// right after the code directory (Python's `sys.path`; Node.js's module paths).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deps: Vec<String>,
    /// Variables exported to the function's processes before its handler is loaded
    /// (its `ol.yaml`'s `environment`; the agent checked names and sizes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// What kind of HTTP application a loaded handler module is (an instance that
/// reports one in `loaded` is sent whole HTTP requests on `/run`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum HttpApp {
    /// PEP 3333: `app(environ, start_response)` (Flask).
    Wsgi,
    /// ASGI 3: `await app(scope, receive, send)` (FastAPI, Starlette).
    Asgi,
}

/// An HTTP request for an instance that is an [`HttpApp`]; the frame's payload is
/// the request's body. Paths and the query are as the client sent them (still
/// percent-encoded); the runtime decodes them for the app.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpRequest {
    pub method: String,
    /// Where the function is mounted: `/run/{name}` (WSGI's `SCRIPT_NAME`, ASGI's
    /// `root_path`).
    pub script_name: String,
    /// The rest of the path after `script_name`, empty or starting with `/`.
    pub path: String,
    /// The query string without its `?`.
    pub query: String,
    /// The request's headers, in order, as sent.
    pub headers: Vec<(String, String)>,
}

/// The status and headers of an [`HttpApp`]'s response; the frame's payload is the
/// body.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HttpHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

/// What a function may learn about itself, sent with `load`: each runtime shows it in
/// its own way (a Lambda-style `context`, an actionloop line's fields).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct About {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub memory_mb: u64,
    /// An invocation's time limit; its deadline is counted from when its `invoke`
    /// arrives.
    #[serde(default)]
    pub timeout_ms: u64,
}

/// Agent → shim.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ShimRequest {
    /// Hand over an instance of `runtime` (the shim's spare, or a new fork).
    SpawnInstance { instance: u64, runtime: Runtime },
    /// Run `spec` in this sandbox (a workflow's sequential step); the payload is the
    /// event. Answered with a [`CallReply`].
    Call {
        id: u64,
        depth: u32,
        #[serde(default, skip_serializing_if = "is_false")]
        raw: bool,
        spec: CallSpec,
    },
    /// To the fork server's shim only: have the zygote fork a child that makes a new
    /// sandbox. Carries the two descriptors of [`SandboxSpec`].
    ForkSandbox(SandboxSpec),
    /// To a package fork server's shim only, once, before any `ForkSandbox`: have
    /// the zygote import `modules` with `paths` (its packages' directories, attached
    /// at `/deps/<key>`) on its import path. Answered with `packages_imported` or
    /// `import_refused`.
    ImportPackages(ImportSpec),
}

/// What a package fork server's zygote imports before it forks ([`ShimRequest::ImportPackages`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImportSpec {
    /// Package directories (`/deps/<key>`), put on `sys.path` while importing.
    pub paths: Vec<String>,
    /// Top-level modules to import, in order; one that fails is skipped.
    pub modules: Vec<String>,
}

/// What the zygote imported: the modules it has, and each that failed with why.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Imported {
    pub imported: Vec<String>,
    pub failed: Vec<ImportFailure>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImportFailure {
    pub module: String,
    pub error: String,
}

/// A new sandbox forked from the fork server's zygote. `ForkSandbox` requests carry
/// two descriptors with it: the sandbox's end of its shim channel (the shim's
/// descriptor 0) and the write end of its output pipe (descriptors 1 and 2).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The sandbox's id: its hostname and `SPROUT_SANDBOX`.
    pub sandbox: String,
    /// The host user and group every process of the sandbox runs as (mapped to
    /// themselves in the fork server's user namespace).
    pub uid: u32,
    pub gid: u32,
    /// What its shim serves (`SPROUT_RUNTIME`). A Python sandbox's zygote is a fork
    /// of the fork server's, not a new interpreter.
    pub runtime: Runtime,
}

/// A forked sandbox's first process (the fork server zygote's child) → agent, on the
/// new sandbox's channel, before the sandbox's shim runs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum EnterEvent {
    /// Carries a pidfd of the child: the agent checks where it is, makes the
    /// sandbox's cgroup and answers with [`EnterRequest::Join`]s and
    /// [`EnterRequest::Enter`].
    Forked,
    /// Carries a pidfd of the new sandbox's PID 1 (its shim to be). Sent before PID 1
    /// goes on, so nothing of the shim's comes first.
    Entered,
    /// The child could not make the sandbox.
    EnterFailed { message: String },
}

/// What a forked sandbox's channel says after `entered`: its shim's `ready`, or its
/// first process's `enter_failed` (PID 1 failed before it became the shim).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum ForkedBoot {
    Shim(ShimEvent),
    Enter(EnterEvent),
}

/// Agent → a forked sandbox's first process.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum EnterRequest {
    /// Carries up to 8 descriptors: files (opened by the agent for writing) through
    /// which the child joins the sandbox's cgroup by writing `0` into each (v1: each
    /// hierarchy's `tasks`; v2: `cgroup.procs`). More come in further `join`s.
    Join,
    /// Join done: make the namespaces, mounts and PID 1.
    Enter,
}

/// Shim → agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ShimEvent {
    /// The shim is up and its zygotes are ready to fork.
    Ready {
        zygote_pid: i32,
    },
    /// Carries three descriptors: the instance's channel, its stdout and its stderr (read ends).
    InstanceSpawned {
        instance: u64,
        pid: i32,
    },
    SpawnFailed {
        instance: u64,
        message: String,
    },
    /// The fork server's zygote forked the child making sandbox `sandbox` (`pid` in
    /// the fork server's pid namespace).
    SandboxForked {
        sandbox: String,
        pid: i32,
    },
    SandboxForkFailed {
        sandbox: String,
        message: String,
    },
    /// A package fork server's zygote imported its packages.
    PackagesImported(Imported),
    /// It did not (a bad request, or the imports left it unable to fork).
    ImportRefused {
        message: String,
    },
}

/// Shim → zygote. `Fork` carries four descriptors: the instance's end of its channel,
/// the write ends of its stdout and stderr pipes, and the instance's end of its calls
/// channel to the shim.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ZygoteRequest {
    /// The child waits, as a spare, for the agent's `load`.
    Fork { instance: u64, runtime: Runtime },
    /// The fork server's zygote only: fork a child that makes a new sandbox. Carries
    /// the two descriptors of [`SandboxSpec`].
    ForkSandbox(SandboxSpec),
    /// The fork server's zygote only, once: import a package set (see
    /// [`ShimRequest::ImportPackages`]).
    ImportPackages(ImportSpec),
}

/// Zygote → shim.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ZygoteEvent {
    Ready { pid: i32 },
    Forked { instance: u64, pid: i32 },
    ForkFailed { instance: u64, message: String },
    SandboxForked { sandbox: String, pid: i32 },
    SandboxForkFailed { sandbox: String, message: String },
    PackagesImported(Imported),
    ImportRefused { message: String },
}

/// Agent → instance. `Load` comes first; `Invoke`'s payload is the event JSON.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum InstanceRequest {
    /// Comes first, once: which handler to import.
    Load(LoadSpec),
    /// The payload is the event: JSON text, or raw bytes with `raw` (from a call).
    Invoke {
        id: u64,
        /// 0 for a top-level invocation; a callee runs at its caller's depth + 1.
        #[serde(default, skip_serializing_if = "is_zero")]
        depth: u32,
        #[serde(default, skip_serializing_if = "is_false")]
        raw: bool,
        /// An OpenWhisk activation's variables (`__OW_*` and its init parameters),
        /// exported into the process environment for this invocation only, before
        /// the handler runs; absent for sprout's own invocations. Its presence also
        /// selects OpenWhisk's result rules in the runtimes that apply them
        /// themselves (`docs/protocol.md`). Bounded by the agent
        /// ([`MAX_ACTIVATION_ENV`] bytes as JSON).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        env: Option<BTreeMap<String, String>>,
    },
    /// Only to an instance that reported an [`HttpApp`] in `loaded`: a whole HTTP
    /// request for the app; the payload is its body. Answered with
    /// [`InstanceEvent::Responded`] (or `raised`).
    Http {
        id: u64,
        #[serde(flatten)]
        request: HttpRequest,
    },
    /// From the shim to an idle local instance: the frame carries the instance's end
    /// of a direct channel to one caller. The instance serves `invoke`s on it, and
    /// nothing else, until the caller closes it, then says [`InstanceEvent::Unbound`]
    /// with the same `token`.
    Bind { token: u64 },
}

/// Instance → agent. `Returned`'s payload is the result JSON.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum InstanceEvent {
    /// To the shim, once: a new instance is set up and waits for `load`.
    Ready,
    /// The handler is imported; `http` says it is an HTTP application.
    Loaded {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        http: Option<HttpApp>,
    },
    LoadFailed {
        error: FunctionError,
    },
    /// `raw`: the payload is bytes the handler returned, not JSON. `called`: the
    /// handler called other functions (its sandbox's workflow scratch is wiped).
    Returned {
        id: u64,
        #[serde(default, skip_serializing_if = "is_false")]
        raw: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        called: bool,
    },
    Raised {
        id: u64,
        error: FunctionError,
        #[serde(default, skip_serializing_if = "is_false")]
        called: bool,
    },
    /// An HTTP app's answer to an `http` request: its status and headers (checked by
    /// the agent before they reach a client); the payload is the body.
    Responded {
        id: u64,
        #[serde(flatten)]
        head: HttpHead,
        #[serde(default, skip_serializing_if = "is_false")]
        called: bool,
    },
    /// To the shim: the caller closed the direct channel of bind `token`; the
    /// instance is idle again.
    Unbound {
        token: u64,
    },
}

/// An exception raised by function code, as the runtime reports it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FunctionError {
    /// The exception's class name, e.g. `ValueError`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub traceback: String,
}

/// The `op` a message is sent under: its variant's name in snake case, as serde
/// writes the tag (a test checks every variant). Every op-tagged enum here derives
/// it (`strum::IntoStaticStr`).
pub fn op_of<'a, M>(message: &'a M) -> &'static str
where
    &'a M: Into<&'static str>,
{
    message.into()
}

/// The agent's end of a sandbox's shim channel.
#[derive(Debug)]
pub struct ShimLink(pub Channel);

/// A function instance the shim started: its channel and output pipes, now the agent's.
#[derive(Debug)]
pub struct SpawnedInstance {
    pub pid: i32,
    pub channel: Channel,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl ShimLink {
    /// Waits for the shim's `Ready`; returns the zygote's pid (inside the sandbox).
    pub fn wait_ready(&mut self) -> Result<i32, Error> {
        match self.0.recv()?.header {
            ShimEvent::Ready { zygote_pid } => Ok(zygote_pid),
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "ready",
            }),
        }
    }

    /// Has the shim run `spec` in its sandbox; answer with [`ShimLink::wait_call`].
    pub fn send_call(
        &self,
        id: u64,
        depth: u32,
        raw: bool,
        spec: &CallSpec,
        event: &Payload,
    ) -> Result<(), Error> {
        let req = ShimRequest::Call {
            id,
            depth,
            raw,
            spec: spec.clone(),
        };
        self.0.send_payload(&req, event, &[])
    }

    /// The shim's answer to a [`ShimLink::send_call`] (blocking; callers poll first).
    pub fn wait_call(&mut self) -> Result<Message<CallReply>, Error> {
        self.0.recv()
    }

    /// Asks the shim for an instance of `runtime` and waits for its channel.
    /// `Ok(Err(message))` is a spawn the shim refused or could not do.
    pub fn spawn_instance(
        &mut self,
        instance: u64,
        runtime: Runtime,
    ) -> Result<Result<SpawnedInstance, String>, Error> {
        self.0
            .send(&ShimRequest::SpawnInstance { instance, runtime }, b"", &[])?;
        let Message { header, fds, .. } = self.0.recv::<ShimEvent>()?;
        match header {
            ShimEvent::InstanceSpawned { instance: i, pid } if i == instance => {
                let [channel, stdout, stderr]: [OwnedFd; 3] =
                    fds.try_into()
                        .map_err(|v: Vec<OwnedFd>| Error::MissingFds {
                            expected: 3,
                            queued: v.len(),
                        })?;
                Ok(Ok(SpawnedInstance {
                    pid,
                    channel: Channel::from_fd(channel),
                    stdout,
                    stderr,
                }))
            }
            ShimEvent::SpawnFailed {
                instance: i,
                message,
            } if i == instance => Ok(Err(message)),
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "instance_spawned",
            }),
        }
    }
}

/// The agent's end of one function instance.
#[derive(Debug)]
pub struct InstanceLink(pub Channel);

impl InstanceLink {
    /// Waits for a new instance's `ready` (the shim's side of the handshake).
    pub fn wait_ready(&mut self) -> Result<(), Error> {
        match self.0.recv()?.header {
            InstanceEvent::Ready => Ok(()),
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "ready",
            }),
        }
    }

    /// Tells a new instance which handler to import; answer with [`Self::wait_loaded`].
    pub fn send_load(&self, spec: &LoadSpec) -> Result<(), Error> {
        self.0.send(&InstanceRequest::Load(spec.clone()), b"", &[])
    }

    /// Waits until the instance imported its handler: whether it is an HTTP app.
    /// `Ok(Err(_))` is a handler that failed to load (missing module or function,
    /// exception at import).
    pub fn wait_loaded(&mut self) -> Result<Result<Option<HttpApp>, FunctionError>, Error> {
        match self.0.recv()?.header {
            InstanceEvent::Loaded { http } => Ok(Ok(http)),
            InstanceEvent::LoadFailed { error } => Ok(Err(error)),
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "loaded",
            }),
        }
    }

    /// Sends an invoke: its call depth (0 from a client), and the event, passed on as it
    /// is.
    pub fn send_call(&self, id: u64, depth: u32, raw: bool, event: &Payload) -> Result<(), Error> {
        self.send_activation(id, depth, raw, None, event)
    }

    /// [`Self::send_call`] with an OpenWhisk activation's environment (`None`: a
    /// plain invoke, nothing more on the wire).
    pub fn send_activation(
        &self,
        id: u64,
        depth: u32,
        raw: bool,
        env: Option<BTreeMap<String, String>>,
        event: &Payload,
    ) -> Result<(), Error> {
        let req = InstanceRequest::Invoke {
            id,
            depth,
            raw,
            env,
        };
        self.0.send_payload(&req, event, &[])
    }

    /// Hands an idle instance its end of a direct channel ([`InstanceRequest::Bind`]).
    pub fn send_bind(&self, token: u64, end: BorrowedFd<'_>) -> Result<(), Error> {
        self.0.send(&InstanceRequest::Bind { token }, b"", &[end])
    }

    /// Sends an HTTP request to an instance that is an [`HttpApp`]; `body` is its body.
    pub fn send_http(&self, id: u64, request: &HttpRequest, body: &Payload) -> Result<(), Error> {
        let req = InstanceRequest::Http {
            id,
            request: request.clone(),
        };
        self.0.send_payload(&req, body, &[])
    }
}

/// The shim's end of its channel to the agent.
#[derive(Debug)]
pub struct AgentLink(pub Channel);

impl AgentLink {
    pub fn announce_ready(&self, zygote_pid: i32) -> Result<(), Error> {
        self.0.send(&ShimEvent::Ready { zygote_pid }, b"", &[])
    }

    pub fn next_request(&mut self) -> Result<ShimRequest, Error> {
        Ok(self.0.recv()?.header)
    }

    /// Hands the agent an instance's channel and its stdout/stderr read ends.
    pub fn report_spawned(
        &self,
        instance: u64,
        pid: i32,
        channel: impl AsFd,
        stdout: impl AsFd,
        stderr: impl AsFd,
    ) -> Result<(), Error> {
        self.0.send(
            &ShimEvent::InstanceSpawned { instance, pid },
            b"",
            &[channel.as_fd(), stdout.as_fd(), stderr.as_fd()],
        )
    }

    pub fn report_spawn_failed(&self, instance: u64, message: String) -> Result<(), Error> {
        self.0
            .send(&ShimEvent::SpawnFailed { instance, message }, b"", &[])
    }
}

impl ShimLink {
    /// Asks a package fork server's shim to have its zygote import `spec`; returns
    /// what it imported, or why it refused.
    pub fn import_packages(
        &mut self,
        spec: &ImportSpec,
    ) -> Result<Result<Imported, String>, Error> {
        self.0
            .send(&ShimRequest::ImportPackages(spec.clone()), b"", &[])?;
        match self.0.recv::<ShimEvent>()?.header {
            ShimEvent::PackagesImported(imported) => Ok(Ok(imported)),
            ShimEvent::ImportRefused { message } => Ok(Err(message)),
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "packages_imported",
            }),
        }
    }

    /// Asks the fork server's shim for a new sandbox `spec`, whose shim channel end
    /// and output pipe are `shim_end` and `output`. Returns the forked child's pid
    /// (in the fork server's pid namespace) or why there is none.
    pub fn fork_sandbox(
        &mut self,
        spec: &SandboxSpec,
        shim_end: impl AsFd,
        output: impl AsFd,
    ) -> Result<Result<i32, String>, Error> {
        self.0.send(
            &ShimRequest::ForkSandbox(spec.clone()),
            b"",
            &[shim_end.as_fd(), output.as_fd()],
        )?;
        match self.0.recv::<ShimEvent>()?.header {
            ShimEvent::SandboxForked { sandbox, pid } if sandbox == spec.sandbox => Ok(Ok(pid)),
            ShimEvent::SandboxForkFailed { sandbox, message } if sandbox == spec.sandbox => {
                Ok(Err(message))
            }
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "sandbox_forked",
            }),
        }
    }

    /// A forked sandbox's child: waits for `expected` and takes the pidfd it carries.
    /// `Ok(Err(message))` is the child's own failure.
    pub fn wait_enter_event(
        &mut self,
        expected: EnterEvent,
    ) -> Result<Result<OwnedFd, String>, Error> {
        let Message { header, fds, .. } = self.0.recv::<EnterEvent>()?;
        match header {
            EnterEvent::EnterFailed { message } => Ok(Err(message)),
            got if got == expected => {
                let [pidfd]: [OwnedFd; 1] =
                    fds.try_into()
                        .map_err(|v: Vec<OwnedFd>| Error::MissingFds {
                            expected: 1,
                            queued: v.len(),
                        })?;
                Ok(Ok(pidfd))
            }
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: op_of(&expected),
            }),
        }
    }

    /// Gives a forked sandbox's child the files it joins its cgroup through (in
    /// frames of at most 8), then tells it to make the sandbox.
    pub fn send_join_and_enter(&self, join: &[OwnedFd]) -> Result<(), Error> {
        for files in join.chunks(8) {
            let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
            self.0.send(&EnterRequest::Join, b"", &fds)?;
        }
        self.0.send(&EnterRequest::Enter, b"", &[])
    }

    /// A forked sandbox after `entered`: waits for its shim's `ready` (the zygote's
    /// pid) or its PID 1's `enter_failed` (`Ok(Err(message))`).
    pub fn wait_forked_ready(&mut self) -> Result<Result<i32, String>, Error> {
        match self.0.recv::<ForkedBoot>()?.header {
            ForkedBoot::Shim(ShimEvent::Ready { zygote_pid }) => Ok(Ok(zygote_pid)),
            ForkedBoot::Enter(EnterEvent::EnterFailed { message }) => Ok(Err(message)),
            ForkedBoot::Shim(other) => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "ready",
            }),
            ForkedBoot::Enter(other) => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "ready",
            }),
        }
    }
}

/// The shim's end of its channel to a zygote.
#[derive(Debug)]
pub struct ZygoteLink(pub Channel);

impl ZygoteLink {
    pub fn wait_ready(&mut self) -> Result<i32, Error> {
        match self.0.recv()?.header {
            ZygoteEvent::Ready { pid } => Ok(pid),
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "ready",
            }),
        }
    }

    /// Asks the zygote to fork an instance that serves on `channel`, writes its
    /// output to `stdout`/`stderr` and makes its calls on `calls`. Returns the
    /// instance's pid or the zygote's refusal.
    pub fn fork(
        &mut self,
        instance: u64,
        runtime: Runtime,
        channel: impl AsFd,
        stdout: impl AsFd,
        stderr: impl AsFd,
        calls: impl AsFd,
    ) -> Result<Result<i32, String>, Error> {
        self.0.send(
            &ZygoteRequest::Fork { instance, runtime },
            b"",
            &[
                channel.as_fd(),
                stdout.as_fd(),
                stderr.as_fd(),
                calls.as_fd(),
            ],
        )?;
        match self.0.recv()?.header {
            ZygoteEvent::Forked { instance: i, pid } if i == instance => Ok(Ok(pid)),
            ZygoteEvent::ForkFailed {
                instance: i,
                message,
            } if i == instance => Ok(Err(message)),
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "forked",
            }),
        }
    }
}

impl ZygoteLink {
    /// Asks a package fork server's zygote to import `spec`.
    pub fn import_packages(
        &mut self,
        spec: &ImportSpec,
    ) -> Result<Result<Imported, String>, Error> {
        self.0
            .send(&ZygoteRequest::ImportPackages(spec.clone()), b"", &[])?;
        match self.0.recv()?.header {
            ZygoteEvent::PackagesImported(imported) => Ok(Ok(imported)),
            ZygoteEvent::ImportRefused { message } => Ok(Err(message)),
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "packages_imported",
            }),
        }
    }

    /// Asks the fork server's zygote to fork the child that makes sandbox `spec`.
    /// Returns its pid or the zygote's refusal.
    pub fn fork_sandbox(
        &mut self,
        spec: &SandboxSpec,
        shim_end: impl AsFd,
        output: impl AsFd,
    ) -> Result<Result<i32, String>, Error> {
        self.0.send(
            &ZygoteRequest::ForkSandbox(spec.clone()),
            b"",
            &[shim_end.as_fd(), output.as_fd()],
        )?;
        match self.0.recv()?.header {
            ZygoteEvent::SandboxForked { sandbox, pid } if sandbox == spec.sandbox => Ok(Ok(pid)),
            ZygoteEvent::SandboxForkFailed { sandbox, message } if sandbox == spec.sandbox => {
                Ok(Err(message))
            }
            other => Err(Error::Unexpected {
                op: op_of(&other).to_owned(),
                expected: "sandbox_forked",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_flat_json_objects_named_by_op() {
        let v = serde_json::to_value(ShimRequest::SpawnInstance {
            instance: 3,
            runtime: Runtime::Python,
        })
        .unwrap();
        assert_eq!(v["op"], "spawn_instance");
        assert_eq!(v["instance"], 3);
        assert_eq!(v["runtime"], "python");
        let load = LoadSpec {
            function: "hello".into(),
            code_dir: "/code".into(),
            handler: Handler::parse("f:f").unwrap(),
            deps: Vec::new(),
            about: About::default(),
            env: BTreeMap::new(),
        };
        let v = serde_json::to_value(InstanceRequest::Load(load)).unwrap();
        assert_eq!(v["op"], "load");
        assert_eq!(v["handler"]["module"], "f");
        let v = serde_json::to_value(InstanceEvent::Raised {
            id: 1,
            called: false,
            error: FunctionError {
                kind: "ValueError".into(),
                message: "m".into(),
                traceback: "t".into(),
            },
        })
        .unwrap();
        assert_eq!(v["op"], "raised");
        assert_eq!(v["error"]["type"], "ValueError");
    }

    /// Every variant's derived op name is the tag serde writes (add a new variant here).
    #[test]
    fn op_names_are_the_serde_tags() {
        fn check<'a, M: Serialize>(messages: &'a [M])
        where
            &'a M: Into<&'static str>,
        {
            for m in messages {
                let v = serde_json::to_value(m).unwrap();
                assert_eq!(v["op"], op_of(m), "{v}");
            }
        }
        let error = FunctionError {
            kind: "E".into(),
            message: "m".into(),
            traceback: String::new(),
        };
        let spec = CallSpec {
            function: "g".into(),
            version: 1,
            code_dir: "/fns/g-1".into(),
            handler: Handler::parse("f:f").unwrap(),
            timeout_ms: 1,
            namespace: "default".into(),
            memory_mb: 128,
            deps: Vec::new(),
            env: BTreeMap::new(),
        };
        let (id, function) = (1, String::from("g"));
        check(&[
            CallRequest::Resolve {
                id,
                function: function.clone(),
            },
            CallRequest::Call {
                id,
                function: function.clone(),
                depth: 1,
                raw: false,
                spec: None,
            },
            CallRequest::Bind {
                id,
                function: function.clone(),
                spec: spec.clone(),
            },
            CallRequest::Unbind { callee: 3 },
        ]);
        check(&[
            CallReply::Resolved { id, spec: None },
            CallReply::Bound { id, callee: 3 },
            CallReply::CallReturned { id, raw: false },
            CallReply::CallRaised {
                id,
                function: function.clone(),
                error: error.clone(),
            },
            CallReply::CallFailed {
                id,
                function: function.clone(),
                message: "m".into(),
            },
            CallReply::CallRefused {
                id,
                function,
                kind: RefusalKind::TooManyCalls,
                message: "m".into(),
            },
        ]);
        check(&[
            ShimRequest::SpawnInstance {
                instance: 1,
                runtime: Runtime::Python,
            },
            ShimRequest::Call {
                id,
                depth: 0,
                raw: false,
                spec: spec.clone(),
            },
        ]);
        check(&[
            ShimEvent::Ready { zygote_pid: 1 },
            ShimEvent::InstanceSpawned {
                instance: 1,
                pid: 1,
            },
            ShimEvent::SpawnFailed {
                instance: 1,
                message: "m".into(),
            },
        ]);
        let sandbox_spec = SandboxSpec {
            sandbox: "s".into(),
            uid: 7,
            gid: 7,
            runtime: Runtime::Python,
        };
        check(&[
            ZygoteRequest::Fork {
                instance: 1,
                runtime: Runtime::Python,
            },
            ZygoteRequest::ForkSandbox(sandbox_spec.clone()),
        ]);
        check(&[ShimRequest::ForkSandbox(sandbox_spec.clone())]);
        let import = ImportSpec {
            paths: vec!["/deps/six-1".into()],
            modules: vec!["six".into()],
        };
        let imported = Imported {
            imported: vec!["six".into()],
            failed: vec![ImportFailure {
                module: "m".into(),
                error: "e".into(),
            }],
        };
        check(&[ShimRequest::ImportPackages(import.clone())]);
        check(&[ZygoteRequest::ImportPackages(import)]);
        check(&[
            ShimEvent::PackagesImported(imported.clone()),
            ShimEvent::ImportRefused {
                message: "m".into(),
            },
        ]);
        check(&[
            ZygoteEvent::PackagesImported(imported),
            ZygoteEvent::ImportRefused {
                message: "m".into(),
            },
        ]);
        check(&[
            ShimEvent::SandboxForked {
                sandbox: "s".into(),
                pid: 1,
            },
            ShimEvent::SandboxForkFailed {
                sandbox: "s".into(),
                message: "m".into(),
            },
        ]);
        check(&[
            ZygoteEvent::SandboxForked {
                sandbox: "s".into(),
                pid: 1,
            },
            ZygoteEvent::SandboxForkFailed {
                sandbox: "s".into(),
                message: "m".into(),
            },
        ]);
        check(&[
            EnterEvent::Forked,
            EnterEvent::Entered,
            EnterEvent::EnterFailed {
                message: "m".into(),
            },
        ]);
        check(&[EnterRequest::Join, EnterRequest::Enter]);
        check(&[
            ZygoteEvent::Ready { pid: 1 },
            ZygoteEvent::Forked {
                instance: 1,
                pid: 1,
            },
            ZygoteEvent::ForkFailed {
                instance: 1,
                message: "m".into(),
            },
        ]);
        check(&[
            InstanceRequest::Load(LoadSpec {
                deps: spec.deps.clone(),
                about: spec.about(),
                function: spec.function,
                code_dir: spec.code_dir,
                handler: spec.handler,
                env: spec.env,
            }),
            InstanceRequest::Invoke {
                id,
                depth: 0,
                raw: false,
                env: None,
            },
            InstanceRequest::Invoke {
                id,
                depth: 0,
                raw: false,
                env: Some(BTreeMap::from([("__OW_NAMESPACE".into(), "ns".into())])),
            },
            InstanceRequest::Http {
                id,
                request: HttpRequest::default(),
            },
            InstanceRequest::Bind { token: 1 },
        ]);
        check(&[
            InstanceEvent::Ready,
            InstanceEvent::Unbound { token: 1 },
            InstanceEvent::Loaded { http: None },
            InstanceEvent::Loaded {
                http: Some(HttpApp::Wsgi),
            },
            InstanceEvent::Responded {
                id,
                head: HttpHead {
                    status: 418,
                    headers: vec![("A".into(), "B".into())],
                },
                called: false,
            },
            InstanceEvent::LoadFailed {
                error: error.clone(),
            },
            InstanceEvent::Returned {
                id,
                raw: false,
                called: false,
            },
            InstanceEvent::Raised {
                id,
                error,
                called: false,
            },
        ]);
        // The plain enums are named as serde writes them too.
        assert_eq!(
            serde_json::to_value(Runtime::Python).unwrap(),
            <&str>::from(Runtime::Python)
        );
        assert_eq!(
            serde_json::to_value(RefusalKind::TooManyCalls).unwrap(),
            RefusalKind::TooManyCalls.as_str()
        );
    }

    #[test]
    fn http_frames_are_flat_and_loaded_may_omit_http() {
        let v = serde_json::to_value(InstanceRequest::Http {
            id: 3,
            request: HttpRequest {
                method: "GET".into(),
                script_name: "/run/f".into(),
                path: "/a".into(),
                query: "x=1".into(),
                headers: vec![("Host".into(), "h".into())],
            },
        })
        .unwrap();
        assert_eq!(v["op"], "http");
        assert_eq!(v["script_name"], "/run/f");
        assert_eq!(v["headers"][0][1], "h");
        let back: InstanceRequest = serde_json::from_value(v).unwrap();
        assert!(matches!(back, InstanceRequest::Http { id: 3, .. }));
        let loaded: InstanceEvent = serde_json::from_str(r#"{"op":"loaded"}"#).unwrap();
        assert_eq!(loaded, InstanceEvent::Loaded { http: None });
        let loaded: InstanceEvent =
            serde_json::from_str(r#"{"op":"loaded","http":"asgi"}"#).unwrap();
        assert_eq!(
            loaded,
            InstanceEvent::Loaded {
                http: Some(HttpApp::Asgi)
            }
        );
        let r: InstanceEvent =
            serde_json::from_str(r#"{"op":"responded","id":1,"status":200,"headers":[["a","b"]]}"#)
                .unwrap();
        assert!(matches!(
            r,
            InstanceEvent::Responded {
                head: HttpHead { status: 200, .. },
                ..
            }
        ));
    }

    #[test]
    fn a_refused_call_names_its_kind_on_the_wire() {
        let v = serde_json::to_value(CallReply::CallRefused {
            id: 7,
            function: "g".into(),
            kind: RefusalKind::TooManyCalls,
            message: "m".into(),
        })
        .unwrap();
        assert_eq!(v["op"], "call_refused");
        assert_eq!(v["kind"], RefusalKind::TooManyCalls.as_str());
        assert_eq!(v["kind"], "too_many_calls");
    }

    #[test]
    fn handler_parsing_names_the_problem() {
        assert_eq!(
            Handler::parse("__main__:main").unwrap().module_file(),
            "__main__.py"
        );
        assert_eq!(
            Handler::parse("pkg.mod:run").unwrap().module_file(),
            "pkg/mod.py"
        );
        assert!(Handler::parse("f").unwrap_err().contains("module:function"));
        assert!(Handler::parse("../x:f").unwrap_err().contains("module"));
        assert!(Handler::parse("f:1x").unwrap_err().contains("function"));
    }

    #[test]
    fn spawn_handshake_carries_three_descriptors() {
        let (agent_end, shim_end) = Channel::pair().unwrap();
        let shim = std::thread::spawn(move || {
            let mut link = AgentLink(shim_end);
            link.announce_ready(2).unwrap();
            let ShimRequest::SpawnInstance { instance, .. } = link.next_request().unwrap() else {
                panic!("expected spawn_instance")
            };
            let (mine, _theirs) = Channel::pair().unwrap();
            let (r1, _w1) = std::io::pipe().unwrap();
            let (r2, _w2) = std::io::pipe().unwrap();
            link.report_spawned(instance, 9, &mine, &r1, &r2).unwrap();
        });
        let mut link = ShimLink(agent_end);
        assert_eq!(link.wait_ready().unwrap(), 2);
        let spawned = link.spawn_instance(5, Runtime::Python).unwrap().unwrap();
        assert_eq!(spawned.pid, 9);
        shim.join().unwrap();
    }
}
