"""The frame codec: ``Channel``, a framed, fd-passing channel over a Unix stream
socket, byte-for-byte compatible with ipc/src/frame.rs (the layout is in the
package's docstring and docs/protocol.md)."""

import array
import collections
import errno
import fcntl
import json
import mmap
import os
import re
import socket
import struct
import time

PREFIX = struct.Struct("<III")
PREFIX_LEN = PREFIX.size
# Largest JSON header (the largest a sprout sender makes is an error: see _MAX_ERROR).
MAX_HEADER = 128 << 10
# Payloads larger than this are sent in a sealed memfd instead of the stream.
SHARED_THRESHOLD = 64 << 10
# Largest payload carried inline, in the stream: no frame needs more.
MAX_PAYLOAD = SHARED_THRESHOLD
# Largest payload carried in a shared memfd.
MAX_SHARED_PAYLOAD = 1 << 30
MAX_FDS = 8
# Bit of the fd_count word that marks a shared (memfd) payload.
SHARED_FLAG = 1 << 31

# A channel starts with a buffer this small and grows it to what a frame needs: a
# zygote's and an idle instance's channels then hold a page each, not 64 KiB of
# zeroed (touched, so private) memory.
_FIRST_READ = 4096
# A buffer grown for one large frame is dropped once it is empty again.
_KEEP_BUFFER = 1 << 20
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_FD_SIZE = array.array("i").itemsize
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# What a receiver insists on: nobody may change the bytes or truncate the file
# (which would turn reads of the mapping into SIGBUS).
_NEEDED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK
# recvmsg's flags as plain ints: ``flags & socket.MSG_CTRUNC`` would go through the
# IntFlag enum's Python-level ``__and__`` on every read.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_CTRUNC = int(socket.MSG_CTRUNC)
_DONTWAIT = int(socket.MSG_DONTWAIT)

_dumps = json.JSONEncoder(separators=(",", ":")).encode
# An event's or a result's JSON text, as ``json.dumps(value, separators=(",", ":"),
# allow_nan=False)`` (one encoder made once, not one per call).
dumps_value = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode

# The headers of an invocation and of its result, which every call and every warm
# invoke sends, are encoded and decoded here without the json module: the same JSON
# object json would make (its bytes, keys in the order "op", "id", "depth"), and a
# header read this way is the dict json.loads would return. Every other header goes
# through json. (In a process that just woke up, the json module's encode or decode
# of a header costs 3 to 5 µs; a call has four.)
_UINT = rb"(0|[1-9][0-9]{0,19})"
_INVOKE_HEADER = re.compile(rb'\{"op":"invoke","id":' + _UINT + rb'(?:,"depth":' + _UINT + rb')?\}')
_RETURNED_HEADER = re.compile(rb'\{"op":"returned","id":' + _UINT + rb"\}")


def encode_header(header):
    """A frame header's bytes: compact JSON."""
    if type(header) is dict:
        size, op, rid = len(header), header.get("op"), header.get("id")
        if type(rid) is int:  # not a bool; an int's digits are its JSON
            if op == "returned" and size == 2:
                return b'{"op":"returned","id":%d}' % rid
            if op == "invoke":
                depth = header.get("depth")
                if size == 2:
                    return b'{"op":"invoke","id":%d}' % rid
                if size == 3 and type(depth) is int:
                    return b'{"op":"invoke","id":%d,"depth":%d}' % (rid, depth)
    return _dumps(header).encode()


