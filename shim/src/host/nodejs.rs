//! The Node.js backend: a `node` process running the runtime's `instance.js`, booted
//! ahead of its `load` (the spare a stem cell holds), driven over a socket pair on its
//! descriptor 3 without descriptors (Node cannot take them).
//!
//! **The link.** Frames as `ipc::frame` lays them out (a 12-byte prefix `u32
//! header_len | u32 payload_len | u32 fd_count`, little-endian; a JSON header with
//! an `op`; the payload bytes), but every payload inline and `fd_count` always 0.
//! Limits, checked on both sides: header ≤ 128 KiB, payload ≤ 1 GiB. A shared event
//! is copied onto the link and a large result copied into a memfd for the agent: the
//! one copy each way Node's lack of `recvmsg` costs. `docs/protocol.md` lists the ops.
//!
//! **Calls.** `node` asks its host (`call {id, function, raw?, async?}`); a thread per
//! call in flight makes it through [`Calls`] and answers node by the same id, so
//! several may be in flight (`Promise.all`), at most [`MAX_CALLS_IN_FLIGHT`].

use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipc::frame::{MAX_HEADER, PREFIX_LEN};
use ipc::payload::MAX_SHARED_PAYLOAD;
use ipc::proto::{CallReply, FunctionError, LoadSpec};
use ipc::{Channel, Payload};
use serde::{Deserialize, Serialize};

use super::backend::{function_error, Backend, Error, Invocation, Outcome};
use super::calls::Calls;
use crate::sys;
use shim::runtime::nodejs;

/// Calls one instance may have in flight: the agent's default per-sandbox limit.
pub const MAX_CALLS_IN_FLIGHT: usize = 64;

/// Host → node.
#[derive(Serialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ToNode<'a> {
    Load(&'a LoadSpec),
    /// The payload is the event (JSON text, or bytes with `raw`).
    Invoke {
        activation_id: String,
        depth: u32,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        raw: bool,
        /// The invocation's time left when it was sent.
        remaining_ms: u64,
        /// An OpenWhisk activation's variables; their presence selects OpenWhisk's
        /// result rules in `instance.js`.
        #[serde(skip_serializing_if = "Option::is_none")]
        env: Option<&'a std::collections::BTreeMap<String, String>>,
    },
}

/// Node → host.
#[derive(Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
enum FromNode {
    Ready,
    Loaded,
    LoadFailed {
        error: FunctionError,
    },
    /// The payload is the result (JSON text, or bytes with `raw`).
    Returned {
        #[serde(default)]
        raw: bool,
    },
    Raised {
        error: FunctionError,
    },
    /// The payload is the event.
    Call {
        id: u64,
        function: String,
        #[serde(default)]
        raw: bool,
        /// Through the agent, in a sibling sandbox (`callAsync`, `map`).
        #[serde(default, rename = "async")]
        in_sibling: bool,
    },
}

/// A booted `node` running the runtime's instance script.
#[derive(Debug)]
pub struct Node {
    from_node: BufReader<UnixStream>,
    to_node: Arc<Mutex<UnixStream>>,
    calls: Arc<Calls>,
    in_flight: Arc<AtomicUsize>,
    /// The host is in a `load` or an invocation: a node that exits now is reported
    /// by them; otherwise its watcher ends the host at once.
    busy: Arc<AtomicBool>,
    pid: i32,
}

impl Node {
    /// Starts `node` and waits until it is ready for its `load`.
    pub fn boot(calls: Channel) -> Result<Node, Error> {
        Node::boot_script(calls, &nodejs::entry_path())
    }

    /// Starts `node` on the runtime's entry script at `entry`.
    fn boot_script(calls: Channel, entry: &str) -> Result<Node, Error> {
        let sys_err = |what| move |source| Error::Sys { what, source };
        let (ours, theirs) = UnixStream::pair().map_err(sys_err("socket pair"))?;
        let mut cmd = Command::new(nodejs::INTERPRETER);
        cmd.arg(entry)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/tmp")
            .env("LANG", "C.UTF-8")
            .envs(std::env::vars().filter(|(k, _)| k.starts_with("SPROUT_")))
            .current_dir("/")
            .stdin(Stdio::null());
        sys::with_fds_and_clean_mask(&mut cmd, &[theirs.as_fd()]);
        sys::die_with_parent_on_exec(&mut cmd);
        let child = cmd.spawn().map_err(sys_err("start /usr/bin/node"))?;
        drop(theirs);
        let pid = child.id() as i32;
        let busy = Arc::new(AtomicBool::new(true));
        watch(child, busy.clone());
        let to_node = ours.try_clone().map_err(sys_err("dup the node link"))?;
        let mut node = Node {
            from_node: BufReader::with_capacity(64 << 10, ours),
            to_node: Arc::new(Mutex::new(to_node)),
            calls: Arc::new(Calls::new(calls).map_err(sys_err("dup the calls channel"))?),
            in_flight: Arc::new(AtomicUsize::new(0)),
            busy,
            pid,
        };
        match node.read()? {
            (FromNode::Ready, _) => {}
            (other, _) => return Err(unexpected(&other, "ready")),
        }
        node.busy.store(false, Ordering::SeqCst);
        Ok(node)
    }

