//! Calls from a hosted instance to other functions, made by its host on its behalf:
//! the runtime's process (Node.js) cannot hold sprout's channels itself.
//!
//! The host holds the instance's **calls channel** to the shim (one call at a time:
//! callers queue on its lock) and one connection to the agent's **call socket**
//! (`/.sprout/agent.sock`, connected on first use; many calls in flight, a reader
//! thread files each reply for the caller waiting on its id). The semantics are the
//! Python SDK's (`docs/protocol.md`, "Calls between functions"): a synchronous call
//! first `resolve`s its callee with the agent and runs it in this sandbox through the
//! shim when the agent gives a spec, else through the agent; an asynchronous call
//! goes to the agent. A call in this sandbox goes on a direct channel to its callee
//! when the shim binds one (`docs/protocol.md`, "Direct channels"), as the Python
//! SDK's do.

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ipc::proto::{CallReply, CallRequest, CallSpec, InstanceEvent, InstanceRequest};
use ipc::{Channel, Message, Payload};

/// The agent's call socket, as every sandbox sees it.
pub const AGENT_SOCKET: &str = "/.sprout/agent.sock";

/// A call's answer: the reply and its payload (the result, for `call_returned`), or
/// why the call could not complete (answered as `call_failed`).
pub type Answer = Result<(CallReply, Payload), String>;

/// One instance's calls.
#[derive(Debug)]
pub struct Calls {
    /// The calls channel to the shim, held for one request and its reply at a time;
    /// `Err`: why it is unusable.
    shim: Mutex<Result<Channel, String>>,
    /// The same socket, for sending: every frame to the shim goes under this lock,
    /// so an unanswered `unbind` waits for no relayed call's reply.
    shim_send: Mutex<Channel>,
    agent: Mutex<Option<Arc<AgentLink>>>,
    /// Callee name → its spec (run it here) or `None` (run it through the agent).
    specs: Mutex<HashMap<String, Option<CallSpec>>>,
    /// Callee name → the direct channel the shim bound to it for this instance.
    direct: Mutex<HashMap<String, Arc<Direct>>>,
    /// Callees the shim would not bind (at capacity): called through the shim,
    /// without asking again until the next invocation.
    no_direct: Mutex<HashSet<String>>,
    ids: AtomicU64,
    agent_socket: String,
}

/// A direct channel to a callee the shim bound to this instance: one call at a time
/// (callers that find it busy go through the shim); this side keeps the callee's time.
#[derive(Debug)]
struct Direct {
    channel: Mutex<Channel>,
    /// The bind's token, for `unbind`.
    token: u64,
    timeout: Duration,
}

/// The connection to the agent's call socket.
#[derive(Debug)]
struct AgentLink {
    send: Mutex<Channel>,
    replies: Arc<Mutex<Waiting>>,
}

#[derive(Debug, Default)]
struct Waiting {
    by_id: HashMap<u64, mpsc::Sender<Answer>>,
    /// Why the connection is gone: every later request fails with it.
    broken: Option<String>,
}

impl Calls {
    /// The calls of an instance whose calls channel to the shim is `shim` (an error
    /// when its socket cannot be duplicated for sending).
    pub fn new(shim: Channel) -> std::io::Result<Calls> {
        let sender = Channel::new(shim.stream().try_clone()?);
        Ok(Calls {
            shim: Mutex::new(Ok(shim)),
            shim_send: Mutex::new(sender),
            agent: Mutex::new(None),
            specs: Mutex::new(HashMap::new()),
            direct: Mutex::new(HashMap::new()),
            no_direct: Mutex::new(HashSet::new()),
            ids: AtomicU64::new(1),
            agent_socket: AGENT_SOCKET.to_owned(),
        })
    }

    /// An invocation of the instance begins: callees the shim would not bind are
    /// asked for again.
    pub fn next_invocation(&self) {
        self.no_direct.lock().unwrap().clear();
    }

