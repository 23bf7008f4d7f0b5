//! The agent's call socket: how a function calls a function it cannot run in its own
//! sandbox, and how it learns whether it can.
//!
//! The socket is `agent.sock` in the runtime directory, which every sandbox sees
//! read-only at `/.sprout`; an instance connects once, on its first call. The agent
//! tells which sandbox a connection comes from by its peer's cgroup, so a function
//! cannot speak for another sandbox. A connection is served by a thread of its own,
//! and each call in flight by another (they wait for instances like any request).
//! The calls a connection made live as long as their run: when the invocation that
//! started the run ends or its sandbox is destroyed, the run's cancel fires and every
//! call still in flight ends (its sibling is destroyed). Closing the connection (or
//! sending a bad frame) cancels the calls not yet started and drops every answer
//! still to come. A caller that leaves an answer unread for [`REPLY_TIMEOUT`] loses
//! its connection, so it cannot hold a sibling longer.

use std::collections::BTreeMap;
use std::io;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use ipc::proto::{check_depth, CallReply, CallRequest};
use ipc::{Channel, Payload};

use crate::agent::{lock, CallOpts, Inner};
use crate::error::Error;
use crate::run::{Cancel, Run};

/// How long an answer may wait for its caller to read it.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The call socket's file name in the runtime directory.
pub const SOCKET_NAME: &str = "agent.sock";

/// Binds the call socket in `runtime_dir`.
pub fn bind(runtime_dir: &Path) -> Result<UnixListener, Error> {
    let path = runtime_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path).map_err(|source| Error::State { path, source })
}

/// Accepts connections until [`stop`] (after the agent began shutting down).
pub fn serve(inner: &Arc<Inner>, listener: UnixListener) {
    for stream in listener.incoming() {
        if inner.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "call socket: accept");
                continue;
            }
        };
        let inner = inner.clone();
        let spawned = std::thread::Builder::new()
            .name("sprout-caller".into())
            .spawn(move || serve_connection(&inner, stream));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "call socket: no thread for a connection");
        }
    }
}

/// Wakes [`serve`] so it sees the shutdown flag.
pub fn stop(socket: &Path) {
    let _ = UnixStream::connect(socket);
}

fn serve_connection(inner: &Arc<Inner>, stream: UnixStream) {
    let sandbox = match caller_sandbox(inner, &stream) {
        Ok(id) => id,
        Err(e) => {
            if !inner.shutting_down.load(Ordering::SeqCst) {
                tracing::warn!(error = %e, "call socket: refused a connection");
            }
            return;
        }
    };
    let span = tracing::debug_span!("caller", sandbox_id = %sandbox);
    let _g = span.enter();
    // A caller that stops reading (its invocation ended, its sandbox is frozen) must
    // not hold an answering thread, and the sibling it holds, for ever: see `Replies`.
    let (writer, watched) = match stream.try_clone().and_then(|w| {
        w.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok((w, stream.try_clone()?))
    }) {
        Ok((w, watched)) => (
            Arc::new(Replies::new(Channel::new(w), REPLY_TIMEOUT)),
            watched,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "call socket: dup connection");
            return;
        }
    };
    std::thread::scope(|scope| {
        let watchdog = std::thread::Builder::new()
            .name("sprout-replies".into())
            .spawn_scoped(scope, || writer.watch(&watched));
        if let Err(e) = watchdog {
            tracing::warn!(error = %e, "call socket: no thread to watch the answers");
            return;
        }
        serve_requests(inner, &sandbox, stream, &writer);
        // No more requests (the caller closed its side, or sent a bad frame): no more
        // answers either, so none can be held by a caller that reads them slowly once
        // the watchdog stops.
        let _ = watched.shutdown(Shutdown::Both);
        writer.stop_watching();
    });
}

