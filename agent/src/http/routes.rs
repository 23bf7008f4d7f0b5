//! The route table: HTTP requests to the library's [`Request`]s. [`ROUTES`] is the
//! one list of what the API serves (method and path pattern → [`Op`]), the router
//! dispatches from it, and `docs/openapi.yaml` describes it (a test holds the two
//! together). Answers go back through [`reply`](super::reply).
//!
//! Functions and workflows live in namespaces: `/functions/...`, `/run/...` and
//! `/workflows/...` act in `default`, and the same routes under
//! `/namespaces/{ns}/` act in `ns`. The namespace's name is checked by the agent (a
//! 400 that states the rule), as is everything else about a request.
//!
//! `/run/{name}[/{path}]` (OpenLambda's) takes any method: the request goes to the
//! agent whole ([`Request::Run`]), which checks the method against the function's
//! `triggers.http` and hands an HTTP app everything.
//!
//! A path in no route is a `404`, a known path with another method a `405`.

use std::borrow::Cow;
use std::path::PathBuf;

use ipc::api::{ActivationId, FunctionConfig, RegisterFunction, DEFAULT_NAMESPACE};
use ipc::proto::HttpRequest;

use super::auth::{Grant, Rule};
use super::openwhisk::{OwOp, OwRoute};
use super::reply::{Answer, Reject};
use super::wire;
use crate::activations::{Activations, Query};
use crate::request::{ActivationPart, FunctionSource, Request, RunRequest};

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Status,
    /// OpenLambda's `/stats`: the status's counters.
    Stats,
    ListFunctions,
    RegisterFunction,
    RemoveFunction,
    Invoke,
    /// OpenLambda's `/run`: any method, the whole request to the agent.
    Run,
    ListWorkflows,
    RegisterWorkflow,
    RemoveWorkflow,
    RunWorkflow,
    ListPackages,
    CollectPackages,
    Usage,
    Metrics,
    ListActivations,
    GetActivation(ActivationPart),
    /// OpenWhisk's REST API (`/api/v1`).
    OpenWhisk(OwOp),
    /// The OpenWhisk invoker contract: an `ActivationMessage`, answered early.
    InvokerActivate,
    /// The invoker's health check.
    Ping,
}

/// The routes of one path pattern.
#[derive(Debug)]
pub(super) struct PathRoutes {
    /// `/`-separated segments; `{ns}` and `{name}` (and `{id}`) match one non-empty
    /// segment each, a last `{path}` the rest of the path.
    pub path: &'static str,
    /// The methods, as `Allow` lists them on a 405 (a test checks they are `ops`').
    pub allow: &'static str,
    pub ops: &'static [(&'static str, Op)],
}

const OW_ACTION_OPS: &[(&str, Op)] = &[
    ("PUT", Op::OpenWhisk(OwOp::PutAction)),
    ("GET", Op::OpenWhisk(OwOp::GetAction)),
    ("DELETE", Op::OpenWhisk(OwOp::DeleteAction)),
    ("POST", Op::OpenWhisk(OwOp::InvokeAction)),
];

/// The methods `/run` routes take (every method a function's `triggers.http` may
/// name, and `HEAD` and `OPTIONS`).
const RUN_ALLOW: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS";
const RUN_OPS: &[(&str, Op)] = &[
    ("GET", Op::Run),
    ("HEAD", Op::Run),
    ("POST", Op::Run),
    ("PUT", Op::Run),
    ("DELETE", Op::Run),
    ("PATCH", Op::Run),
    ("OPTIONS", Op::Run),
];

