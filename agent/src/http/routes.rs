//! The route table: HTTP requests to [`Request`]s, and [`Response`]s and [`Error`]s
//! back to HTTP responses. The one place that picks a status code for an error
//! kind is [`status_for`].
//!
//! Functions and workflows live in namespaces: `/functions/...`, `/run/...` and
//! `/workflows/...` act in `default`, and the same routes under
//! `/namespaces/{ns}/` act in `ns`. The namespace's name is checked by the agent (a
//! 400 that states the rule), as is everything else about a request.

use std::path::PathBuf;

use ipc::api::{ErrorBody, ErrorDetail, FunctionConfig, RegisterFunction, DEFAULT_NAMESPACE};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::error::{Error, ErrorKind};
use crate::request::{FunctionSource, Invocation, Request, Response};

/// Header carrying an invocation's duration in microseconds.
pub const DURATION_HEADER: &str = "X-Sprout-Duration-Us";
/// Header saying whether an invocation needed a new sandbox (`true`/`false`).
pub const COLD_HEADER: &str = "X-Sprout-Cold";
/// Task steps a workflow run executed.
pub const TASKS_HEADER: &str = "X-Sprout-Tasks";
/// How the invocation's instance was found: `warm`, `thawed`, `stem_cell`, `new_sandbox`.
pub const START_HEADER: &str = "X-Sprout-Start";

/// The status code for each kind of agent error ([`ErrorKind::http_status`]).
pub fn status_for(kind: ErrorKind) -> u16 {
    kind.http_status()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// A request refused by the HTTP layer, before or instead of reaching the agent.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Reject {
    pub status: u16,
    /// The `kind` in the error body.
    pub kind: &'static str,
    pub message: String,
    /// For 405: the methods the path accepts.
    pub allow: Option<&'static str>,
    /// Whether the connection must be closed after the response (the request's
    /// framing can no longer be trusted, or its body was not read).
    pub close: bool,
}

impl Reject {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Reject {
        Reject {
            status,
            kind,
            message: message.into(),
            allow: None,
            close: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Reject {
        Reject::new(400, "bad_request", message)
    }

    /// A request whose framing is broken: answered, then the connection is closed.
    pub fn malformed(message: impl Into<String>) -> Reject {
        Reject {
            close: true,
            ..Reject::bad_request(message)
        }
    }

    pub fn head_too_large(max: usize) -> Reject {
        Reject {
            close: true,
            ..Reject::new(
                431,
                "headers_too_large",
                format!("request head exceeds {max} bytes or 64 headers"),
            )
        }
    }

    pub fn body_too_large(len: Option<u64>, max: usize) -> Reject {
        let message = match len {
            Some(len) => format!("request body of {len} bytes exceeds the limit of {max} bytes"),
            None => format!("request body exceeds the limit of {max} bytes"),
        };
        Reject {
            close: true,
            ..Reject::new(413, "payload_too_large", message)
        }
    }

    pub fn not_implemented(message: impl Into<String>) -> Reject {
        Reject {
            close: true,
            ..Reject::new(501, "not_implemented", message)
        }
    }

    fn internal(message: impl Into<String>) -> Reject {
        Reject::new(500, "internal", message)
    }

    pub fn reply(&self) -> Reply {
        let detail = ErrorDetail {
            kind: self.kind.to_owned(),
            message: self.message.clone(),
            exception: None,
            traceback: None,
            logs: None,
        };
        let mut reply = Reply::json(self.status, &ErrorBody { error: detail });
        if let Some(allow) = self.allow {
            reply.headers.push(("Allow", allow.to_owned()));
        }
        reply
    }
}

/// Whether the connection stays open after a response, and how to say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Persist {
    Close,
    /// Keep the connection; HTTP/1.0 clients need to be told.
    KeepAlive {
        http10: bool,
    },
}

/// A response before encoding. Every response is JSON.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    fn json<T: Serialize>(status: u16, value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply {
                status,
                headers: Vec::new(),
                body,
            },
            // Not reachable for the API's types, which have no fallible serializers.
            Err(e) => Reject::internal(format!("serialize response: {e}")).reply(),
        }
    }

    /// The response's bytes: status line, headers and body.
    pub fn encode(&self, persist: Persist) -> Vec<u8> {
        let mut out = encode_head(self.status, &self.headers, self.body.len(), persist);
        out.extend_from_slice(&self.body);
        out
    }
}