def decode_header(buf, start=0, end=None):
    """The header in ``buf[start:end]`` (a bytes-like object), as a dict;
    ProtocolError when it is not a JSON object."""
    if end is None:
        end = len(buf)
    m = _RETURNED_HEADER.fullmatch(buf, start, end)
    if m is not None:
        return {"op": "returned", "id": int(m[1])}
    m = _INVOKE_HEADER.fullmatch(buf, start, end)
    if m is not None:
        if m[2] is None:
            return {"op": "invoke", "id": int(m[1])}
        return {"op": "invoke", "id": int(m[1]), "depth": int(m[2])}
    raw = bytes(memoryview(buf)[start:end])
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON; or nested too deep
        raise ProtocolError(f"malformed frame header {raw[:200]!r}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"frame header is not a JSON object: {raw[:200]!r}")
    return header


class ProtocolError(Exception):
    """The peer broke the framing rules (limits, truncation, malformed header)."""


class ChannelClosed(EOFError):
    """The peer closed the channel between two frames."""


class SharedPayloadError(Exception):
    """A payload could not be put in a sealed memfd (memfd_create, write or seal failed).

    Raised by ``Channel.send`` before anything is written to the socket.
    """


def _decode_prefix(buf, at):
    """Returns ``(header_len, payload_len, fd_count, shared)`` of a bounds-checked prefix."""
    hlen, plen, fd_word = PREFIX.unpack_from(buf, at)
    shared = bool(fd_word & SHARED_FLAG)
    nfds = fd_word & ~SHARED_FLAG
    if hlen > MAX_HEADER:
        raise ProtocolError(f"frame header of {hlen} bytes exceeds the limit of {MAX_HEADER}")
    if shared and plen > MAX_SHARED_PAYLOAD:
        raise ProtocolError(f"frame payload of {plen} bytes exceeds the limit of {MAX_SHARED_PAYLOAD}")
    if not shared and plen > MAX_PAYLOAD:
        raise ProtocolError(f"inline frame payload of {plen} bytes exceeds the limit of {MAX_PAYLOAD} "
                            "(a larger payload goes in a shared memfd)")
    if nfds > MAX_FDS:
        raise ProtocolError(f"frame carries {nfds} descriptors, at most {MAX_FDS} allowed")
    if shared and nfds == 0:
        raise ProtocolError("frame announced a shared payload but carries no descriptor")
    return hlen, plen, nfds, shared


def timeval(seconds):
    """A ``struct timeval`` of ``seconds`` (> 0) for SO_RCVTIMEO/SO_SNDTIMEO, at
    least 1 µs: zero would mean no timeout at all."""
    usec = max(int(seconds * 1_000_000), 1)
    return struct.pack("@ll", usec // 1_000_000, usec % 1_000_000)


def _time_left(deadline):
    """Seconds left until ``deadline`` (``time.monotonic()``); TimeoutError when none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the peer did not read in time")
    return left


def _seal(fd):
    """Seals a written memfd. F_SEAL_WRITE fails with EBUSY while the kernel still
    holds an extra reference on a page just written (after waiting ~75 ms itself):
    transient, so retried a few times, 1 to 32 ms apart (as ipc::sys::seal)."""
    pause = 0.001
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or pause > 0.032:
                raise
            time.sleep(pause)
            pause *= 2


def _share(view):
    """Copies ``view`` (a byte memoryview) into a new sealed memfd; returns its descriptor."""
    try:
        fd = os.memfd_create("sprout-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise SharedPayloadError(f"memfd_create: {exc}") from exc
    try:
        done, total = 0, len(view)
        while done < total:
            done += os.write(fd, view[done:])
        _seal(fd)
    except OSError as exc:
        os.close(fd)
        raise SharedPayloadError(f"writing a shared payload of {len(view)} bytes: {exc}") from exc
    return fd


class Buffer(mmap.mmap):
    """Shared memory a function fills in place and hands off without a copy
    (``sprout.buffer(size)``): a memfd of ``size`` bytes, allocated in full when made
    (charged to the function's own memory cgroup, so running out is a MemoryError
    here, not a kill later), mapped read-write. It is an ``mmap``: slice-assign,
    ``write``, ``memoryview`` and ``readinto`` fill it.

    Passing it as an event to ``sprout.call`` (or returning it from a handler) hands
    it off: its mapping is closed (every memoryview of it must be released first),
    the memfd sealed, and the memfd itself sent, so the receiver maps the very pages
    the function wrote. After that it can no longer be read or written here; it can be
    handed off again (to another call) at no cost. Every byte must be written before
    the hand-off (SharedPayloadError otherwise): receivers outside the sandbox refuse
    pages that were never written.
    """

    def __new__(cls, size):
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"a buffer's size must be an int, not {type(size).__name__}")
        if not 0 < size <= MAX_SHARED_PAYLOAD:
            raise ValueError(f"a buffer's size must be 1 to {MAX_SHARED_PAYLOAD} bytes, not {size}")
        fd = os.memfd_create("sprout-buffer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            self = super().__new__(cls, fd, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOMEM, errno.ENOSPC):
                raise MemoryError(f"cannot allocate a buffer of {size} bytes: {exc.strerror}") from None
            raise
        self._memfd = fd
        self._size = size
        return self

    def __del__(self):
        _close_quietly(self._memfd)

    def __len__(self):
        # Still the buffer's size once its mapping is closed (handed off).
        return self._size

    def __repr__(self):
        state = "handed off" if self.closed else "open"
        return f"<sprout.Buffer {self._size} bytes, {state}>"

    def _hand_off(self):
        """Closes the mapping and seals the memfd (once); returns the memfd, still
        this buffer's. SharedPayloadError when it cannot be handed off."""
        if not self.closed:
            # What receivers outside the sandbox refuse (pages never written are
            # holes), refused here with the reason instead.
            hole = os.lseek(self._memfd, 0, os.SEEK_HOLE)
            if hole < self._size:
                raise SharedPayloadError(
                    f"a buffer of {self._size} bytes is handed off written in full: "
                    f"bytes from {hole} on were never written"
                )
            try:
                self.close()
            except BufferError:
                raise SharedPayloadError(
                    "a buffer is handed off with every memoryview of it released "
                    "(release them, or leave the with-block, before sending it)"
                ) from None
            try:
                _seal(self._memfd)
            except OSError as exc:
                raise SharedPayloadError(f"sealing a buffer of {self._size} bytes: {exc}") from exc
        return self._memfd


def _map_shared(fd, length):
    """Maps the first ``length`` bytes of a received memfd read-only, after checking it
    is sealed against writing and shrinking and long enough. Closes ``fd``."""
    try:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            raise ProtocolError(f"shared payload: the descriptor is not sealed (not a memfd: {exc})") from None
        if seals & _NEEDED_SEALS != _NEEDED_SEALS:
            raise ProtocolError("shared payload: the memfd is not sealed against writing and shrinking")
        size = os.fstat(fd).st_size
        if size < length:
            raise ProtocolError(f"shared payload: the memfd holds {size} bytes, the frame announced {length}")
        if length == 0:
            return b""
        try:
            # mmap keeps a descriptor of its own (a dup) until the mapping is collected.
            return mmap.mmap(fd, length, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"shared payload: cannot map {length} bytes: {exc}") from None
    finally:
        _close_quietly(fd)


class Channel:
    """A framed, fd-passing channel over one end of a Unix stream socket.

    ``recv()`` returns ``(header_dict, payload, [fds])``; the caller owns the returned
    descriptors. ``payload`` is ``bytes`` when it came inline and a read-only
    ``mmap.mmap`` when it came shared (its memfd is not among the descriptors); both
    support the buffer protocol (``memoryview(payload)``, ``str(payload, "utf-8")``).
    ``send(header, payload=b"", fds=())`` sends one frame; ``payload`` is anything
    with the buffer protocol, and goes shared when it is over SHARED_THRESHOLD.
    """

    __slots__ = ("sock", "_buf", "_start", "_end", "_fds")

    def __init__(self, sock):
        self.sock = sock
        self._buf = bytearray(_FIRST_READ)
        self._start = 0  # first unconsumed byte
        self._end = 0  # end of received bytes
        self._fds = collections.deque()

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        """Closes the socket and every descriptor received but not yet handed out."""
        while self._fds:
            _close_quietly(self._fds.popleft())
        self.sock.close()

    # -- sending

    def send(self, header, payload=b"", fds=(), deadline=None):
        """Sends one frame. Limits are checked, and a shared payload's memfd is made,
        before anything is written (ProtocolError, SharedPayloadError); an OSError
        comes from the socket.

        ``deadline`` (a ``time.monotonic()`` time), for a blocking socket: what the
        socket's buffer does not take at once is sent by then, or TimeoutError."""
        hdr = encode_header(header)
        if len(hdr) > MAX_HEADER:
            raise ProtocolError(f"frame header of {len(hdr)} bytes exceeds the limit of {MAX_HEADER}")
        fds = [fd if isinstance(fd, int) else fd.fileno() for fd in fds]
        if isinstance(payload, Buffer):
            self._send_buffer(hdr, payload, fds, deadline)
            return
        view = memoryview(payload)
        try:
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")  # TypeError for a non-contiguous buffer
            plen = len(view)
            if plen <= SHARED_THRESHOLD:
                self._send_frame(hdr, view, plen, fds, False, deadline)
                return
            if plen > MAX_SHARED_PAYLOAD:
                raise ProtocolError(f"frame payload of {plen} bytes exceeds the limit of {MAX_SHARED_PAYLOAD}")
            if len(fds) + 1 > MAX_FDS:
                raise ProtocolError(f"frame carries {len(fds) + 1} descriptors, at most {MAX_FDS} allowed")
            memfd = _share(view)
            try:
                self._send_frame(hdr, b"", plen, fds + [memfd], True, deadline)
            finally:
                os.close(memfd)
        finally:
            view.release()

    def _send_buffer(self, hdr, buffer, fds, deadline):
        """Sends a Buffer's own memfd as the frame's shared payload (a small one, while
        it is still open, inline)."""
        if len(fds) + 1 > MAX_FDS:
            raise ProtocolError(f"frame carries {len(fds) + 1} descriptors, at most {MAX_FDS} allowed")
        plen = len(buffer)
        if plen <= SHARED_THRESHOLD and not buffer.closed:
            with memoryview(buffer) as view:
                self._send_frame(hdr, view, plen, fds, False, deadline)
            return
        self._send_frame(hdr, b"", plen, fds + [buffer._hand_off()], True, deadline)

    def _send_frame(self, hdr, payload, plen, fds, shared, deadline):
        if len(fds) > MAX_FDS:
            raise ProtocolError(f"frame carries {len(fds)} descriptors, at most {MAX_FDS} allowed")
        head = PREFIX.pack(len(hdr), plen, len(fds) | (SHARED_FLAG if shared else 0)) + hdr
        inline = 0 if shared else plen
        if not fds:  # one buffer, one send(2): cheaper than sendmsg's vector
            if inline:
                head += payload
            self._send_all(head, deadline)
            return
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        if deadline is None:
            sent = self.sock.sendmsg([head, payload] if inline else [head], anc)
        else:
            # The descriptors go with the first byte, in one sendmsg(2): bounded by
            # the kernel's send timeout, set to the time left.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(_time_left(deadline)))
            try:
                sent = self.sock.sendmsg([head, payload] if inline else [head], anc)
            except BlockingIOError:
                raise TimeoutError("the peer did not read in time") from None
        # A stream socket may take less than all of it; the rest goes without descriptors.
        if sent < len(head):
            self._send_all(memoryview(head)[sent:], deadline)
            sent = len(head)
        if sent < len(head) + inline:
            self._send_all(payload[sent - len(head):], deadline)

    def _send_all(self, data, deadline):
        """Writes all of ``data``. With a ``deadline``, on a blocking socket: one
        send(2) that does not wait, and only when the socket's buffer is full, the
        rest with a Python timeout for the time left (a kernel send timeout would
        start again with every partial write)."""
        sock = self.sock
        if deadline is None:
            sock.sendall(data)
            return
        try:
            sent = sock.send(data, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        sock.settimeout(_time_left(deadline))
        try:
            sock.sendall(memoryview(data)[sent:])
        finally:
            sock.settimeout(None)

    # -- receiving

    def recv(self):
        """Blocks until a whole frame has arrived.

        Raises ChannelClosed at a clean end of stream, ProtocolError for a broken frame.
        """
        while True:
            frame = self.try_recv()
            if frame is not None:
                return frame
            if self.fill() == 0:
                if self._end > self._start:
                    raise ProtocolError("peer closed the channel in the middle of a frame")
                raise ChannelClosed("peer closed the channel")

    def try_recv(self):
        """Returns a frame if one is complete in the buffer (else None); never reads
        the socket. A shared frame is consumed even when its memfd is refused, so only
        that frame fails."""
        avail = self._end - self._start
        if avail < PREFIX_LEN:
            return None
        hlen, plen, nfds, shared = _decode_prefix(self._buf, self._start)
        total = PREFIX_LEN + hlen + (0 if shared else plen)
        if avail < total:
            return None
        return self._take(hlen, plen, nfds, shared, total)

    def fill(self):
        """One read from the socket into the buffer; returns the bytes read (0 means the
        peer closed). Blocks until the socket has data."""
        want = max(_FIRST_READ, len(self._buf) - self._end)
        if self._end - self._start >= PREFIX_LEN:
            try:
                hlen, plen, _, shared = _decode_prefix(self._buf, self._start)
            except ProtocolError:
                pass
            else:
                rest = PREFIX_LEN + hlen + (0 if shared else plen) - (self._end - self._start)
                want = max(rest, _FIRST_READ)
        return self._fill(want)

    def _fill(self, want):
        """One recvmsg of up to ``want`` bytes; returns the bytes read (0 at end of stream)."""
        buf = self._buf
        if len(buf) - self._end < want:
            # Not enough room behind the data: move the pending bytes to the front of
            # a buffer that fits them plus this read.
            avail = self._end - self._start
            size = avail + want
            if len(buf) >= size:
                # The slice is a copy, so source and destination never overlap.
                buf[:avail] = buf[self._start:self._end]
            else:
                new = bytearray(size)
                new[:avail] = memoryview(buf)[self._start:self._end]
                self._buf = buf = new
            self._start, self._end = 0, avail
        view = memoryview(buf)[self._end:self._end + want]
        try:
            n, anc, flags, _ = self.sock.recvmsg_into([view], _ANC_SPACE, _RECV_FLAGS)
        finally:
            view.release()
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
                self._fds.extend(fds)
        if flags & _CTRUNC:
            raise ProtocolError("descriptors were lost: control message truncated")
        self._end += n
        return n

    def _take(self, hlen, plen, nfds, shared, total):
        if len(self._fds) < nfds:
            raise ProtocolError(f"frame announced {nfds} descriptors but {len(self._fds)} arrived")
        buf = self._buf
        at = self._start + PREFIX_LEN
        header = decode_header(buf, at, at + hlen)
        if shared:
            payload = b""
        else:
            with memoryview(buf) as mv:
                payload = bytes(mv[at + hlen:self._start + total])
        fds = [self._fds.popleft() for _ in range(nfds)]
        self._start += total
        if self._start == self._end:
            self._start = self._end = 0
            if len(buf) > _KEEP_BUFFER:
                self._buf = bytearray(_FIRST_READ)
        if shared:
            memfd = fds.pop()
            try:
                payload = _map_shared(memfd, plen)
            except ProtocolError:
                for fd in fds:
                    _close_quietly(fd)
                raise
        return header, payload, fds


def _close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass

