"""The sprout SDK: the ``sprout`` module every handler can import (``call``,
``call_async``, ``map``), and each process's call state (its calls channel to the
shim and its connection to the agent's call socket)."""

import itertools
import json
import os
import select
import socket
import threading
import time
import types

from .codec import (
    MAX_SHARED_PAYLOAD,
    Buffer,
    Channel,
    ChannelClosed,
    ProtocolError,
    SharedPayloadError,
    _close_quietly,
    dumps_value,
    timeval,
)
from .errors import _log

MAX_CALL_DEPTH = 16
AGENT_SOCKET = "/.sprout/agent.sock"
# A direct call's time is capped here (a year): a spec's timeout_ms is a u64.
_MAX_TIMEOUT_MS = 365 * 86_400_000

_SPROUT_DOC = """Calls from one function to another.

call(name, event)        -> the result (decoded JSON, or a read-only memoryview for a
                            raw result); raises CallError
call_async(name, event)  -> Future (result(timeout=None), done()); runs in a sibling sandbox
map(name, events)        -> the results in input order (the calls run in parallel, in
                            sibling sandboxes)
buffer(size)             -> a Buffer: shared memory to fill in place and pass as an
                            event (or return) without a copy

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


# This process's pid, kept by a fork hook: ``_state()`` runs twice per invocation
# and once per call, and getpid(2) is a system call. (A process forked by C code
# that goes on running Python without CPython's fork hooks would keep its parent's
# state and channels: only the tenant's own processes, and such a fork breaks
# CPython's own locks and threads too.)
_pid = os.getpid()


def _forked():
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class _CallState:
    """One process's calls: its channels, their locks, and the current invocation."""

    def __init__(self, calls=None, specs=None, depth=0):
        self.pid = _pid
        # The calls channel to the shim (None outside an instance): one request and
        # its reply at a time, under calls_lock; every frame sent under
        # calls_send_lock (an unanswered `unbind` takes only that one).
        self.calls = calls
        self.calls_lock = threading.Lock()
        self.calls_send_lock = threading.Lock()
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
        self.direct = {}  # name -> _Direct: a callee the shim bound to this process
        self.no_direct = set()  # names the shim would not bind: through the shim
        self.depth = depth  # of the invocation running now
        self.called = False  # it called another function

    def close(self):
        for channel in (self.calls, self.agent):
            if channel is not None:
                channel.close()
        for direct in self.direct.values():
            direct.channel.close()
        self.calls = self.agent = None
        self.direct = {}


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
    if state.pid != _pid:
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
    if isinstance(event, Buffer):
        return True, event  # handed off as it is: its own memfd
    if isinstance(event, (bytes, bytearray, memoryview)):
        view = memoryview(event)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        payload, raw = view.cast("B"), True
    else:
        payload, raw = dumps_value(event).encode(), False
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


def _shim_request(state, req_id, name, header, payload=b""):
    """Sends a request on the calls channel and waits for its reply ``(header,
    payload, fds)``; the caller owns the descriptors."""
    with state.calls_lock:
        if state.calls_broken is not None:
            raise _ChannelGone(state.calls_broken)
        channel = state.calls
        try:
            try:
                with state.calls_send_lock:
                    channel.send(header, payload)
            except (ProtocolError, SharedPayloadError) as exc:  # nothing was sent
                raise CallError(name, "CallFailed", f"cannot send the call: {exc}") from None
            while True:
                reply, body, fds = channel.recv()
                if reply.get("id") == req_id:
                    return reply, body, fds
                for fd in fds:
                    _close_quietly(fd)
                _log(f"ignoring a reply for call {reply.get('id')!r} on the calls channel")
        except ChannelClosed:
            state.calls_broken = "the shim closed the calls channel"
        except (ProtocolError, OSError) as exc:
            state.calls_broken = f"the calls channel to the shim broke: {exc}"
        raise _ChannelGone(state.calls_broken)


