"""HTTP apps behind OpenLambda's ``/run/{name}[/path]``: finding a WSGI or ASGI app in
a handler's module, and running one request through it.

An instance whose module is an app says so in ``loaded`` (``http: "wsgi"|"asgi"``);
the agent then sends it ``http`` frames (method, ``script_name``, ``path``, ``query``,
``headers``; the payload is the body) and it answers ``responded`` (``status``,
``headers``; the payload is the body). The agent checks what comes back.

Which app, as OpenLambda chooses (compat C.2): ``OL_WSGI_ENTRY`` / ``OL_ASGI_ENTRY``
in the function's environment name an attribute of the module; otherwise the
handler's function (``f``) if the module has it (a plain function); otherwise an
attribute ``app``: ASGI if it (or its ``__call__``) is a coroutine function, WSGI if
not.
"""

import io
import os
import sys
from urllib.parse import unquote, unquote_to_bytes

from .errors import stdlib

WSGI = "wsgi"
ASGI = "asgi"

# The largest body an app may answer with: the agent's limit for a result.
MAX_BODY = 64 << 20


class BadResponse(Exception):
    """An app broke its protocol (WSGI's or ASGI's): no response can be sent."""


def _is_async(app):
    inspect = stdlib("inspect")
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(app, "__call__", None)
    return call is not None and inspect.iscoroutinefunction(call)


def find(module, function_name):
    """``(kind, target)``: the app the module offers (``kind`` WSGI or ASGI), or the
    plain handler (``kind`` None; ``target`` None when the module has neither). An
    entry named in the environment that is missing raises AttributeError naming it."""
    for var, kind in (("OL_WSGI_ENTRY", WSGI), ("OL_ASGI_ENTRY", ASGI)):
        attr = os.environ.get(var)
        if attr:
            try:
                app = getattr(module, attr)
            except AttributeError:
                raise AttributeError(f"module '{module.__name__}' has no attribute '{attr}' ({var})") from None
            if not callable(app):
                raise TypeError(f"{var} {attr} of module '{module.__name__}' is not callable")
            return kind, app
    if hasattr(module, function_name):
        return None, getattr(module, function_name)
    app = getattr(module, "app", None)
    if app is not None and callable(app):
        return (ASGI if _is_async(app) else WSGI), app
    # Neither: the caller's getattr says the handler is missing.
    return None, None


def _check_request(header):
    for key in ("method", "script_name", "path", "query"):
        if not isinstance(header.get(key), str):
            return f"http {key} {header.get(key)!r} is not a string"
    headers = header.get("headers")
    if not isinstance(headers, list) or not all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in headers
    ):
        return "http headers are not a list of [name, value] strings"
    return None


def _latin1(text):
    """A request's decoded path as WSGI wants it: its bytes, one character each."""
    return unquote_to_bytes(text).decode("latin-1")