    fn read(&mut self) -> Result<(FromNode, Vec<u8>), Error> {
        read_frame(&mut self.from_node).map_err(Error::Runtime)
    }

    fn send(&self, header: &ToNode<'_>, payload: &[u8]) -> Result<(), Error> {
        let header = serde_json::to_vec(header).expect("a header serialises");
        write_frame(&self.to_node, &header, payload)
            .map_err(|e| Error::Runtime(format!("node is gone: {e}")))
    }

    /// Makes node's call `id` on a thread of its own; the answer goes to node.
    fn start_call(
        &self,
        id: u64,
        function: String,
        depth: u32,
        raw: bool,
        sibling: bool,
        event: Vec<u8>,
    ) {
        let to_node = self.to_node.clone();
        let answer_failed = |message: String| {
            let reply = CallReply::CallFailed {
                id,
                function: function.clone(),
                message,
            };
            let _ = send_reply(&to_node, &reply, &[]);
        };
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_CALLS_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return answer_failed(format!(
                "too many calls in flight (the limit is {MAX_CALLS_IN_FLIGHT})"
            ));
        }
        let (calls, in_flight) = (self.calls.clone(), self.in_flight.clone());
        let to = to_node.clone();
        let name = function.clone();
        let spawned = std::thread::Builder::new()
            .name("call".into())
            .spawn(move || {
                let answer = calls.call(&name, depth, raw, &event, !sibling);
                drop(event);
                let _ = match answer {
                    Ok((reply, payload)) => send_reply(&to, &with_id(reply, id), &payload),
                    Err(message) => send_reply(
                        &to,
                        &CallReply::CallFailed {
                            id,
                            function: name,
                            message,
                        },
                        &[],
                    ),
                };
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            answer_failed(format!("cannot start the call: {e}"));
        }
    }
}

impl Backend for Node {
    fn load(&mut self, spec: &LoadSpec) -> Result<(), FunctionError> {
        self.busy.store(true, Ordering::SeqCst);
        let gone = |e: Error| function_error("RuntimeExited", format!("node during load: {e}"));
        self.send(&ToNode::Load(spec), &[]).map_err(gone)?;
        let answer = match self.read().map_err(gone)? {
            (FromNode::Loaded, _) => Ok(()),
            (FromNode::LoadFailed { error }, _) => Err(error),
            (other, _) => Err(gone(unexpected(&other, "loaded or load_failed"))),
        };
        self.busy.store(false, Ordering::SeqCst);
        answer
    }

    fn invoke(&mut self, invocation: Invocation) -> Result<(Outcome, bool), Error> {
        self.busy.store(true, Ordering::SeqCst);
        self.calls.next_invocation();
        let remaining = invocation
            .deadline
            .saturating_duration_since(Instant::now());
        let header = ToNode::Invoke {
            activation_id: invocation.activation_id(),
            depth: invocation.depth,
            raw: invocation.raw,
            remaining_ms: remaining.as_millis() as u64,
            env: invocation.env.as_ref(),
        };
        self.send(&header, &invocation.event)?;
        drop(invocation.event);
        let mut called = false;
        let outcome = loop {
            match self.read()? {
                (FromNode::Returned { raw }, result) => {
                    break Outcome::Returned {
                        result: Payload::Inline(result),
                        raw,
                    }
                }
                (FromNode::Raised { error }, _) => break Outcome::Raised(error),
                (
                    FromNode::Call {
                        id,
                        function,
                        raw,
                        in_sibling,
                    },
                    event,
                ) => {
                    called = true;
                    let depth = invocation.depth.saturating_add(1);
                    self.start_call(id, function, depth, raw, in_sibling, event);
                }
                (other, _) => return Err(unexpected(&other, "returned, raised or call")),
            }
        };
        self.busy.store(false, Ordering::SeqCst);
        Ok((outcome, called))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Ending node on purpose is not node exiting on its own.
        self.busy.store(true, Ordering::SeqCst);
        sys::kill(self.pid);
    }
}

/// Reaps node; when it exits while the host is idle, the host exits too (the agent
/// sees the instance's channel close).
fn watch(mut child: Child, busy: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let status = child.wait();
        if !busy.load(Ordering::SeqCst) {
            let _ = writeln!(io::stderr(), "sprout-shim host: node exited ({status:?})");
            std::process::exit(1);
        }
    });
}

fn unexpected(got: &FromNode, expected: &str) -> Error {
    Error::Runtime(format!("node sent {got:?} where {expected} was expected"))
}

/// `reply` with node's call id in place of the host's.
fn with_id(reply: CallReply, node_id: u64) -> CallReply {
    match reply {
        CallReply::Resolved { spec, .. } => CallReply::Resolved { id: node_id, spec },
        CallReply::CallReturned { raw, .. } => CallReply::CallReturned { id: node_id, raw },
        CallReply::Bound { callee, .. } => CallReply::Bound {
            id: node_id,
            callee,
        },
        CallReply::CallRaised {
            function, error, ..
        } => CallReply::CallRaised {
            id: node_id,
            function,
            error,
        },
        CallReply::CallFailed {
            function, message, ..
        } => CallReply::CallFailed {
            id: node_id,
            function,
            message,
        },
        CallReply::CallRefused {
            function,
            kind,
            message,
            ..
        } => CallReply::CallRefused {
            id: node_id,
            function,
            kind,
            message,
        },
    }
}

fn send_reply(to_node: &Mutex<UnixStream>, reply: &CallReply, payload: &[u8]) -> io::Result<()> {
    let header = serde_json::to_vec(reply).expect("a reply serialises");
    write_frame(to_node, &header, payload)
}

/// Writes one frame: one `write` for a small one, two for a large payload.
fn write_frame(to_node: &Mutex<UnixStream>, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let prefix = prefix(header.len(), payload.len());
    let mut stream = to_node.lock().unwrap();
    if payload.len() <= 64 << 10 {
        let mut frame = Vec::with_capacity(PREFIX_LEN + header.len() + payload.len());
        frame.extend_from_slice(&prefix);
        frame.extend_from_slice(header);
        frame.extend_from_slice(payload);
        return stream.write_all(&frame);
    }
    let mut head = Vec::with_capacity(PREFIX_LEN + header.len());
    head.extend_from_slice(&prefix);
    head.extend_from_slice(header);
    stream.write_all(&head)?;
    stream.write_all(payload)
}