/// Every route of the API, in the order the router tries them (no two patterns
/// match the same path).
pub(super) const ROUTES: &[PathRoutes] = &[
    PathRoutes {
        path: "/functions/{name}/invoke",
        allow: "POST",
        ops: &[("POST", Op::Invoke)],
    },
    PathRoutes {
        path: "/run/{name}",
        allow: RUN_ALLOW,
        ops: RUN_OPS,
    },
    PathRoutes {
        path: "/run/{name}/{path}",
        allow: RUN_ALLOW,
        ops: RUN_OPS,
    },
    PathRoutes {
        path: "/namespaces/{ns}/functions/{name}/invoke",
        allow: "POST",
        ops: &[("POST", Op::Invoke)],
    },
    PathRoutes {
        path: "/namespaces/{ns}/run/{name}",
        allow: RUN_ALLOW,
        ops: RUN_OPS,
    },
    PathRoutes {
        path: "/namespaces/{ns}/run/{name}/{path}",
        allow: RUN_ALLOW,
        ops: RUN_OPS,
    },
    PathRoutes {
        path: "/status",
        allow: "GET",
        ops: &[("GET", Op::Status)],
    },
    PathRoutes {
        path: "/functions",
        allow: "GET",
        ops: &[("GET", Op::ListFunctions)],
    },
    PathRoutes {
        path: "/packages",
        allow: "GET",
        ops: &[("GET", Op::ListPackages)],
    },
    PathRoutes {
        path: "/packages/gc",
        allow: "POST",
        ops: &[("POST", Op::CollectPackages)],
    },
    PathRoutes {
        path: "/functions/{name}",
        allow: "PUT, DELETE",
        ops: &[
            ("PUT", Op::RegisterFunction),
            ("DELETE", Op::RemoveFunction),
        ],
    },
    PathRoutes {
        path: "/workflows",
        allow: "GET",
        ops: &[("GET", Op::ListWorkflows)],
    },
    PathRoutes {
        path: "/workflows/{name}",
        allow: "PUT, DELETE",
        ops: &[
            ("PUT", Op::RegisterWorkflow),
            ("DELETE", Op::RemoveWorkflow),
        ],
    },
    PathRoutes {
        path: "/workflows/{name}/invoke",
        allow: "POST",
        ops: &[("POST", Op::RunWorkflow)],
    },
    PathRoutes {
        path: "/namespaces/{ns}/functions",
        allow: "GET",
        ops: &[("GET", Op::ListFunctions)],
    },
    PathRoutes {
        path: "/namespaces/{ns}/functions/{name}",
        allow: "PUT, DELETE",
        ops: &[
            ("PUT", Op::RegisterFunction),
            ("DELETE", Op::RemoveFunction),
        ],
    },
    PathRoutes {
        path: "/namespaces/{ns}/workflows",
        allow: "GET",
        ops: &[("GET", Op::ListWorkflows)],
    },
    PathRoutes {
        path: "/namespaces/{ns}/workflows/{name}",
        allow: "PUT, DELETE",
        ops: &[
            ("PUT", Op::RegisterWorkflow),
            ("DELETE", Op::RemoveWorkflow),
        ],
    },
    PathRoutes {
        path: "/namespaces/{ns}/workflows/{name}/invoke",
        allow: "POST",
        ops: &[("POST", Op::RunWorkflow)],
    },
    PathRoutes {
        path: "/activations",
        allow: "GET",
        ops: &[("GET", Op::ListActivations)],
    },
    PathRoutes {
        path: "/activations/{id}",
        allow: "GET",
        ops: &[("GET", Op::GetActivation(ActivationPart::Record))],
    },
    PathRoutes {
        path: "/activations/{id}/result",
        allow: "GET",
        ops: &[("GET", Op::GetActivation(ActivationPart::Result))],
    },
    PathRoutes {
        path: "/activations/{id}/logs",
        allow: "GET",
        ops: &[("GET", Op::GetActivation(ActivationPart::Logs))],
    },
    // Accounting, metrics and OpenLambda's counters.
    PathRoutes {
        path: "/namespaces/{ns}/usage",
        allow: "GET",
        ops: &[("GET", Op::Usage)],
    },
    PathRoutes {
        path: "/metrics",
        allow: "GET",
        ops: &[("GET", Op::Metrics)],
    },
    PathRoutes {
        path: "/stats",
        allow: "GET",
        ops: &[("GET", Op::Stats)],
    },
    // OpenWhisk's REST API.
    PathRoutes {
        path: "/api/v1/namespaces",
        allow: "GET",
        ops: &[("GET", Op::OpenWhisk(OwOp::Namespaces))],
    },
    PathRoutes {
        path: "/api/v1/namespaces/{ns}/actions",
        allow: "GET",
        ops: &[("GET", Op::OpenWhisk(OwOp::ListActions))],
    },
    PathRoutes {
        path: "/api/v1/namespaces/{ns}/actions/{name}",
        allow: "PUT, GET, DELETE, POST",
        ops: OW_ACTION_OPS,
    },
    // A package's action as OpenWhisk's clients send it (`pkg/act` unencoded).
    PathRoutes {
        path: "/api/v1/namespaces/{ns}/actions/{pkg}/{name}",
        allow: "PUT, GET, DELETE, POST",
        ops: OW_ACTION_OPS,
    },
    PathRoutes {
        path: "/api/v1/namespaces/{ns}/activations",
        allow: "GET",
        ops: &[("GET", Op::OpenWhisk(OwOp::ListActivations))],
    },
    PathRoutes {
        path: "/api/v1/namespaces/{ns}/activations/{id}",
        allow: "GET",
        ops: &[(
            "GET",
            Op::OpenWhisk(OwOp::GetActivation(ActivationPart::Record)),
        )],
    },
    PathRoutes {
        path: "/api/v1/namespaces/{ns}/activations/{id}/result",
        allow: "GET",
        ops: &[(
            "GET",
            Op::OpenWhisk(OwOp::GetActivation(ActivationPart::Result)),
        )],
    },
    PathRoutes {
        path: "/api/v1/namespaces/{ns}/activations/{id}/logs",
        allow: "GET",
        ops: &[(
            "GET",
            Op::OpenWhisk(OwOp::GetActivation(ActivationPart::Logs)),
        )],
    },
    PathRoutes {
        path: "/invoke",
        allow: "POST",
        ops: &[("POST", Op::InvokerActivate)],
    },
    PathRoutes {
        path: "/ping",
        allow: "GET",
        ops: &[("GET", Op::Ping)],
    },
];

/// What a path pattern captured, still percent-encoded.
#[derive(Debug, Default)]
pub(super) struct Params<'a> {
    ns: Option<&'a str>,
    /// An OpenWhisk action's package.
    pkg: Option<&'a str>,
    name: Option<&'a str>,
    id: Option<&'a str>,
    /// Where a last `{path}` begins in the path (after its `/`).
    rest_at: Option<usize>,
}

/// Matches `path` (which starts with `/`) against a pattern of [`PathRoutes::path`].
pub(super) fn match_path<'a>(pattern: &str, path: &'a str) -> Option<Params<'a>> {
    let mut params = Params::default();
    let mut segments = path[1..].split('/');
    let mut parts = pattern[1..].split('/').peekable();
    while let Some(part) = parts.next() {
        let segment = segments.next()?;
        match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            // The rest of the path, whatever it is.
            Some("path") if parts.peek().is_none() => {
                params.rest_at = Some(segment.as_ptr() as usize - path.as_ptr() as usize);
                return Some(params);
            }
            Some(_) if segment.is_empty() => return None,
            Some("ns") => params.ns = Some(segment),
            Some("pkg") => params.pkg = Some(segment),
            Some("name") => params.name = Some(segment),
            Some("id") => params.id = Some(segment),
            Some(_) => {}
            None if part != segment => return None,
            None => {}
        }
    }
    segments.next().is_none().then_some(params)
}

/// Matches a request head to a route for a caller on the Unix socket (trusted with
/// everything). `target` is the request target as sent.
#[cfg(test)]
pub(super) fn route(
    method: &str,
    target: &str,
    content_type: Option<&str>,
) -> Result<Route, Reject> {
    let found = find(method, target)?;
    let grant = super::auth::Caller::Local.authorize(found.rule(), || found.namespace())?;
    found.into_route(content_type, &grant)
}

