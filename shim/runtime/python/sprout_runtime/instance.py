"""A function instance, forked by the zygote: it says ``ready`` as a spare, loads
the handler the agent names, and serves invocations until the agent lets go."""

import importlib
import importlib.util
import json
import os
import signal
import socket
import sys
import time
import types

from .codec import (
    MAX_PAYLOAD,
    Buffer,
    MAX_SHARED_PAYLOAD,
    SHARED_THRESHOLD,
    Channel,
    ChannelClosed,
    ProtocolError,
    SharedPayloadError,
    _close_quietly,
    dumps_value,
)
from . import http_app
from .errors import LAZY_STDLIB, _log, describe_error, preload, stdlib
from .sdk import MAX_CALL_DEPTH, _start_calls, _state

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


def load_target(code_dir, module_name, function_name, apps=True, deps=()):
    """Imports the handler's module and returns ``(kind, target)``: with ``apps``, an
    HTTP app the module offers (``kind`` ``"wsgi"``/``"asgi"``, see ``http_app.find``),
    else the handler (``kind`` None). ``__main__`` is OpenWhisk's format:
    ``<code_dir>/__main__.py``, loaded as module ``__sprout_main__`` so the zygote's
    ``__main__`` (the bootstrap) stays. ``deps``, the function's package directories,
    come right after the code directory on the import path, before the
    interpreter's own."""
    os.chdir(code_dir)
    # Code that names a module as the standard library does would be found first
    # by the runtime's later imports of LAZY_STDLIB (and theirs): import them now,
    # as a zygote that preloads did, so the function sees what it would there.
    if not all(name in sys.modules for name in LAZY_STDLIB) and _shadows_stdlib([code_dir, *deps]):
        preload()
    sys.path[0:0] = [code_dir, *deps]
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
    if apps:
        kind, target = http_app.find(module, function_name)
        if kind is not None:
            return kind, target
    try:
        handler = getattr(module, function_name)
    except AttributeError:
        raise AttributeError(f"module '{module_name}' has no attribute '{function_name}'") from None
    if not callable(handler):
        raise TypeError(f"handler {module_name}:{function_name} is not callable")
    return None, handler


def _shadows_stdlib(dirs):
    """Whether one of ``dirs`` holds a module, package or file named like a module
    of the standard library (``token.py``, ``inspect/``, ``ast.cpython-311.so``)."""
    for path in dirs:
        try:
            names = os.listdir(path)
        except OSError:
            continue
        if any(name.split(".", 1)[0] in sys.stdlib_module_names for name in names):
            return True
    return False


# What makes ``inspect.signature`` of a plain function differ from its code object.
_SIGNATURE_ATTRS = frozenset(
    ("__wrapped__", "__signature__", "__text_signature__", "_partialmethod", "__partialmethod__")
)
_CO_VARARGS = 0x04  # inspect.CO_VARARGS


def _takes_context(handler):
    """Whether ``handler`` is AWS Lambda-shaped: exactly two positional parameters,
    neither with a default (``handler(event, context)``), and no ``*args``. A handler
    ``f(event, verbose=False)`` is called with the event alone, as it always was.

    A plain function is read off its code object, as ``inspect.signature`` would read
    it: a one-shot instance then never imports ``inspect`` (8 ms here)."""
    if type(handler) is types.FunctionType and _SIGNATURE_ATTRS.isdisjoint(handler.__dict__):
        code = handler.__code__
        return code.co_argcount == 2 and not code.co_flags & _CO_VARARGS and not handler.__defaults__
    return _takes_context_by_signature(handler)


def _takes_context_by_signature(handler):
    """``_takes_context`` for any callable, through ``inspect.signature``."""
    inspect = stdlib("inspect")
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return False
    positionals = [p for p in params if p.kind in positional]
    return len(positionals) == 2 and all(p.default is p.empty for p in positionals)


