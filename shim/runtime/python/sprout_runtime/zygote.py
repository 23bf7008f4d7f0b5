"""The zygote: imports everything an instance needs once, then forks instances on
the shim's request (``fork``) until the shim closes its channel."""

import gc
import importlib
import importlib.machinery
import os
import signal
import socket
import sys

from . import enter
from .codec import Channel, ChannelClosed, _close_quietly
from .errors import _log, preload, stdlib
from .instance import _flush_stdio, instance_main
from .sdk import sprout

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


# A sandbox id as the agent makes them (`sprout-<agent>-<n>`): a host name too.
_MAX_SANDBOX_ID = 63
_RUNTIMES = ("python", "nodejs", "native")


def _check_sandbox_spec(spec, fds):
    """Returns why a fork_sandbox request cannot be served, or None."""
    if len(fds) != 2:
        return f"fork_sandbox carries {len(fds)} descriptors, expected 2 (channel, output)"
    sandbox = spec.get("sandbox")
    if (
        not isinstance(sandbox, str)
        or not 0 < len(sandbox) <= _MAX_SANDBOX_ID
        or not all(c.isascii() and (c.isalnum() or c == "-") for c in sandbox)
    ):
        return f"sandbox {sandbox!r} is not a sandbox id"
    for field in ("uid", "gid"):
        value = spec.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 0xFFFFFFFF:
            return f"{field} {value!r} is not a sandbox user"
    if spec.get("runtime") not in _RUNTIMES:
        return f"runtime {spec.get('runtime')!r} is not one of {', '.join(_RUNTIMES)}"
    return None


def _fork_sandbox(zygote, spec, fds):
    """Forks the child that makes a new sandbox (the fork server's zygote only)."""
    sandbox = spec.get("sandbox")
    problem = _check_sandbox_spec(spec, fds)
    if problem is None and enter._prepared is None:
        problem = "this zygote is not a fork server's"
    enter._forked = True
    _fork_child(
        zygote,
        fds,
        problem,
        lambda: enter.make_sandbox(zygote, spec, *fds, zygote_main),
        {"op": "sandbox_forked", "sandbox": sandbox},
        {"op": "sandbox_fork_failed", "sandbox": sandbox},
    )


# A package fork server's import request: how many paths and modules it may name.
_MAX_IMPORTS = 256
# Thread pools of numeric libraries are started when they are imported: a zygote must
# have no thread but its own when it forks, so they are made single-threaded while
# the package zygote imports (its sandboxes keep that pool).
_SINGLE_THREADED = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_imported_packages = False


def _check_import_spec(spec):
    """Returns why an import_packages request cannot be served, or None."""
    paths, modules = spec.get("paths"), spec.get("modules")
    if not isinstance(paths, list) or len(paths) > _MAX_IMPORTS:
        return f"paths must be a list of at most {_MAX_IMPORTS}"
    for path in paths:
        if not (isinstance(path, str) and path.startswith("/deps/") and "/" not in path[6:]
                and path[6:] not in ("", ".", "..") and len(path) <= 256):
            return f"path {path!r} is not a package directory (/deps/<key>)"
    if not isinstance(modules, list) or len(modules) > _MAX_IMPORTS:
        return f"modules must be a list of at most {_MAX_IMPORTS}"
    for module in modules:
        if not (isinstance(module, str) and module.isidentifier() and module.isascii() and len(module) <= 128):
            return f"module {module!r} is not a top-level module name"
    return None


def _threads():
    return len(os.listdir("/proc/self/task"))


def _import_set(paths, modules):
    """Imports ``modules`` with ``paths`` on the import path (taken off again: an
    instance puts its own function's packages there); returns what was imported and
    what failed."""
    saved_path = list(sys.path)
    saved_env = {k: os.environ.get(k) for k in _SINGLE_THREADED}
    os.environ.update({k: "1" for k in _SINGLE_THREADED})
    sys.path[0:0] = paths
    imported, failed = [], []
    try:
        for module in modules:
            try:
                importlib.import_module(module)
                imported.append(module)
            except BaseException as exc:  # noqa: BLE001 (package code: anything)
                error = f"{type(exc).__name__}: {exc}"[:1024]
                _log(f"package zygote: import {module}: {error}")
                failed.append({"module": module, "error": error})
    finally:
        sys.path[:] = saved_path
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return imported, failed