/// A request head matched to its path and method: who may use it is known
/// ([`Found::rule`]), nothing else is checked yet.
#[derive(Debug)]
pub(super) struct Found<'a> {
    method: &'a str,
    op: Op,
    params: Params<'a>,
    path: &'a str,
    query: &'a str,
}

/// Matches a request head's path and method (`404`, `405`). `target` is the request
/// target as sent.
pub(super) fn find<'a>(method: &'a str, target: &'a str) -> Result<Found<'a>, Reject> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path.starts_with('/') {
        return Err(Reject::bad_request(format!(
            "request target {target:?} is not a path"
        )));
    }
    // Path, then method, then query and content type: a wrong path is a 404 whatever the rest.
    let Some((routes, params)) = ROUTES
        .iter()
        .find_map(|r| match_path(r.path, path).map(|p| (r, p)))
    else {
        return Err(Reject::new(
            404,
            "not_found",
            format!("no route for {method} {path}"),
        ));
    };
    let Some(&(_, op)) = routes.ops.iter().find(|(m, _)| *m == method) else {
        let allow = routes.allow;
        return Err(Reject {
            allow: Some(allow),
            ..Reject::new(
                405,
                "method_not_allowed",
                format!("{method} is not allowed on {path}; use {allow}"),
            )
        });
    };
    Ok(Found {
        method,
        op,
        params,
        path,
        query,
    })
}

/// Who may use a route ([`auth`](super::auth)'s rules).
pub(super) fn rule(op: Op) -> Rule {
    match op {
        Op::ListFunctions
        | Op::RegisterFunction
        | Op::RemoveFunction
        | Op::Invoke
        | Op::Run
        | Op::ListWorkflows
        | Op::RegisterWorkflow
        | Op::RemoveWorkflow
        | Op::RunWorkflow => Rule::Namespace,
        // Node-wide counts; the namespaces listed are narrowed to the key's.
        Op::Status => Rule::Scoped,
        // Node-wide counters that name nothing.
        Op::Stats => Rule::AnyKey,
        // The cache lists every namespace's functions; collecting acts on the node.
        Op::ListPackages | Op::CollectPackages => Rule::Node,
        // What a planned route will act on: its path's namespace; the activation
        // reads and OpenWhisk's namespace list are narrowed to the key's; the rest
        // (metrics, the invoker's routes) is the node's.
        // A namespace's usage is that namespace's.
        Op::Usage => Rule::Namespace,
        // Records of any namespace, narrowed to a namespace key's own.
        Op::ListActivations | Op::GetActivation(_) => Rule::Scoped,
        // Every namespace's counters and function names.
        Op::Metrics => Rule::Node,
        // The namespaces listed are narrowed to the key's; the rest acts in the
        // path's namespace.
        Op::OpenWhisk(OwOp::Namespaces) => Rule::Scoped,
        Op::OpenWhisk(_) => Rule::Namespace,
        // A namespace key acts for its own namespace only, which the message's body
        // names: checked once it is read (`Route::into_dispatch`), before any answer.
        Op::InvokerActivate => Rule::Scoped,
        Op::Ping => Rule::AnyKey,
    }
}

impl Found<'_> {
    /// Who may use the route.
    pub fn rule(&self) -> Rule {
        rule(self.op)
    }

    /// The namespace the route acts in: its path's, or `default`.
    pub fn namespace(&self) -> Result<String, Reject> {
        match self.params.ns {
            Some(ns) => decode(Some(ns), self.path),
            None => Ok(DEFAULT_NAMESPACE.to_owned()),
        }
    }

    /// The route, for a caller granted `grant`, with what the head says of its body.
    pub fn into_route(self, content_type: Option<&str>, grant: &Grant) -> Result<Route, Reject> {
        let Found {
            method,
            op,
            params,
            path,
            query,
        } = self;
        if let Op::OpenWhisk(op) = op {
            let namespace =
                super::openwhisk::namespace_of(decode(params.ns, path)?, grant.own.as_deref());
            let mut name = decode(params.name.or(params.id), path)?;
            if let Some(pkg) = params.pkg {
                name = format!("{}/{name}", decode(Some(pkg), path)?);
            }
            let query = parse_query(query)?;
            let caller = super::openwhisk::Caller {
                own: grant.own.clone(),
                api_key: grant.api_key.clone(),
            };
            return super::openwhisk::route(op, namespace, name, query, caller)
                .map(Route::OpenWhisk);
        }
        if let Op::GetActivation(part) = op {
            let id = decode(params.id, path)?;
            let id = ActivationId::parse(&id).map_err(|e| Reject::bad_request(e.to_string()))?;
            no_params(&parse_query(query)?)?;
            return Ok(Route::GetActivation {
                id,
                part,
                scope: grant.scope.clone(),
            });
        }
        let namespace = match params.ns {
            Some(ns) => decode(Some(ns), path)?,
            None => DEFAULT_NAMESPACE.to_owned(),
        };
        let name = decode(params.name, path)?;
        into_route(
            op,
            method,
            path,
            query,
            params.rest_at,
            namespace,
            name,
            content_type,
            grant,
        )
    }
}

fn decode(segment: Option<&str>, path: &str) -> Result<String, Reject> {
    let segment = segment.unwrap_or_default();
    wire::percent_decode(segment)
        .map(Cow::into_owned)
        .ok_or_else(|| Reject::bad_request(format!("invalid percent-encoding in path {path:?}")))
}

