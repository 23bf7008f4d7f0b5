"""What the runtime reports: the ``error`` object of ``raised`` and ``load_failed``
(a traceback that shows the function's own code, bounded to fit a frame header),
and the runtime's own log lines."""

import importlib
import os
import sys

from .codec import _dumps

# The package's directory: a frame whose code is in it is the runtime's.
_RUNTIME_DIR = os.path.dirname(__file__)

# Standard library modules the runtime imports only where it needs them (an error's
# traceback, a handler that is no plain function, an HTTP app): 12 ms of this
# interpreter's start here. A zygote that forks many instances imports them at boot
# (``preload``), so that none of its instances pays; a one-shot's instance imports
# them when first needed, through ``stdlib``.
LAZY_STDLIB = ("inspect", "traceback")

# The interpreter's own import path (without the runtime's directory), as it was when
# the zygote booted: ``stdlib`` imports through it.
_INTERPRETER_PATH = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(_RUNTIME_DIR)]


def stdlib(name):
    """Standard library module ``name``, imported now if it was not yet, from the
    interpreter's own import path: whatever the function put on ``sys.path`` (its
    code directory may hold a ``token.py``) or took off it."""
    module = sys.modules.get(name)
    if module is None:
        saved = sys.path[:]
        sys.path[:] = _INTERPRETER_PATH
        try:
            module = importlib.import_module(name)
        finally:
            sys.path[:] = saved
    return module


def preload():
    """Imports ``LAZY_STDLIB`` now (a no-op once imported)."""
    for name in LAZY_STDLIB:
        stdlib(name)
_IMPORTLIB_MODULES = frozenset(("importlib", "importlib._bootstrap", "importlib._bootstrap_external"))
# Bounds that keep an error header well under MAX_HEADER even if every character
# needs a 12-byte JSON escape.
_MAX_MESSAGE = 16 << 10
_MAX_TRACEBACK = 64 << 10
# The most bytes an encoded error object takes, so that the header carrying it (and the
# agent's, which adds the function's name) stays well under MAX_HEADER.
_MAX_ERROR = 64 << 10
_TRUNCATED = "... (truncated)"


def _is_runtime_file(filename):
    return os.path.dirname(filename) == _RUNTIME_DIR


def _is_runtime_frame(frame, skip_import):
    return _is_runtime_file(frame.f_code.co_filename) or (
        skip_import and frame.f_globals.get("__name__") in _IMPORTLIB_MODULES
    )


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
        traceback = stdlib("traceback")
        tb = exc.__traceback__ if frames else None
        while tb is not None and _is_runtime_frame(tb.tb_frame, skip_import):
            tb = tb.tb_next
        shown = traceback.TracebackException(type(exc), exc, tb)
        shown.stack = traceback.StackSummary.from_list(
            [f for f in shown.stack if not _is_runtime_file(f.filename)]
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


def _log(msg):
    try:
        sys.stderr.write(f"sprout runtime [{os.getpid()}]: {msg}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