/// A response for the event loop to send: the body is not copied into the head's
/// buffer, and an invocation's result is its payload as it came from the instance
/// (a shared result is written from its mapping, never copied in the agent).
#[derive(Debug)]
pub(super) struct Output {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: ipc::Payload,
}

impl From<Reply> for Output {
    fn from(reply: Reply) -> Output {
        Output {
            status: reply.status,
            headers: reply.headers,
            body: reply.body.into(),
        }
    }
}

impl Output {
    /// The status line and headers; the body follows them.
    pub fn head(&self, persist: Persist) -> Vec<u8> {
        encode_head(self.status, &self.headers, self.body.len(), persist)
    }
}

/// Status line and headers of a response with a body of `len` bytes.
fn encode_head(
    status: u16,
    headers: &[(&'static str, String)],
    len: usize,
    persist: Persist,
) -> Vec<u8> {
    use std::fmt::Write;
    let mut head = String::with_capacity(160);
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        status,
        reason(status),
        len
    );
    match persist {
        Persist::Close => head.push_str("Connection: close\r\n"),
        Persist::KeepAlive { http10: true } => head.push_str("Connection: keep-alive\r\n"),
        Persist::KeepAlive { http10: false } => {}
    }
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// The interim response to `Expect: 100-continue`.
pub(super) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

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
    },
    Status,
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
    /// For invocations: answer with an [`ipc::api::InvocationRecord`] instead of the bare result.
    pub logs: bool,
}

/// Matches a request head to a route. `target` is the request target as sent.
pub(super) fn route(
    method: &str,
    target: &str,
    content_type: Option<&str>,
) -> Result<Route, Reject> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let Some(rest) = path.strip_prefix('/') else {
        return Err(Reject::bad_request(format!(
            "request target {target:?} is not a path"
        )));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    // `/namespaces/{ns}/<route>` is `<route>` in `ns` (not `/status`: it is the agent's).
    let (namespace, segments) = match segments.as_slice() {
        ["namespaces", ns, tail @ ..] if !ns.is_empty() && tail.first() != Some(&"status") => {
            (*ns, tail)
        }
        other => (DEFAULT_NAMESPACE, other),
    };
    let namespace = namespace.to_owned();
    let not_found = || Reject::new(404, "not_found", format!("no route for {method} {path}"));
    let allow = |allow: &'static str| Reject {
        allow: Some(allow),
        ..Reject::new(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {path}; use {allow}"),
        )
    };
    // Path, then method, then query and content type: a wrong path is a 404 whatever the rest.
    let (name, methods) = match segments {
        ["functions"] => (None, "GET"),
        ["functions", name] if !name.is_empty() => (Some(*name), "PUT, DELETE"),
        ["functions", name, "invoke"] | ["run", name] if !name.is_empty() => (Some(*name), "POST"),
        ["status"] => (None, "GET"),
        ["workflows"] => (None, "GET"),
        ["workflows", name] if !name.is_empty() => (Some(*name), "PUT, DELETE"),
        ["workflows", name, "invoke"] if !name.is_empty() => (Some(*name), "POST"),
        _ => return Err(not_found()),
    };
    if !methods.split(", ").any(|m| m == method) {
        return Err(allow(methods));
    }
    let query = parse_query(query)?;
    let name = name.unwrap_or_default().to_owned();
    match (segments[0], method) {
        ("functions", "GET") => no_params(&query).map(|()| Route::List { namespace }),
        ("functions", "PUT") => {
            let body = match media_type(content_type).as_deref() {
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
        ("functions", "DELETE") => no_params(&query).map(|()| Route::Remove { namespace, name }),
        ("functions" | "run", "POST") => Ok(Route::Invoke {
            namespace,
            name,
            logs: logs_from_query(&query)?,
        }),
        ("status", _) => no_params(&query).map(|()| Route::Status),
        ("workflows", "GET") => no_params(&query).map(|()| Route::ListWorkflows { namespace }),
        ("workflows", "PUT") => {
            no_params(&query).map(|()| Route::RegisterWorkflow { namespace, name })
        }
        ("workflows", "DELETE") => {
            no_params(&query).map(|()| Route::RemoveWorkflow { namespace, name })
        }
        ("workflows", "POST") => no_params(&query).map(|()| Route::RunWorkflow { namespace, name }),
        _ => Err(not_found()),
    }
}

impl Route {
    /// Completes the route with the request's body.
    pub fn into_dispatch(self, body: Vec<u8>) -> Result<Dispatch, Reject> {
        let (request, logs) = match self {
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
            } => {
                let event = if body.is_empty() {
                    b"{}".to_vec()
                } else {
                    body
                };
                (
                    Request::Invoke {
                        namespace,
                        name,
                        event,
                    },
                    logs,
                )
            }
            Route::Status => (Request::Status, false),
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
        Ok(Dispatch { request, logs })
    }
}

/// The HTTP response for what the agent answered.
///
/// An invocation's result is not copied: it becomes the response's body as it is (a
/// shared result stays in its mapping), or, with `?logs=true`, is copied once into
/// the record.
pub(super) fn reply_for(result: Result<Response, Error>, logs: bool) -> Output {
    let reply = match result {
        Ok(Response::Registered(info)) => Reply::json(200, &info),
        Ok(Response::Functions(list)) => Reply::json(200, &list),
        // The default namespace's answer is what it was before namespaces.
        Ok(Response::Removed { namespace, name }) if namespace == DEFAULT_NAMESPACE => {
            Reply::json(200, &serde_json::json!({ "removed": name }))
        }
        Ok(Response::Removed { namespace, name }) => Reply::json(
            200,
            &serde_json::json!({ "removed": name, "namespace": namespace }),
        ),
        Ok(Response::Invoked(inv)) => return invoked(inv, logs),
        Ok(Response::Status(status)) => Reply::json(200, &status),
        Ok(Response::WorkflowRegistered(info)) => Reply::json(200, &info),
        Ok(Response::Workflows(list)) => Reply::json(200, &list),
        Ok(Response::WorkflowRan(out)) => Reply {
            status: 200,
            headers: vec![
                (
                    DURATION_HEADER,
                    u64::try_from(out.duration.as_micros())
                        .unwrap_or(u64::MAX)
                        .to_string(),
                ),
                (TASKS_HEADER, out.tasks.to_string()),
            ],
            body: out.result,
        },
        Err(err) => Reply::json(
            status_for(err.kind()),
            &ErrorBody {
                error: err.detail(),
            },
        ),
    };
    reply.into()
}

/// The reply when a handler panicked.
pub(super) fn panicked() -> Output {
    Reject::internal("the request handler panicked")
        .reply()
        .into()
}

fn invoked(inv: Invocation, logs: bool) -> Output {
    let duration_us = u64::try_from(inv.duration.as_micros()).unwrap_or(u64::MAX);
    let mut out: Output = if logs {
        // `ipc::api::InvocationRecord` with the result borrowed, not copied into a `String`.
        #[derive(Serialize)]
        struct Record<'a> {
            result: &'a RawValue,
            logs: &'a ipc::api::Logs,
            duration_us: u64,
            cold: bool,
            start: &'a str,
        }
        let result = std::str::from_utf8(&inv.result)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str::<&RawValue>(s).map_err(|e| e.to_string()));
        match result {
            Ok(result) => Reply::json(
                200,
                &Record {
                    result,
                    logs: &inv.logs,
                    duration_us,
                    cold: inv.start.is_cold(),
                    start: inv.start.as_str(),
                },
            )
            .into(),
            Err(e) => {
                return Reject::internal(format!("the function's result is not JSON: {e}"))
                    .reply()
                    .into()
            }
        }
    } else {
        Output {
            status: 200,
            headers: Vec::new(),
            body: inv.result,
        }
    };
    out.headers.push((DURATION_HEADER, duration_us.to_string()));
    out.headers
        .push((COLD_HEADER, inv.start.is_cold().to_string()));
    out.headers
        .push((START_HEADER, inv.start.as_str().to_owned()));
    out
}

