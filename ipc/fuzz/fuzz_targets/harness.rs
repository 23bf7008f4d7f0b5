//! The body of the `frames` fuzz target, shared with the corpus replay
//! (`ipc/tests/fuzz_corpus.rs` includes this file).
//!
//! The input is a *send script*: what a hostile peer writes on one end of a Unix
//! stream socket while an [`ipc::Channel`] reads the other end. It is a sequence of
//! sends:
//!
//! ```text
//! u8 control | u16 length (little-endian) | length bytes
//! ```
//!
//! `control` bits 0-3 are how many descriptors go with the send (`SCM_RIGHTS`, 0-15;
//! a frame may carry at most `MAX_FDS`), bits 4-5 their kind: 0 `/dev/null`, 1 a memfd
//! sealed like a shared payload holding the send's bytes, 2 the same memfd unsealed,
//! 3 one end of a socket pair. A tail too short for a control word is sent as it is.
//! The Python target (`shim/runtime/python/fuzz_frames.py`) reads the same format.
//!
//! Every frame received is decoded as each message of [`ipc::proto`]. What must
//! hold: no panic, no crash (a mapped shared payload is read in full), every failure
//! is an [`ipc::Error`] that names the problem, and the channel never waits on a
//! peer that has stopped sending.

use std::fs::File;
use std::io::{IoSlice, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use ipc::proto;
use ipc::{Channel, Error, Message};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::value::RawValue;

/// Descriptor kinds of a send (bits 4-5 of its control byte).
pub const DEVNULL: u8 = 0;
pub const SEALED_MEMFD: u8 = 1;
pub const UNSEALED_MEMFD: u8 = 2;
pub const SOCKET: u8 = 3;

/// One send of a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send<'a> {
    pub bytes: &'a [u8],
    pub fds: usize,
    pub kind: u8,
}

/// Splits a send script into its sends.
pub fn parse_script(mut data: &[u8]) -> Vec<Send<'_>> {
    let mut sends = Vec::new();
    while !data.is_empty() {
        if data.len() < 3 {
            sends.push(Send {
                bytes: data,
                fds: 0,
                kind: DEVNULL,
            });
            break;
        }
        let control = data[0];
        let len = u16::from_le_bytes([data[1], data[2]]) as usize;
        let rest = &data[3..];
        let (bytes, tail) = rest.split_at(len.min(rest.len()));
        sends.push(Send {
            bytes,
            fds: (control & 0x0f) as usize,
            kind: (control >> 4) & 0x03,
        });
        data = tail;
    }
    sends
}

/// Encodes one send (the inverse of [`parse_script`] for one entry).
pub fn send(bytes: &[u8], fds: usize, kind: u8) -> Vec<u8> {
    let mut out = vec![(fds as u8 & 0x0f) | (kind << 4)];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// The bytes of one well-formed frame.
pub fn frame(header: &str, payload: &[u8], fds: usize, shared: bool) -> Vec<u8> {
    let word = fds as u32 | if shared { ipc::frame::SHARED_FLAG } else { 0 };
    let mut out = Vec::new();
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&word.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    if !shared {
        out.extend_from_slice(payload);
    }
    out
}

/// A frame prefix alone.
pub fn prefix(header: u32, payload: u32, fd_word: u32) -> Vec<u8> {
    [
        header.to_le_bytes(),
        payload.to_le_bytes(),
        fd_word.to_le_bytes(),
    ]
    .concat()
}

/// What one run saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Frames received and decoded.
    pub frames: usize,
    /// How the channel ended (`peer closed the channel` when all went well).
    pub end: String,
}

/// Runs one send script against a fresh channel; panics when a rule is broken.
pub fn run(data: &[u8]) -> Outcome {
    let (peer, mut chan) = Channel::pair().expect("socketpair");
    let sender = peer.stream();
    sender.set_nonblocking(true).expect("nonblocking sender");
    let mut out = Outcome::default();
    for s in parse_script(data) {
        let fds = make_fds(&s);
        let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
        if s.bytes.is_empty() && raw.is_empty() {
            continue;
        }
        let iov = [IoSlice::new(s.bytes)];
        // Another refusal (e.g. descriptors with no byte) means nothing went: go on.
        let sent = sendmsg::<()>(sender.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None);
        if sent == Err(nix::errno::Errno::EAGAIN) {
            // The channel does not read (its socket is full): the rest cannot go.
            break;
        }
        drop(fds);
        if let Err(e) = drain(&mut chan, &mut out) {
            out.end = checked(&e);
            return out;
        }
    }
    sender
        .shutdown(Shutdown::Write)
        .expect("shut down the sender");
    // Blocking now: a channel must end (closed, truncated, or a refusal) and never
    // wait on a peer that sends nothing more.
    loop {
        match chan.recv::<Box<RawValue>>() {
            Ok(m) => use_frame(m, &mut out),
            Err(e) => {
                out.end = checked(&e);
                return out;
            }
        }
    }
}

