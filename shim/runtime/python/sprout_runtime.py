"""sprout's Python runtime: a zygote that forks function instances.

Run as ``python3 -I -B /.sprout/python/sprout_runtime.py`` by the shim, with its
control channel to the shim inherited as fd 3 (a connected AF_UNIX stream socket).
Importing this file has no side effects; the zygote starts only when it is run as
a script.

Every message on every channel is a frame (all integers little-endian)::

    u32 header_len | u32 payload_len | u32 fd_count | header (UTF-8 JSON object) | payload

with ``fd_count`` descriptors passed by SCM_RIGHTS on the sendmsg that carries the
frame's first byte. Bit 31 of ``fd_count`` marks a *shared* payload: it is not in
the stream but the first ``payload_len`` bytes of the frame's last descriptor, a
memfd sealed against writing, resizing and further sealing (the low 31 bits count
the descriptors, that one included). Payloads over 64 KiB go that way. This must
stay byte-for-byte compatible with ipc/src/frame.rs.

Zygote (fd 3, talking to the shim)::

    zygote -> shim   {"op":"ready","pid":P}
    shim -> zygote   {"op":"fork","instance":N,"runtime":"python"}
                     + fds [instance channel, stdout write end, stderr write end,
                            calls channel]
    zygote -> shim   {"op":"forked","instance":N,"pid":P}
                   | {"op":"fork_failed","instance":N,"message":..}

Instance (its own channel: the shim's, then the agent's)::

    instance -> shim   {"op":"ready"}                      (a spare, set up)
    agent -> instance  {"op":"load","function":..,"code_dir":..,
                        "handler":{"module":..,"function":..}}
    instance -> agent  {"op":"loaded"} | {"op":"load_failed","error":E}   (then exits 1)
    agent -> instance  {"op":"invoke","id":K,"depth":D?,"raw":bool?} + payload = event
    instance -> agent  {"op":"returned","id":K,"raw":bool?,"called":true?} + payload = result
                     | {"op":"raised","id":K,"error":E,"called":true?}
    E = {"type":"ValueError","message":..,"traceback":..}

An event or a result is JSON text, or with ``raw`` bytes: a raw event reaches the
handler as a read-only ``memoryview``, and a handler that returns ``bytes``,
``bytearray`` or a ``memoryview`` answers raw. ``called`` says the handler called
other functions.

Calls between functions (the ``sprout`` module every instance can import)::

    instance -> agent  {"op":"resolve","id":N,"function":F}          (call socket)
    agent -> instance  {"op":"resolved","id":N,"spec":S|null}
    instance -> shim   {"op":"call","id":N,"function":F,"depth":D,"raw":bool?,"spec":S}
                       + event                                   (calls channel)
    instance -> agent  {"op":"call","id":N,"function":F,"depth":D,"raw":bool?}
                       + event                                   (call socket)
    shim/agent -> instance
                       {"op":"call_returned","id":N,"raw":bool?} + result
                     | {"op":"call_raised","id":N,"function":F,"error":E}
                     | {"op":"call_failed","id":N,"function":F,"message":..}
                     | {"op":"call_refused","id":N,"function":F,"kind":K,"message":..}
                                                                 (agent only)

The calls channel is the fourth descriptor of ``fork``; the call socket is
``/.sprout/agent.sock``, connected on first use, where replies may come in any order.

Standard library only.
"""

import array
import collections
import fcntl
import gc
import importlib
import importlib.machinery
import importlib.util
import itertools
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types

# --------------------------------------------------------------------------- framing

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

_READ_CHUNK = 64 << 10
# A buffer grown for one large frame is dropped once it is empty again.
_KEEP_BUFFER = 1 << 20
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_FD_SIZE = array.array("i").itemsize
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# What a receiver insists on: nobody may change the bytes or truncate the file
# (which would turn reads of the mapping into SIGBUS).
_NEEDED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK

_dumps = json.JSONEncoder(separators=(",", ":")).encode


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
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except OSError as exc:
        os.close(fd)
        raise SharedPayloadError(f"writing a shared payload of {len(view)} bytes: {exc}") from exc
    return fd


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
        self._buf = bytearray(_READ_CHUNK)
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

    def send(self, header, payload=b"", fds=()):
        """Sends one frame. Limits are checked, and a shared payload's memfd is made,
        before anything is written (ProtocolError, SharedPayloadError); an OSError
        comes from the socket."""
        hdr = _dumps(header).encode()
        if len(hdr) > MAX_HEADER:
            raise ProtocolError(f"frame header of {len(hdr)} bytes exceeds the limit of {MAX_HEADER}")
        fds = [fd if isinstance(fd, int) else fd.fileno() for fd in fds]
        view = memoryview(payload)
        try:
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")  # TypeError for a non-contiguous buffer
            plen = len(view)
            if plen <= SHARED_THRESHOLD:
                self._send_frame(hdr, view, plen, fds, False)
                return
            if plen > MAX_SHARED_PAYLOAD:
                raise ProtocolError(f"frame payload of {plen} bytes exceeds the limit of {MAX_SHARED_PAYLOAD}")
            if len(fds) + 1 > MAX_FDS:
                raise ProtocolError(f"frame carries {len(fds) + 1} descriptors, at most {MAX_FDS} allowed")
            memfd = _share(view)
            try:
                self._send_frame(hdr, b"", plen, fds + [memfd], True)
            finally:
                os.close(memfd)
        finally:
            view.release()

    def _send_frame(self, hdr, payload, plen, fds, shared):
        if len(fds) > MAX_FDS:
            raise ProtocolError(f"frame carries {len(fds)} descriptors, at most {MAX_FDS} allowed")
        head = PREFIX.pack(len(hdr), plen, len(fds) | (SHARED_FLAG if shared else 0)) + hdr
        inline = 0 if shared else plen
        anc = []
        if fds:
            anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)))
        sent = self.sock.sendmsg([head, payload] if inline else [head], anc)
        # A stream socket may take less than all of it; the rest goes without descriptors.
        if sent < len(head):
            self.sock.sendall(memoryview(head)[sent:])
            sent = len(head)
        if sent < len(head) + inline:
            self.sock.sendall(payload[sent - len(head):])

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
        want = _READ_CHUNK
        if self._end - self._start >= PREFIX_LEN:
            try:
                hlen, plen, _, shared = _decode_prefix(self._buf, self._start)
            except ProtocolError:
                pass
            else:
                rest = PREFIX_LEN + hlen + (0 if shared else plen) - (self._end - self._start)
                want = max(rest, _READ_CHUNK)
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
            n, anc, flags, _ = self.sock.recvmsg_into([view], _ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
        finally:
            view.release()
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("descriptors were lost: control message truncated")
        self._end += n
        return n

    def _take(self, hlen, plen, nfds, shared, total):
        if len(self._fds) < nfds:
            raise ProtocolError(f"frame announced {nfds} descriptors but {len(self._fds)} arrived")
        buf = self._buf
        at = self._start + PREFIX_LEN
        with memoryview(buf) as mv:
            raw = bytes(mv[at:at + hlen])
            payload = b"" if shared else bytes(mv[at + hlen:self._start + total])
        try:
            header = json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both are
            raise ProtocolError(f"malformed frame header {raw[:200]!r}: {exc}") from None
        if not isinstance(header, dict):
            raise ProtocolError(f"frame header is not a JSON object: {raw[:200]!r}")
        fds = [self._fds.popleft() for _ in range(nfds)]
        self._start += total
        if self._start == self._end:
            self._start = self._end = 0
            if len(buf) > _KEEP_BUFFER:
                self._buf = bytearray(_READ_CHUNK)
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


# --------------------------------------------------------------------------- errors

_RUNTIME_GLOBALS = globals()
_RUNTIME_FILE = __file__
_IMPORTLIB_MODULES = frozenset(("importlib", "importlib._bootstrap", "importlib._bootstrap_external"))
# Bounds that keep an error header well under MAX_HEADER even if every character
# needs a 12-byte JSON escape.
_MAX_MESSAGE = 16 << 10
_MAX_TRACEBACK = 64 << 10
# The most bytes an encoded error object takes, so that the header carrying it (and the
# agent's, which adds the function's name) stays well under MAX_HEADER.
_MAX_ERROR = 64 << 10
_TRUNCATED = "... (truncated)"


def _is_runtime_frame(frame, skip_import):
    g = frame.f_globals
    return g is _RUNTIME_GLOBALS or (skip_import and g.get("__name__") in _IMPORTLIB_MODULES)


def _clean(text):
    """Text that encodes as UTF-8 (lone surrogates become backslash escapes)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def describe_error(exc, skip_import=False, frames=True, message=None):
    """The ``error`` object for ``load_failed``/``raised``.

    The traceback shows the function's own code: the runtime's leading frames (and,
    for a load, importlib's) are dropped, and so are the SDK's inside it (a
    ``CallError`` ends at the handler's ``sprout.call`` line). ``frames=False``
    reports the exception alone.
    """
    kind = type(exc).__name__
    try:
        tb = exc.__traceback__ if frames else None
        while tb is not None and _is_runtime_frame(tb.tb_frame, skip_import):
            tb = tb.tb_next
        shown = traceback.TracebackException(type(exc), exc, tb)
        shown.stack = traceback.StackSummary.from_list(
            [f for f in shown.stack if f.filename != _RUNTIME_FILE]
        )
        text = "".join(shown.format())
    except BaseException:  # noqa: BLE001 - a broken exception must still be reported
        text = f"{kind}: <traceback unavailable>\n"
    if message is None:
        try:
            message = str(exc)
        except BaseException:  # noqa: BLE001
            message = f"<unprintable {kind} object>"
    message = _clean(message)
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + " ... (truncated)"
    text = _clean(text)
    if len(text) > _MAX_TRACEBACK:
        text = "... (truncated)\n" + text[-_MAX_TRACEBACK:]
    return _fit_error({"type": _clean(kind)[:256], "message": message, "traceback": text})


def _fit_error(err):
    """``err`` with its message cut to at most a quarter of _MAX_ERROR, then its
    traceback (its oldest lines first) cut so that the whole encodes in at most
    _MAX_ERROR bytes; a cut is marked ``... (truncated)``."""
    if len(_dumps(err)) <= _MAX_ERROR:
        return err
    err["message"] = _cut(err["message"], _MAX_ERROR // 4, keep_end=False)
    rest = _MAX_ERROR - len(_dumps({**err, "traceback": ""}))
    err["traceback"] = _cut(err["traceback"], rest, keep_end=True)
    return err


def _cut(text, budget, keep_end):
    """``text``, or the part of it (its start, or its end) that encodes as a JSON
    string in at most ``budget`` bytes, marked as cut."""
    size = len(_dumps(text))
    keep = len(text)
    while size > budget and keep > 0:
        keep = min(keep - 1, keep * max(budget - 64, 0) // size)
        if keep_end:
            out = _TRUNCATED + "\n" + (text[len(text) - keep:] if keep else "")
        else:
            out = text[:keep] + " " + _TRUNCATED
        size = len(_dumps(out))
    return text if keep == len(text) else out


# --------------------------------------------------------------------------- calls (the sprout SDK)

MAX_CALL_DEPTH = 16
AGENT_SOCKET = "/.sprout/agent.sock"

_SPROUT_DOC = """Calls from one function to another.

call(name, event)        -> the result (decoded JSON, or a read-only memoryview for a
                            raw result); raises CallError
call_async(name, event)  -> Future (result(timeout=None), done()); runs in a sibling sandbox
map(name, events)        -> the results in input order (the calls run in parallel, in
                            sibling sandboxes)

An event that is bytes, bytearray or a memoryview is sent as raw bytes; anything else
is sent as JSON. Calls nest at most MAX_DEPTH deep.
"""

# The module handler code imports; the zygote puts it in sys.modules.
sprout = types.ModuleType("sprout", _SPROUT_DOC)


class CallError(Exception):
    """A call to another function did not return a result.

    ``function`` is the callee; ``type`` the class name of the exception it raised,
    or ``"CallFailed"`` when the call could not complete (unknown function, depth
    limit, timeout, the callee died); ``message`` the exception's message or why the
    call failed; ``remote_traceback`` the callee's traceback (may be empty). ``kind``
    names a limit the agent refused the call for at once (``"too_many_calls"``: the
    sandbox had as many calls in flight as the agent allows), else None.
    """

    def __init__(self, function, type, message, remote_traceback="", failed=None, kind=None):  # noqa: A002
        if failed is None:
            failed = type == "CallFailed"
        super().__init__(function, type, message, remote_traceback, failed)
        self.function = function
        self.type = type
        self.message = message
        self.remote_traceback = remote_traceback
        self.failed = failed
        self.kind = kind

    def __str__(self):
        if self.failed:
            return f"call to {self.function} failed: {self.message}"
        return f"{self.function} raised {self.type}: {self.message}"


class _ChannelGone(Exception):
    """A call channel can no longer be used; the message says why."""


class _CallState:
    """One process's calls: its channels, their locks, and the current invocation."""

    def __init__(self, calls=None, specs=None, depth=0):
        self.pid = os.getpid()
        # The calls channel to the shim (None outside an instance): one request and
        # its reply at a time, under calls_lock.
        self.calls = calls
        self.calls_lock = threading.Lock()
        self.calls_broken = None  # why the calls channel is unusable
        # The agent's call socket, connected on first use.
        self.agent = None
        self.agent_connect_lock = threading.Lock()
        self.agent_send_lock = threading.Lock()
        # Guards replies, agent_reading and agent_broken. One thread at a time reads
        # the socket (agent_reading); it files replies for other calls in `replies`.
        self.agent_cond = threading.Condition(threading.Lock())
        self.agent_reading = False
        self.agent_broken = None
        self.replies = {}
        self.ids = itertools.count(1)  # next() on it is atomic
        self.specs = {} if specs is None else specs  # name -> spec, or None: through the agent
        self.depth = depth  # of the invocation running now
        self.called = False  # it called another function

    def close(self):
        for channel in (self.calls, self.agent):
            if channel is not None:
                channel.close()
        self.calls = self.agent = None


_calls = _CallState()


def _start_calls(calls=None):
    """Starts this process's call state afresh, with ``calls`` (a Channel to the shim, or
    None) as its calls channel. Returns the new state."""
    global _calls
    _calls = _CallState(calls)
    return _calls


def _state():
    """This process's call state. A process the handler forked gets a state of its own
    (no calls channel: its calls go through the agent, on a connection of its own)."""
    global _calls
    state = _calls
    if state.pid != os.getpid():
        state = _calls = _CallState(None, dict(state.specs), state.depth)
    return state


def _depth_message(name):
    return f"call depth limit of {MAX_CALL_DEPTH} exceeded calling {name!r} (a call cycle or runaway recursion?)"


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"a function name must be a str, not {type(name).__name__}")


def _encode_event(event):
    """``(raw, payload)`` for an event; raises TypeError/ValueError for one that
    cannot be sent (before anything is sent)."""
    if isinstance(event, (bytes, bytearray, memoryview)):
        view = memoryview(event)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        payload, raw = view.cast("B"), True
    else:
        payload, raw = json.dumps(event, separators=(",", ":"), allow_nan=False).encode(), False
    if len(payload) > MAX_SHARED_PAYLOAD:
        raise ValueError(f"event of {len(payload)} bytes exceeds the limit of {MAX_SHARED_PAYLOAD} bytes")
    return raw, payload


def _call_header(req_id, name, depth, raw):
    header = {"op": "call", "id": req_id, "function": name, "depth": depth}
    if raw:
        header["raw"] = True
    return header


def _outcome(name, header, payload):
    """The result a reply carries, or the CallError it stands for."""
    op = header.get("op")
    function = header.get("function")
    if not isinstance(function, str):
        function = name
    if op == "call_returned":
        if header.get("raw"):
            return memoryview(payload)
        try:
            return json.loads(str(payload, "utf-8"))
        except Exception as exc:  # noqa: BLE001 - ValueError, or RecursionError when too deep
            raise CallError(name, "CallFailed", f"the result is not valid JSON: {exc}") from None
    if op == "call_raised":
        error = header.get("error")
        if not isinstance(error, dict):
            error = {}
        raise CallError(
            function,
            str(error.get("type") or "Exception"),
            str(error.get("message") or ""),
            str(error.get("traceback") or ""),
            failed=False,
        )
    if op == "call_failed":
        raise CallError(function, "CallFailed", str(header.get("message") or ""), failed=True)
    if op == "call_refused":
        kind = str(header.get("kind") or "call_refused")
        message = str(header.get("message") or "")
        raise CallError(function, "CallFailed", message or kind, failed=True, kind=kind)
    raise CallError(name, "CallFailed", f"unexpected reply op={op!r}", failed=True)


# -- the calls channel (to the shim)


def _call_shim(state, req_id, name, header, payload):
    """Sends a call on the calls channel and waits for its reply ``(header, payload)``."""
    with state.calls_lock:
        if state.calls_broken is not None:
            raise _ChannelGone(state.calls_broken)
        channel = state.calls
        try:
            try:
                channel.send(header, payload)
            except (ProtocolError, SharedPayloadError) as exc:  # nothing was sent
                raise CallError(name, "CallFailed", f"cannot send the call: {exc}") from None
            while True:
                reply, body, fds = channel.recv()
                for fd in fds:
                    _close_quietly(fd)
                if reply.get("id") == req_id:
                    return reply, body
                _log(f"ignoring a reply for call {reply.get('id')!r} on the calls channel")
        except ChannelClosed:
            state.calls_broken = "the shim closed the calls channel"
        except (ProtocolError, OSError) as exc:
            state.calls_broken = f"the calls channel to the shim broke: {exc}"
        raise _ChannelGone(state.calls_broken)


# -- the agent's call socket


def _agent_channel(state):
    """The connection to the agent's call socket, connected on first use."""
    with state.agent_connect_lock:
        if state.agent is None:
            if state.agent_broken is not None:
                raise _ChannelGone(state.agent_broken)
            path = sprout._AGENT_SOCKET
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec
            try:
                sock.connect(path)
            except OSError as exc:
                sock.close()
                raise _ChannelGone(f"cannot connect to the agent's call socket {path}: {exc}") from None
            state.agent = Channel(sock)
        return state.agent


def _agent_gone(state, message):
    with state.agent_cond:
        if state.agent_broken is None:
            state.agent_broken = message
        state.agent_cond.notify_all()
    return _ChannelGone(state.agent_broken)


def _agent_send(state, name, header, payload=b""):
    """Sends a request to the agent. Raises _ChannelGone, or CallError for a request
    that cannot be sent at all."""
    channel = _agent_channel(state)
    with state.agent_send_lock:
        if state.agent_broken is not None:
            raise _ChannelGone(state.agent_broken)
        try:
            channel.send(header, payload)
        except (ProtocolError, SharedPayloadError) as exc:  # nothing was sent
            raise CallError(name, "CallFailed", f"cannot send the call: {exc}") from None
        except OSError as exc:
            raise _agent_gone(state, f"the call connection to the agent broke: {exc}") from None


def _readable(channel, timeout):
    """Waits up to ``timeout`` seconds for ``channel``'s socket to have data (or an end)."""
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


def _agent_reply(state, req_id, timeout=None):
    """Waits for the agent's reply to ``req_id``: ``(header, payload)``. Raises
    TimeoutError after ``timeout`` seconds, _ChannelGone when the connection is."""
    deadline = None if timeout is None else time.monotonic() + timeout
    cond = state.agent_cond
    with cond:
        while True:
            reply = state.replies.pop(req_id, None)
            if reply is not None:
                return reply
            if state.agent_broken is not None:
                raise _ChannelGone(state.agent_broken)
            if not state.agent_reading:
                state.agent_reading = True
                break
            # Another thread is reading; it files this reply if it sees it.
            if deadline is None:
                cond.wait()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                cond.wait(left)
    try:
        return _read_agent(state, req_id, deadline)
    finally:
        with cond:
            state.agent_reading = False
            cond.notify_all()


def _read_agent(state, req_id, deadline):
    """Reads the agent connection (as its one reader) until the reply to ``req_id``."""
    channel = state.agent
    while True:
        try:
            frame = channel.try_recv()
            ready = frame is not None or deadline is None or _readable(channel, deadline - time.monotonic())
            if frame is None and ready and channel.fill() == 0:
                raise ChannelClosed
        except ChannelClosed:
            raise _agent_gone(state, "the agent closed the call connection") from None
        except (ProtocolError, OSError) as exc:
            raise _agent_gone(state, f"the call connection to the agent broke: {exc}") from None
        if frame is None:
            if not ready:
                raise TimeoutError
            continue
        header, payload, fds = frame
        for fd in fds:
            _close_quietly(fd)
        rid = header.get("id")
        if rid == req_id:
            return header, payload
        if not isinstance(rid, int) or isinstance(rid, bool):
            _log(f"ignoring a message without a call id from the agent: op={header.get('op')!r}")
            continue
        with state.agent_cond:
            state.replies[rid] = (header, payload)
            state.agent_cond.notify_all()


def _agent_call(state, name, header, payload):
    """Sends a request to the agent and waits for its reply."""
    _agent_send(state, name, header, payload)
    return _agent_reply(state, header["id"])


def _resolve(state, name):
    """The spec of ``name`` (run it through the shim) or None (through the agent)."""
    try:
        return state.specs[name]
    except KeyError:
        pass
    req_id = next(state.ids)
    header, payload = _agent_call(state, name, {"op": "resolve", "id": req_id, "function": name}, b"")
    op = header.get("op")
    if op == "resolved":
        spec = header.get("spec")
        if spec is not None and not isinstance(spec, dict):
            raise CallError(name, "CallFailed", f"the agent resolved {name!r} to a malformed spec {spec!r}")
        state.specs[name] = spec
        return spec
    if op in ("call_failed", "call_raised"):
        _outcome(name, header, payload)  # raises
    raise CallError(name, "CallFailed", f"unexpected answer to resolve: op={op!r}")


# -- the API


class Future:
    """The pending result of ``call_async``."""

    def __init__(self, state, function, req_id, error=None):
        self.function = function
        self._state = state
        self._id = req_id
        self._lock = threading.Lock()
        self._settled = error is not None
        self._value = None
        self._error = error

    def __repr__(self):
        return f"<sprout.Future {self.function} {'done' if self._settled else 'pending'}>"

    def _wait(self, timeout):
        if self._settled:
            return
        if timeout is None:
            self._lock.acquire()
        else:
            deadline = time.monotonic() + timeout
            if not self._lock.acquire(timeout=max(timeout, 0)):
                raise TimeoutError(f"call to {self.function} did not answer within {timeout} s")
        try:
            if self._settled:
                return
            left = None if timeout is None else deadline - time.monotonic()
            try:
                header, payload = _agent_reply(self._state, self._id, left)
            except TimeoutError:
                raise TimeoutError(f"call to {self.function} did not answer within {timeout} s") from None
            except _ChannelGone as exc:
                self._error = CallError(self.function, "CallFailed", str(exc))
            else:
                try:
                    self._value = _outcome(self.function, header, payload)
                except CallError as exc:
                    self._error = exc
            self._settled = True
        finally:
            self._lock.release()

    def result(self, timeout=None):
        """The callee's result; raises its CallError, or TimeoutError when it has not
        answered within ``timeout`` seconds (None waits for as long as it takes)."""
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def done(self):
        """Whether the answer has arrived (never blocks)."""
        try:
            self._wait(0)
        except TimeoutError:
            return False
        return True


def _start_call(state, name, payload, raw, depth):
    """Sends a call to the agent; returns its Future (a failed one if it cannot be sent)."""
    req_id = next(state.ids)
    try:
        _agent_send(state, name, _call_header(req_id, name, depth, raw), payload)
    except _ChannelGone as exc:
        return Future(state, name, req_id, CallError(name, "CallFailed", str(exc)))
    except CallError as exc:
        return Future(state, name, req_id, exc)
    return Future(state, name, req_id)


def call(name, event):
    """Calls function ``name`` with ``event`` and returns its result: decoded JSON, or a
    read-only memoryview for a raw result. Raises CallError when it raised or the call
    failed. It runs in this sandbox when the agent can attach its code here."""
    state = _state()
    _check_name(name)
    raw, payload = _encode_event(event)
    depth = state.depth + 1
    if depth > MAX_CALL_DEPTH:
        raise CallError(name, "CallFailed", _depth_message(name))
    state.called = True
    try:
        spec = _resolve(state, name)
        req_id = next(state.ids)
        header = _call_header(req_id, name, depth, raw)
        if spec is not None and state.calls is not None:
            header["spec"] = spec
            reply = _call_shim(state, req_id, name, header, payload)
        else:
            reply = _agent_call(state, name, header, payload)
    except _ChannelGone as exc:
        raise CallError(name, "CallFailed", str(exc)) from None
    return _outcome(name, *reply)


def call_async(name, event):
    """Starts a call of ``name`` in a sibling sandbox; returns a Future."""
    state = _state()
    _check_name(name)
    raw, payload = _encode_event(event)
    depth = state.depth + 1
    if depth > MAX_CALL_DEPTH:
        return Future(state, name, None, CallError(name, "CallFailed", _depth_message(name)))
    state.called = True
    return _start_call(state, name, payload, raw, depth)


def map_(name, events):
    """Calls ``name`` once per event, all in parallel (in sibling sandboxes); returns
    the results in the order of ``events``. When any failed, raises the CallError of
    the first failed one, after all have answered."""
    state = _state()
    _check_name(name)
    encoded = [_encode_event(event) for event in events]
    if not encoded:
        return []
    depth = state.depth + 1
    if depth > MAX_CALL_DEPTH:
        raise CallError(name, "CallFailed", _depth_message(name))
    state.called = True
    futures = [_start_call(state, name, payload, raw, depth) for raw, payload in encoded]
    results, first_error = [], None
    for future in futures:
        try:
            results.append(future.result())
        except CallError as exc:
            results.append(None)
            if first_error is None:
                first_error = exc
    if first_error is not None:
        raise first_error
    return results


map_.__name__ = map_.__qualname__ = "map"
for _obj in (CallError, Future, call, call_async, map_):
    _obj.__module__ = "sprout"
    setattr(sprout, _obj.__name__, _obj)
sprout.MAX_DEPTH = MAX_CALL_DEPTH
sprout._AGENT_SOCKET = AGENT_SOCKET
sprout.__all__ = ["call", "call_async", "map", "CallError", "Future", "MAX_DEPTH"]
del _obj


# --------------------------------------------------------------------------- instance


def _log(msg):
    try:
        sys.stderr.write(f"sprout runtime [{os.getpid()}]: {msg}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass


def _flush_stdio():
    seen = set()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is None or id(stream) in seen:
            continue
        seen.add(id(stream))
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a broken pipe must not stop the reply
            pass


def _open_stdio(fd):
    # Line-buffered so a handler's output reaches the pipe as it prints (and is not
    # lost if the instance is killed mid-invoke); flushed again before every reply.
    return open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)


def _unshadow(module_name, code_dir):
    """Lets the function's own top-level module win over one the zygote imported.

    The zygote has imported json, socket, struct, ... before the code directory was
    on sys.path; in a fresh interpreter a file of that name in the code directory
    would be found first. Only modules loaded from a file are dropped (never
    builtin or frozen ones, which a fresh interpreter would not shadow either).
    """
    top = module_name.partition(".")[0]
    mod = sys.modules.get(top)
    if mod is None:
        return
    spec = getattr(mod, "__spec__", None)
    if spec is None or not spec.has_location:
        return
    if not (os.path.isfile(os.path.join(code_dir, top + ".py")) or os.path.isdir(os.path.join(code_dir, top))):
        return
    origin = os.path.abspath(spec.origin or "")
    if origin.startswith(os.path.join(os.path.abspath(code_dir), "")):
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


def load_handler(code_dir, module_name, function_name):
    """Imports the handler. ``__main__`` is OpenWhisk's format: ``<code_dir>/__main__.py``,
    loaded as module ``__sprout_main__`` so the runtime's own ``__main__`` stays."""
    os.chdir(code_dir)
    sys.path.insert(0, code_dir)
    importlib.invalidate_caches()
    if module_name == "__main__":
        path = os.path.join(code_dir, "__main__.py")
        if not os.path.isfile(path):
            raise ModuleNotFoundError(f"No module named '__main__' ({path} does not exist)", name="__main__")
        spec = importlib.util.spec_from_file_location("__sprout_main__", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["__sprout_main__"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("__sprout_main__", None)
            raise
    else:
        _unshadow(module_name, code_dir)
        module = importlib.import_module(module_name)
    try:
        handler = getattr(module, function_name)
    except AttributeError:
        raise AttributeError(f"module '{module_name}' has no attribute '{function_name}'") from None
    if not callable(handler):
        raise TypeError(f"handler {module_name}:{function_name} is not callable")
    return handler


def _raised(request_id, exc, **kw):
    return {"op": "raised", "id": request_id, "error": describe_error(exc, **kw)}, b""


def _encode_result(request_id, result):
    """The reply ``(header, payload)`` for a handler's result."""
    if isinstance(result, (bytes, bytearray, memoryview)):
        try:
            body = memoryview(result)
            if not body.c_contiguous:
                body = memoryview(body.tobytes())
            body = body.cast("B")
        except BaseException as exc:  # noqa: BLE001
            return _raised(request_id, exc, frames=False, message=f"handler result is not a byte buffer: {exc}")
        header = {"op": "returned", "id": request_id, "raw": True}
    else:
        try:
            body = json.dumps(result, separators=(",", ":"), allow_nan=False).encode()
        except BaseException as exc:  # noqa: BLE001
            return _raised(request_id, exc, frames=False, message=f"handler result is not JSON-serialisable: {exc}")
        header = {"op": "returned", "id": request_id}
    # Results over SHARED_THRESHOLD go in a memfd, which takes up to MAX_SHARED_PAYLOAD.
    limit = MAX_PAYLOAD if len(body) <= SHARED_THRESHOLD else MAX_SHARED_PAYLOAD
    if len(body) > limit:
        exc = ValueError(f"handler result of {len(body)} bytes exceeds the limit of {limit} bytes")
        return _raised(request_id, exc, frames=False)
    return header, body


def _check_invoke(depth, raw):
    """Returns why an invoke's ``depth``/``raw`` cannot be served, or None."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        return f"invoke depth {depth!r} is not a call depth"
    if not isinstance(raw, bool):
        return f"invoke raw {raw!r} is not a boolean"
    return None


def invoke(handler, request_id, payload, depth=0, raw=False):
    """Runs one invocation at call ``depth``; returns the reply ``(header, payload)``.

    ``payload`` is the event: JSON text, or with ``raw`` bytes that the handler gets
    as a read-only memoryview (no copy). Either way any buffer (bytes, mmap).
    """
    problem = _check_invoke(depth, raw)
    if problem is not None:
        error = {"type": "ProtocolError", "message": problem, "traceback": ""}
        return {"op": "raised", "id": request_id, "error": error}, b""
    if raw:
        event = memoryview(payload)
        if not event.readonly:
            event = event.toreadonly()
    else:
        try:
            event = json.loads(str(payload, "utf-8"))
        except Exception as exc:  # noqa: BLE001 - ValueError, or RecursionError when too deep
            return _raised(request_id, exc, frames=False, message=f"event is not valid JSON: {exc}")
    state = _state()
    state.depth, state.called = depth, False
    try:
        try:
            result = handler(event)
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too
            reply, body = _raised(request_id, exc)
        else:
            del event
            reply, body = _encode_result(request_id, result)
    finally:
        state = _state()
        called, state.called = state.called, False
    if called:
        reply["called"] = True
    return reply, body


def _recv_no_fds(channel):
    """Receives a frame on an instance channel, where no descriptors belong."""
    header, payload, fds = channel.recv()
    for fd in fds:
        _close_quietly(fd)
    return header, payload


def serve(channel, handler):
    """Answers invokes until the agent closes the channel; returns the exit status."""
    while True:
        try:
            header, payload = _recv_no_fds(channel)
        except ChannelClosed:
            return 0
        op = header.get("op")
        if op != "invoke":
            _log(f"ignoring unknown message op={op!r}")
            continue
        request_id = header.get("id")
        reply, body = invoke(handler, request_id, payload, header.get("depth", 0), header.get("raw", False))
        # Everything the handler printed is in the pipes before the agent hears back.
        _flush_stdio()
        try:
            try:
                channel.send(reply, body)
            except (ProtocolError, SharedPayloadError) as exc:  # nothing was sent
                failed, _ = _raised(request_id, exc, frames=False, message=f"cannot send the result: {exc}")
                if reply.get("called"):
                    failed["called"] = True
                channel.send(failed)
        except OSError:  # the agent is gone
            return 0
        finally:
            # A shared event's mapping goes only now, after the answer: unmapping the
            # last reference frees its pages (~17 ms for 64 MiB), which the caller
            # need not wait for.
            del body, payload


def instance_main(zygote, instance, chan_fd, out_fd, err_fd, calls_fd):
    """Body of a forked instance; returns its exit status (never returns to the zygote).

    It starts as a *spare*: set up ahead of time (says ``ready`` to the shim), it
    waits for the agent's ``load``, then imports the handler and serves invocations.
    ``calls_fd`` is its calls channel to the shim, for ``sprout.call``.
    """
    # Nothing of the zygote's stays open here: its channel, and descriptors already
    # queued for later fork requests (they belong to other instances).
    zygote.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in (out_fd, err_fd):
        if fd not in (1, 2):
            os.close(fd)
    sys.stdout = sys.__stdout__ = _open_stdio(1)
    sys.stderr = sys.__stderr__ = _open_stdio(2)
    os.environ["SPROUT_INSTANCE"] = str(instance)
    # Received close-on-exec, so nothing the function runs inherits it; open for the
    # instance's life.
    _start_calls(Channel(socket.socket(fileno=calls_fd)))
    channel = Channel(socket.socket(fileno=chan_fd))
    try:
        # Set up: the shim may now hand this spare over (or freeze its sandbox).
        channel.send({"op": "ready"})
    except OSError:
        return 0
    try:
        header, _payload = _recv_no_fds(channel)
    except ChannelClosed:
        return 0
    problem = _check_load(header)
    if problem is not None:
        error = {"type": "ProtocolError", "message": problem, "traceback": ""}
        return _report_load_failure(channel, error)
    os.environ["SPROUT_FUNCTION"] = header["function"]
    handler_spec = header["handler"]
    try:
        handler = load_handler(header["code_dir"], handler_spec["module"], handler_spec["function"])
    except BaseException as exc:  # noqa: BLE001
        return _report_load_failure(channel, describe_error(exc, skip_import=True))
    _flush_stdio()
    try:
        channel.send({"op": "loaded"})
    except OSError:
        return 0
    return serve(channel, handler)


def _report_load_failure(channel, error):
    _flush_stdio()
    try:
        channel.send({"op": "load_failed", "error": error})
    except OSError:
        pass
    return 1


def _check_load(header):
    """Returns why a ``load`` request cannot be served, or None."""
    if header.get("op") != "load":
        return f"expected a load request, got op={header.get('op')!r}"
    for key in ("function", "code_dir"):
        if not isinstance(header.get(key), str):
            return f"{key} {header.get(key)!r} is not a string"
    handler = header.get("handler")
    if not (
        isinstance(handler, dict) and isinstance(handler.get("module"), str) and isinstance(handler.get("function"), str)
    ):
        return f"handler {handler!r} is not {{\"module\": ..., \"function\": ...}}"
    return None


# --------------------------------------------------------------------------- zygote


def _check_spec(spec, fds):
    """Returns why a fork request cannot be served, or None."""
    if len(fds) != 4:
        return f"fork carries {len(fds)} descriptors, expected 4 (channel, stdout, stderr, calls)"
    instance = spec.get("instance")
    if not isinstance(instance, int) or isinstance(instance, bool) or instance < 0:
        return f"instance {instance!r} is not an instance number"
    runtime = spec.get("runtime", "python")
    if runtime != "python":
        return f"runtime {runtime!r} is not served by the python zygote"
    return None


def _fork(zygote, spec, fds):
    instance = spec.get("instance")
    problem = _check_spec(spec, fds)
    if problem is not None:
        for fd in fds:
            _close_quietly(fd)
        zygote.send({"op": "fork_failed", "instance": instance, "message": problem})
        return
    _flush_stdio()  # or the child would print the zygote's buffered output again
    gc.freeze()  # keep the collector from touching (and copying) the zygote's pages
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in fds:
            _close_quietly(fd)
        zygote.send({"op": "fork_failed", "instance": instance, "message": f"fork: {exc}"})
        return
    if pid == 0:
        status = 70
        try:
            status = instance_main(zygote, instance, *fds)
        except BaseException:  # noqa: BLE001
            try:
                traceback.print_exc()
                _flush_stdio()
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(status)
    for fd in fds:
        _close_quietly(fd)
    zygote.send({"op": "forked", "instance": instance, "pid": pid})


CODE_DIR = "/code"


def _prime_import_path(path):
    """Builds and caches the import finder of the code directory in the zygote: the
    first import from a new path entry costs about a millisecond, and every
    sandbox's code appears at the same path. The finder notices when the function's
    code is mounted there (the directory changes) and rereads it."""
    if os.path.isdir(path):
        importlib.machinery.PathFinder.find_spec("__sprout_prime__", [path])


def zygote_main(fd=3):
    """Serves fork requests on ``fd`` until the shim closes it; returns the exit status."""
    os.fstat(fd)  # fail loudly if the control channel is missing
    os.set_inheritable(fd, False)
    # Keep 0, 1 and 2 taken so received descriptors never land on them.
    for std in (0, 1, 2):
        try:
            os.fstat(std)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != std:
                os.dup2(null, std)
                os.close(null)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # instances are reaped by the kernel
    _prime_import_path(CODE_DIR)
    # Every instance's handler can `import sprout`.
    sys.modules["sprout"] = sprout
    zygote = Channel(socket.socket(fileno=fd))
    try:
        zygote.send({"op": "ready", "pid": os.getpid()})
        while True:
            try:
                header, _payload, fds = zygote.recv()
            except ChannelClosed:
                return 0
            op = header.get("op")
            if op == "fork":
                _fork(zygote, header, fds)
            else:
                for received in fds:
                    _close_quietly(received)
                _log(f"ignoring unknown message op={op!r}")
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the shim went away while we were replying


if __name__ == "__main__":
    sys.exit(zygote_main())