/// The media type of a `Content-Type` value, lower-cased, without parameters.
fn media_type(content_type: Option<&str>) -> Option<String> {
    let t = content_type?.split(';').next().unwrap_or_default().trim();
    (!t.is_empty()).then(|| t.to_ascii_lowercase())
}

/// Splits and percent-decodes a query string. Repeated keys are refused.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, Reject> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (percent_decode(key)?, percent_decode(value)?);
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(Reject::bad_request(format!(
                "query parameter {key:?} is given more than once"
            )));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn percent_decode(s: &str) -> Result<String, Reject> {
    let invalid = || Reject::bad_request(format!("invalid percent-encoding in query {s:?}"));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .ok_or_else(invalid)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| invalid())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| invalid())
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
            "handler" => return Err(bad_value(key, value)),
            _ => return Err(unknown_param(key)),
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_map_to_statuses() {
        assert_eq!(status_for(ErrorKind::BadRequest), 400);
        assert_eq!(status_for(ErrorKind::NotFound), 404);
        assert_eq!(status_for(ErrorKind::Function), 502);
        assert_eq!(status_for(ErrorKind::Timeout), 504);
        assert_eq!(status_for(ErrorKind::Internal), 500);
        assert_eq!(status_for(ErrorKind::Unavailable), 503);
    }

    #[test]
    fn route_table() {
        assert_eq!(
            route("GET", "/functions", None),
            Ok(Route::List {
                namespace: "default".into()
            })
        );
        assert_eq!(route("GET", "/status", None), Ok(Route::Status));
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
        assert_eq!(
            route("POST", "/run/f", None),
            Ok(Route::Invoke {
                namespace: "default".into(),
                name: "f".into(),
                logs: false
            })
        );
        assert_eq!(
            route("POST", "/functions/f/invoke?logs=1", None),
            Ok(Route::Invoke {
                namespace: "default".into(),
                name: "f".into(),
                logs: true
            })
        );
        assert_eq!(
            route("POST", "/functions/f/invoke?logs=false", None),
            Ok(Route::Invoke {
                namespace: "default".into(),
                name: "f".into(),
                logs: false
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
            ("PUT", "/run/f", "POST"),
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
    fn tar_config_comes_from_the_query() {
        let r = route(
            "PUT",
            "/functions/f?handler=app%3Amain&memory_mb=128&timeout_ms=1000&pids=64&cpus=0.5&max_instances=2",
            Some("application/x-tar"),
        );
        let config = FunctionConfig {
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
        assert_eq!(
            route("POST", "/run/f?logs=maybe", None).unwrap_err().status,
            400
        );
        assert_eq!(route("POST", "/run/f?x=%zz", None).unwrap_err().status, 400);
    }

    #[test]
    fn dispatch_builds_requests() {
        let d = Route::Invoke {
            namespace: "default".into(),
            name: "f".into(),
            logs: true,
        }
        .into_dispatch(Vec::new())
        .unwrap();
        assert!(d.logs);
        assert!(
            matches!(d.request, Request::Invoke { ref namespace, ref name, ref event } if namespace == "default" && name == "f" && event == b"{}")
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
                logs: true
            })
        );
        assert_eq!(
            route("POST", "/namespaces/t/run/f", None),
            Ok(Route::Invoke {
                namespace: ns("t"),
                name: ns("f"),
                logs: false
            })
        );
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

    #[test]
    fn encodes_responses() {
        let reply = Reply {
            status: 200,
            headers: vec![("X-A", "1".into())],
            body: b"{}".to_vec(),
        };
        assert_eq!(
            reply.encode(Persist::KeepAlive { http10: false }),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nX-A: 1\r\n\r\n{}"
        );
        let text = String::from_utf8(reply.encode(Persist::Close)).unwrap();
        assert!(text.contains("\r\nConnection: close\r\n"));
        let text = String::from_utf8(reply.encode(Persist::KeepAlive { http10: true })).unwrap();
        assert!(text.contains("\r\nConnection: keep-alive\r\n"));
    }
}
