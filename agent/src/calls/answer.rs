//! An answer on the call socket, encoded as a frame the loop writes as the socket takes
//! it (a large result goes as a sealed memfd with the frame's first byte).

use std::sync::mpsc;
use std::time::Instant;

use ipc::frame::{PREFIX_LEN, SHARED_FLAG};
use ipc::payload::SHARED_THRESHOLD;
use ipc::proto::CallReply;
use ipc::Payload;

/// An encoded answer, partly written.
pub(super) struct Outgoing {
    pub bytes: Vec<u8>,
    /// A shared payload, whose memfd goes with the first byte.
    pub shared: Option<Payload>,
    pub sent: usize,
    pub ready_at: Instant,
    /// Dropped once written, or when the connection closes: the worker waiting on it
    /// lets the callee's instance go.
    pub written: Option<mpsc::Sender<()>>,
}

impl Outgoing {
    fn encode(reply: &CallReply, payload: Payload) -> Result<Outgoing, String> {
        let header = serde_json::to_vec(reply).map_err(|e| format!("encode the answer: {e}"))?;
        let payload = match payload {
            Payload::Inline(bytes) if bytes.len() > SHARED_THRESHOLD => {
                Payload::share(&bytes).map_err(|e| format!("share the answer: {e}"))?
            }
            p => p,
        };
        let shared = payload.is_shared();
        if shared && payload.len() > ipc::payload::MAX_SHARED_PAYLOAD {
            return Err(format!(
                "the result of {} bytes exceeds the limit of {} bytes",
                payload.len(),
                ipc::payload::MAX_SHARED_PAYLOAD
            ));
        }
        let inline: &[u8] = if shared { &[] } else { &payload };
        let fd_word = if shared { 1 | SHARED_FLAG } else { 0 };
        let mut bytes = Vec::with_capacity(PREFIX_LEN + header.len() + inline.len());
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&fd_word.to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(inline);
        Ok(Outgoing {
            bytes,
            shared: shared.then_some(payload),
            sent: 0,
            ready_at: Instant::now(),
            written: None,
        })
    }

    /// [`Outgoing::encode`], or a `call_failed` that says why it could not be.
    pub fn answer(reply: &CallReply, payload: Payload) -> Outgoing {
        Outgoing::encode(reply, payload).unwrap_or_else(|message| {
            let (id, function) = reply_id(reply);
            let failed = CallReply::CallFailed {
                id,
                function,
                message,
            };
            Outgoing::encode(&failed, Payload::default()).expect("a small answer encodes")
        })
    }
}

fn reply_id(reply: &CallReply) -> (u64, String) {
    match reply {
        CallReply::Resolved { id, spec } => (
            *id,
            spec.as_ref()
                .map(|s| s.function.clone())
                .unwrap_or_default(),
        ),
        CallReply::CallReturned { id, .. } | CallReply::Bound { id, .. } => (*id, String::new()),
        CallReply::CallRaised { id, function, .. }
        | CallReply::CallFailed { id, function, .. }
        | CallReply::CallRefused { id, function, .. } => (*id, function.clone()),
    }
}
