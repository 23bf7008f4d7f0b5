//! The agent's answers as HTTP responses: a [`Response`], or an [`Error`] with its
//! kind's status ([`ErrorKind::http_status`](crate::error::ErrorKind::http_status),
//! the one mapping), to a JSON response; and the HTTP layer's own refusals
//! ([`Reject`]) in the same error shape.

use std::collections::BTreeMap;

use ipc::api::{
    ActivationId, ErrorBody, ErrorDetail, Status, ACTIVATION_ID_HEADER, DEFAULT_NAMESPACE,
};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::wire::{self, Persist};
use crate::error::Error;
use crate::request::{Invocation, Response};

/// Every response is JSON, but `GET /metrics`'s (Prometheus' text format).
pub(super) const CONTENT_TYPE: &str = "application/json";

/// Header carrying an invocation's duration in microseconds.
pub const DURATION_HEADER: &str = "X-Sprout-Duration-Us";
/// Header saying whether an invocation needed a new sandbox (`true`/`false`).
pub const COLD_HEADER: &str = "X-Sprout-Cold";
/// Task steps a workflow run executed.
pub const TASKS_HEADER: &str = "X-Sprout-Tasks";
/// How the invocation's instance was found: `warm`, `thawed`, `stem_cell`, `new_sandbox`.
pub const START_HEADER: &str = "X-Sprout-Start";

/// The `WWW-Authenticate` of a 401: the TCP listener's keys, as basic auth.
pub(super) const CHALLENGE: &str = "Basic realm=\"sprout\"";

/// How a response is written, beyond what the agent answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Answer {
    /// For invocations: an [`ipc::api::InvocationRecord`] instead of the bare result.
    pub logs: bool,
    /// `GET /stats`: the status as OpenLambda's counters ([`stats`]).
    pub stats: bool,
    /// A namespace key's view of the status: only this namespace is listed.
    pub scope: Option<String>,
    /// An invocation's activation id, made by the router so that every answer, an
    /// error too, carries it in [`ipc::api::ACTIVATION_ID_HEADER`].
    pub activation: Option<ActivationId>,
    /// An OpenWhisk request (`/api/v1`): answered in OpenWhisk's shapes.
    pub openwhisk: Option<OwAnswer>,
    /// The response's head is written as soon as the request is handed over, before
    /// its answer (`POST /invoke`'s early acknowledgement): `200`, the body chunked.
    pub early: bool,
    /// `GET /ping`: the status only says the agent is up.
    pub ping: bool,
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
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Reject {
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

    /// A body the server will not take (413), though within the wire's limits: one
    /// of too many JSON values, say.
    pub fn payload_too_large(message: impl Into<String>) -> Reject {
        Reject::new(413, "payload_too_large", message)
    }

    pub fn internal(message: impl Into<String>) -> Reject {
        Reject::new(500, "internal", message)
    }

    pub fn reply(&self) -> Reply {
        let mut reply = self.error_reply();
        if self.status == 401 {
            reply
                .headers
                .push(("WWW-Authenticate", CHALLENGE.to_owned()));
        }
        reply
    }

    fn error_reply(&self) -> Reply {
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

impl From<wire::Error> for Reject {
    /// Refused by the wire layer: the connection is closed after the answer.
    fn from(e: wire::Error) -> Reject {
        Reject {
            close: true,
            ..Reject::new(e.status, e.kind, e.message)
        }
    }
}

/// A response before encoding. Every response is JSON.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json<T: Serialize>(status: u16, value: &T) -> Reply {
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
        let mut out = self.head(persist);
        out.extend_from_slice(&self.body);
        out
    }

    /// The status line and headers alone (the answer to a `HEAD`): `Content-Length`
    /// is still the body's.
    pub fn head(&self, persist: Persist) -> Vec<u8> {
        wire::encode_head(
            self.status,
            CONTENT_TYPE,
            self.body.len(),
            persist,
            &self.headers,
        )
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
    /// An HTTP app's own headers (checked by the agent): the response is the app's,
    /// so sprout writes no `Content-Type` of its own.
    pub app: Option<Vec<(String, String)>>,
}

impl From<Reply> for Output {
    fn from(reply: Reply) -> Output {
        Output {
            status: reply.status,
            headers: reply.headers,
            body: reply.body.into(),
            app: None,
        }
    }
}

impl Output {
    /// The status line and headers; the body follows them.
    pub fn head(&self, persist: Persist) -> Vec<u8> {
        match &self.app {
            None => wire::encode_head(
                self.status,
                CONTENT_TYPE,
                self.body.len(),
                persist,
                &self.headers,
            ),
            Some(app) => wire::encode_head_with(
                self.status,
                None,
                self.body.len(),
                persist,
                &self.headers,
                app,
            ),
        }
    }
}

/// The HTTP response for what the agent answered.
///
/// An invocation's result is not copied: it becomes the response's body as it is (a
/// shared result stays in its mapping), or, with `?logs=true`, is copied once into
/// the record.
pub(super) fn reply_for(result: Result<Response, Error>, answer: &Answer) -> Output {
    if let Some(ow) = &answer.openwhisk {
        return openwhisk_reply(result, ow);
    }
    let mut out = reply_without_id(result, answer);
    if let Some(id) = answer.activation {
        out.headers.push((ACTIVATION_ID_HEADER, id.to_string()));
    }
    out
}

fn reply_without_id(result: Result<Response, Error>, answer: &Answer) -> Output {
    let logs = answer.logs;
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
        Ok(Response::Status(_)) if answer.ping => {
            Reply::json(200, &serde_json::json!({"ok": true}))
        }
        Ok(Response::Acknowledged(ack)) => Reply::json(200, &ack),
        Ok(Response::Status(status)) if answer.stats => Reply::json(200, &stats(&status)),
        Ok(Response::Status(mut status)) => {
            if let Some(own) = &answer.scope {
                status.namespaces.retain(|n| &n.namespace == own);
            }
            Reply::json(200, &status)
        }
        Ok(Response::Usage(usage)) => Reply::json(200, &usage),
        // Prometheus' text format, not JSON.
        Ok(Response::Metrics(text)) => {
            return Output {
                status: 200,
                headers: Vec::new(),
                body: text.into_bytes().into(),
                app: Some(vec![(
                    "Content-Type".to_owned(),
                    crate::metrics::CONTENT_TYPE.to_owned(),
                )]),
            }
        }
        Ok(Response::Packages(list)) => Reply::json(200, &list),
        Ok(Response::WorkflowRegistered(info)) => Reply::json(200, &info),
        Ok(Response::Workflows(list)) => Reply::json(200, &list),
        Ok(Response::Accepted(activation_id)) => {
            Reply::json(202, &ipc::api::ActivationAccepted { activation_id })
        }
        Ok(Response::Activation(record)) => Reply::json(200, &record),
        Ok(Response::ActivationResult(result)) => Reply::json(200, &result),
        Ok(Response::ActivationLogs(logs)) => Reply::json(200, &logs),
        Ok(Response::Activations(list)) => Reply::json(200, &list),
        Ok(Response::Activated(activation)) => Reply::json(200, &activation),
        Ok(Response::Action(action)) => Reply::json(200, &action),
        Ok(Response::Actions(list)) => Reply::json(200, &list),
        Ok(Response::WhiskActivations(list)) => Reply::json(200, &list),
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
        // OpenLambda's answer, as its clients test it: its text, not sprout's JSON.
        Err(ref err @ Error::MethodNotAllowed { ref allowed, .. }) => {
            let text = err.openlambda_text().unwrap_or_default();
            return Output {
                status: 405,
                headers: Vec::new(),
                body: text.into_bytes().into(),
                app: Some(vec![
                    (
                        "Content-Type".to_owned(),
                        "text/plain; charset=utf-8".to_owned(),
                    ),
                    ("Allow".to_owned(), allowed.join(", ")),
                ]),
            };
        }
        Err(err) => Reply::json(
            err.kind().http_status(),
            &ErrorBody {
                error: err.detail(),
            },
        ),
    };
    reply.into()
}