class LambdaContext:
    """What an AWS Lambda-style handler gets as ``context``, for one invocation."""

    __slots__ = (
        "function_name",
        "function_version",
        "invoked_function_arn",
        "memory_limit_in_mb",
        "aws_request_id",
        "log_group_name",
        "log_stream_name",
        "identity",
        "client_context",
        "_deadline",
    )

    def __init__(self, about, request_id, deadline):
        (
            self.function_name,
            self.function_version,
            self.invoked_function_arn,
            self.memory_limit_in_mb,
            self.log_group_name,
            self.log_stream_name,
        ) = about
        self.aws_request_id = f"{request_id:032x}" if isinstance(request_id, int) else str(request_id)
        self.identity = None
        self.client_context = None
        self._deadline = deadline

    def get_remaining_time_in_millis(self):
        """Milliseconds left of the invocation's time limit (counted from its arrival)."""
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class LambdaHandler:
    """An ``(event, context)`` handler as the instance calls it: ``serve`` tells it of
    each invocation (``arrived``) before calling it with the event alone."""

    def __init__(self, handler, header):
        self.handler = handler
        function = header["function"]
        namespace = header.get("namespace") or "_"
        # Fields as AWS's runtime gives them: strings for the version and the memory.
        self.about = (
            function,
            str(header.get("version", 0)),
            f"arn:aws:lambda:sprout:{namespace}:function:{function}",
            str(header.get("memory_mb", 0)),
            f"/aws/lambda/{function}",
            f"sprout/{os.environ.get('SPROUT_INSTANCE', '')}",
        )
        self.timeout = max(int(header.get("timeout_ms", 0) or 0), 0) / 1000
        self.context = None

    def arrived(self, request_id):
        self.context = LambdaContext(self.about, request_id, time.monotonic() + self.timeout)

    def __call__(self, event):
        context, self.context = self.context, None
        if context is None:  # invoked without serve (a test): no arrival recorded
            context = LambdaContext(self.about, 0, time.monotonic() + self.timeout)
        return self.handler(event, context)


def _raised(request_id, exc, **kw):
    return {"op": "raised", "id": request_id, "error": describe_error(exc, **kw)}, b""


def _encode_result(request_id, result):
    """The reply ``(header, payload)`` for a handler's result."""
    if isinstance(result, Buffer):  # handed off as it is: its own memfd
        return {"op": "returned", "id": request_id, "raw": True}, result
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
            body = dumps_value(result).encode()
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


class _activation_env:
    """An OpenWhisk activation's variables in ``os.environ`` while it runs; what
    was there before is put back after (a warm instance serves sprout's own
    invocations too)."""

    def __init__(self, env):
        self.env = env
        self.saved = {}

    def __enter__(self):
        for key, value in self.env.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return False


def invoke(handler, request_id, payload, depth=0, raw=False, openwhisk=False):
    """Runs one invocation at call ``depth``; returns the reply ``(header, payload)``.

    ``payload`` is the event: JSON text, or with ``raw`` bytes that the handler gets
    as a read-only memoryview (no copy). Either way any buffer (bytes, mmap).
    ``openwhisk``: an OpenWhisk activation, whose exception's traceback also goes
    to stderr (its logs), as OpenWhisk's Python runtime writes it.
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
    state.no_direct.clear()  # a function the shim would not bind is asked again
    try:
        try:
            result = handler(event)
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too
            reply, body = _raised(request_id, exc)
            if openwhisk:
                error = reply["error"]
                text = error["traceback"] or f"{error['type']}: {error['message']}\n"
                sys.stderr.write(text if text.startswith("Traceback") else "Traceback (most recent call last):\n" + text)
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


def serve_http(app, request_id, header, payload):
    """Runs one ``http`` request through an HTTP app; returns the reply
    ``(header, payload)``: ``responded`` with its status, headers and body, or
    ``raised``."""
    state = _state()
    state.depth, state.called = 0, False
    try:
        try:
            reply, body = http_app.serve_one(app.kind, app.target, app.asgi, header, payload)
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too
            reply, body = _raised(request_id, exc)
        else:
            reply["id"] = request_id
    finally:
        state = _state()
        called, state.called = state.called, False
    if called:
        reply["called"] = True
    return reply, body


class HttpApp:
    """A loaded HTTP app: its kind (``"wsgi"``/``"asgi"``), the app, and for ASGI the
    instance's event loop."""

    def __init__(self, kind, target):
        self.kind = kind
        self.target = target
        self.asgi = http_app.AsgiRunner() if kind == http_app.ASGI else None


def _answer(handler, header, payload, direct=False):
    """The reply ``(header, payload)`` to one request, or None for one to ignore.
    ``direct``: it came on a direct channel from a caller in this sandbox, where only
    plain ``invoke``s belong (no OpenWhisk environment, no HTTP)."""
    app = handler if isinstance(handler, HttpApp) else None
    op = header.get("op")
    request_id = header.get("id")
    if op == "http" and app is not None and not direct:
        return serve_http(app, request_id, header, payload)
    if op != "invoke":
        _log(f"ignoring unknown message op={op!r}")
        return None
    if app is not None:
        exc = TypeError(
            f"function {os.environ.get('SPROUT_FUNCTION', '')} is an HTTP app ({app.kind}): "
            "send it HTTP requests on /run/{name}"
        )
        return _raised(request_id, exc, frames=False)
    if isinstance(handler, LambdaHandler):
        handler.arrived(request_id)
    env = header.get("env")
    depth = header.get("depth", 0)
    problem = None if env is None else _check_env(env, "invoke env")
    if direct and env is not None:
        problem = "an invoke on a direct channel carries no env"
    elif direct and isinstance(depth, int) and depth > MAX_CALL_DEPTH:
        problem = f"call depth {depth} exceeds the limit of {MAX_CALL_DEPTH}"
    if problem is not None:
        error = {"type": "ProtocolError", "message": problem, "traceback": ""}
        return {"op": "raised", "id": request_id, "error": error}, b""
    if env is None:
        return invoke(handler, request_id, payload, depth, header.get("raw", False))
    with _activation_env(env):
        return invoke(handler, request_id, payload, depth, header.get("raw", False), openwhisk=True)


