//! Frames over a Unix stream socket.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! u32 header_len | u32 payload_len | u32 fd_count | header (JSON) | payload (bytes)
//! ```
//!
//! Descriptors travel with `SCM_RIGHTS` on the `sendmsg` that carries the frame's
//! first byte. The receiver queues descriptors in arrival order and hands a frame
//! exactly `fd_count` of them; because a frame's descriptors arrive no later than
//! its first byte, they are always queued by the time the frame is complete.
//!
//! **Shared payloads.** Bit 31 of `fd_count` ([`SHARED_FLAG`]) says the payload is not
//! in the stream: it is the first `payload_len` bytes of the frame's last descriptor, a
//! sealed memfd (see [`crate::payload`]). Senders put payloads over
//! [`SHARED_THRESHOLD`] there, so a large event or result is written once and mapped
//! by its receiver; a process that only passes it on forwards the descriptor.
//!
//! **What a peer can make the receiver hold.** The peer may be a hostile function, so
//! a channel spends memory and descriptors on what has arrived, never on what a
//! prefix announces. A frame is at most [`MAX_FRAME`] long: its header at most
//! [`MAX_HEADER`], its inline payload at most [`MAX_PAYLOAD`] (= [`SHARED_THRESHOLD`],
//! what every sprout sender keeps inline; larger payloads go shared), and a prefix
//! announcing more is refused before anything else of it is read. The receive buffer
//! holds at most the frame being read plus one [`READ_CHUNK`] (so never more than
//! [`MAX_FRAME`] + [`READ_CHUNK`], about 256 KiB, per channel) and grows
//! geometrically with the bytes received (a frame announced and not sent costs one
//! chunk); a buffer grown over [`KEEP_BUFFER`] is shrunk once its frame is consumed.
//! Descriptors are queued only for frames received so far,
//! at most [`MAX_FDS`] a frame (a prefix still incomplete may carry [`MAX_FDS`]), and
//! the channel reads nothing past a complete frame while a later frame's descriptors
//! are queued, so at most 2 × [`MAX_FDS`] wait in a channel. A peer that breaks a
//! bound gets an error that names it; its descriptors are closed at once and the
//! channel is not used any further.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::payload::{Payload, MAX_SHARED_PAYLOAD, SHARED_THRESHOLD};
use crate::sys::{self, MAX_FDS};

/// Bit of the `fd_count` word that marks a shared (memfd) payload.
pub const SHARED_FLAG: u32 = 1 << 31;

/// Length of the fixed prefix.
pub const PREFIX_LEN: usize = 12;
/// Largest JSON header accepted. The largest legitimate one is a function's error
/// (the Python runtime keeps its encoded error object within 64 KiB).
pub const MAX_HEADER: usize = 128 << 10;
/// Largest payload accepted inline in one frame: larger ones must be shared, as every
/// sprout sender does past [`SHARED_THRESHOLD`].
pub const MAX_PAYLOAD: usize = SHARED_THRESHOLD;
/// Longest frame in the stream: prefix, header and inline payload.
pub const MAX_FRAME: usize = PREFIX_LEN + MAX_HEADER + MAX_PAYLOAD;

/// The room a read is given behind the bytes a channel holds: what a channel may
/// always take without having received anything of the frame's body yet.
pub const READ_CHUNK: usize = 64 << 10;
/// Receive buffers up to this size are kept between frames; a larger one (grown for
/// a large frame) is shrunk as soon as its frame is consumed.
pub const KEEP_BUFFER: usize = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("peer closed the channel")]
    Closed,
    #[error("peer closed the channel in the middle of a frame")]
    Truncated,
    #[error("frame header of {len} bytes exceeds the limit of {max}")]
    HeaderTooLarge { len: usize, max: usize },
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { len: usize, max: usize },
    #[error(
        "inline frame payload of {len} bytes exceeds the limit of {max} (a larger payload \
         goes in a shared memfd)"
    )]
    InlineTooLarge { len: usize, max: usize },
    #[error("frame carries {count} descriptors, at most {max} allowed")]
    TooManyFds { count: usize, max: usize },
    #[error("frame announced {expected} descriptors but {queued} arrived")]
    MissingFds { expected: usize, queued: usize },
    #[error(
        "{queued} descriptors arrived where the frames received so far carry at most {allowed} \
         (a frame's descriptors, at most {max}, come with its first byte)",
        max = MAX_FDS
    )]
    UnexpectedFds { queued: usize, allowed: usize },
    #[error(
        "the kernel truncated the descriptors of a message (more than {max} in one message, \
         or this process is out of descriptors)"
    )]
    FdsTruncated { max: usize },
    #[error("shared payload")]
    Shared(#[source] io::Error),
    #[error("malformed frame header {header:?}")]
    Header {
        header: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected message {op:?} while waiting for {expected}")]
    Unexpected { op: String, expected: &'static str },
    #[error("socket i/o")]
    Io(#[source] io::Error),
}

/// Whether an I/O error means the peer went away (reset, broken pipe, not
/// connected): the one definition of "peer gone" in sprout.
pub fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::NotConnected
    )
}

impl Error {
    /// Whether the peer went away: it closed the channel (between frames or inside
    /// one) or the socket says it is gone ([`is_peer_gone`]).
    pub fn is_peer_gone(&self) -> bool {
        match self {
            Error::Closed | Error::Truncated => true,
            Error::Io(e) => is_peer_gone(e),
            _ => false,
        }
    }
}

/// A received frame.
#[derive(Debug)]
pub struct Message<H> {
    pub header: H,
    /// Inline bytes, or a mapped shared payload (its descriptor is not in `fds`).
    pub payload: Payload,
    pub fds: Vec<OwnedFd>,
}

/// A framed, fd-passing channel over one end of a Unix stream socket.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
    buf: RecvBuf,
    /// Descriptors received for the frames in `buf`, in arrival order.
    fds: VecDeque<OwnedFd>,
    scratch_fds: Vec<OwnedFd>,
}

