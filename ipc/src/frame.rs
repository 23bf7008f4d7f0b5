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
/// Largest JSON header accepted.
pub const MAX_HEADER: usize = 1 << 20;
/// Largest payload accepted inline in one frame (larger ones must be shared).
pub const MAX_PAYLOAD: usize = 64 << 20;

const READ_CHUNK: usize = 64 << 10;
/// A buffer grown past this for a large frame is given back once it is empty.
const KEEP_BUFFER: usize = 1 << 20;

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
    #[error("frame carries {count} descriptors, at most {max} allowed")]
    TooManyFds { count: usize, max: usize },
    #[error("frame announced {expected} descriptors but {queued} arrived")]
    MissingFds { expected: usize, queued: usize },
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
    /// Always initialised; `buf[start..end]` is received and not yet consumed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    fds: VecDeque<OwnedFd>,
    scratch_fds: Vec<OwnedFd>,
}

impl Channel {
    pub fn new(sock: UnixStream) -> Self {
        Channel {
            sock,
            buf: Vec::new(),
            start: 0,
            end: 0,
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
            return Err(Error::PayloadTooLarge {
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
                return Err(if self.end > self.start {
                    Error::Truncated
                } else {
                    Error::Closed
                });
            }
        }
    }

    /// Returns a frame if one is complete in the buffer; never reads the socket.
    pub fn try_recv<H: DeserializeOwned>(&mut self) -> Result<Option<Message<H>>, Error> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < PREFIX_LEN {
            return Ok(None);
        }
        let p = decode_prefix(avail)?;
        let total = PREFIX_LEN + p.header + p.inline();
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
            self.consume(total);
            let memfd = fds
                .pop()
                .expect("decode_prefix: a shared frame has a descriptor");
            Payload::map(memfd, p.payload).map_err(Error::Shared)?
        } else {
            let bytes = avail[PREFIX_LEN + p.header..total].to_vec();
            self.consume(total);
            Payload::Inline(bytes)
        };
        Ok(Some(Message {
            header,
            payload,
            fds,
        }))
    }

    fn consume(&mut self, total: usize) {
        self.start += total;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > KEEP_BUFFER {
                self.buf = Vec::new();
            }
        }
    }

    /// One read from the socket into the buffer. Returns the bytes read; 0 means the
    /// peer closed. Call it when the socket is readable (or to block for data).
    pub fn fill(&mut self) -> Result<usize, Error> {
        self.read(false)
    }

    /// Like [`Channel::fill`] but never blocks: `Err(Error::Io(WouldBlock))` when the
    /// socket holds nothing (for event loops).
    pub fn fill_nonblocking(&mut self) -> Result<usize, Error> {
        self.read(true)
    }

    fn read(&mut self, dont_wait: bool) -> Result<usize, Error> {
        // Make room behind the data for this read (the rest of the frame being
        // read, or a chunk): move pending bytes to the front, grow if still short.
        let pending = self.end - self.start;
        let want = match decode_prefix(&self.buf[self.start..self.end]) {
            Ok(p) => (PREFIX_LEN + p.header + p.inline())
                .saturating_sub(pending)
                .max(READ_CHUNK),
            Err(_) => READ_CHUNK,
        };
        if self.buf.len() - self.end < want {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = pending;
            if self.buf.len() < pending + want {
                self.buf.resize(pending + want, 0);
            }
        }
        let res = sys::recv_with_fds(
            self.sock.as_fd(),
            &mut self.buf[self.end..],
            &mut self.scratch_fds,
            dont_wait,
        );
        self.fds.extend(self.scratch_fds.drain(..));
        let n = res.map_err(Error::Io)?;
        self.end += n;
        Ok(n)
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
    let max = if shared {
        MAX_SHARED_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    if p > max {
        return Err(Error::PayloadTooLarge { len: p, max });
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

    #[test]
    fn large_payload_crosses_many_reads() {
        let (a, mut b) = Channel::pair().unwrap();
        let big: Vec<u8> = (0..(5 << 20)).map(|i| (i % 251) as u8).collect();
        let sender =
            std::thread::spawn(move || a.send_raw(br#"{"op":"t","n":1}"#, &big, &[]).map(|_| big));
        let m: Message<Hdr> = b.recv().unwrap();
        let big = sender.join().unwrap().unwrap();
        assert!(!m.payload.is_shared());
        assert_eq!(*m.payload, big);
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
}