def _call_shim(state, req_id, name, header, payload):
    """Sends a call on the calls channel and waits for its reply ``(header, payload)``."""
    reply, body, fds = _shim_request(state, req_id, name, header, payload)
    for fd in fds:
        _close_quietly(fd)
    return reply, body


# -- direct channels (to a callee the shim bound to this process)


class _Direct:
    """A direct channel to one instance of a function in this sandbox: the shim made
    it (``bind``) and is out of the way from then on. One call at a time (``lock``);
    this side keeps the callee's time and asks the shim to kill it when it is past.

    The socket blocks, so that a call is mostly one send(2) and one recvmsg(2), with
    no poll(2) before each (as a socket with a Python timeout would make). The call's
    time is kept by a send that never waits unless the socket's buffer is full (then
    a Python timeout for the time left; a frame with descriptors, one sendmsg(2)
    under SO_SNDTIMEO set to the time left), and by the kernel's receive timeout
    (SO_RCVTIMEO), the call's whole time, or what is left of it once the send or
    a reply in pieces took more than a millisecond. The kernel starts a receive
    timeout again after a signal handler ran (PEP 475 retries the read): a caller
    whose own handlers run more often than the call's time waits on, until its
    invocation's deadline, which kills it and so its callee."""

    __slots__ = ("channel", "callee", "timeout_ms", "lock", "_recv_timeout")  # callee: the bind's token

    def __init__(self, channel, callee, timeout_ms):
        self.channel = channel
        self.callee = callee
        self.timeout_ms = timeout_ms
        self.lock = threading.Lock()
        self._recv_timeout = None
        channel.sock.setblocking(True)
        self.recv_timeout(timeout_ms / 1000)

    def recv_timeout(self, seconds):
        """Sets how long one read may wait (a system call only when it changes)."""
        if seconds != self._recv_timeout:
            self.channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(seconds))
            self._recv_timeout = seconds


def _bind(state, name, spec):
    """Asks the shim for a direct channel to an instance of ``spec``; returns it, or
    None when the shim has as many bound as it allows (this call goes through the
    shim). Raises CallError when no instance could be had (the call's own failure)."""
    req_id = next(state.ids)
    header = {"op": "bind", "id": req_id, "function": name, "spec": spec}
    reply, _body, fds = _shim_request(state, req_id, name, header)
    op = reply.get("op")
    token = reply.get("callee")
    timeout_ms = spec.get("timeout_ms") if isinstance(spec, dict) else None
    if op == "bound" and len(fds) == 1 and isinstance(token, int) and isinstance(timeout_ms, int) and timeout_ms > 0:
        direct = _Direct(Channel(socket.socket(fileno=fds[0])), token, min(timeout_ms, _MAX_TIMEOUT_MS))
        state.direct[name] = direct
        return direct
    for fd in fds:
        _close_quietly(fd)
    if op in ("call_failed", "call_raised"):
        _outcome(name, reply, b"")  # raises: what the call itself would have met
    # At capacity (call_refused), or a reply this SDK cannot use: through the shim,
    # without asking again until the next invocation.
    state.no_direct.add(name)
    return None


def _drop_direct(state, name, direct, kill):
    """Forgets a direct channel; with ``kill``, asks the shim to kill its callee (past
    its time, or broke the protocol). Never fails: the shim may be gone too. Waits
    for no relayed call: ``unbind`` is unanswered."""
    if state.direct.get(name) is direct:
        del state.direct[name]
    direct.channel.close()
    if not kill or state.calls_broken is not None:
        return
    with state.calls_send_lock:
        try:
            state.calls.send({"op": "unbind", "callee": direct.callee})
        except (ProtocolError, OSError):
            pass