impl Channel {
    pub fn new(sock: UnixStream) -> Self {
        Channel {
            sock,
            buf: RecvBuf::new(),
            fds: VecDeque::new(),
            scratch_fds: Vec::new(),
        }
    }

    /// A connected pair, both ends close-on-exec.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Channel::new(a), Channel::new(b)))
    }

    pub fn from_fd(fd: OwnedFd) -> Self {
        Channel::new(UnixStream::from(fd))
    }

    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.sock)
    }

    pub fn stream(&self) -> &UnixStream {
        &self.sock
    }

    /// Sends one frame. `header` must serialize to a JSON object. A payload over
    /// [`SHARED_THRESHOLD`] is written to a sealed memfd that goes instead.
    pub fn send<H: Serialize>(
        &self,
        header: &H,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let header = encode_header(header)?;
        if payload.len() > SHARED_THRESHOLD {
            let shared = Payload::share(payload).map_err(Error::Shared)?;
            return self.send_shared(&header, &shared, fds);
        }
        self.send_raw(&header, payload, fds)
    }

    /// Sends one frame with `payload` as it is: a shared payload's descriptor is
    /// passed on (nothing is copied), an inline one goes as [`Channel::send`] sends it.
    pub fn send_payload<H: Serialize>(
        &self,
        header: &H,
        payload: &Payload,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        match payload {
            Payload::Inline(bytes) => self.send(header, bytes, fds),
            Payload::Shared(_) => self.send_shared(&encode_header(header)?, payload, fds),
        }
    }

    fn send_shared(
        &self,
        header: &[u8],
        payload: &Payload,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let memfd = payload.shared_fd().expect("a shared payload");
        if payload.len() > MAX_SHARED_PAYLOAD {
            return Err(Error::PayloadTooLarge {
                len: payload.len(),
                max: MAX_SHARED_PAYLOAD,
            });
        }
        let mut all: Vec<BorrowedFd<'_>> = fds.to_vec();
        all.push(memfd);
        self.send_frame(header, &[], payload.len(), &all, true)
    }

    /// Sends one frame whose header is already encoded, with its payload inline.
    pub fn send_raw(
        &self,
        header: &[u8],
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::InlineTooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        self.send_frame(header, payload, payload.len(), fds, false)
    }

    fn send_frame(
        &self,
        header: &[u8],
        payload: &[u8],
        payload_len: usize,
        fds: &[BorrowedFd<'_>],
        shared: bool,
    ) -> Result<(), Error> {
        if header.len() > MAX_HEADER {
            return Err(Error::HeaderTooLarge {
                len: header.len(),
                max: MAX_HEADER,
            });
        }
        if fds.len() > MAX_FDS {
            return Err(Error::TooManyFds {
                count: fds.len(),
                max: MAX_FDS,
            });
        }
        let prefix = encode_prefix(header.len(), payload_len, fds.len(), shared);
        let parts = [&prefix[..], header, payload];
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let iov = parts.map(IoSlice::new);
        let mut sent = sys::send_with_fds(self.sock.as_fd(), &iov, fds).map_err(Error::Io)?;
        // A stream socket may take less than all of it; the rest goes without descriptors.
        let mut sock = &self.sock;
        for part in parts {
            if sent >= part.len() {
                sent -= part.len();
                continue;
            }
            sock.write_all(&part[sent..]).map_err(Error::Io)?;
            sent = 0;
        }
        debug_assert!(total > 0);
        Ok(())
    }

    /// Blocks until a whole frame has arrived.
    pub fn recv<H: DeserializeOwned>(&mut self) -> Result<Message<H>, Error> {
        loop {
            if let Some(m) = self.try_recv()? {
                return Ok(m);
            }
            if self.fill()? == 0 {
                return Err(if !self.buf.pending().is_empty() {
                    Error::Truncated
                } else {
                    Error::Closed
                });
            }
        }
    }

    /// Returns a frame if one is complete in the buffer; never reads the socket.
    pub fn try_recv<H: DeserializeOwned>(&mut self) -> Result<Option<Message<H>>, Error> {
        let avail = self.buf.pending();
        if avail.len() < PREFIX_LEN {
            return Ok(None);
        }
        let p = decode_prefix(avail)?;
        let total = p.frame_len();
        if avail.len() < total {
            return Ok(None);
        }
        if self.fds.len() < p.fds {
            return Err(Error::MissingFds {
                expected: p.fds,
                queued: self.fds.len(),
            });
        }
        let raw_header = &avail[PREFIX_LEN..PREFIX_LEN + p.header];
        let header = serde_json::from_slice(raw_header).map_err(|source| Error::Header {
            header: String::from_utf8_lossy(&raw_header[..raw_header.len().min(200)]).into_owned(),
            source,
        })?;
        let mut fds: Vec<OwnedFd> = self.fds.drain(..p.fds).collect();
        let payload = if p.shared {
            // The frame is consumed either way: a bad memfd fails this frame only.
            self.buf.consume(total);
            let memfd = fds
                .pop()
                .expect("decode_prefix: a shared frame has a descriptor");
            Payload::map(memfd, p.payload).map_err(Error::Shared)?
        } else {
            Payload::Inline(self.buf.take(PREFIX_LEN + p.header, total))
        };
        Ok(Some(Message {
            header,
            payload,
            fds,
        }))
    }

    /// One read from the socket into the buffer. Returns the bytes read; 0 means the
    /// peer closed. Call it when the socket is readable (or to block for data).
    ///
    /// A channel holding a complete frame reads at most one [`READ_CHUNK`] past it, and
    /// nothing while a later frame's descriptors are queued: then it returns
    /// `Err(Error::Io(WouldBlock))` until the frame is taken with
    /// [`Channel::try_recv`] ([`Channel::recv`] always takes it first).
    pub fn fill(&mut self) -> Result<usize, Error> {
        self.read(false)
    }

    /// Like [`Channel::fill`] but never blocks: `Err(Error::Io(WouldBlock))` when the
    /// socket holds nothing (for event loops).
    pub fn fill_nonblocking(&mut self) -> Result<usize, Error> {
        self.read(true)
    }

    fn read(&mut self, dont_wait: bool) -> Result<usize, Error> {
        let room = self.room()?;
        if room == 0 {
            return Err(Error::Io(io::ErrorKind::WouldBlock.into()));
        }
        self.buf.reserve(room);
        let res = sys::recv_with_fds(
            self.sock.as_fd(),
            self.buf.spare(),
            &mut self.scratch_fds,
            dont_wait,
        );
        self.fds.extend(self.scratch_fds.drain(..));
        let got = res.map_err(Error::Io)?;
        self.buf.filled(got.bytes);
        let checked = if got.truncated {
            Err(Error::FdsTruncated { max: MAX_FDS })
        } else {
            self.check_fds()
        };
        if let Err(e) = checked {
            // The peer broke the descriptor rules: the channel is done, and what it
            // sent is closed now rather than when the channel is dropped.
            self.fds.clear();
            return Err(e);
        }
        Ok(got.bytes)
    }

    /// How many bytes the next read may take: the rest of the frame being read but
    /// no more than has arrived of it (so a buffer grows geometrically with what is
    /// received), and at least a chunk; behind a complete frame, up to one chunk
    /// past it (0 while a later frame's descriptors are queued).
    fn room(&self) -> Result<usize, Error> {
        let have = self.buf.pending();
        if have.len() < PREFIX_LEN {
            return Ok(READ_CHUNK);
        }
        let p = decode_prefix(have)?;
        let (have, frame) = (have.len(), p.frame_len());
        Ok(if have < frame {
            (frame - have).min(have).max(READ_CHUNK)
        } else if self.fds.len() > p.fds {
            0
        } else {
            (frame + READ_CHUNK).saturating_sub(have)
        })
    }

    /// Checks that the queued descriptors are no more than the frames in the buffer
    /// may carry: what each complete prefix announces, and [`MAX_FDS`] for a prefix
    /// still being received.
    fn check_fds(&self) -> Result<(), Error> {
        if self.fds.is_empty() {
            return Ok(());
        }
        let mut allowed = 0;
        let mut rest = self.buf.pending();
        while !rest.is_empty() {
            if rest.len() < PREFIX_LEN {
                allowed += MAX_FDS;
                break;
            }
            let p = decode_prefix(rest)?;
            allowed += p.fds;
            rest = rest.get(p.frame_len()..).unwrap_or_default();
        }
        if self.fds.len() > allowed {
            return Err(Error::UnexpectedFds {
                queued: self.fds.len(),
                allowed,
            });
        }
        Ok(())
    }
}