def _import_packages(zygote, spec, fds):
    """A package fork server's zygote, once, before it forks: imports a package set,
    whose directories its children keep mounted (``enter.keep_mounts``)."""
    global _imported_packages
    for fd in fds:
        _close_quietly(fd)
    problem = _check_import_spec(spec)
    if problem is None and enter._prepared is None:
        problem = "this zygote is not a fork server's"
    if problem is None and (_imported_packages or enter._forked):
        problem = "packages are imported once, before any sandbox is forked"
    if problem is not None:
        zygote.send({"op": "import_refused", "message": problem})
        return
    _imported_packages = True
    imported, failed = _import_set(spec["paths"], spec["modules"])
    threads = _threads()
    if threads > 1:
        zygote.send({"op": "import_refused",
                     "message": f"importing {', '.join(imported)} left {threads} threads running; a zygote forks with one"})
        return
    enter.keep_mounts(spec["paths"])
    gc.collect()
    gc.freeze()
    zygote.send({"op": "packages_imported", "imported": imported, "failed": failed})


def _fork(zygote, spec, fds):
    instance = spec.get("instance")
    _fork_child(
        zygote,
        fds,
        _check_spec(spec, fds),
        lambda: instance_main(zygote, instance, *fds),
        {"op": "forked", "instance": instance},
        {"op": "fork_failed", "instance": instance},
    )


def _fork_child(zygote, fds, problem, child_main, forked, failed):
    """Forks a child that runs ``child_main`` (its exit status) with the received
    ``fds``, and answers ``forked`` (with its pid) or ``failed`` (with ``problem``
    or why the fork failed). The zygote keeps none of the descriptors."""
    if problem is None:
        _flush_stdio()  # or the child would print the zygote's buffered output again
        gc.freeze()  # keep the collector from touching (and copying) the zygote's pages
        try:
            pid = os.fork()
        except OSError as exc:
            problem = f"fork: {exc}"
    if problem is not None:
        for fd in fds:
            _close_quietly(fd)
        zygote.send({**failed, "message": problem})
        return
    if pid == 0:
        status = 70
        try:
            status = child_main()
        except BaseException:  # noqa: BLE001
            try:
                stdlib("traceback").print_exc()
                _flush_stdio()
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(status)
    for fd in fds:
        _close_quietly(fd)
    zygote.send({**forked, "pid": pid})


CODE_DIR = "/code"

# Set by an agent that makes the sandbox for one instance (the one-shot CLI): its
# zygote does not import ``errors.LAZY_STDLIB`` ahead of need.
LAZY_ENV = "SPROUT_ZYGOTE_LAZY"


def _prime_import_path(path):
    """Builds and caches the import finder of the code directory in the zygote: the
    first import from a new path entry costs about a millisecond, and every
    sandbox's code appears at the same path. The finder notices when the function's
    code is mounted there (the directory changes) and rereads it."""
    if os.path.isdir(path):
        importlib.machinery.PathFinder.find_spec("__sprout_prime__", [path])


def zygote_main(fd=3, fork_server=None):
    """Serves fork requests on ``fd`` until the shim closes it; returns the exit status.

    The fork server's zygote (``SPROUT_FORK_SERVER=1`` in its environment, or
    ``fork_server=True``) also forks new sandboxes (``fork_sandbox``)."""
    if fork_server is None:
        fork_server = os.environ.pop("SPROUT_FORK_SERVER", None) == "1"
    if os.environ.pop(LAZY_ENV, None) != "1":
        preload()
    if fork_server:
        enter.prepare()
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
        if fork_server:
            enter.wait_mapped()
        while True:
            try:
                header, _payload, fds = zygote.recv()
            except ChannelClosed:
                return 0
            op = header.get("op")
            if op == "fork":
                _fork(zygote, header, fds)
            elif op == "fork_sandbox":
                _fork_sandbox(zygote, header, fds)
            elif op == "import_packages" and fork_server:
                _import_packages(zygote, header, fds)
            else:
                for received in fds:
                    _close_quietly(received)
                _log(f"ignoring unknown message op={op!r}")
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the shim went away while we were replying