    /// Calls `function` with `event` at `depth` (the callee's) and waits for the
    /// answer. `in_sandbox`: a synchronous call, which may run in this sandbox.
    pub fn call(
        &self,
        function: &str,
        depth: u32,
        raw: bool,
        event: &[u8],
        in_sandbox: bool,
    ) -> Answer {
        ipc::proto::check_depth(function, depth)?;
        let spec = if in_sandbox {
            match self.resolve(function)? {
                Ok(spec) => spec,
                Err(answer) => return Ok(answer),
            }
        } else {
            None
        };
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let request = CallRequest::Call {
            id,
            function: function.to_owned(),
            depth,
            raw,
            spec: None,
        };
        match spec {
            Some(spec) => self.call_here(id, function, depth, raw, spec, event),
            None => self.call_agent(id, &request, event),
        }
    }

    /// A call in this sandbox: on the direct channel to its callee (bound on first
    /// use), or through the shim when that is busy or the shim would not bind one.
    fn call_here(
        &self,
        id: u64,
        function: &str,
        depth: u32,
        raw: bool,
        spec: CallSpec,
        event: &[u8],
    ) -> Answer {
        let direct = match self.direct_to(function, &spec)? {
            Ok(direct) => direct,
            Err(failed) => return Ok(failed),
        };
        if let Some(direct) = direct {
            if let Ok(mut channel) = direct.channel.try_lock() {
                let call = InstanceRequest::Invoke {
                    id,
                    depth,
                    raw,
                    env: None,
                };
                // None: the callee had closed its end before the call reached
                // it (nothing ran); through the shim.
                if let Some(answer) =
                    self.call_direct(&direct, &mut channel, id, function, &call, event)
                {
                    return answer;
                }
            }
        }
        let request = CallRequest::Call {
            id,
            function: function.to_owned(),
            depth,
            raw,
            spec: Some(spec),
        };
        self.call_shim(id, request, event)
            .map(|m| (m.header, m.payload))
    }

    /// The direct channel to `function`: the one bound, or a new one the shim binds
    /// (`Ok(None)`: it has as many bound as it allows; `Err`: no instance could be
    /// had, answered as the call).
    #[allow(clippy::type_complexity)]
    fn direct_to(
        &self,
        function: &str,
        spec: &CallSpec,
    ) -> Result<Result<Option<Arc<Direct>>, (CallReply, Payload)>, String> {
        if let Some(direct) = self.direct.lock().unwrap().get(function) {
            return Ok(Ok(Some(direct.clone())));
        }
        if self.no_direct.lock().unwrap().contains(function) {
            return Ok(Ok(None));
        }
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let request = CallRequest::Bind {
            id,
            function: function.to_owned(),
            spec: spec.clone(),
        };
        let m = self.call_shim(id, request, &[])?;
        match m.header {
            CallReply::Bound { callee, .. } if m.fds.len() == 1 => {
                let end = m.fds.into_iter().next().expect("one descriptor");
                let direct = Arc::new(Direct {
                    channel: Mutex::new(Channel::from_fd(end)),
                    token: callee,
                    timeout: Duration::from_millis(spec.timeout_ms.max(1)),
                });
                self.direct
                    .lock()
                    .unwrap()
                    .insert(function.to_owned(), direct.clone());
                Ok(Ok(Some(direct)))
            }
            reply @ (CallReply::CallFailed { .. } | CallReply::CallRaised { .. }) => {
                Ok(Err((reply, m.payload)))
            }
            // At capacity (`call_refused`, kind `too_many_channels`), or a reply
            // that makes no channel: through the shim, without asking again until
            // the next invocation.
            _ => {
                self.no_direct.lock().unwrap().insert(function.to_owned());
                Ok(Ok(None))
            }
        }
    }