/// How an OpenWhisk answer is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct OwAnswer {
    /// `?result=true`: a blocking invocation answers its result alone.
    pub result_only: bool,
    /// `GET /namespaces`: the status's namespaces, as names (with the key's own).
    pub namespaces: bool,
    /// The key's own namespace, for `GET /namespaces`.
    pub own: Option<String>,
    /// The `code` of an error: the request's transaction id.
    pub code: String,
}

// OpenWhisk's shapes (`/api/v1`, `http::openwhisk`).

/// OpenWhisk's error body.
pub(super) fn error_reply(status: u16, message: &str, code: &str) -> Reply {
    let message = match status {
        404 => "The requested resource does not exist.",
        401 => "The supplied authentication is invalid",
        _ => message,
    };
    Reply::json(status, &json!({"error": message, "code": code}))
}

/// An error reply of the HTTP layer (sprout's shape) in OpenWhisk's.
pub(super) fn openwhisk_error(reply: Reply) -> Reply {
    if reply.status < 400 {
        return reply;
    }
    let message = serde_json::from_slice::<ipc::api::ErrorBody>(&reply.body)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&reply.body).into_owned());
    let mut out = error_reply(
        reply.status,
        &message,
        &crate::activations::Activations::new_id().to_string(),
    );
    out.headers = reply.headers;
    out
}

