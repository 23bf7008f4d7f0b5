//! The route table: HTTP requests to [`Request`]s, and [`Response`]s and [`Error`]s
//! back to HTTP responses. The one place that picks a status code for an error
//! kind is [`status_for`].

use std::path::PathBuf;

use ipc::api::{ErrorBody, ErrorDetail, FunctionConfig, InvocationRecord, RegisterFunction};
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

/// The status code for each kind of agent error: the only such mapping.
pub fn status_for(kind: ErrorKind) -> u16 {
    match kind {
        ErrorKind::BadRequest => 400,
        ErrorKind::NotFound => 404,
        ErrorKind::Function => 502,
        ErrorKind::Timeout => 504,
        ErrorKind::Internal => 500,
        ErrorKind::Unavailable => 503,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
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
        use std::fmt::Write;
        let mut head = String::with_capacity(160);
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.body.len()
        );
        match persist {
            Persist::Close => head.push_str("Connection: close\r\n"),
            Persist::KeepAlive { http10: true } => head.push_str("Connection: keep-alive\r\n"),
            Persist::KeepAlive { http10: false } => {}
        }
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        let mut out = Vec::with_capacity(head.len() + self.body.len());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// The interim response to `Expect: 100-continue`.
pub(super) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A request matched to a route, waiting for its body.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Route {
    Register { name: String, body: RegisterBody },
    List,
    Remove { name: String },
    Invoke { name: String, logs: bool },
    Status,
    RegisterWorkflow { name: String },
    ListWorkflows,
    RemoveWorkflow { name: String },
    RunWorkflow { name: String },
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
    /// For invocations: answer with an [`InvocationRecord`] instead of the bare result.
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
    let (name, methods) = match segments.as_slice() {
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
        ("functions", "GET") => no_params(&query).map(|()| Route::List),
        ("functions", "PUT") => {
            let body = match media_type(content_type).as_deref() {
                None | Some("application/json") => {
                    no_params(&query).map(|()| RegisterBody::Json)?
                }
                Some("application/x-tar") => RegisterBody::Tar(config_from_query(&query)?),
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
            Ok(Route::Register { name, body })
        }
        ("functions", "DELETE") => no_params(&query).map(|()| Route::Remove { name }),
        ("functions" | "run", "POST") => Ok(Route::Invoke {
            name,
            logs: logs_from_query(&query)?,
        }),
        ("status", _) => no_params(&query).map(|()| Route::Status),
        ("workflows", "GET") => no_params(&query).map(|()| Route::ListWorkflows),
        ("workflows", "PUT") => no_params(&query).map(|()| Route::RegisterWorkflow { name }),
        ("workflows", "DELETE") => no_params(&query).map(|()| Route::RemoveWorkflow { name }),
        ("workflows", "POST") => no_params(&query).map(|()| Route::RunWorkflow { name }),
        _ => Err(not_found()),
    }
}

impl Route {
    /// Completes the route with the request's body.
    pub fn into_dispatch(self, body: Vec<u8>) -> Result<Dispatch, Reject> {
        let (request, logs) = match self {
            Route::Register {
                name,
                body: RegisterBody::Json,
            } => {
                let reg: RegisterFunction = serde_json::from_slice(&body)
                    .map_err(|e| Reject::bad_request(format!("invalid request body: {e}")))?;
                let source = FunctionSource::Dir(PathBuf::from(reg.path));
                (
                    Request::RegisterFunction {
                        name,
                        source,
                        config: reg.config,
                    },
                    false,
                )
            }
            Route::Register {
                name,
                body: RegisterBody::Tar(config),
            } => (
                Request::RegisterFunction {
                    name,
                    source: FunctionSource::Tar(body),
                    config,
                },
                false,
            ),
            Route::List => (Request::ListFunctions, false),
            Route::Remove { name } => (Request::RemoveFunction { name }, false),
            Route::Invoke { name, logs } => {
                let event = if body.is_empty() {
                    b"{}".to_vec()
                } else {
                    body
                };
                (Request::Invoke { name, event }, logs)
            }
            Route::Status => (Request::Status, false),
            Route::RegisterWorkflow { name } => {
                let workflow = crate::workflow::Workflow::parse(&body)
                    .map_err(|e| Reject::bad_request(ipc::chain(&e)))?;
                if !workflow.functions.is_empty() {
                    return Err(Reject::bad_request(
                        "invalid workflow: \"functions\" is for `sprout workflow run FILE`; register functions with PUT /functions/{name}",
                    ));
                }
                (Request::RegisterWorkflow { name, workflow }, false)
            }
            Route::ListWorkflows => (Request::ListWorkflows, false),
            Route::RemoveWorkflow { name } => (Request::RemoveWorkflow { name }, false),
            Route::RunWorkflow { name } => {
                let input = if body.is_empty() {
                    b"{}".to_vec()
                } else {
                    body
                };
                (Request::RunWorkflow { name, input }, false)
            }
        };
        Ok(Dispatch { request, logs })
    }
}

/// The HTTP response for what the agent answered.
pub(super) fn reply_for(result: Result<Response, Error>, logs: bool) -> Reply {
    match result {
        Ok(Response::Registered(info)) => Reply::json(200, &info),
        Ok(Response::Functions(list)) => Reply::json(200, &list),
        Ok(Response::Removed { name }) => Reply::json(200, &serde_json::json!({ "removed": name })),
        Ok(Response::Invoked(inv)) => invoked(inv, logs),
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
    }
}

/// The reply when a handler panicked.
pub(super) fn panicked() -> Reply {
    Reject::internal("the request handler panicked").reply()
}

fn invoked(inv: Invocation, logs: bool) -> Reply {
    let duration_us = u64::try_from(inv.duration.as_micros()).unwrap_or(u64::MAX);
    let mut reply = if logs {
        let result = String::from_utf8(inv.result)
            .map_err(|e| e.to_string())
            .and_then(|s| RawValue::from_string(s).map_err(|e| e.to_string()));
        match result {
            Ok(result) => Reply::json(
                200,
                &InvocationRecord {
                    result,
                    logs: inv.logs,
                    duration_us,
                    cold: inv.start.is_cold(),
                    start: inv.start.as_str().to_owned(),
                },
            ),
            Err(e) => {
                return Reject::internal(format!("the function's result is not JSON: {e}")).reply()
            }
        }
    } else {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: inv.result,
        }
    };
    reply
        .headers
        .push((DURATION_HEADER, duration_us.to_string()));
    reply
        .headers
        .push((COLD_HEADER, inv.start.is_cold().to_string()));
    reply
        .headers
        .push((START_HEADER, inv.start.as_str().to_owned()));
    reply
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

fn config_from_query(query: &[(String, String)]) -> Result<FunctionConfig, Reject> {
    let mut config = FunctionConfig::default();
    for (key, value) in query {
        let int = || value.parse::<u64>().map_err(|_| bad_value(key, value));
        match key.as_str() {
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
        assert_eq!(route("GET", "/functions", None), Ok(Route::List));
        assert_eq!(route("GET", "/status", None), Ok(Route::Status));
        assert_eq!(
            route("DELETE", "/functions/f", None),
            Ok(Route::Remove { name: "f".into() })
        );
        assert_eq!(
            route(
                "PUT",
                "/functions/f",
                Some("Application/JSON; charset=utf-8")
            ),
            Ok(Route::Register {
                name: "f".into(),
                body: RegisterBody::Json
            })
        );
        assert_eq!(
            route("PUT", "/functions/f", None),
            Ok(Route::Register {
                name: "f".into(),
                body: RegisterBody::Json
            })
        );
        assert_eq!(
            route("POST", "/run/f", None),
            Ok(Route::Invoke {
                name: "f".into(),
                logs: false
            })
        );
        assert_eq!(
            route("POST", "/functions/f/invoke?logs=1", None),
            Ok(Route::Invoke {
                name: "f".into(),
                logs: true
            })
        );
        assert_eq!(
            route("POST", "/functions/f/invoke?logs=false", None),
            Ok(Route::Invoke {
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
            name: "f".into(),
            logs: true,
        }
        .into_dispatch(Vec::new())
        .unwrap();
        assert!(d.logs);
        assert!(
            matches!(d.request, Request::Invoke { ref name, ref event } if name == "f" && event == b"{}")
        );

        let body = br#"{"path":"/srv/f","handler":"m:h","memory_mb":64}"#.to_vec();
        let d = Route::Register {
            name: "f".into(),
            body: RegisterBody::Json,
        }
        .into_dispatch(body)
        .unwrap();
        match d.request {
            Request::RegisterFunction {
                name,
                source: FunctionSource::Dir(dir),
                config,
            } => {
                assert_eq!(name, "f");
                assert_eq!(dir, PathBuf::from("/srv/f"));
                assert_eq!(config.handler.as_deref(), Some("m:h"));
                assert_eq!(config.memory_mb, Some(64));
            }
            other => panic!("{other:?}"),
        }
        let bad = Route::Register {
            name: "f".into(),
            body: RegisterBody::Json,
        }
        .into_dispatch(b"{\"pth\":1}".to_vec());
        assert_eq!(bad.unwrap_err().status, 400);
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