/// Serves the requests of one connection until it closes; then cancels its calls.
fn serve_requests(inner: &Arc<Inner>, sandbox: &str, stream: UnixStream, writer: &Arc<Replies>) {
    let cancel = match Cancel::new() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "call socket: cancel pipe");
            return;
        }
    };
    let mut reader = Channel::new(stream);
    loop {
        let msg = match reader.recv::<CallRequest>() {
            Ok(msg) => msg,
            Err(ipc::Error::Closed) => break,
            Err(e) => {
                tracing::warn!(error = %ipc::chain(&e), "call socket: bad request; closing the connection");
                break;
            }
        };
        match msg.header {
            CallRequest::Resolve { id, function } => {
                let reply = resolve(inner, sandbox, id, &function);
                writer.send(&reply, &Payload::default());
            }
            CallRequest::Call {
                id,
                function,
                depth,
                raw,
                spec: None,
            } => {
                let (inner, sandbox, writer, cancel) = (
                    inner.clone(),
                    sandbox.to_owned(),
                    writer.clone(),
                    cancel.clone(),
                );
                let event = msg.payload;
                let spawned = std::thread::Builder::new()
                    .name("sprout-call".into())
                    .spawn(move || {
                        let call = Call {
                            sandbox: &sandbox,
                            id,
                            function: &function,
                            depth,
                            raw,
                        };
                        call.run(&inner, &event, &cancel, |reply, result| {
                            writer.send(reply, result)
                        });
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "call socket: no thread for a call");
                }
            }
            CallRequest::Call { id, function, .. } => {
                let reply = CallReply::CallFailed {
                    id,
                    function,
                    message: "a call with a spec runs in the sandbox: send it to the shim".into(),
                };
                writer.send(&reply, &Payload::default());
            }
        }
    }
    // The caller is gone: whatever it still waits for is of no use.
    cancel.fire();
}

/// The writing half of a connection, shared by the threads that answer its calls.
///
/// A caller that does not read its answers must not hold them, and the siblings that
/// wait to go back to the pool once their answer is out, for long: an answer not
/// written within [`REPLY_TIMEOUT`] of being ready (the socket is full, or a slow reader
/// keeps it so; answers waiting for their turn count too) closes the connection, which
/// fails that write and every later one at once. The write timeout on the socket
/// bounds each write once the connection's watchdog has stopped.
struct Replies {
    channel: Mutex<Channel>,
    /// [`REPLY_TIMEOUT`], but for tests.
    timeout: std::time::Duration,
    watch: Mutex<Watch>,
    wake: Condvar,
}

#[derive(Default)]
struct Watch {
    /// When each answer being written, or waiting to be, must be out, by ticket (so
    /// the first is the earliest).
    due: BTreeMap<u64, Instant>,
    next_ticket: u64,
    stopped: bool,
}

impl Replies {
    fn new(channel: Channel, timeout: std::time::Duration) -> Replies {
        Replies {
            channel: Mutex::new(channel),
            timeout,
            watch: Mutex::new(Watch::default()),
            wake: Condvar::new(),
        }
    }

    fn send(&self, reply: &CallReply, payload: &Payload) {
        let ticket = {
            let mut w = lock(&self.watch);
            let ticket = w.next_ticket;
            w.next_ticket += 1;
            w.due.insert(ticket, Instant::now() + self.timeout);
            ticket
        };
        self.wake.notify_all();
        let channel = lock(&self.channel);
        let sent = channel.send_payload(reply, payload, &[]);
        lock(&self.watch).due.remove(&ticket);
        self.wake.notify_all();
        if let Err(e) = sent {
            tracing::debug!(error = %ipc::chain(&e), "call socket: caller went away before its answer");
            // The stream may end mid-frame: nothing more can go on it.
            let _ = channel.stream().shutdown(Shutdown::Both);
        }
    }