/// Takes every complete frame and reads what the socket holds, without blocking.
fn drain(chan: &mut Channel, out: &mut Outcome) -> Result<(), Error> {
    loop {
        if let Some(m) = chan.try_recv::<Box<RawValue>>()? {
            use_frame(m, out);
            continue;
        }
        match chan.fill_nonblocking() {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Does with a received frame what sprout's processes do with one from a peer.
fn use_frame(m: Message<Box<RawValue>>, out: &mut Outcome) {
    out.frames += 1;
    let text = m.header.get();
    // Every message type some process reads from a peer that may be hostile.
    let _ = serde_json::from_str::<proto::CallRequest>(text);
    let _ = serde_json::from_str::<proto::CallReply>(text);
    let _ = serde_json::from_str::<proto::ShimRequest>(text);
    let _ = serde_json::from_str::<proto::ShimEvent>(text);
    let _ = serde_json::from_str::<proto::ZygoteRequest>(text);
    let _ = serde_json::from_str::<proto::ZygoteEvent>(text);
    let _ = serde_json::from_str::<proto::InstanceRequest>(text);
    let _ = serde_json::from_str::<proto::InstanceEvent>(text);
    let _ = serde_json::from_str::<proto::LoadSpec>(text);
    let _ = serde_json::from_str::<proto::CallSpec>(text);
    let _ = serde_json::from_str::<proto::FunctionError>(text);
    if let Ok(s) = serde_json::from_str::<String>(text) {
        let _ = proto::Handler::parse(&s);
    }
    // A shared payload is mapped: every byte of it must be readable (no SIGBUS).
    let sum = m.payload.iter().fold(0u8, |a, b| a ^ b);
    std::hint::black_box(sum);
    for fd in &m.fds {
        assert!(fd.as_raw_fd() >= 0);
    }
}

/// A channel's failure must say what went wrong.
fn checked(e: &Error) -> String {
    let text = ipc::chain(e);
    assert!(!text.is_empty(), "an error with no message: {e:?}");
    text
}

/// Opens the descriptors of a send.
fn make_fds(s: &Send<'_>) -> Vec<OwnedFd> {
    (0..s.fds)
        .map(|_| match s.kind {
            SEALED_MEMFD | UNSEALED_MEMFD => {
                let fd = memfd_create(
                    c"sprout-fuzz",
                    MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
                )
                .expect("memfd_create");
                let mut file = File::from(fd);
                file.write_all(s.bytes).expect("write the memfd");
                if s.kind == SEALED_MEMFD {
                    let seals = SealFlag::F_SEAL_WRITE
                        | SealFlag::F_SEAL_SHRINK
                        | SealFlag::F_SEAL_GROW
                        | SealFlag::F_SEAL_SEAL;
                    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).expect("seal the memfd");
                }
                OwnedFd::from(file)
            }
            SOCKET => {
                let (a, _b) = UnixStream::pair().expect("socketpair");
                OwnedFd::from(a)
            }
            _ => OwnedFd::from(File::open("/dev/null").expect("open /dev/null")),
        })
        .collect()
}

/// Well-formed traffic of every channel sprout reads, as send scripts.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let invoke = frame(
        r#"{"op":"invoke","id":1,"depth":0}"#,
        br#"{"a":[1,2,3]}"#,
        0,
        false,
    );
    let mut split = send(&invoke[..5], 0, DEVNULL);
    split.extend(send(&invoke[5..17], 0, DEVNULL));
    split.extend(send(&invoke[17..], 0, DEVNULL));
    let mut two = invoke.clone();
    two.extend(frame(r#"{"op":"ready"}"#, b"", 0, false));
    vec![
        ("invoke", send(&invoke, 0, DEVNULL)),
        ("invoke_split", split),
        ("two_frames_one_send", send(&two, 0, DEVNULL)),
        (
            "call",
            send(
                &frame(
                    r#"{"op":"call","id":4,"function":"g","depth":1,"raw":true}"#,
                    b"\x00\x01",
                    0,
                    false,
                ),
                0,
                DEVNULL,
            ),
        ),
        (
            "resolve",
            send(
                &frame(r#"{"op":"resolve","id":5,"function":"g"}"#, b"", 0, false),
                0,
                DEVNULL,
            ),
        ),
        (
            "returned",
            send(
                &frame(r#"{"op":"returned","id":1,"called":true}"#, b"{}", 0, false),
                0,
                DEVNULL,
            ),
        ),
        (
            "raised",
            send(
                &frame(
                    r#"{"op":"raised","id":1,"error":{"type":"ValueError","message":"m","traceback":"t"}}"#,
                    b"",
                    0,
                    false,
                ),
                0,
                DEVNULL,
            ),
        ),
        (
            "load",
            send(
                &frame(
                    r#"{"op":"load","function":"f","code_dir":"/code","handler":{"module":"m","function":"f"}}"#,
                    b"",
                    0,
                    false,
                ),
                0,
                DEVNULL,
            ),
        ),
        (
            "spawned_with_fds",
            send(
                &frame(r#"{"op":"spawned","instance":3,"pid":42}"#, b"", 4, false),
                4,
                SOCKET,
            ),
        ),
        (
            "shared_payload",
            // The memfd holds the send's own bytes: the payload is the frame's first 12.
            send(
                &frame(r#"{"op":"returned","id":2,"raw":true}"#, &[0; 12], 1, true),
                1,
                SEALED_MEMFD,
            ),
        ),
        (
            "shared_unsealed",
            send(
                &frame(r#"{"op":"returned","id":2}"#, &[0; 4], 1, true),
                1,
                UNSEALED_MEMFD,
            ),
        ),
        ("fds_without_frame", send(b"", 8, DEVNULL)),
        ("too_many_fds", send(&invoke, 12, DEVNULL)),
        // A prefix announcing a large frame (within the limits) and nothing more.
        (
            "large_prefix",
            send(&prefix(100_000, 60_000, 0), 0, DEVNULL),
        ),
        // One announcing 1 MiB of header and 64 MiB of inline payload.
        (
            "huge_prefix",
            send(&prefix(1 << 20, 64 << 20, 0), 0, DEVNULL),
        ),
        (
            "bad_json",
            send(&frame("{not json", b"", 0, false), 0, DEVNULL),
        ),
    ]
}