/// The HTTP response for what the agent answered an OpenWhisk request.
fn openwhisk_reply(result: Result<Response, Error>, answer: &OwAnswer) -> Output {
    let reply = match result {
        Ok(Response::Action(a)) => Reply::json(200, &a),
        Ok(Response::Actions(list)) => Reply::json(200, &list),
        Ok(Response::WhiskActivations(list)) => Reply::json(200, &list),
        Ok(Response::Accepted(id)) => Reply::json(202, &json!({ "activationId": id })),
        Ok(Response::Activated(a)) => {
            // OpenWhisk's statuses for a blocking invocation that finished: an
            // application or developer error is 502, a system error 500.
            let status = match a.response.status_code {
                0 => 200,
                1 | 2 => 502,
                _ => 500,
            };
            if answer.result_only {
                let result = a
                    .response
                    .result
                    .as_ref()
                    .map(|r| r.get().as_bytes().to_vec())
                    .unwrap_or_else(|| b"{}".to_vec());
                Reply {
                    status,
                    headers: Vec::new(),
                    body: result,
                }
            } else {
                Reply::json(status, &a)
            }
        }
        Ok(Response::ActivationResult(r)) => {
            let size = r.result.get().len();
            Reply::json(
                200,
                &json!({
                    "result": r.result,
                    "size": size,
                    "status": crate::openwhisk::activation::status_text(r.status),
                    "success": r.success,
                }),
            )
        }
        Ok(Response::ActivationLogs(l)) => Reply::json(200, &json!({ "logs": l.logs })),
        Ok(Response::Status(status)) if answer.namespaces => {
            let mut names: Vec<String> = match &answer.own {
                Some(own) => vec![own.clone()],
                None => status.namespaces.into_iter().map(|n| n.namespace).collect(),
            };
            if names.is_empty() {
                names.push(DEFAULT_NAMESPACE.to_owned());
            }
            Reply::json(200, &names)
        }
        Ok(_) => error_reply(
            500,
            "the agent's answer does not fit this route",
            &answer.code,
        ),
        Err(e) => error_reply(e.kind().http_status(), &ipc::chain(&e), &answer.code),
    };
    reply.into()
}

/// The status as OpenLambda's worker answers `/stats`: one JSON object of counter
/// name to integer. Node-wide counts only: no namespace or function is named.
pub(super) fn stats(status: &Status) -> BTreeMap<String, u64> {
    let n = |v: usize| v as u64;
    let mut counters: BTreeMap<String, u64> = [
        ("functions", n(status.functions)),
        ("invocations", status.invocations),
        ("sandboxes", n(status.sandboxes)),
        ("sandboxes_forked", status.sandboxes_forked),
        ("sandboxes_created", status.sandboxes_created),
        ("stem_cells", n(status.stem_cells)),
        ("frozen", n(status.frozen)),
        ("queued", n(status.queued)),
        ("reserved_mb", status.reserved_mb),
        ("memory_budget_mb", status.memory_budget_mb),
        ("uptime_ms", status.uptime_ms),
        ("packages_installed", status.packages_installed),
        ("package_cache_hits", status.package_cache_hits),
        ("package_zygotes", n(status.package_zygotes)),
        ("namespaces", n(status.namespaces.len())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (runtime, count) in &status.stem_cells_by_runtime {
        counters.insert(format!("stem_cells.{runtime}"), n(*count));
    }
    counters
}

/// The reply when a handler panicked.
pub(super) fn panicked() -> Output {
    Reject::internal("the request handler panicked")
        .reply()
        .into()
}

fn invoked(inv: Invocation, logs: bool) -> Output {
    let duration_us = u64::try_from(inv.duration.as_micros()).unwrap_or(u64::MAX);
    let mut out: Output = if let Some(head) = inv.http {
        // An HTTP app's response, as it answered it (`?logs` is the app's query).
        Output {
            status: head.status,
            headers: Vec::new(),
            // These statuses have no body (RFC 9110 §15.3.5, §15.4.5).
            body: if matches!(head.status, 204 | 304) {
                ipc::Payload::default()
            } else {
                inv.result
            },
            app: Some(head.headers),
        }
    } else if logs {
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
            app: None,
        }
    };
    out.headers.push((DURATION_HEADER, duration_us.to_string()));
    out.headers
        .push((COLD_HEADER, inv.start.is_cold().to_string()));
    out.headers
        .push((START_HEADER, inv.start.as_str().to_owned()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn error_kinds_map_to_statuses() {
        assert_eq!(ErrorKind::BadRequest.http_status(), 400);
        assert_eq!(ErrorKind::NotFound.http_status(), 404);
        assert_eq!(ErrorKind::MethodNotAllowed.http_status(), 405);
        assert_eq!(ErrorKind::Function.http_status(), 502);
        assert_eq!(ErrorKind::Timeout.http_status(), 504);
        assert_eq!(ErrorKind::Internal.http_status(), 500);
        assert_eq!(ErrorKind::Unavailable.http_status(), 503);
        assert_eq!(ErrorKind::TooManyRequests.http_status(), 429);
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
