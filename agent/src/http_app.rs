//! OpenLambda's `/run` for the agent: what a request is for a plain function (its
//! event) and what an HTTP app may send back ([`check_head`]). An instance is
//! hostile: its status and headers are checked before any of them reaches a client,
//! so it can neither split the response nor take over its framing.

use ipc::proto::HttpHead;

use crate::error::Error;

/// Most headers an HTTP app's response may carry.
pub const MAX_HEADERS: usize = 100;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME: usize = 256;
/// Longest header value, in bytes.
pub const MAX_HEADER_VALUE: usize = 8 << 10;
/// Most bytes of all header names and values together.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// Headers the agent writes itself and drops from an app's response: the message's
/// framing is the agent's (it sends the body it has, with its length), and
/// `X-Sprout-*` are sprout's own.
const AGENT_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
];

/// The event a plain function gets from a `/run` body: the body, or `{}` when empty.
pub fn event_of(body: &[u8]) -> Result<Vec<u8>, Error> {
    if body.is_empty() {
        return Ok(b"{}".to_vec());
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(Error::InvalidEvent)?;
    Ok(body.to_vec())
}

/// Checks an HTTP app's status and headers for `function` and keeps the headers a
/// client gets: a status of 200 to 599; at most [`MAX_HEADERS`] headers whose names
/// are HTTP tokens of at most [`MAX_HEADER_NAME`] bytes and whose values have no
/// control characters but tab (so no CR or LF) and at most [`MAX_HEADER_VALUE`]
/// bytes, [`MAX_HEADER_BYTES`] in all. Framing headers and `X-Sprout-*` are dropped.
pub fn check_head(function: &str, head: HttpHead) -> Result<HttpHead, Error> {
    let bad = |why: String| Error::BadHttpResponse {
        function: function.to_owned(),
        why,
    };
    if !(200..=599).contains(&head.status) {
        return Err(bad(format!(
            "status {} is not one of 200 to 599",
            head.status
        )));
    }
    if head.headers.len() > MAX_HEADERS {
        return Err(bad(format!(
            "{} headers, more than {MAX_HEADERS}",
            head.headers.len()
        )));
    }
    let total: usize = head.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    if total > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "headers of {total} bytes, more than {MAX_HEADER_BYTES}"
        )));
    }
    let mut kept = Vec::with_capacity(head.headers.len());
    for (name, value) in head.headers {
        let token = !name.is_empty()
            && name.len() <= MAX_HEADER_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            let shown: String = name.chars().take(64).collect();
            return Err(bad(format!("header name {shown:?} is not an HTTP token")));
        }
        if value.len() > MAX_HEADER_VALUE {
            return Err(bad(format!(
                "header {name} has a value of {} bytes, more than {MAX_HEADER_VALUE}",
                value.len()
            )));
        }
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(bad(format!(
                "header {name}'s value has a control character (CR, LF, NUL, ...)"
            )));
        }
        let lower = name.to_ascii_lowercase();
        if AGENT_HEADERS.contains(&lower.as_str()) || lower.starts_with("x-sprout-") {
            continue;
        }
        kept.push((name, value));
    }
    Ok(HttpHead {
        status: head.status,
        headers: kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, headers: &[(&str, &str)]) -> HttpHead {
        HttpHead {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn why(h: HttpHead) -> String {
        check_head("f", h).unwrap_err().to_string()
    }

    #[test]
    fn an_apps_head_is_kept_as_it_is_but_framing_and_sprouts_own() {
        let h = check_head(
            "f",
            head(
                418,
                &[
                    ("A", "B"),
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", "999"),
                    ("transfer-encoding", "chunked"),
                    ("Connection", "close"),
                    ("X-Sprout-Start", "warm"),
                    ("Set-Cookie", "a=1"),
                    ("Set-Cookie", "b=2"),
                ],
            ),
        )
        .unwrap();
        assert_eq!(h.status, 418);
        let names: Vec<_> = h.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["A", "Content-Type", "Set-Cookie", "Set-Cookie"]);
    }

    #[test]
    fn what_could_break_the_response_is_refused() {
        assert!(why(head(99, &[])).contains("status 99"));
        assert!(why(head(101, &[])).contains("status 101"));
        assert!(why(head(600, &[])).contains("status 600"));
        assert!(why(head(200, &[("A\r\nB", "x")])).contains("not an HTTP token"));
        assert!(why(head(200, &[("A:", "x")])).contains("not an HTTP token"));
        assert!(why(head(200, &[("", "x")])).contains("not an HTTP token"));
        assert!(why(head(200, &[("A", "x\r\nSet-Cookie: y")])).contains("control character"));
        assert!(why(head(200, &[("A", "x\ny")])).contains("control character"));
        assert!(why(head(200, &[("A", "x\0")])).contains("control character"));
        assert!(check_head("f", head(200, &[("A", "tab\there")])).is_ok());
        let long = "v".repeat(MAX_HEADER_VALUE + 1);
        assert!(why(head(200, &[("A", &long)])).contains("bytes"));
        let name = "n".repeat(MAX_HEADER_NAME + 1);
        assert!(why(head(200, &[(&name, "x")])).contains("not an HTTP token"));
        let many: Vec<(&str, &str)> = (0..=MAX_HEADERS).map(|_| ("A", "b")).collect();
        assert!(why(head(200, &many)).contains("headers"));
        let big = "v".repeat(MAX_HEADER_VALUE);
        let lots: Vec<(&str, &str)> = (0..9).map(|_| ("A", big.as_str())).collect();
        assert!(why(head(200, &lots)).contains("bytes"));
        assert!(why(head(200, &[("A", "\u{7f}")])).contains("control character"));
    }

    #[test]
    fn a_plain_functions_event() {
        assert_eq!(event_of(b"").unwrap(), b"{}");
        assert_eq!(event_of(b"[1]").unwrap(), b"[1]");
        assert_eq!(event_of(b"nope").unwrap_err().name(), "invalid_event");
    }
}
