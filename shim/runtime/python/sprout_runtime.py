"""sprout's Python runtime: a zygote that forks function instances.

Run as ``python3 -I -B /.sprout/python/sprout_runtime.py`` by the shim, with its
control channel to the shim inherited as fd 3 (a connected AF_UNIX stream socket).
Importing this file has no side effects; the zygote starts only when it is run as
a script.

Every message on every channel is a frame (all integers little-endian)::

    u32 header_len | u32 payload_len | u32 fd_count | header (UTF-8 JSON object) | payload

with ``fd_count`` descriptors passed by SCM_RIGHTS on the sendmsg that carries the
frame's first byte. This must stay byte-for-byte compatible with ipc/src/frame.rs.

Zygote (fd 3, talking to the shim)::

    zygote -> shim   {"op":"ready","pid":P}
    shim -> zygote   {"op":"fork","instance":N,"function":..,"runtime":"python",
                      "code_dir":..,"handler":{"module":..,"function":..}}
                     + fds [instance channel, stdout write end, stderr write end]
    zygote -> shim   {"op":"forked","instance":N,"pid":P}
                   | {"op":"fork_failed","instance":N,"message":..}

Instance (its own channel, talking to the agent)::

    instance -> agent  {"op":"loaded"} | {"op":"load_failed","error":E}   (then exits 1)
    agent -> instance  {"op":"invoke","id":K} + payload = event JSON
    instance -> agent  {"op":"returned","id":K} + payload = result JSON
                     | {"op":"raised","id":K,"error":E}
    E = {"type":"ValueError","message":..,"traceback":..}

Standard library only.
"""

import array
import collections
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import struct
import sys
import traceback

# --------------------------------------------------------------------------- framing

PREFIX = struct.Struct("<III")
PREFIX_LEN = PREFIX.size
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 64 << 20
MAX_FDS = 8

_READ_CHUNK = 64 << 10
# A buffer grown for one large frame is dropped once it is empty again.
_KEEP_BUFFER = 1 << 20
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_FD_SIZE = array.array("i").itemsize

_dumps = json.JSONEncoder(separators=(",", ":")).encode


class ProtocolError(Exception):
    """The peer broke the framing rules (limits, truncation, malformed header)."""


class ChannelClosed(EOFError):
    """The peer closed the channel between two frames."""


def _decode_prefix(buf, at):
    hlen, plen, nfds = PREFIX.unpack_from(buf, at)
    if hlen > MAX_HEADER:
        raise ProtocolError(f"frame header of {hlen} bytes exceeds the limit of {MAX_HEADER}")
    if plen > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {plen} bytes exceeds the limit of {MAX_PAYLOAD}")
    if nfds > MAX_FDS:
        raise ProtocolError(f"frame carries {nfds} descriptors, at most {MAX_FDS} allowed")
    return hlen, plen, nfds