def _send_reply(channel, request_id, reply, body):
    """Sends a reply (or why it could not be sent); OSError when the peer is gone."""
    # Everything the handler printed is in the pipes before the caller hears back.
    _flush_stdio()
    try:
        channel.send(reply, body)
    except (ProtocolError, SharedPayloadError) as exc:  # nothing was sent
        failed, _ = _raised(request_id, exc, frames=False, message=f"cannot send the result: {exc}")
        if reply.get("called"):
            failed["called"] = True
        channel.send(failed)


def serve(channel, handler):
    """Answers invokes until the agent closes the channel; returns the exit status.
    A ``bind`` hands over a direct channel, served alone until its caller closes it."""
    while True:
        try:
            header, payload, fds = channel.recv()
        except ChannelClosed:
            return 0
        token = header.get("token")
        if header.get("op") == "bind" and len(fds) == 1 and isinstance(token, int):
            serve_direct(fds[0], handler)
            try:
                channel.send({"op": "unbound", "token": token})
            except OSError:  # the shim is gone
                return 0
            continue
        for fd in fds:
            _close_quietly(fd)
        request_id = header.get("id")
        answer = _answer(handler, header, payload)
        if answer is None:
            continue
        reply, body = answer
        try:
            _send_reply(channel, request_id, reply, body)
        except OSError:  # the agent is gone
            return 0
        finally:
            # A shared event's mapping goes only now, after the answer: unmapping the
            # last reference frees its pages (~17 ms for 64 MiB), which the caller
            # need not wait for.
            del body, payload


def serve_direct(fd, handler):
    """Answers one caller's invokes on a direct channel (``fd``, the shim's ``bind``)
    until the caller closes it (or breaks the channel)."""
    direct = Channel(socket.socket(fileno=fd))
    try:
        while True:
            try:
                header, payload, fds = direct.recv()
            except (ChannelClosed, ProtocolError, OSError):
                return
            for extra in fds:
                _close_quietly(extra)
            answer = _answer(handler, header, payload, direct=True)
            if answer is None:
                continue
            reply, body = answer
            try:
                _send_reply(direct, header.get("id"), reply, body)
            except OSError:  # the caller is gone (or gave up on this call)
                return
            finally:
                del body, payload
    finally:
        direct.close()


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
    # The function's own environment (its ol.yaml's), there before its module is
    # imported; the agent checked the names (sprout's own are not among them).
    os.environ.update(header.get("env") or {})
    os.environ["SPROUT_FUNCTION"] = header["function"]
    handler_spec = header["handler"]
    try:
        kind, handler = load_target(
            header["code_dir"], handler_spec["module"], handler_spec["function"], deps=header.get("deps", ())
        )
        if kind is not None:
            handler = HttpApp(kind, handler)
        elif _takes_context(handler):
            handler = LambdaHandler(handler, header)
    except BaseException as exc:  # noqa: BLE001
        return _report_load_failure(channel, describe_error(exc, skip_import=True))
    _flush_stdio()
    loaded = {"op": "loaded"}
    if kind is not None:
        loaded["http"] = kind
    try:
        channel.send(loaded)
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


def _check_env(env, what):
    """Returns why ``env`` cannot be exported, or None."""
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        return f"{what} is not an object of strings"
    if any(not k or "=" in k or "\0" in k or "\0" in v for k, v in env.items()):
        return f"{what} has a name that is empty or holds = or NUL, or a value with NUL"
    return None


def _check_load(header):
    """Returns why a ``load`` request cannot be served, or None."""
    if header.get("op") != "load":
        return f"expected a load request, got op={header.get('op')!r}"
    for key in ("function", "code_dir"):
        if not isinstance(header.get(key), str):
            return f"{key} {header.get(key)!r} is not a string"
    problem = _check_env(header.get("env", {}), "env")
    if problem is not None:
        return problem
    handler = header.get("handler")
    if not (
        isinstance(handler, dict) and isinstance(handler.get("module"), str) and isinstance(handler.get("function"), str)
    ):
        return f"handler {handler!r} is not {{\"module\": ..., \"function\": ...}}"
    deps = header.get("deps", [])
    if not (isinstance(deps, list) and all(isinstance(d, str) and d.startswith("/deps/") for d in deps)):
        return f"deps {deps!r} is not a list of /deps/ directories"
    return None