#[allow(clippy::too_many_arguments)]
fn into_route(
    op: Op,
    method: &str,
    path: &str,
    query: &str,
    rest_at: Option<usize>,
    namespace: String,
    name: String,
    content_type: Option<&str>,
    grant: &Grant,
) -> Result<Route, Reject> {
    if op == Op::Run {
        // The query is the app's: sprout takes only a valid `logs` from it.
        let logs = parse_query(query)
            .ok()
            .and_then(|q| logs_from_query(&q).ok())
            .unwrap_or(false);
        // SCRIPT_NAME is the path up to the name; PATH_INFO the rest, with its `/`.
        let (script_name, rest) = match rest_at {
            Some(at) => path.split_at(at - 1),
            None => (path, ""),
        };
        let request = HttpRequest {
            method: method.to_owned(),
            script_name: script_name.to_owned(),
            path: rest.to_owned(),
            query: query.to_owned(),
            headers: Vec::new(),
        };
        return Ok(Route::Run {
            namespace,
            name,
            logs,
            request,
        });
    }
    let query = parse_query(query)?;
    match op {
        Op::ListFunctions => no_params(&query).map(|()| Route::List { namespace }),
        Op::RegisterFunction => {
            let body = match media_type(content_type).as_deref() {
                None | Some("application/json") if grant.remote => {
                    return Err(super::auth::forbidden(
                        "a function is registered by a host path only on the agent's Unix socket: over the network, upload its directory as a tar archive (Content-Type: application/x-tar)".to_owned(),
                    ))
                }
                None | Some("application/json") => {
                    no_params(&query).map(|()| RegisterBody::Json)?
                }
                Some("application/x-tar") => {
                    RegisterBody::Tar(config_from_query(&query, &namespace)?)
                }
                Some(_) => {
                    return Err(Reject::new(
                        415,
                        "unsupported_media_type",
                        format!(
                        "unsupported content type {:?}: use application/json or application/x-tar",
                        content_type.unwrap_or_default()
                    ),
                    ))
                }
            };
            Ok(Route::Register {
                namespace,
                name,
                body,
            })
        }
        Op::RemoveFunction => no_params(&query).map(|()| Route::Remove { namespace, name }),
        Op::Invoke => {
            let (logs, blocking) = invoke_query(&query)?;
            Ok(Route::Invoke {
                namespace,
                name,
                logs,
                blocking,
            })
        }
        Op::ListActivations => {
            let mut query = list_query(&query)?;
            // A namespace key reads its own namespace's records only.
            if let Some(own) = &grant.scope {
                match &query.namespace {
                    Some(asked) if asked != own => {
                        return Err(super::auth::forbidden(format!(
                            "this key reads the activations of namespace {own:?} only"
                        )))
                    }
                    _ => query.namespace = Some(own.clone()),
                }
            }
            Ok(Route::ListActivations { query })
        }
        Op::Status => no_params(&query).map(|()| Route::Status {
            scope: grant.scope.clone(),
        }),
        Op::Stats => no_params(&query).map(|()| Route::Stats),
        Op::Usage => no_params(&query).map(|()| Route::Usage { namespace }),
        Op::Metrics => no_params(&query).map(|()| Route::Metrics),
        Op::InvokerActivate => no_params(&query).map(|()| Route::Invoker {
            scope: grant.scope.clone(),
        }),
        Op::Ping => no_params(&query).map(|()| Route::Ping),
        Op::ListPackages => no_params(&query).map(|()| Route::ListPackages),
        Op::CollectPackages => no_params(&query).map(|()| Route::CollectPackages),
        Op::ListWorkflows => no_params(&query).map(|()| Route::ListWorkflows { namespace }),
        Op::RegisterWorkflow => {
            no_params(&query).map(|()| Route::RegisterWorkflow { namespace, name })
        }
        Op::RemoveWorkflow => no_params(&query).map(|()| Route::RemoveWorkflow { namespace, name }),
        Op::RunWorkflow => no_params(&query).map(|()| Route::RunWorkflow { namespace, name }),
        Op::Run | Op::GetActivation(_) | Op::OpenWhisk(_) => {
            unreachable!("answered above")
        }
    }
}

/// A request matched to a route, waiting for its body.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Route {
    Register {
        namespace: String,
        name: String,
        body: RegisterBody,
    },
    List {
        namespace: String,
    },
    Remove {
        namespace: String,
        name: String,
    },
    Invoke {
        namespace: String,
        name: String,
        logs: bool,
        /// `?blocking=false`: accepted, answered 202, run later.
        blocking: bool,
    },
    ListActivations {
        query: Query,
    },
    GetActivation {
        id: ActivationId,
        part: ActivationPart,
        /// A namespace key's read: only a record of this namespace is found.
        scope: Option<String>,
    },
    /// `/run`: the request's head as an app sees it (its headers are added by
    /// [`Route::with_headers`]).
    Run {
        namespace: String,
        name: String,
        logs: bool,
        request: HttpRequest,
    },
    /// `GET /status`; a namespace key's view lists only its namespace.
    Status {
        scope: Option<String>,
    },
    Stats,
    Usage {
        namespace: String,
    },
    Metrics,
    /// `POST /invoke`; a namespace key's message must be of its namespace.
    Invoker {
        scope: Option<String>,
    },
    Ping,
    ListPackages,
    CollectPackages,
    RegisterWorkflow {
        namespace: String,
        name: String,
    },
    ListWorkflows {
        namespace: String,
    },
    RemoveWorkflow {
        namespace: String,
        name: String,
    },
    RunWorkflow {
        namespace: String,
        name: String,
    },
    /// OpenWhisk's REST API.
    OpenWhisk(OwRoute),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum RegisterBody {
    /// `application/json`: an [`ipc::api::RegisterFunction`].
    Json,
    /// `application/x-tar`, with the configuration from the query string.
    Tar(FunctionConfig),
}

/// A request ready for a worker.
#[derive(Debug)]
pub(super) struct Dispatch {
    pub request: Request,
    /// How the response is written.
    pub answer: Answer,
}

impl Route {
    /// Gives a `/run` route the request's headers (others need none).
    pub fn with_headers(mut self, headers: Vec<(String, String)>) -> Route {
        if let Route::Run { request, .. } = &mut self {
            request.headers = headers;
        }
        self
    }