fn prefix(header_len: usize, payload_len: usize) -> [u8; PREFIX_LEN] {
    let mut prefix = [0u8; PREFIX_LEN];
    prefix[..4].copy_from_slice(&(header_len as u32).to_le_bytes());
    prefix[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
    prefix
}

/// Reads one frame from node, checking it against the link's limits.
fn read_frame<H: serde::de::DeserializeOwned>(
    from: &mut impl Read,
) -> Result<(H, Vec<u8>), String> {
    let gone = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            "node exited".to_owned()
        } else {
            format!("reading from node: {e}")
        }
    };
    let mut prefix = [0u8; PREFIX_LEN];
    from.read_exact(&mut prefix).map_err(gone)?;
    let word = |i: usize| u32::from_le_bytes(prefix[i..i + 4].try_into().unwrap()) as usize;
    let (header_len, payload_len, fds) = (word(0), word(4), word(8));
    if fds != 0 {
        return Err(format!(
            "node sent a frame with {fds} descriptors (must be 0)"
        ));
    }
    if header_len > MAX_HEADER {
        return Err(format!(
            "node sent a header of {header_len} bytes (the limit is {MAX_HEADER})"
        ));
    }
    if payload_len > MAX_SHARED_PAYLOAD {
        return Err(format!(
            "node sent a payload of {payload_len} bytes (the limit is {MAX_SHARED_PAYLOAD})"
        ));
    }
    let mut header = vec![0u8; header_len];
    from.read_exact(&mut header).map_err(gone)?;
    let header = serde_json::from_slice(&header).map_err(|e| {
        let shown = String::from_utf8_lossy(&header[..header.len().min(200)]).into_owned();
        format!("node sent a header that is not one of its ops ({e}): {shown}")
    })?;
    let mut payload = vec![0u8; payload_len];
    from.read_exact(&mut payload).map_err(gone)?;
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_beyond_the_limits_are_refused_by_name() {
        let mut frame = prefix(10, 0).to_vec();
        frame[8] = 1;
        let err = read_frame::<FromNode>(&mut &frame[..]).unwrap_err();
        assert!(err.contains("1 descriptors"), "{err}");
        let frame = prefix(MAX_HEADER + 1, 0);
        let err = read_frame::<FromNode>(&mut &frame[..]).unwrap_err();
        assert!(err.contains("header of"), "{err}");
        let frame = prefix(2, MAX_SHARED_PAYLOAD + 1);
        let err = read_frame::<FromNode>(&mut &frame[..]).unwrap_err();
        assert!(err.contains("payload of"), "{err}");
        let mut frame = prefix(13, 0).to_vec();
        frame.extend_from_slice(br#"{"op":"what"}"#);
        let err = read_frame::<FromNode>(&mut &frame[..]).unwrap_err();
        assert!(err.contains("not one of its ops"), "{err}");
    }

    use std::time::Duration;

    use ipc::proto::{About, Handler};

    /// A booted node on the runtime installed in a scratch directory, loaded with
    /// `code` as `index.js`, and the shim's end of its calls channel.
    fn loaded(code: &str, function: &str) -> (Node, Result<(), FunctionError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        nodejs::install(dir.path()).unwrap();
        let code_dir = dir.path().join("code");
        std::fs::create_dir(&code_dir).unwrap();
        std::fs::write(code_dir.join("index.js"), code).unwrap();
        let (calls, _shim) = Channel::pair().unwrap();
        let entry = dir.path().join("nodejs").join(nodejs::ENTRY);
        let mut node = Node::boot_script(calls, entry.to_str().unwrap()).unwrap();
        let spec = LoadSpec {
            env: Default::default(),
            function: "unit".into(),
            code_dir: code_dir.display().to_string(),
            handler: Handler {
                module: String::new(),
                function: function.into(),
            },
            deps: Vec::new(),
            about: About {
                namespace: "ns".into(),
                version: 7,
                memory_mb: 128,
                timeout_ms: 1000,
            },
        };
        let load = node.load(&spec);
        (node, load, dir)
    }

    fn invoke(node: &mut Node, event: &[u8], raw: bool) -> (Outcome, bool) {
        node.invoke(Invocation {
            id: 0xabc,
            depth: 0,
            raw,
            event: Payload::Inline(event.to_vec()),
            deadline: Instant::now() + Duration::from_secs(5),
            env: None,
        })
        .unwrap()
    }

    #[test]
    fn node_runs_a_handler_with_its_context_and_raw_bytes() {
        let code = r#"exports.handler = async (e, c) => Buffer.isBuffer(e)
  ? Buffer.concat([e, Buffer.from('!')])
  : {e, id: c.awsRequestId, v: c.functionVersion, left: c.getRemainingTimeInMillis() > 4000};
"#;
        let (mut node, load, _dir) = loaded(code, "handler");
        load.unwrap();
        match invoke(&mut node, br#"{"a":1}"#, false) {
            (Outcome::Returned { result, raw: false }, false) => {
                let v: serde_json::Value = serde_json::from_slice(&result).unwrap();
                assert_eq!(
                    v,
                    serde_json::json!({"e": {"a": 1}, "id": format!("{:032x}", 0xabc), "v": "7", "left": true})
                );
            }
            other => panic!("{other:?}"),
        }
        let big = vec![b'z'; 200 << 10];
        match invoke(&mut node, &big, true) {
            (Outcome::Returned { result, raw: true }, _) => {
                assert_eq!(result.len(), big.len() + 1);
                assert_eq!(result.last(), Some(&b'!'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_call_rejects_with_a_call_error() {
        // Outside a sandbox there is no agent socket: the call fails, by name.
        let code = r#"const sprout = require('sprout');
exports.main = async () => {
  try { await sprout.call('other', {}); return 'no'; }
  catch (e) { return [e.name, e.function, e.type, e.failed, e.message]; }
};
"#;
        let (mut node, load, _dir) = loaded(code, "");
        load.unwrap();
        match invoke(&mut node, b"{}", false) {
            (Outcome::Returned { result, .. }, true) => {
                let v: serde_json::Value = serde_json::from_slice(&result).unwrap();
                assert_eq!(v[0], "CallError", "{v}");
                assert_eq!(v[1], "other", "{v}");
                assert_eq!(v[2], "CallFailed", "{v}");
                assert_eq!(v[3], true, "{v}");
                assert!(v[4].as_str().unwrap().contains("agent"), "{v}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn load_errors_name_what_is_missing() {
        let (_node, load, _dir) = loaded("exports.other = 1;\n", "");
        let e = load.unwrap_err();
        assert_eq!(e.kind, "HandlerNotFound", "{e:?}");
        let (_node, load, _dir) = loaded("exports.main = () => 1;\n", "niam.xyz");
        let e = load.unwrap_err();
        assert!(e.message.contains("no function niam.xyz"), "{e:?}");
    }

    #[test]
    fn a_frame_round_trips() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let a = Mutex::new(a);
        write_frame(&a, br#"{"op":"returned","raw":true}"#, b"abc").unwrap();
        let (h, p) = read_frame::<FromNode>(&mut b).unwrap();
        assert!(matches!(h, FromNode::Returned { raw: true }));
        assert_eq!(p, b"abc");
    }
}
