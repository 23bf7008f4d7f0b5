//! The agent's call socket: how a function calls a function it cannot run in its own
//! sandbox, and how it learns whether it can.
//!
//! The socket is `agent.sock` in the runtime directory, which every sandbox sees
//! read-only at `/.sprout`; an instance connects once, on its first call. The agent
//! tells which sandbox a connection comes from by its peer's cgroup, so a function
//! cannot speak for another sandbox. A connection is served by a thread of its own,
//! and each call in flight by another (they wait for instances like any request).
//! When a connection closes (its process died, or its sandbox was destroyed because
//! its workflow ended), the calls it made are cancelled.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

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
    // not hold an answering thread, and the sibling it holds, for ever.
    let writer = match stream
        .try_clone()
        .and_then(|s| s.set_write_timeout(Some(REPLY_TIMEOUT)).map(|()| s))
    {
        Ok(s) => Arc::new(Mutex::new(Channel::new(s))),
        Err(e) => {
            tracing::warn!(error = %e, "call socket: dup connection");
            return;
        }
    };
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
                let reply = resolve(inner, &sandbox, id, &function);
                reply_to(&writer, &reply, &Payload::default());
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
                    sandbox.clone(),
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
                            reply_to(&writer, reply, result)
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
                reply_to(&writer, &reply, &Payload::default());
            }
        }
    }
    // The caller is gone: whatever it still waits for is of no use.
    cancel.fire();
}

fn reply_to(writer: &Mutex<Channel>, reply: &CallReply, payload: &Payload) {
    if let Err(e) = lock(writer).send_payload(reply, payload, &[]) {
        tracing::debug!(error = %ipc::chain(&e), "call socket: caller went away before its answer");
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