    /// Sets how long an OpenWhisk blocking invocation is waited for.
    pub fn with_openwhisk_wait(self, wait: std::time::Duration) -> Route {
        match self {
            Route::OpenWhisk(r) => Route::OpenWhisk(r.with_wait(wait)),
            other => other,
        }
    }

    /// Completes the route with the request's body.
    pub fn into_dispatch(self, body: Vec<u8>) -> Result<Dispatch, Reject> {
        let mut answer = Answer::default();
        let (request, logs) = match self {
            Route::OpenWhisk(route) => {
                let (request, ow) = route.into_dispatch(body)?;
                return Ok(Dispatch {
                    request,
                    answer: Answer {
                        openwhisk: Some(ow),
                        ..answer
                    },
                });
            }
            Route::Register {
                namespace,
                name,
                body: RegisterBody::Json,
            } => {
                let reg: RegisterFunction = serde_json::from_slice(&body)
                    .map_err(|e| Reject::bad_request(format!("invalid request body: {e}")))?;
                if let Some(given) = &reg.namespace {
                    same_namespace(given, &namespace)?;
                }
                let source = FunctionSource::Dir(PathBuf::from(reg.path));
                (
                    Request::RegisterFunction {
                        namespace,
                        name,
                        source,
                        config: reg.config,
                    },
                    false,
                )
            }
            Route::Register {
                namespace,
                name,
                body: RegisterBody::Tar(config),
            } => (
                Request::RegisterFunction {
                    namespace,
                    name,
                    source: FunctionSource::Tar(body),
                    config,
                },
                false,
            ),
            Route::List { namespace } => (Request::ListFunctions { namespace }, false),
            Route::Remove { namespace, name } => {
                (Request::RemoveFunction { namespace, name }, false)
            }
            Route::Invoke {
                namespace,
                name,
                logs,
                blocking,
            } => {
                let event = if body.is_empty() {
                    b"{}".to_vec()
                } else {
                    body
                };
                let id = Activations::new_id();
                return Ok(Dispatch {
                    request: Request::Invoke {
                        namespace,
                        name,
                        event,
                        activation_id: Some(id),
                        blocking,
                    },
                    answer: Answer {
                        logs,
                        activation: Some(id),
                        ..answer
                    },
                });
            }
            Route::Run {
                namespace,
                name,
                logs,
                request,
            } => {
                let id = Activations::new_id();
                return Ok(Dispatch {
                    request: Request::Run {
                        namespace,
                        name,
                        run: RunRequest { request, body },
                        activation_id: Some(id),
                    },
                    answer: Answer {
                        logs,
                        activation: Some(id),
                        ..answer
                    },
                });
            }
            Route::ListActivations { query } => (Request::ListActivations { query }, false),
            Route::GetActivation { id, part, scope } => (
                Request::GetActivation {
                    namespace: scope,
                    id,
                    part,
                },
                false,
            ),
            Route::Status { scope } => {
                answer.scope = scope;
                (Request::Status, false)
            }
            Route::Stats => {
                answer.stats = true;
                (Request::Status, false)
            }
            Route::Usage { namespace } => (Request::Usage { namespace }, false),
            Route::Metrics => (Request::Metrics, false),
            Route::Invoker { scope } => {
                let msg = ipc::openwhisk::invoker::ActivationMessage::parse(&body).map_err(
                    |e| match e {
                        ipc::openwhisk::invoker::InvalidMessage::TooLarge(_) => {
                            Reject::payload_too_large(ipc::chain(&e))
                        }
                        e => Reject::bad_request(ipc::chain(&e)),
                    },
                )?;
                // A namespace key: the message is its namespace's, invoking an action
                // of its namespace (sprout shares no packages across namespaces).
                if let Some(own) = &scope {
                    if &msg.user.namespace.name != own || msg.action.namespace() != own {
                        return Err(super::auth::forbidden(format!(
                            "this key acts only in its own namespace, {own:?}: the message is of namespace {:?} and its action of {:?}",
                            msg.user.namespace.name,
                            msg.action.namespace()
                        )));
                    }
                }
                return Ok(Dispatch {
                    request: Request::Invoker(Box::new(msg)),
                    answer: Answer {
                        early: true,
                        ..answer
                    },
                });
            }
            Route::Ping => {
                answer.ping = true;
                (Request::Status, false)
            }
            Route::ListPackages => (Request::ListPackages, false),
            Route::CollectPackages => (Request::CollectPackages, false),
            Route::RegisterWorkflow { namespace, name } => {
                let workflow = crate::workflow::Workflow::parse(&body)
                    .map_err(|e| Reject::bad_request(ipc::chain(&e)))?;
                if !workflow.functions.is_empty() {
                    return Err(Reject::bad_request(
                        "invalid workflow: \"functions\" is for `sprout workflow run FILE`; register functions with PUT /functions/{name}",
                    ));
                }
                (
                    Request::RegisterWorkflow {
                        namespace,
                        name,
                        workflow,
                    },
                    false,
                )
            }
            Route::ListWorkflows { namespace } => (Request::ListWorkflows { namespace }, false),
            Route::RemoveWorkflow { namespace, name } => {
                (Request::RemoveWorkflow { namespace, name }, false)
            }
            Route::RunWorkflow { namespace, name } => {
                let input = if body.is_empty() {
                    b"{}".to_vec()
                } else {
                    body
                };
                (
                    Request::RunWorkflow {
                        namespace,
                        name,
                        input,
                    },
                    false,
                )
            }
        };
        answer.logs = logs;
        Ok(Dispatch { request, answer })
    }
}

/// The media type of a `Content-Type` value, lower-cased, without parameters.
fn media_type(content_type: Option<&str>) -> Option<String> {
    let t = content_type?.split(';').next().unwrap_or_default().trim();
    (!t.is_empty()).then(|| t.to_ascii_lowercase())
}