def _call_direct(state, direct, req_id, name, depth, raw, payload):
    """One call on a direct channel: the reply ``(header, payload)`` as the shim would
    have relayed it, or None when the callee was gone before the call reached it (the
    caller then goes through the shim)."""
    header = {"op": "invoke", "id": req_id, "depth": depth}
    if raw:
        header["raw"] = True
    channel = direct.channel
    timeout = direct.timeout_ms / 1000
    deadline = time.monotonic() + timeout
    try:
        channel.send(header, payload, deadline=deadline)
    except (ProtocolError, SharedPayloadError) as exc:  # nothing was sent
        raise CallError(name, "CallFailed", f"cannot send the call: {exc}") from None
    except TimeoutError:  # it stopped reading: as past its time
        _drop_direct(state, name, direct, kill=True)
        raise CallError(name, "CallFailed", f"{name} timed out after {direct.timeout_ms} ms") from None
    except OSError:
        # The callee is gone (it closed its end): it never ran this call.
        _drop_direct(state, name, direct, kill=False)
        return None
    try:
        while True:
            frame = channel.try_recv()
            if frame is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise BlockingIOError
            # Mostly the first read, with the call's whole time (set once per
            # channel); a millisecond off that is worth a system call.
            direct.recv_timeout(timeout if timeout - left < 0.001 else left)
            if channel.fill() == 0:
                raise ChannelClosed
    except BlockingIOError:  # SO_RCVTIMEO, or past the deadline
        _drop_direct(state, name, direct, kill=True)
        raise CallError(name, "CallFailed", f"{name} timed out after {direct.timeout_ms} ms") from None
    except (ChannelClosed, ConnectionError):
        _drop_direct(state, name, direct, kill=False)
        message = f"{name}'s instance died while running (out of memory or killed?)"
        raise CallError(name, "CallFailed", message) from None
    except (ProtocolError, OSError) as exc:
        _drop_direct(state, name, direct, kill=True)
        raise CallError(name, "CallFailed", f"{name}'s instance broke the protocol: {exc}") from None
    reply, body, fds = frame
    for fd in fds:
        _close_quietly(fd)
    op = reply.get("op")
    if reply.get("id") == req_id and op == "returned":
        return {"op": "call_returned", "id": req_id, "raw": reply.get("raw") is True}, body
    if reply.get("id") == req_id and op == "raised":
        return {"op": "call_raised", "id": req_id, "function": name, "error": reply.get("error")}, b""
    _drop_direct(state, name, direct, kill=True)
    message = f"{name}'s instance broke the protocol: unexpected {op!r} for call {reply.get('id')!r}"
    raise CallError(name, "CallFailed", message)


def _call_local(state, req_id, name, depth, raw, spec, payload):
    """A call that runs in this sandbox: on the direct channel to its callee (bound
    on first use), or relayed by the shim when that is busy or refused."""
    direct = state.direct.get(name)
    if direct is None and name not in state.no_direct:
        direct = _bind(state, name, spec)
    if direct is not None and direct.lock.acquire(blocking=False):
        try:
            reply = _call_direct(state, direct, req_id, name, depth, raw, payload)
        finally:
            direct.lock.release()
        if reply is not None:
            return reply
    header = _call_header(req_id, name, depth, raw)
    header["spec"] = spec
    return _call_shim(state, req_id, name, header, payload)


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
        if spec is not None and state.calls is not None:
            reply = _call_local(state, req_id, name, depth, raw, spec, payload)
        else:
            reply = _agent_call(state, name, _call_header(req_id, name, depth, raw), payload)
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


def buffer(size):
    """Shared memory of ``size`` bytes to fill in place and pass to ``call`` (or
    return) without a copy; see ``sprout.Buffer``."""
    return Buffer(size)


map_.__name__ = map_.__qualname__ = "map"
Buffer.__module__ = "sprout"
sprout.Buffer = Buffer
for _obj in (CallError, Future, call, call_async, map_, buffer):
    _obj.__module__ = "sprout"
    setattr(sprout, _obj.__name__, _obj)
sprout.MAX_DEPTH = MAX_CALL_DEPTH
sprout._AGENT_SOCKET = AGENT_SOCKET
sprout.__all__ = ["call", "call_async", "map", "buffer", "Buffer", "CallError", "Future", "MAX_DEPTH"]
del _obj