def _wsgi_environ(header, body):
    environ = {
        "REQUEST_METHOD": header["method"],
        "SCRIPT_NAME": _latin1(header["script_name"]),
        # `/run/f` is the app's root, as OpenLambda hands it over: `/`, not empty (a
        # Flask route `/` would answer an empty path with a redirect).
        "PATH_INFO": _latin1(header["path"] or "/"),
        "QUERY_STRING": header["query"],
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for name, value in header["headers"]:
        # A name with "_" would pass for one with "-": left out, as common servers do.
        if "_" in name:
            continue
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if key == "CONTENT_TYPE":
                environ[key] = value
            continue
        key = "HTTP_" + key
        if key == "HTTP_HOST":
            environ["SERVER_NAME"] = value.rsplit(":", 1)[0] or "localhost"
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def _header_list(headers):
    out = []
    for h in headers:
        name, value = h
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if not isinstance(name, str) or not isinstance(value, str):
            raise BadResponse(f"response header {h!r} is not a pair of strings")
        out.append([name, value])
    return out


class _Body:
    def __init__(self):
        self.parts = []
        self.size = 0

    def add(self, chunk):
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise BadResponse(f"response body chunk of type {type(chunk).__name__} is not bytes")
        self.size += len(chunk)
        if self.size > MAX_BODY:
            raise BadResponse(f"response body over the limit of {MAX_BODY} bytes")
        self.parts.append(bytes(chunk))

    def bytes(self):
        return b"".join(self.parts)


def run_wsgi(app, header, body):
    """Runs one request through a PEP 3333 app: ``(status, headers, body)``."""
    started = []
    out = _Body()

    def start_response(status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if started and out.size:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif started:
            raise BadResponse("start_response called twice without exc_info")
        started[:] = [status, headers]
        return out.add

    result = app(_wsgi_environ(header, body), start_response)
    try:
        for chunk in result:
            if chunk:
                if not started:
                    raise BadResponse("the app sent body bytes before start_response")
                out.add(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not started:
        raise BadResponse("the app returned without calling start_response")
    status, headers = started
    if not isinstance(status, str):
        raise BadResponse(f"status {status!r} is not a string")
    try:
        code = int(status.split(" ", 1)[0])
    except ValueError:
        raise BadResponse(f"status {status!r} does not start with a number") from None
    return code, _header_list(headers), out.bytes()


class AsgiRunner:
    """Runs ASGI apps on one event loop for the instance's life (so an app's state,
    a connection pool for one, outlives a request). Lifespan events are not sent."""

    def __init__(self):
        self.loop = None

    def run(self, app, header, body):
        import asyncio  # only in an instance that serves an ASGI app

        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        return self.loop.run_until_complete(self._run(app, header, body))

    async def _run(self, app, header, body):
        import asyncio

        root = unquote(header["script_name"])
        rest = header["path"] or "/"
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": header["method"],
            "scheme": "http",
            "root_path": root,
            # The full path, root_path included (as uvicorn sends it).
            "path": root + unquote(rest),
            "raw_path": (header["script_name"] + rest).encode("latin-1", "replace"),
            "query_string": header["query"].encode("latin-1", "replace"),
            "headers": [
                (n.lower().encode("latin-1", "replace"), v.encode("latin-1", "replace")) for n, v in header["headers"]
            ],
            "client": ("127.0.0.1", 0),
            "server": ("localhost", 80),
            "state": {},
        }
        done = asyncio.Event()
        request_sent = False
        start = []
        out = _Body()

        async def receive():
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            # The client "leaves" once the response is complete.
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            kind = message.get("type")
            if kind == "http.response.start":
                if start:
                    raise BadResponse("http.response.start sent twice")
                status = message.get("status")
                if not isinstance(status, int) or isinstance(status, bool):
                    raise BadResponse(f"status {status!r} is not an integer")
                start[:] = [status, _header_list(message.get("headers", []))]
            elif kind == "http.response.body":
                if not start:
                    raise BadResponse("http.response.body before http.response.start")
                if done.is_set():
                    return
                out.add(message.get("body", b""))
                if not message.get("more_body", False):
                    done.set()
            else:
                raise BadResponse(f"unexpected ASGI message type {kind!r}")

        try:
            await app(scope, receive, send)
        finally:
            done.set()
        if not start:
            raise BadResponse("the app returned without sending http.response.start")
        return start[0], start[1], out.bytes()


def serve_one(kind, app, asgi, header, body):
    """One ``http`` frame's reply ``(header, payload)`` but its id; raises what the
    app raised (or BadResponse)."""
    problem = _check_request(header)
    if problem is not None:
        raise BadResponse(problem)
    body = bytes(body)
    if kind == WSGI:
        status, headers, data = run_wsgi(app, header, body)
    else:
        status, headers, data = asgi.run(app, header, body)
    # A HEAD's body comes back too: the agent sends its length (Content-Length) and
    # never its bytes, whatever an instance answers.
    return {"op": "responded", "status": status, "headers": headers}, data