/// Splits and percent-decodes a query string. Repeated keys are refused.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, Reject> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| Reject::bad_request(format!("invalid query string: {e}")))?;
    for (i, (key, _)) in pairs.iter().enumerate() {
        if pairs[..i].iter().any(|(k, _)| k == key) {
            return Err(Reject::bad_request(format!(
                "query parameter {key:?} is given more than once"
            )));
        }
    }
    Ok(pairs)
}

fn unknown_param(key: &str) -> Reject {
    Reject::bad_request(format!("unknown query parameter {key:?}"))
}

fn no_params(query: &[(String, String)]) -> Result<(), Reject> {
    match query.first() {
        Some((key, _)) => Err(unknown_param(key)),
        None => Ok(()),
    }
}

fn bad_value(key: &str, value: &str) -> Reject {
    Reject::bad_request(format!(
        "query parameter {key:?} has an invalid value {value:?}"
    ))
}

fn flag(key: &str, value: &str) -> Result<bool, Reject> {
    match value {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad_value(key, value)),
    }
}

/// An invoke's query: `logs` and `blocking` (default true).
fn invoke_query(query: &[(String, String)]) -> Result<(bool, bool), Reject> {
    let (mut logs, mut blocking) = (false, true);
    for (key, value) in query {
        match key.as_str() {
            "logs" => logs = flag(key, value)?,
            "blocking" => blocking = flag(key, value)?,
            _ => return Err(unknown_param(key)),
        }
    }
    if logs && !blocking {
        return Err(Reject::bad_request(
            "logs=true needs blocking=true: an asynchronous invocation's logs are in its record (GET /activations/{id}/logs)",
        ));
    }
    Ok((logs, blocking))
}

/// `GET /activations`' query: `namespace`, `name`, `since` (ms since the epoch),
/// `limit` (default 30, at most 200) and `skip`.
fn list_query(query: &[(String, String)]) -> Result<Query, Reject> {
    let mut q = Query {
        limit: crate::activations::DEFAULT_LIMIT,
        ..Query::default()
    };
    for (key, value) in query {
        let int = || value.parse::<u64>().map_err(|_| bad_value(key, value));
        match key.as_str() {
            "namespace" if !value.is_empty() => q.namespace = Some(value.clone()),
            "name" if !value.is_empty() => q.name = Some(value.clone()),
            "since" => q.since = Some(int()?),
            "limit" => {
                let limit = int()?;
                if limit > crate::activations::MAX_LIMIT {
                    return Err(Reject::bad_request(format!(
                        "query parameter \"limit\" is {limit}, over the most a listing returns ({})",
                        crate::activations::MAX_LIMIT
                    )));
                }
                q.limit = limit;
            }
            "skip" => q.skip = int()?,
            "namespace" | "name" => return Err(bad_value(key, value)),
            _ => return Err(unknown_param(key)),
        }
    }
    Ok(q)
}

fn logs_from_query(query: &[(String, String)]) -> Result<bool, Reject> {
    let mut logs = false;
    for (key, value) in query {
        match key.as_str() {
            "logs" => {
                logs = match value.as_str() {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad_value(key, value)),
                }
            }
            _ => return Err(unknown_param(key)),
        }
    }
    Ok(logs)
}

/// A registration's namespace, when its body (JSON) or query (tar) gives one too, must
/// be the path's.
fn same_namespace(given: &str, path: &str) -> Result<(), Reject> {
    if given == path {
        return Ok(());
    }
    Err(Reject::bad_request(format!(
        "namespace {given:?} in the request is not the path's namespace {path:?}: register in another namespace with PUT /namespaces/{{ns}}/functions/{{name}}"
    )))
}

