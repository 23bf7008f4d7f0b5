"""The zygote: imports everything an instance needs once, then forks instances on
the shim's request (``fork``) until the shim closes its channel."""

import gc
import importlib.machinery
import os
import signal
import socket
import sys
import traceback

from .codec import Channel, ChannelClosed, _close_quietly
from .errors import _log
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