    fn call_direct(
        &self,
        direct: &Direct,
        channel: &mut Channel,
        id: u64,
        function: &str,
        call: &InstanceRequest,
        event: &[u8],
    ) -> Option<Answer> {
        let failed = |message: String| {
            Some(Ok((
                CallReply::CallFailed {
                    id,
                    function: function.to_owned(),
                    message,
                },
                Payload::default(),
            )))
        };
        let deadline = Instant::now() + direct.timeout;
        let timed_out = |e: &ipc::Error| matches!(e, ipc::Error::Io(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
        // A callee that stops reading holds the send no longer than its time.
        let sent = channel
            .stream()
            .set_write_timeout(Some(direct.timeout))
            .map_err(ipc::Error::Io)
            .and_then(|()| channel.send(call, event, &[]));
        match sent {
            Ok(()) => {}
            Err(e) if timed_out(&e) => {
                self.drop_direct(function, direct, true);
                let ms = direct.timeout.as_millis();
                return failed(format!("{function} timed out after {ms} ms"));
            }
            Err(_) => {
                // The callee had closed its end: it never ran this call.
                self.drop_direct(function, direct, false);
                return None;
            }
        }
        // The deadline is checked after every read, so a callee trickling a frame a
        // byte at a time holds the caller no longer than its time either.
        let heard = loop {
            match channel.try_recv::<InstanceEvent>() {
                Ok(Some(m)) => break Ok(m),
                Ok(None) => {}
                Err(e) => break Err(Some(e)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(None);
            }
            if let Err(e) = channel.stream().set_read_timeout(Some(left)) {
                break Err(Some(ipc::Error::Io(e)));
            }
            match channel.fill() {
                Ok(0) => break Err(Some(ipc::Error::Closed)),
                Ok(_) => {}
                Err(e) if timed_out(&e) => {}
                Err(e) => break Err(Some(e)),
            }
        };
        match heard {
            Ok(Message {
                header: InstanceEvent::Returned { id: got, raw, .. },
                payload,
                ..
            }) if got == id => Some(Ok((CallReply::CallReturned { id, raw }, payload))),
            Ok(Message {
                header: InstanceEvent::Raised { id: got, error, .. },
                ..
            }) if got == id => Some(Ok((
                CallReply::CallRaised {
                    id,
                    function: function.to_owned(),
                    error,
                },
                Payload::default(),
            ))),
            Ok(other) => {
                self.drop_direct(function, direct, true);
                let op = ipc::proto::op_of(&other.header);
                failed(format!(
                    "{function}'s instance broke the protocol: unexpected {op}"
                ))
            }
            Err(None) => {
                self.drop_direct(function, direct, true);
                let ms = direct.timeout.as_millis();
                failed(format!("{function} timed out after {ms} ms"))
            }
            Err(Some(e)) if matches!(e, ipc::Error::Closed) || e.is_peer_gone() => {
                self.drop_direct(function, direct, false);
                failed(format!(
                    "{function}'s instance died while running (out of memory or killed?)"
                ))
            }
            Err(Some(e)) => {
                self.drop_direct(function, direct, true);
                failed(format!(
                    "{function}'s instance broke the protocol: {}",
                    ipc::chain(&e)
                ))
            }
        }
    }

    /// Forgets a direct channel; with `kill`, asks the shim to kill its callee (past
    /// its time, or broke the protocol). The request is unanswered: it waits for no
    /// relayed call's reply, only for a frame being sent.
    fn drop_direct(&self, function: &str, direct: &Direct, kill: bool) {
        {
            let mut bound = self.direct.lock().unwrap();
            if bound
                .get(function)
                .is_some_and(|d| std::ptr::eq(Arc::as_ptr(d), direct))
            {
                bound.remove(function);
            }
        }
        if kill {
            let unbind = CallRequest::Unbind {
                callee: direct.token,
            };
            let _ = self.shim_send.lock().unwrap().send(&unbind, &[], &[]);
        }
    }

    /// The callee's spec (`Some`: run it here), or the agent's failure answer.
    #[allow(clippy::type_complexity)]
    fn resolve(
        &self,
        function: &str,
    ) -> Result<Result<Option<CallSpec>, (CallReply, Payload)>, String> {
        if let Some(known) = self.specs.lock().unwrap().get(function) {
            return Ok(Ok(known.clone()));
        }
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let request = CallRequest::Resolve {
            id,
            function: function.to_owned(),
        };
        match self.call_agent(id, &request, &[])? {
            (CallReply::Resolved { spec, .. }, _) => {
                self.specs
                    .lock()
                    .unwrap()
                    .insert(function.to_owned(), spec.clone());
                Ok(Ok(spec))
            }
            (reply @ (CallReply::CallFailed { .. } | CallReply::CallRaised { .. }), payload) => {
                Ok(Err((reply, payload)))
            }
            (other, _) => Err(format!(
                "unexpected answer to resolve: op={}",
                ipc::proto::op_of(&other)
            )),
        }
    }

    /// Sends a request on the calls channel and waits for its reply (with whatever
    /// descriptors it carries).
    fn call_shim(
        &self,
        id: u64,
        request: CallRequest,
        event: &[u8],
    ) -> Result<Message<CallReply>, String> {
        let mut shim = self.shim.lock().unwrap();
        let channel = shim.as_mut().map_err(|why| why.clone())?;
        if let Err(e) = self.shim_send.lock().unwrap().send(&request, event, &[]) {
            let why = format!("the calls channel to the shim broke: {}", ipc::chain(&e));
            *shim = Err(why.clone());
            return Err(why);
        }
        loop {
            match channel.recv::<CallReply>() {
                Ok(m) if reply_id(&m.header) == id => return Ok(m),
                Ok(_) => continue, // an answer to a call nobody waits for
                Err(e) => {
                    let why = format!("the calls channel to the shim broke: {}", ipc::chain(&e));
                    *shim = Err(why.clone());
                    return Err(why);
                }
            }
        }
    }

    fn agent(&self) -> Result<Arc<AgentLink>, String> {
        let mut agent = self.agent.lock().unwrap();
        if let Some(link) = agent.as_ref() {
            return Ok(link.clone());
        }
        let path = &self.agent_socket;
        let stream = UnixStream::connect(path)
            .map_err(|e| format!("cannot connect to the agent's call socket {path}: {e}"))?;
        let reader = stream
            .try_clone()
            .map_err(|e| format!("cannot use the agent's call socket: {e}"))?;
        let replies = Arc::new(Mutex::new(Waiting::default()));
        let filed = replies.clone();
        std::thread::Builder::new()
            .name("agent-replies".into())
            .spawn(move || read_replies(Channel::new(reader), &filed))
            .map_err(|e| format!("cannot start the agent reply reader: {e}"))?;
        let link = Arc::new(AgentLink {
            send: Mutex::new(Channel::new(stream)),
            replies,
        });
        *agent = Some(link.clone());
        Ok(link)
    }

    fn call_agent(&self, id: u64, request: &CallRequest, event: &[u8]) -> Answer {
        let link = self.agent()?;
        let (tx, rx) = mpsc::channel();
        {
            let mut waiting = link.replies.lock().unwrap();
            if let Some(why) = &waiting.broken {
                return Err(why.clone());
            }
            waiting.by_id.insert(id, tx);
        }
        if let Err(e) = link.send.lock().unwrap().send(request, event, &[]) {
            link.replies.lock().unwrap().by_id.remove(&id);
            return Err(format!(
                "the call connection to the agent broke: {}",
                ipc::chain(&e)
            ));
        }
        rx.recv()
            .unwrap_or_else(|_| Err("the agent closed the call connection".into()))
    }
}

/// The id a reply answers.
pub fn reply_id(reply: &CallReply) -> u64 {
    match reply {
        CallReply::Resolved { id, .. }
        | CallReply::CallReturned { id, .. }
        | CallReply::Bound { id, .. }
        | CallReply::CallRaised { id, .. }
        | CallReply::CallFailed { id, .. }
        | CallReply::CallRefused { id, .. } => *id,
    }
}

/// Files the agent's replies for their callers until the connection ends, then fails
/// everyone still waiting.
fn read_replies(mut channel: Channel, waiting: &Mutex<Waiting>) {
    let why = loop {
        match channel.recv::<CallReply>() {
            Ok(m) => {
                let id = reply_id(&m.header);
                if let Some(tx) = waiting.lock().unwrap().by_id.remove(&id) {
                    let _ = tx.send(Ok((m.header, m.payload)));
                }
            }
            Err(ipc::Error::Closed) => break "the agent closed the call connection".to_owned(),
            Err(e) => break format!("the call connection to the agent broke: {}", ipc::chain(&e)),
        }
    };
    let mut waiting = waiting.lock().unwrap();
    waiting.broken = Some(why.clone());
    for (_, tx) in waiting.by_id.drain() {
        let _ = tx.send(Err(why.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A callee past its time is killed at once, even while another thread of the
    /// same instance waits for the shim to answer a relayed call.
    #[test]
    fn an_unbind_waits_for_no_relayed_reply() {
        let (ours, mut shim) = Channel::pair().unwrap();
        let calls = Arc::new(Calls::new(ours).unwrap());
        let relayed = CallRequest::Call {
            id: 7,
            function: "slow".into(),
            depth: 1,
            raw: false,
            spec: None,
        };
        let relaying = {
            let calls = calls.clone();
            let relayed = relayed.clone();
            std::thread::spawn(move || calls.call_shim(7, relayed, b"{}"))
        };
        assert_eq!(shim.recv::<CallRequest>().unwrap().header, relayed);
        let direct = Direct {
            channel: Mutex::new(Channel::pair().unwrap().0),
            token: 42,
            timeout: Duration::from_secs(1),
        };
        let (done, unbound) = mpsc::channel();
        let unbinding = {
            let calls = calls.clone();
            std::thread::spawn(move || {
                calls.drop_direct("stuck", &direct, true);
                done.send(()).unwrap();
            })
        };
        unbound
            .recv_timeout(Duration::from_secs(10))
            .expect("the unbind waited for the relayed call's reply");
        assert_eq!(
            shim.recv::<CallRequest>().unwrap().header,
            CallRequest::Unbind { callee: 42 }
        );
        let answer = CallReply::CallReturned { id: 7, raw: false };
        shim.send(&answer, b"1", &[]).unwrap();
        let reply = relaying.join().unwrap().unwrap();
        assert_eq!(reply.header, answer);
        unbinding.join().unwrap();
    }

    /// A refused bind is not asked for again until the next invocation: the calls
    /// in between go through the shim.
    #[test]
    fn a_refused_bind_is_asked_again_only_in_the_next_invocation() {
        let (ours, mut shim) = Channel::pair().unwrap();
        let calls = Calls::new(ours).unwrap();
        let fake_shim = std::thread::spawn(move || {
            let mut ops = Vec::new();
            while let Ok(m) = shim.recv::<CallRequest>() {
                let reply = match m.header {
                    CallRequest::Bind { id, function, .. } => CallReply::CallRefused {
                        id,
                        function,
                        kind: ipc::proto::RefusalKind::TooManyChannels,
                        message: "at capacity".into(),
                    },
                    CallRequest::Call { id, .. } => CallReply::CallReturned { id, raw: false },
                    other => panic!("unexpected {other:?}"),
                };
                ops.push(ipc::proto::op_of(&reply).to_owned());
                shim.send(&reply, b"1", &[]).unwrap();
            }
            ops
        });
        let spec = CallSpec {
            function: "g".into(),
            version: 1,
            code_dir: "/code".into(),
            handler: ipc::proto::Handler::parse("f:f").unwrap(),
            timeout_ms: 1000,
            namespace: "ns".into(),
            memory_mb: 128,
            deps: Vec::new(),
            env: Default::default(),
        };
        let call = |id| {
            let (reply, _) = calls
                .call_here(id, "g", 1, false, spec.clone(), b"{}")
                .unwrap();
            assert_eq!(reply, CallReply::CallReturned { id, raw: false });
        };
        call(1);
        call(2);
        calls.next_invocation();
        call(3);
        drop(calls);
        let (refused, returned) = ("call_refused", "call_returned");
        assert_eq!(
            fake_shim.join().unwrap(),
            [refused, returned, returned, refused, returned]
        );
    }
}