class Channel:
    """A framed, fd-passing channel over one end of a Unix stream socket.

    ``recv()`` returns ``(header_dict, payload_bytes, [fds])``; the caller owns the
    returned descriptors. ``send(header, payload=b"", fds=())`` sends one frame.
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
        hdr = _dumps(header).encode()
        if not isinstance(payload, bytes):
            payload = memoryview(payload).cast("B")
        plen = len(payload)
        if len(hdr) > MAX_HEADER:
            raise ProtocolError(f"frame header of {len(hdr)} bytes exceeds the limit of {MAX_HEADER}")
        if plen > MAX_PAYLOAD:
            raise ProtocolError(f"frame payload of {plen} bytes exceeds the limit of {MAX_PAYLOAD}")
        if len(fds) > MAX_FDS:
            raise ProtocolError(f"frame carries {len(fds)} descriptors, at most {MAX_FDS} allowed")
        head = PREFIX.pack(len(hdr), plen, len(fds)) + hdr
        anc = []
        if fds:
            fds = [fd if isinstance(fd, int) else fd.fileno() for fd in fds]
            anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)))
        sent = self.sock.sendmsg([head, payload] if plen else [head], anc)
        # A stream socket may take less than all of it; the rest goes without descriptors.
        if sent < len(head):
            self.sock.sendall(memoryview(head)[sent:])
            sent = len(head)
        if sent < len(head) + plen:
            self.sock.sendall(memoryview(payload)[sent - len(head):])

    # -- receiving

    def recv(self):
        """Blocks until a whole frame has arrived.

        Raises ChannelClosed at a clean end of stream, ProtocolError for a broken frame.
        """
        while True:
            avail = self._end - self._start
            if avail >= PREFIX_LEN:
                hlen, plen, nfds = _decode_prefix(self._buf, self._start)
                total = PREFIX_LEN + hlen + plen
                if avail >= total:
                    return self._take(hlen, plen, nfds, total)
                want = total - avail
            else:
                want = PREFIX_LEN - avail
            if self._fill(want if want > _READ_CHUNK else _READ_CHUNK) == 0:
                if self._end > self._start:
                    raise ProtocolError("peer closed the channel in the middle of a frame")
                raise ChannelClosed("peer closed the channel")

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

    def _take(self, hlen, plen, nfds, total):
        if len(self._fds) < nfds:
            raise ProtocolError(f"frame announced {nfds} descriptors but {len(self._fds)} arrived")
        buf = self._buf
        at = self._start + PREFIX_LEN
        with memoryview(buf) as mv:
            raw = bytes(mv[at:at + hlen])
            payload = bytes(mv[at + hlen:self._start + total])
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
        return header, payload, fds


def _close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------- errors

_RUNTIME_GLOBALS = globals()
_IMPORTLIB_MODULES = frozenset(("importlib", "importlib._bootstrap", "importlib._bootstrap_external"))
# Bounds that keep an error header well under MAX_HEADER even if every character
# needs a 12-byte JSON escape.
_MAX_MESSAGE = 16 << 10
_MAX_TRACEBACK = 64 << 10


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

    The traceback starts at the function's own code: the runtime's leading frames
    (and, for a load, importlib's) are dropped. ``frames=False`` reports the
    exception alone.
    """
    kind = type(exc).__name__
    try:
        tb = exc.__traceback__ if frames else None
        while tb is not None and _is_runtime_frame(tb.tb_frame, skip_import):
            tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
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
    return {"type": _clean(kind)[:256], "message": message, "traceback": text}


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


def invoke(handler, request_id, payload):
    """Runs one invocation; returns the reply ``(header, payload)``."""
    try:
        event = json.loads(payload)
    except Exception as exc:  # noqa: BLE001 - ValueError, or RecursionError when too deep
        error = describe_error(exc, frames=False, message=f"event is not valid JSON: {exc}")
        return {"op": "raised", "id": request_id, "error": error}, b""
    try:
        result = handler(event)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too
        return {"op": "raised", "id": request_id, "error": describe_error(exc)}, b""
    try:
        body = json.dumps(result, separators=(",", ":"), allow_nan=False).encode()
    except BaseException as exc:  # noqa: BLE001
        error = describe_error(exc, frames=False, message=f"handler result is not JSON-serialisable: {exc}")
        return {"op": "raised", "id": request_id, "error": error}, b""
    if len(body) > MAX_PAYLOAD:
        exc = ValueError(f"handler result of {len(body)} bytes exceeds the limit of {MAX_PAYLOAD} bytes")
        return {"op": "raised", "id": request_id, "error": describe_error(exc, frames=False)}, b""
    return {"op": "returned", "id": request_id}, body


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
        reply, body = invoke(handler, header.get("id"), payload)
        # Everything the handler printed is in the pipes before the agent hears back.
        _flush_stdio()
        try:
            channel.send(reply, body)
        except OSError:  # the agent is gone
            return 0


def instance_main(zygote, instance, chan_fd, out_fd, err_fd):
    """Body of a forked instance; returns its exit status (never returns to the zygote).

    It starts as a *spare*: set up ahead of time (says ``ready`` to the shim), it
    waits for the agent's ``load``, then imports the handler and serves invocations.
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
    if len(fds) != 3:
        return f"fork carries {len(fds)} descriptors, expected 3 (channel, stdout, stderr)"
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