/// The settings of a tar registration; `namespace` (optional) must be the path's.
fn config_from_query(
    query: &[(String, String)],
    namespace: &str,
) -> Result<FunctionConfig, Reject> {
    let mut config = FunctionConfig::default();
    for (key, value) in query {
        let int = || value.parse::<u64>().map_err(|_| bad_value(key, value));
        match key.as_str() {
            "namespace" => same_namespace(value, namespace)?,
            "handler" if !value.is_empty() => config.handler = Some(value.clone()),
            "runtime" if !value.is_empty() => config.runtime = Some(value.clone()),
            "network" if !value.is_empty() => config.network = Some(value.clone()),
            "memory_mb" => config.memory_mb = Some(int()?),
            "timeout_ms" => config.timeout_ms = Some(int()?),
            "pids" => config.pids = Some(int()?),
            "max_instances" => config.max_instances = Some(int()? as usize),
            "cpus" => {
                let cpus = value
                    .parse::<f64>()
                    .ok()
                    .filter(|c| c.is_finite())
                    .ok_or_else(|| bad_value(key, value))?;
                config.cpus = Some(cpus);
            }
            "handler" | "runtime" | "network" => return Err(bad_value(key, value)),
            _ => return Err(unknown_param(key)),
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_table() {
        assert_eq!(
            route("GET", "/functions", None),
            Ok(Route::List {
                namespace: "default".into()
            })
        );
        assert_eq!(
            route("GET", "/status", None),
            Ok(Route::Status { scope: None })
        );
        assert_eq!(route("GET", "/stats", None), Ok(Route::Stats));
        assert_eq!(
            route("DELETE", "/functions/f", None),
            Ok(Route::Remove {
                namespace: "default".into(),
                name: "f".into()
            })
        );
        assert_eq!(
            route(
                "PUT",
                "/functions/f",
                Some("Application/JSON; charset=utf-8")
            ),
            Ok(Route::Register {
                namespace: "default".into(),
                name: "f".into(),
                body: RegisterBody::Json
            })
        );
        assert_eq!(
            route("PUT", "/functions/f", None),
            Ok(Route::Register {
                namespace: "default".into(),
                name: "f".into(),
                body: RegisterBody::Json
            })
        );
        let run = |method: &str, script_name: &str, path: &str, query: &str| HttpRequest {
            method: method.into(),
            script_name: script_name.into(),
            path: path.into(),
            query: query.into(),
            headers: Vec::new(),
        };
        assert_eq!(
            route("POST", "/run/f", None),
            Ok(Route::Run {
                namespace: "default".into(),
                name: "f".into(),
                logs: false,
                request: run("POST", "/run/f", "", ""),
            })
        );
        assert_eq!(
            route("PATCH", "/run/f/a/b%2F?logs=1&q", None),
            Ok(Route::Run {
                namespace: "default".into(),
                name: "f".into(),
                logs: false,
                request: run("PATCH", "/run/f", "/a/b%2F", "logs=1&q"),
            })
        );
        assert_eq!(
            route("GET", "/run/f/?logs=1", None),
            Ok(Route::Run {
                namespace: "default".into(),
                name: "f".into(),
                logs: true,
                request: run("GET", "/run/f", "/", "logs=1"),
            })
        );
        assert_eq!(route("GET", "/run/", None).unwrap_err().status, 404);
        assert_eq!(
            route("POST", "/functions/f/invoke?logs=1", None),
            Ok(Route::Invoke {
                namespace: "default".into(),
                name: "f".into(),
                logs: true,
                blocking: true
            })
        );
        assert_eq!(
            route("POST", "/functions/f/invoke?logs=false", None),
            Ok(Route::Invoke {
                namespace: "default".into(),
                name: "f".into(),
                logs: false,
                blocking: true
            })
        );

        let r = route("GET", "/nope", None).unwrap_err();
        assert_eq!(
            (r.status, r.kind, r.message.as_str()),
            (404, "not_found", "no route for GET /nope")
        );
        assert_eq!(route("GET", "/functions/", None).unwrap_err().status, 404);
        assert_eq!(
            route("GET", "/functions/f/invoke/x", None)
                .unwrap_err()
                .status,
            404
        );
        for (method, target, allow) in [
            ("POST", "/functions", "GET"),
            ("GET", "/functions/f", "PUT, DELETE"),
            ("GET", "/functions/f/invoke", "POST"),
            ("TRACE", "/run/f", RUN_ALLOW),
            ("CONNECT", "/run/f/x", RUN_ALLOW),
            ("DELETE", "/status", "GET"),
        ] {
            let r = route(method, target, None).unwrap_err();
            assert_eq!(
                (r.status, r.kind, r.allow),
                (405, "method_not_allowed", Some(allow)),
                "{method} {target}"
            );
        }
        let r = route("PUT", "/functions/f", Some("text/plain")).unwrap_err();
        assert_eq!((r.status, r.kind), (415, "unsupported_media_type"));
        assert_eq!(route("GET", "*", None).unwrap_err().status, 400);
    }

    #[test]
    fn activation_routes_check_ids_and_queries() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            route("GET", &format!("/activations/{id}/logs"), None),
            Ok(Route::GetActivation {
                id: ActivationId::parse(id).unwrap(),
                part: ActivationPart::Logs,
                scope: None,
            })
        );
        for bad in ["xyz", "0123456789ABCDEF0123456789ABCDEF", "0123"] {
            let r = route("GET", &format!("/activations/{bad}"), None).unwrap_err();
            assert_eq!(r.status, 400, "{bad}");
            assert!(r.message.contains(&format!("{bad:?}")), "{}", r.message);
        }
        assert_eq!(
            route(
                "GET",
                "/activations?name=f&namespace=t&since=5&limit=7&skip=2",
                None
            ),
            Ok(Route::ListActivations {
                query: Query {
                    namespace: Some("t".into()),
                    name: Some("f".into()),
                    since: Some(5),
                    limit: 7,
                    skip: 2
                }
            })
        );
        assert!(matches!(
            route("GET", "/activations", None),
            Ok(Route::ListActivations {
                query: Query { limit: 30, .. }
            })
        ));
        for bad in ["limit=201", "since=x", "color=red", "skip=-1"] {
            let r = route("GET", &format!("/activations?{bad}"), None).unwrap_err();
            assert_eq!(r.status, 400, "{bad}");
        }
        assert!(matches!(
            route("POST", "/functions/f/invoke?blocking=false", None),
            Ok(Route::Invoke {
                blocking: false,
                logs: false,
                ..
            })
        ));
        let r = route("POST", "/functions/f/invoke?blocking=false&logs=1", None).unwrap_err();
        assert!(
            r.message.contains("logs=true needs blocking=true"),
            "{}",
            r.message
        );
    }

    #[test]
    fn tar_network_comes_from_the_query() {
        let q = |v: &str| vec![("network".to_owned(), v.to_owned())];
        let config = config_from_query(&q("egress"), "default").unwrap();
        assert_eq!(config.network.as_deref(), Some("egress"));
        assert_eq!(
            config_from_query(&q(""), "default").unwrap_err().status,
            400
        );
    }

    #[test]
    fn tar_config_comes_from_the_query() {
        let r = route(
            "PUT",
            "/functions/f?handler=app%3Amain&memory_mb=128&timeout_ms=1000&pids=64&cpus=0.5&max_instances=2",
            Some("application/x-tar"),
        );
        let config = FunctionConfig {
            runtime: None,
            network: None,
            handler: Some("app:main".into()),
            memory_mb: Some(128),
            timeout_ms: Some(1000),
            pids: Some(64),
            cpus: Some(0.5),
            max_instances: Some(2),
        };
        assert_eq!(
            r,
            Ok(Route::Register {
                namespace: "default".into(),
                name: "f".into(),
                body: RegisterBody::Tar(config)
            })
        );

        for (query, key) in [
            ("color=red", "color"),
            ("memory_mb=lots", "memory_mb"),
            ("timeout_ms=-1", "timeout_ms"),
            ("cpus=NaN", "cpus"),
            ("pids=1&pids=2", "pids"),
        ] {
            let r = route(
                "PUT",
                &format!("/functions/f?{query}"),
                Some("application/x-tar"),
            )
            .unwrap_err();
            assert_eq!(r.status, 400, "{query}");
            assert!(
                r.message.contains(&format!("{key:?}")),
                "{query}: {}",
                r.message
            );
        }
        // Configuration travels in the body for JSON registrations.
        let r = route("PUT", "/functions/f?memory_mb=1", Some("application/json")).unwrap_err();
        assert!(r.message.contains("\"memory_mb\""), "{}", r.message);
        // On /run the query is the function's: sprout takes a valid `logs` only.
        for query in ["logs=maybe", "x=%zz", "logs=1&logs=0"] {
            let r = route("POST", &format!("/run/f?{query}"), None).unwrap();
            assert!(matches!(r, Route::Run { logs: false, .. }), "{query}");
        }
        assert_eq!(
            route("POST", "/functions/f/invoke?logs=maybe", None)
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn dispatch_builds_requests() {
        let d = Route::Invoke {
            namespace: "default".into(),
            name: "f".into(),
            logs: true,
            blocking: true,
        }
        .into_dispatch(Vec::new())
        .unwrap();
        assert!(d.answer.logs);
        assert!(
            matches!(d.request, Request::Invoke { ref namespace, ref name, ref event, activation_id: Some(id), blocking: true } if namespace == "default" && name == "f" && event == b"{}" && d.answer.activation == Some(id))
        );

        let body = br#"{"path":"/srv/f","handler":"m:h","memory_mb":64}"#.to_vec();
        let d = Route::Register {
            namespace: "default".into(),
            name: "f".into(),
            body: RegisterBody::Json,
        }
        .into_dispatch(body)
        .unwrap();
        match d.request {
            Request::RegisterFunction {
                namespace,
                name,
                source: FunctionSource::Dir(dir),
                config,
            } => {
                assert_eq!((namespace.as_str(), name.as_str()), ("default", "f"));
                assert_eq!(dir, PathBuf::from("/srv/f"));
                assert_eq!(config.handler.as_deref(), Some("m:h"));
                assert_eq!(config.memory_mb, Some(64));
            }
            other => panic!("{other:?}"),
        }
        let bad = Route::Register {
            namespace: "default".into(),
            name: "f".into(),
            body: RegisterBody::Json,
        }
        .into_dispatch(b"{\"pth\":1}".to_vec());
        assert_eq!(bad.unwrap_err().status, 400);
    }

    #[test]
    fn namespaced_routes_act_in_their_namespace() {
        let ns = |n: &str| n.to_owned();
        assert_eq!(
            route("GET", "/namespaces/t/functions", None),
            Ok(Route::List { namespace: ns("t") })
        );
        assert_eq!(
            route("POST", "/namespaces/a@b.c/functions/f/invoke?logs=1", None),
            Ok(Route::Invoke {
                namespace: ns("a@b.c"),
                name: ns("f"),
                logs: true,
                blocking: true
            })
        );
        assert!(matches!(
            route("POST", "/namespaces/t/run/f/x", None),
            Ok(Route::Run { ref namespace, ref name, ref request, .. })
                if namespace == "t" && name == "f"
                    && request.script_name == "/namespaces/t/run/f" && request.path == "/x"
        ));
        assert_eq!(
            route("DELETE", "/namespaces/t/functions/f", None),
            Ok(Route::Remove {
                namespace: ns("t"),
                name: ns("f")
            })
        );
        assert_eq!(
            route("PUT", "/namespaces/t/workflows/w", None),
            Ok(Route::RegisterWorkflow {
                namespace: ns("t"),
                name: ns("w")
            })
        );
        assert_eq!(
            route("POST", "/namespaces/t/workflows/w/invoke", None),
            Ok(Route::RunWorkflow {
                namespace: ns("t"),
                name: ns("w")
            })
        );
        assert_eq!(
            route("GET", "/workflows", None),
            Ok(Route::ListWorkflows {
                namespace: ns("default")
            })
        );
        // The name is the agent's to judge (a 400 stating the rule), the shape the router's.
        assert_eq!(
            route("GET", "/namespaces/_/functions", None),
            Ok(Route::List { namespace: ns("_") })
        );
        for target in [
            "/namespaces",
            "/namespaces/t",
            "/namespaces//functions",
            "/namespaces/t/status",
            "/namespaces/t/namespaces/u/functions",
        ] {
            assert_eq!(
                route("GET", target, None).unwrap_err().status,
                404,
                "{target}"
            );
        }
        // A registration body may name its namespace, but not another one.
        let reg = |target: &str, body: &str| {
            route("PUT", target, None)
                .unwrap()
                .into_dispatch(body.as_bytes().to_vec())
        };
        let d = reg(
            "/namespaces/t/functions/f",
            r#"{"path":"/srv/f","namespace":"t"}"#,
        )
        .unwrap();
        assert!(
            matches!(d.request, Request::RegisterFunction { ref namespace, .. } if namespace == "t")
        );
        let e = reg("/functions/f", r#"{"path":"/srv/f","namespace":"t"}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message
                .contains("namespace \"t\" in the request is not the path's namespace \"default\""),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_tar_registration_may_name_its_namespace_in_the_query() {
        let r = route(
            "PUT",
            "/namespaces/t/functions/f?namespace=t&memory_mb=64",
            Some("application/x-tar"),
        )
        .unwrap();
        assert!(
            matches!(r, Route::Register { ref namespace, body: RegisterBody::Tar(ref c), .. } if namespace == "t" && c.memory_mb == Some(64))
        );
        let e = route("PUT", "/functions/f?namespace=t", Some("application/x-tar")).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message
                .contains("is not the path's namespace \"default\""),
            "{}",
            e.message
        );
    }
}