/// A channel's receive buffer: always initialised, `buf[start..end]` received and not
/// yet consumed.
#[derive(Debug)]
struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    fn new() -> RecvBuf {
        RecvBuf {
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// Received bytes not consumed yet.
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The room behind the pending bytes, for a read.
    fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`RecvBuf::spare`].
    fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Makes at least `room` bytes of room behind the pending bytes: moves them to the
    /// front if that is enough, or else grows the buffer to exactly `pending + room`.
    fn reserve(&mut self, room: usize) {
        if self.buf.len() - self.end >= room {
            return;
        }
        let pending = self.end - self.start;
        if self.buf.len() - pending >= room {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = pending;
            return;
        }
        self.resize(pending + room)
    }

    /// Takes `pending[from..to]` out and consumes `to` bytes. A buffer over
    /// [`KEEP_BUFFER`] that holds nothing else becomes those bytes (moved to its front
    /// and trimmed, not copied to a new allocation).
    fn take(&mut self, from: usize, to: usize) -> Vec<u8> {
        if self.buf.len() <= KEEP_BUFFER || self.end - self.start != to {
            let bytes = self.pending()[from..to].to_vec();
            self.consume(to);
            return bytes;
        }
        let mut bytes = std::mem::take(&mut self.buf);
        bytes.copy_within(self.start + from..self.start + to, 0);
        bytes.truncate(to - from);
        bytes.shrink_to_fit();
        self.start = 0;
        self.end = 0;
        bytes
    }

    /// Drops `n` consumed bytes. A buffer over [`KEEP_BUFFER`] is given back once it is
    /// empty, or shrunk once what it holds fits in a quarter of it.
    fn consume(&mut self, n: usize) {
        self.start += n;
        let pending = self.end - self.start;
        if pending == 0 {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() > KEEP_BUFFER && pending <= self.buf.len() / 4 {
            let len = if pending == 0 {
                0
            } else {
                pending + READ_CHUNK
            };
            self.resize(len);
        }
    }

    /// Moves the pending bytes to the front and makes the buffer `len` (≥ pending)
    /// bytes long. Growing reallocates and zeroes only the new part, once.
    fn resize(&mut self, len: usize) {
        let pending = self.end - self.start;
        debug_assert!(len >= pending);
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
        }
        self.start = 0;
        self.end = pending;
        if len == 0 {
            self.buf = Vec::new();
        } else if len > self.buf.len() {
            self.buf.reserve_exact(len - self.buf.len());
            self.buf.resize(len, 0);
        } else {
            self.buf.truncate(len);
            self.buf.shrink_to_fit();
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

fn encode_header<H: Serialize>(header: &H) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(header).map_err(|source| Error::Header {
        header: String::new(),
        source,
    })
}

fn encode_prefix(header: usize, payload: usize, fds: usize, shared: bool) -> [u8; PREFIX_LEN] {
    let fd_word = fds as u32 | if shared { SHARED_FLAG } else { 0 };
    let mut p = [0u8; PREFIX_LEN];
    p[0..4].copy_from_slice(&(header as u32).to_le_bytes());
    p[4..8].copy_from_slice(&(payload as u32).to_le_bytes());
    p[8..12].copy_from_slice(&fd_word.to_le_bytes());
    p
}

/// A decoded frame prefix.
struct Prefix {
    header: usize,
    payload: usize,
    /// Descriptors, the shared payload's included.
    fds: usize,
    shared: bool,
}

impl Prefix {
    /// Payload bytes that follow the header in the stream.
    fn inline(&self) -> usize {
        if self.shared {
            0
        } else {
            self.payload
        }
    }

    /// The whole frame's length in the stream.
    fn frame_len(&self) -> usize {
        PREFIX_LEN + self.header + self.inline()
    }
}

/// Decodes and bounds-checks a prefix; `Err` only for a prefix that can never be valid.
fn decode_prefix(b: &[u8]) -> Result<Prefix, Error> {
    if b.len() < PREFIX_LEN {
        return Err(Error::Truncated);
    }
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let (h, p, fd_word) = (word(0) as usize, word(4) as usize, word(8));
    let shared = fd_word & SHARED_FLAG != 0;
    let n = (fd_word & !SHARED_FLAG) as usize;
    if h > MAX_HEADER {
        return Err(Error::HeaderTooLarge {
            len: h,
            max: MAX_HEADER,
        });
    }
    if shared && p > MAX_SHARED_PAYLOAD {
        return Err(Error::PayloadTooLarge {
            len: p,
            max: MAX_SHARED_PAYLOAD,
        });
    }
    if !shared && p > MAX_PAYLOAD {
        return Err(Error::InlineTooLarge {
            len: p,
            max: MAX_PAYLOAD,
        });
    }
    if n > MAX_FDS {
        return Err(Error::TooManyFds {
            count: n,
            max: MAX_FDS,
        });
    }
    if shared && n == 0 {
        return Err(Error::MissingFds {
            expected: 1,
            queued: 0,
        });
    }
    Ok(Prefix {
        header: h,
        payload: p,
        fds: n,
        shared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::fs::File;
    use std::io::{Read, Seek};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Hdr {
        op: String,
        n: u32,
    }

    fn hdr(n: u32) -> Hdr {
        Hdr { op: "t".into(), n }
    }

    #[test]
    fn round_trip_header_and_payload() {
        let (a, mut b) = Channel::pair().unwrap();
        a.send(&hdr(7), b"{\"x\":1}", &[]).unwrap();
        let m: Message<Hdr> = b.recv().unwrap();
        assert_eq!(m.header, hdr(7));
        assert_eq!(&*m.payload, b"{\"x\":1}");
        assert!(m.fds.is_empty());
    }

    #[test]
    fn many_frames_in_one_read_keep_their_order() {
        let (a, mut b) = Channel::pair().unwrap();
        for i in 0..100 {
            a.send(&hdr(i), &vec![i as u8; i as usize], &[]).unwrap();
        }
        for i in 0..100 {
            let m: Message<Hdr> = b.recv().unwrap();
            assert_eq!(m.header.n, i);
            assert_eq!(*m.payload, vec![i as u8; i as usize]);
        }
    }

    #[test]
    fn descriptors_follow_their_frame() {
        let (a, mut b) = Channel::pair().unwrap();
        let mut f1 = tempfile::tempfile().unwrap();
        let mut f2 = tempfile::tempfile().unwrap();
        f1.write_all(b"one").unwrap();
        f2.write_all(b"two").unwrap();
        a.send(&hdr(0), b"", &[]).unwrap();
        a.send(&hdr(1), b"p", &[f1.as_fd(), f2.as_fd()]).unwrap();
        a.send(&hdr(2), b"", &[]).unwrap();
        let m0: Message<Hdr> = b.recv().unwrap();
        assert!(m0.fds.is_empty());
        let m1: Message<Hdr> = b.recv().unwrap();
        assert_eq!(m1.fds.len(), 2);
        for (fd, want) in m1.fds.into_iter().zip(["one", "two"]) {
            let mut f = File::from(fd);
            f.rewind().unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            assert_eq!(s, want);
        }
        let m2: Message<Hdr> = b.recv().unwrap();
        assert!(m2.fds.is_empty());
    }

    /// The largest frame the caps allow: a header of exactly [`MAX_HEADER`] bytes
    /// (`hdr(n)` padded) and an inline payload of [`MAX_PAYLOAD`].
    fn largest_frame(n: u32) -> (Vec<u8>, Vec<u8>) {
        let base = serde_json::to_vec(&hdr(n)).unwrap();
        let pad = MAX_HEADER - base.len() - r#","pad":"""#.len();
        let header = format!(
            r#"{}, "pad":"{}"}}"#,
            std::str::from_utf8(&base[..base.len() - 1]).unwrap(),
            "p".repeat(pad - 1)
        )
        .into_bytes();
        assert_eq!(header.len(), MAX_HEADER);
        let payload = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
        (header, payload)
    }

    #[test]
    fn the_largest_frame_crosses_many_reads() {
        let (a, mut b) = Channel::pair().unwrap();
        let (header, big) = largest_frame(1);
        let sender = std::thread::spawn(move || a.send_raw(&header, &big, &[]).map(|_| big));
        let m: Message<Hdr> = b.recv().unwrap();
        let big = sender.join().unwrap().unwrap();
        assert_eq!(m.header, hdr(1));
        assert!(!m.payload.is_shared());
        assert_eq!(*m.payload, big);
    }

    #[test]
    fn a_prefix_over_a_cap_is_refused_by_name_before_its_body() {
        // Finding 4 of issue 9: 64 MiB inline frames half-sent. Refused at the prefix.
        for (prefix, want) in [
            (
                encode_prefix(2, MAX_PAYLOAD + 1, 0, false),
                "inline frame payload of 65537 bytes exceeds the limit of 65536",
            ),
            (
                encode_prefix(2, 64 << 20, 0, false),
                "inline frame payload of 67108864 bytes exceeds the limit of 65536",
            ),
            (
                encode_prefix(MAX_HEADER + 1, 0, 0, false),
                "frame header of 131073 bytes exceeds the limit of 131072",
            ),
            (
                encode_prefix(2, MAX_SHARED_PAYLOAD + 1, 1, true),
                "frame payload of 1073741825 bytes exceeds the limit of 1073741824",
            ),
        ] {
            let (a, mut b) = Channel::pair().unwrap();
            a.stream().write_all(&prefix).unwrap();
            let err = b.recv::<Hdr>().unwrap_err();
            assert!(err.to_string().starts_with(want), "{err}");
            assert!(b.buf.buf.len() <= READ_CHUNK, "{}", b.buf.buf.len());
        }
        // Senders keep to the caps too.
        let (a, _b) = Channel::pair().unwrap();
        let err = a
            .send_raw(br#"{"op":"t","n":0}"#, &[0u8; MAX_PAYLOAD + 1], &[])
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InlineTooLarge {
                    len: 65537,
                    max: 65536
                }
            ),
            "{err:?}"
        );
        let err = a
            .send_raw(&vec![b' '; MAX_HEADER + 1], b"", &[])
            .unwrap_err();
        assert!(matches!(err, Error::HeaderTooLarge { .. }), "{err:?}");
        // `send` puts a payload over the threshold in a memfd, never inline.
        let (a, mut b) = Channel::pair().unwrap();
        a.send(&hdr(2), &[1u8; MAX_PAYLOAD + 1], &[]).unwrap();
        assert!(b.recv::<Hdr>().unwrap().payload.is_shared());
    }

    #[test]
    fn large_payload_goes_through_a_sealed_memfd_and_is_forwarded_without_copy() {
        let (a, mut b) = Channel::pair().unwrap();
        let (c, mut d) = Channel::pair().unwrap();
        let big: Vec<u8> = (0..(3 << 20) + 7).map(|i| (i % 253) as u8).collect();
        a.send(&hdr(1), &big, &[]).unwrap();
        a.send(&hdr(2), b"small", &[]).unwrap();
        let m: Message<Hdr> = b.recv().unwrap();
        assert!(m.payload.is_shared());
        assert!(m.fds.is_empty());
        assert_eq!(*m.payload, big);
        // Passed on as it is: the same memfd, nothing copied.
        c.send_payload(&hdr(3), &m.payload, &[]).unwrap();
        let fwd: Message<Hdr> = d.recv().unwrap();
        assert_eq!(fwd.header, hdr(3));
        assert!(fwd.payload.is_shared());
        assert_eq!(*fwd.payload, big);
        let m2: Message<Hdr> = b.recv().unwrap();
        assert_eq!(
            (&*m2.payload, m2.payload.is_shared()),
            (&b"small"[..], false)
        );
    }

    #[test]
    fn an_unsealed_shared_payload_is_refused() {
        let (a, mut b) = Channel::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 100]).unwrap();
        a.send_frame(br#"{"op":"t","n":0}"#, &[], 100, &[f.as_fd()], true)
            .unwrap();
        let err = b.recv::<Hdr>().unwrap_err();
        assert!(matches!(err, Error::Shared(_)), "{err:?}");
        assert!(
            crate::chain(&err).contains("sealed"),
            "{}",
            crate::chain(&err)
        );
    }

    #[test]
    fn close_between_frames_is_closed_and_inside_a_frame_is_truncated() {
        let (a, mut b) = Channel::pair().unwrap();
        drop(a);
        assert!(matches!(b.recv::<Hdr>(), Err(Error::Closed)));

        let (a, mut b) = Channel::pair().unwrap();
        let mut s = a.stream().try_clone().unwrap();
        s.write_all(&encode_prefix(10, 10, 0, false)).unwrap();
        s.write_all(b"{\"op\"").unwrap();
        drop((a, s));
        assert!(matches!(b.recv::<Hdr>(), Err(Error::Truncated)));
    }

    #[test]
    fn oversized_and_malformed_frames_are_rejected_by_name() {
        let (a, mut b) = Channel::pair().unwrap();
        a.stream()
            .write_all(&encode_prefix(MAX_HEADER + 1, 0, 0, false))
            .unwrap();
        assert!(matches!(b.recv::<Hdr>(), Err(Error::HeaderTooLarge { .. })));

        let (a, mut b) = Channel::pair().unwrap();
        a.send_raw(b"not json", b"", &[]).unwrap();
        let err = b.recv::<Hdr>().unwrap_err();
        assert!(
            matches!(err, Error::Header { ref header, .. } if header == "not json"),
            "{err:?}"
        );

        let (a, mut b) = Channel::pair().unwrap();
        a.stream()
            .write_all(&encode_prefix(2, 0, 1, false))
            .unwrap();
        a.stream().write_all(b"{}").unwrap();
        assert!(matches!(
            b.recv::<Hdr>(),
            Err(Error::MissingFds {
                expected: 1,
                queued: 0
            })
        ));
    }
    /// Reads what the socket holds without blocking; the bytes read.
    fn drain(ch: &mut Channel) -> usize {
        let mut total = 0;
        loop {
            match ch.fill_nonblocking() {
                Ok(0) => return total,
                Ok(n) => total += n,
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return total,
                Err(e) => panic!("fill: {e:?}"),
            }
        }
    }

    #[test]
    fn a_frame_announced_and_not_sent_costs_one_chunk() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut b = Channel::new(b);
        // The attack of issue 9: 12 bytes announcing the largest header and payload,
        // and one byte of the header.
        let mut a = a;
        a.write_all(&encode_prefix(MAX_HEADER, MAX_PAYLOAD, 0, false))
            .unwrap();
        a.write_all(b"{").unwrap();
        assert_eq!(drain(&mut b), PREFIX_LEN + 1);
        assert!(b.try_recv::<Hdr>().unwrap().is_none());
        // Reading again (an event loop woken for nothing) does not grow it either.
        assert_eq!(drain(&mut b), 0);
        assert!(
            b.buf.buf.capacity() < 2 * READ_CHUNK,
            "{} bytes for 13 received",
            b.buf.buf.capacity()
        );
    }

    #[test]
    fn a_slow_sender_grows_the_largest_frame_with_what_arrives() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut b = Channel::new(b);
        let (header, big) = largest_frame(8);
        let mut frame = encode_prefix(header.len(), big.len(), 0, false).to_vec();
        frame.extend_from_slice(&header);
        frame.extend_from_slice(&big);
        // 48 KiB at a time, each read as soon as it is sent: the buffer stays within
        // twice what arrived plus a chunk, and within the largest frame plus a chunk.
        let mut received = 0;
        let mut largest = 0;
        for piece in frame.chunks(48 << 10) {
            a.write_all(piece).unwrap();
            received += drain(&mut b);
            assert_eq!(
                received,
                piece.as_ptr() as usize - frame.as_ptr() as usize + piece.len()
            );
            let cap = b.buf.buf.capacity();
            assert!(
                cap <= 2 * received + READ_CHUNK,
                "{cap} bytes of buffer for {received} received"
            );
            assert!(cap <= MAX_FRAME + READ_CHUNK, "{cap}");
            largest = largest.max(cap);
        }
        assert!(largest > KEEP_BUFFER, "{largest}");
        let m: Message<Hdr> = b.try_recv().unwrap().expect("a whole frame");
        assert_eq!(m.header, hdr(8));
        assert_eq!(*m.payload, big);
        // Consumed: the large buffer is given back.
        assert_eq!(b.buf.buf.len(), 0);
    }

    #[test]
    fn a_flood_of_frames_is_read_one_chunk_past_the_frame_being_taken() {
        let (a, mut b) = Channel::pair().unwrap();
        let n = 2000;
        let sender = std::thread::spawn(move || {
            for i in 0..n {
                a.send(&hdr(i), &[7u8; 1000], &[]).unwrap();
            }
        });
        // An event loop's reader: reads until the socket would block, then takes a
        // frame, as `Instance::try_finish` does.
        let mut got = 0;
        while got < n {
            match b.fill_nonblocking() {
                Ok(0) => {
                    // The sender is done: what is left is buffered.
                    let m: Message<Hdr> = b.try_recv().unwrap().expect("a buffered frame");
                    assert_eq!(m.header.n, got);
                    got += 1;
                }
                Ok(_) => {}
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    match b.try_recv::<Hdr>().unwrap() {
                        Some(m) => {
                            assert_eq!(m.header.n, got);
                            got += 1;
                        }
                        None => {
                            let mut fds = [nix::poll::PollFd::new(
                                b.as_fd(),
                                nix::poll::PollFlags::POLLIN,
                            )];
                            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16))
                                .unwrap();
                        }
                    }
                }
                Err(e) => panic!("{e:?}"),
            }
            let pending = b.buf.pending().len();
            assert!(pending <= PREFIX_LEN + 1100 + 2 * READ_CHUNK, "{pending}");
            assert!(b.buf.buf.len() <= 2 * READ_CHUNK, "{}", b.buf.buf.len());
        }
        sender.join().unwrap();
    }

    /// A pipe whose write end is sent; its read end sees EOF once every copy is closed.
    fn pipe_nonblocking() -> (File, OwnedFd) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        (File::from(r), w)
    }

    /// Whether every copy of the pipe's write end is closed (the read end sees EOF).
    fn all_closed(r: &mut File) -> bool {
        let mut byte = [0u8; 1];
        matches!(r.read(&mut byte), Ok(0))
    }

    fn send_bytes_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let n = sys::send_with_fds(sock.as_fd(), &[IoSlice::new(bytes)], fds).unwrap();
        assert_eq!(n, bytes.len());
    }

    #[test]
    fn descriptors_behind_an_unfinished_header_drop_the_channel_and_are_closed() {
        // The attack of issue 9: one-byte sends carrying MAX_FDS descriptors each.
        let (a, mut b) = Channel::pair().unwrap();
        let (mut r, w) = pipe_nonblocking();
        let eight = [w.as_fd(); MAX_FDS];
        let prefix = encode_prefix(MAX_HEADER, 0, MAX_FDS, false);
        // The prefix's first byte may carry a frame's worth...
        send_bytes_with_fds(a.stream(), &prefix[..1], &eight);
        assert_eq!(b.fill().unwrap(), 1);
        assert_eq!(b.fds.len(), MAX_FDS);
        // ... and no more.
        send_bytes_with_fds(a.stream(), &prefix[1..2], &eight);
        let err = b.fill().unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnexpectedFds {
                    queued: 16,
                    allowed: 8
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("at most 8"), "{err}");
        assert!(b.fds.is_empty());
        drop(w);
        assert!(all_closed(&mut r), "the channel still holds a descriptor");

        // A prefix that announces none, then a byte of its header with one.
        let (a, mut b) = Channel::pair().unwrap();
        let (mut r, w) = pipe_nonblocking();
        a.stream()
            .write_all(&encode_prefix(100, 0, 0, false))
            .unwrap();
        assert_eq!(b.fill().unwrap(), PREFIX_LEN);
        send_bytes_with_fds(a.stream(), b"{", &[w.as_fd()]);
        let err = b.fill().unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnexpectedFds {
                    queued: 1,
                    allowed: 0
                }
            ),
            "{err:?}"
        );
        drop(w);
        assert!(all_closed(&mut r), "the channel still holds a descriptor");
    }

    #[test]
    fn descriptors_without_a_frame_or_over_the_cap_drop_the_channel() {
        // Descriptors behind a complete frame, with no frame of their own.
        let (a, mut b) = Channel::pair().unwrap();
        let (mut r, w) = pipe_nonblocking();
        let mut frame = encode_prefix(2, 0, 0, false).to_vec();
        frame.extend_from_slice(b"{}");
        a.stream().write_all(&frame).unwrap();
        // The same frame again, but the descriptor goes with its last byte.
        send_bytes_with_fds(a.stream(), &frame[..13], &[]);
        send_bytes_with_fds(a.stream(), &frame[13..], &[w.as_fd()]);
        let err = loop {
            match b.fill() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(
                err,
                Error::UnexpectedFds {
                    queued: 1,
                    allowed: 0
                }
            ),
            "{err:?}"
        );
        drop(w);
        assert!(all_closed(&mut r));

        // More than MAX_FDS in one message: the kernel truncates them, the channel says so.
        let (a, mut b) = Channel::pair().unwrap();
        let (mut r, w) = pipe_nonblocking();
        let nine = [w.as_fd(); MAX_FDS + 1];
        let mut frame = encode_prefix(2, 0, MAX_FDS + 1, false).to_vec();
        frame.extend_from_slice(b"{}");
        send_bytes_with_fds(a.stream(), &frame, &nine);
        let err = b.fill().unwrap_err();
        assert!(
            matches!(err, Error::FdsTruncated { max: MAX_FDS }),
            "{err:?}"
        );
        assert!(b.fds.is_empty());
        drop(w);
        assert!(all_closed(&mut r));
    }

    #[test]
    fn a_later_frames_descriptors_stop_reading_until_the_first_is_taken() {
        let (a, mut b) = Channel::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        for i in 0..4 {
            a.send(&hdr(i), b"", &[f.as_fd(); MAX_FDS]).unwrap();
        }
        // Each message's descriptors end a read; the second frame's stop the reads.
        assert!(b.fill_nonblocking().unwrap() > 0);
        assert!(b.fill_nonblocking().unwrap() > 0);
        let err = b.fill_nonblocking().unwrap_err();
        assert!(
            matches!(err, Error::Io(ref e) if e.kind() == io::ErrorKind::WouldBlock),
            "{err:?}"
        );
        assert_eq!(b.fds.len(), 2 * MAX_FDS);
        for i in 0..4 {
            let m: Message<Hdr> = b.recv().unwrap();
            assert_eq!((m.header.n, m.fds.len()), (i, MAX_FDS));
        }
    }
}