    /// Until [`Replies::stop_watching`]: shuts `stream` (this connection) down when an
    /// answer is not out by its due time.
    fn watch(&self, stream: &UnixStream) {
        let mut w = lock(&self.watch);
        loop {
            if w.stopped {
                return;
            }
            let Some(&due) = w.due.values().next() else {
                w = self.wake.wait(w).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let now = Instant::now();
            if now >= due {
                tracing::warn!(
                    timeout_ms = self.timeout.as_millis() as u64,
                    "call socket: the caller does not read its answers; closing the connection"
                );
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            w = self
                .wake
                .wait_timeout(w, due - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn stop_watching(&self) {
        lock(&self.watch).stopped = true;
        self.wake.notify_all();
    }
}

/// Whether `function` can run in `sandbox` (its code is attached there if so).
fn resolve(inner: &Inner, sandbox: &str, id: u64, function: &str) -> CallReply {
    let outcome = inner
        .function(function)
        .and_then(|callee| inner.attach_callee(sandbox, &callee));
    match outcome {
        Ok(spec) => CallReply::Resolved { id, spec },
        Err(e) => CallReply::CallFailed {
            id,
            function: function.to_owned(),
            message: ipc::chain(&e),
        },
    }
}

/// A call from a function in `sandbox` to run in a sibling sandbox.
struct Call<'a> {
    sandbox: &'a str,
    id: u64,
    function: &'a str,
    depth: u32,
    raw: bool,
}

impl Call<'_> {
    /// Runs it in a sibling that joins the caller's workflow run, and gives the answer
    /// to `answer` before the sibling leaves the run (its scratch is detached: a
    /// spawner round trip the caller need not wait for) and goes back to the pool.
    fn run(
        &self,
        inner: &Inner,
        event: &Payload,
        cancel: &Cancel,
        answer: impl FnOnce(&CallReply, &Payload),
    ) {
        if let Err(message) = check_depth(self.function, self.depth) {
            return answer(&self.failed(message), &Payload::default());
        }
        let run = match run_of(inner, self.sandbox) {
            Ok(run) => run,
            Err(e) => {
                return answer(
                    &self.failed(format!("start a workflow run: {e}")),
                    &Payload::default(),
                )
            }
        };
        let held = Mutex::new(None);
        // The run's cancel fires when the invocation that started it ends (or its
        // workflow fails); the connection's when the calling process goes away.
        let cancel = if cancel.fired() { cancel } else { &run.cancel };
        let opts = CallOpts {
            depth: self.depth,
            raw: self.raw,
            run: Some(&run),
            cancel: Some(cancel),
            deadline: None,
            hand_back: Some(&held),
        };
        match inner.invoke_with(self.function, event, &opts) {
            Ok(inv) => answer(
                &CallReply::CallReturned {
                    id: self.id,
                    raw: inv.raw,
                },
                &Payload::Inline(inv.result),
            ),
            Err(Error::Handler {
                function, error, ..
            }) => answer(
                &CallReply::CallRaised {
                    id: self.id,
                    function,
                    error,
                },
                &Payload::default(),
            ),
            Err(e) => answer(&self.failed(ipc::chain(&e)), &Payload::default()),
        }
        let done_with = lock(&held).take();
        if let Some((inst, healthy)) = done_with {
            inner.release_returning(inst, &run, healthy);
        }
    }

    fn failed(&self, message: String) -> CallReply {
        CallReply::CallFailed {
            id: self.id,
            function: self.function.to_owned(),
            message,
        }
    }
}

/// The run `sandbox` takes part in; a new one rooted there if none.
fn run_of(inner: &Inner, sandbox: &str) -> io::Result<Arc<Run>> {
    let mut runs = lock(&inner.runs);
    if let Some(run) = runs.get(sandbox) {
        return Ok(run.clone());
    }
    let run = Arc::new(Run::rooted_in(inner.next_id(), sandbox)?);
    runs.insert(sandbox.to_owned(), run.clone());
    Ok(run)
}

/// The bound sandbox the peer of `stream` runs in, from its cgroup.
fn caller_sandbox(inner: &Inner, stream: &UnixStream) -> Result<String, String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let pid = getsockopt(stream, PeerCredentials)
        .map_err(|e| format!("peer credentials: {e}"))?
        .pid();
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    let id = sandbox_in_cgroups(&text, &inner.cgroup_parent)
        .ok_or_else(|| format!("process {pid} is not in a sandbox of this agent"))?;
    if !lock(&inner.bound).contains_key(&id) {
        return Err(format!(
            "sandbox {id} (process {pid}) is not bound to a function"
        ));
    }
    Ok(id)
}

/// The sandbox id in a `/proc/<pid>/cgroup` text whose cgroups live under `parent`.
fn sandbox_in_cgroups(text: &str, parent: &Path) -> Option<String> {
    text.lines().find_map(|line| {
        let path = PathBuf::from(line.splitn(3, ':').nth(2)?);
        let rest = path.strip_prefix(parent).ok()?;
        let first = rest.components().next()?;
        Some(first.as_os_str().to_string_lossy().into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shim_and_the_sandbox_spec_agree_on_where_callees_are_attached() {
        assert_eq!(shim::FUNCTIONS_DIR, rootfs::FUNCTIONS_DIR);
    }

    #[test]
    fn a_sandbox_may_write_the_largest_shared_payload() {
        // A shared payload is a memfd the sender writes: its size is bound by the
        // sandbox's RLIMIT_FSIZE.
        assert!(ipc::payload::MAX_SHARED_PAYLOAD as u64 <= rootfs::MAX_FILE_SIZE);
    }

    #[test]
    fn answers_a_caller_does_not_read_end_its_connection_within_the_timeout() {
        let (agent_end, caller_end) = UnixStream::pair().unwrap();
        let watched = agent_end.try_clone().unwrap();
        let timeout = std::time::Duration::from_millis(300);
        // Without the watchdog, the test fails on time instead of hanging.
        agent_end.set_write_timeout(Some(timeout * 8)).unwrap();
        let replies = Replies::new(Channel::new(agent_end), timeout);
        let answer = Payload::Inline(vec![b'x'; 60_000]);
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| replies.watch(&watched));
            // More answers than the socket holds, from threads of their own as the
            // calls answer; none is read.
            let senders: Vec<_> = (0..16)
                .map(|id| {
                    let (replies, answer) = (&replies, &answer);
                    s.spawn(move || {
                        replies.send(&CallReply::CallReturned { id, raw: false }, answer)
                    })
                })
                .collect();
            for t in senders {
                t.join().unwrap();
            }
            replies.stop_watching();
        });
        // One timeout for them all, not one each (a margin for a loaded host).
        let took = started.elapsed();
        assert!(took < timeout * 4, "the answers took {took:?}");
        // The connection is closed: the caller reads what got through, then the end.
        let mut caller = Channel::new(caller_end);
        let mut read = 0;
        loop {
            match caller.recv::<CallReply>() {
                Ok(_) => read += 1,
                Err(ipc::Error::Closed | ipc::Error::Truncated) => break,
                Err(e) => panic!("{}", ipc::chain(&e)),
            }
        }
        assert!(read < 16, "every answer got through: nothing was tested");
    }

    #[test]
    fn the_caller_sandbox_comes_from_its_cgroup_path() {
        let parent = Path::new("/sprout/42");
        let v1 = "12:freezer:/sprout/42/sprout-42-7\n11:memory:/sprout/42/sprout-42-7\n";
        assert_eq!(
            sandbox_in_cgroups(v1, parent).as_deref(),
            Some("sprout-42-7")
        );
        let v2 = "0::/sprout/42/sprout-42-9\n";
        assert_eq!(
            sandbox_in_cgroups(v2, parent).as_deref(),
            Some("sprout-42-9")
        );
        assert_eq!(sandbox_in_cgroups("0::/user.slice\n", parent), None);
        assert_eq!(
            sandbox_in_cgroups("0::/sprout/43/sprout-43-1\n", parent),
            None
        );
    }
}
