"""Tests for the sprout_runtime package: its framing, the sprout SDK against fake shim and agent
endpoints, and the real zygote driven as a subprocess.

Run from this directory with ``/usr/bin/python3 -B -m unittest -v test_sprout_runtime``.
"""

import errno
import fcntl
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
# What the shim runs with `python3 -I -B -c`, given the directory of the package.
with open(os.path.join(HERE, "bootstrap.py")) as _f:
    BOOTSTRAP = _f.read()
PYTHON = "/usr/bin/python3"
TIMEOUT = 10.0

sys.path.insert(0, HERE)
from sprout_runtime import codec, errors, http_app, instance, sdk  # noqa: E402


def wait_until(predicate, timeout=TIMEOUT, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def read_available(fd):
    """Everything already in a pipe, without blocking."""
    chunks = []
    while True:
        r, _, _ = select.select([fd], [], [], 0)
        if not r:
            break
        data = os.read(fd, 65536)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def wait_eof(fd, timeout=TIMEOUT):
    """Drains a pipe until every write end is closed."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("pipe never reached end of file")
        r, _, _ = select.select([fd], [], [], left)
        if r and not os.read(fd, 65536):
            return


def readable(channel, timeout=0.0):
    return bool(select.select([channel.fileno()], [], [], timeout)[0])


def memfd_with(data, seals=codec._SEALS):
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def send_hand_made(sock, header, payload_len, fds, shared, payload=b""):
    """Writes a frame laid out as ipc/src/frame.rs does, with ``fds`` by SCM_RIGHTS."""
    word = len(fds) | (0x8000_0000 if shared else 0)
    data = struct.pack("<III", len(header), payload_len, word) + header + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    sent = sock.sendmsg([data], anc)
    sock.sendall(data[sent:])


class Peer:
    """Runs ``target`` on a thread; ``join`` re-raises what it raised."""

    def __init__(self, target):
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self.thread.start()

    def _run(self, target):
        try:
            target()
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def join(self):
        self.thread.join(TIMEOUT)
        if self.thread.is_alive():
            raise AssertionError("a fake peer never finished")
        if self.error is not None:
            raise self.error


def serve_agent(test, path, script):
    """A fake agent: listens on ``path``, accepts one connection and runs ``script`` on it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(TIMEOUT)
    test.addCleanup(listener.close)

    def run():
        conn, _ = listener.accept()
        conn.settimeout(TIMEOUT)
        channel = codec.Channel(conn)
        try:
            script(channel)
        finally:
            channel.close()

    return Peer(run)


class Zygote(codec.Channel):
    """The shim's end of a zygote's channel, with the process and its log."""


class Instance:
    def __init__(self, channel, pid, out_r, err_r, calls):
        self.ch = channel
        self.pid = pid
        self.out = out_r
        self.err = err_r
        self.calls = calls  # the shim's end of the instance's calls channel

    def invoke(self, request_id, event, raw=None, depth=None, raw_event=False):
        payload = raw if raw is not None else json.dumps(event).encode()
        header = {"op": "invoke", "id": request_id}
        if depth is not None:
            header["depth"] = depth
        if raw_event:
            header["raw"] = True
        self.ch.send(header, payload)
        return self.ch.recv()

    def call(self, request_id, event):
        header, payload, fds = self.invoke(request_id, event)
        assert fds == [], fds
        assert header == {"op": "returned", "id": request_id}, header
        return json.loads(str(payload, "utf-8"))


class RuntimeTest(unittest.TestCase):
    # -- fixtures

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.pids = []
        self.addCleanup(self._kill_instances)

    def _kill_instances(self):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def code_dir(self, name="fn", **files):
        path = os.path.join(self.tmp.name, name)
        os.mkdir(path)
        for fname, text in files.items():
            with open(os.path.join(path, fname + ".py"), "w") as f:
                f.write(textwrap.dedent(text))
        return path

    def start_zygote(self, env=None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log = tempfile.TemporaryFile()
        self.addCleanup(log.close)
        fd = theirs.fileno()

        def at_fd_3():
            # close_fds=False: our own descriptors are close-on-exec anyway, and
            # subprocess's own fd closing would run after this and close fd 3.
            if fd == 3:
                os.set_inheritable(3, True)
            else:
                os.dup2(fd, 3)

        proc = subprocess.Popen(
            [PYTHON, "-I", "-B", "-c", BOOTSTRAP, HERE],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=False,
            preexec_fn=at_fd_3,
            env=None if env is None else {**os.environ, **env},
        )
        theirs.close()
        ours.settimeout(TIMEOUT)
        zygote = Zygote(ours)

        def stop():
            zygote.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        self.addCleanup(stop)
        zygote.proc = proc
        zygote.log = log
        header, payload, fds = zygote.recv()
        self.assertEqual(header, {"op": "ready", "pid": proc.pid})
        self.assertEqual((payload, fds), (b"", []))
        return zygote

    def zygote_log(self, zygote):
        zygote.log.seek(0)
        return zygote.log.read().decode(errors="replace")

    def send_fork(self, zygote, instance, code_dir, module="f", function="f", about=None):
        """Sends a fork request; returns (agent channel, stdout read end, stderr read end,
        the shim's end of the calls channel)."""
        agent, inst = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        shim, inst_calls = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        zygote.send(
            {"op": "fork", "instance": instance, "runtime": "python"},
            b"",
            [inst.fileno(), out_w, err_w, inst_calls.fileno()],
        )
        inst.close()
        inst_calls.close()
        os.close(out_w)
        os.close(err_w)
        for fd in (out_r, err_r):
            self.addCleanup(os.close, fd)
        agent.settimeout(TIMEOUT)
        shim.settimeout(TIMEOUT)
        channel = codec.Channel(agent)
        calls = codec.Channel(shim)
        self.addCleanup(channel.close)
        self.addCleanup(calls.close)
        # The spare says it is set up; then it is told what to load.
        self.assertEqual(channel.recv()[0], {"op": "ready"})
        channel.send({
            "op": "load",
            "function": "fn-%d" % instance,
            "code_dir": code_dir,
            "handler": {"module": module, "function": function},
            **(about or {}),
        })
        return channel, out_r, err_r, calls

    def await_forked(self, zygote, instance):
        header, _, fds = zygote.recv()
        self.assertEqual(fds, [])
        self.assertEqual(header["op"], "forked", header)
        self.assertEqual(header["instance"], instance)
        pid = header["pid"]
        self.pids.append(pid)
        return pid

    def fork(self, zygote, instance, code_dir, module="f", function="f", about=None):
        channel, out_r, err_r, calls = self.send_fork(zygote, instance, code_dir, module, function, about)
        pid = self.await_forked(zygote, instance)
        return Instance(channel, pid, out_r, err_r, calls)

    def loaded(self, zygote, instance, code_dir, module="f", function="f", about=None):
        inst = self.fork(zygote, instance, code_dir, module, function, about)
        header, payload, fds = inst.ch.recv()
        self.assertEqual(header, {"op": "loaded"}, header)
        self.assertEqual((payload, fds), (b"", []))
        return inst

    def load_failure(self, code_dir, module="f", function="f"):
        zygote = self.start_zygote()
        inst = self.fork(zygote, 1, code_dir, module, function)
        header, _, _ = inst.ch.recv()
        self.assertEqual(header["op"], "load_failed", header)
        # The instance exits after reporting.
        with self.assertRaises(codec.ChannelClosed):
            inst.ch.recv()
        wait_until(lambda: not pid_alive(inst.pid), what="failed instance to exit")
        return header["error"]

    HELLO = """\
        def f(event):
            return "Hello, " + event["name"] + "!"
        """

    # -- zygote

    def test_ready_then_exit_0_when_the_shim_closes_fd_3(self):
        zygote = self.start_zygote()
        zygote.close()
        self.assertEqual(zygote.proc.wait(timeout=TIMEOUT), 0)
        self.assertEqual(self.zygote_log(zygote), "")

    def test_fork_load_and_invoke(self):
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 7, self.code_dir(f=self.HELLO))
        self.assertNotEqual(inst.pid, zygote.proc.pid)
        header, payload, fds = inst.invoke(1, {"name": "Alice"})
        self.assertEqual(header, {"op": "returned", "id": 1})
        self.assertEqual(payload, b'"Hello, Alice!"')
        self.assertEqual(fds, [])
        self.assertEqual(inst.call(2, {"name": "Bob"}), "Hello, Bob!")

    def test_environment_cwd_and_sys_path(self):
        code = self.code_dir(
            f="""\
            import os, signal, sys
            import sprout
            def f(event):
                fds = {}
                for name in os.listdir("/proc/self/fd"):
                    try:
                        fds[name] = [os.readlink("/proc/self/fd/" + name), os.get_inheritable(int(name))]
                    except OSError:
                        pass  # the listing's own descriptor, closed by now
                return {"cwd": os.getcwd(), "path0": sys.path[0],
                        "function": os.environ["SPROUT_FUNCTION"],
                        "instance": os.environ["SPROUT_INSTANCE"],
                        "sigchld": signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL,
                        "fd3": os.path.exists("/proc/self/fd/3"),
                        "fds": fds,
                        "sdk": [sprout.__name__, sprout.MAX_DEPTH, callable(sprout.call)]}
            """
        )
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 12, code)
        got = inst.call(1, None)
        self.assertEqual(os.path.realpath(got["cwd"]), os.path.realpath(code))
        self.assertEqual(got["path0"], code)
        self.assertEqual(got["function"], "fn-12")
        self.assertEqual(got["instance"], "12")
        self.assertTrue(got["sigchld"], "SIGCHLD is SIG_DFL again")
        self.assertFalse(got["fd3"], "the zygote's channel leaked into the instance")
        self.assertEqual(got["sdk"], ["sprout", 16, True])
        # Its own channel and its calls channel, both close-on-exec, are its only sockets
        # (other descriptors come from this test process: the zygote runs with close_fds=False).
        sockets = [v for v in got["fds"].values() if v[0].startswith("socket:")]
        self.assertEqual(len(sockets), 2, got["fds"])
        self.assertFalse(any(inheritable for _, inheritable in sockets), got["fds"])

    def test_output_is_in_the_pipes_before_returned(self):
        code = self.code_dir(
            f="""\
            import sys
            def f(event):
                print("to stdout", event, end="")
                sys.stderr.write("to stderr")
                return 1
            """
        )
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code)
        self.assertEqual(inst.call(1, "one"), 1)
        self.assertEqual(read_available(inst.out), b"to stdout one")
        self.assertEqual(read_available(inst.err), b"to stderr")
        self.assertEqual(inst.call(2, "two"), 1)
        self.assertEqual(read_available(inst.out), b"to stdout two")
        self.assertEqual(self.zygote_log(zygote), "")

    PRELOADED = """\
        import os, sys

        def f(event):
            if event == "raise":
                raise ValueError("lazily")
            if event == "raise without a path":
                sys.path.clear()
                raise ValueError("pathless")
            present = [m for m in ("inspect", "traceback", "urllib.parse") if m in sys.modules]
            return {"present": present, "env": "SPROUT_ZYGOTE_LAZY" in os.environ}
        """

    def test_a_zygote_preloads_what_instances_import_lazily_unless_told_not_to(self):
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, self.code_dir("many", f=self.PRELOADED))
        self.assertEqual(inst.call(1, None), {"present": ["inspect", "traceback", "urllib.parse"], "env": False})
        lazy = self.start_zygote(env={"SPROUT_ZYGOTE_LAZY": "1"})
        inst = self.loaded(lazy, 2, self.code_dir("one", f=self.PRELOADED))
        # Nothing imported ahead (urllib.parse always is), the variable gone; an
        # error still has its traceback, even with the function's sys.path emptied.
        self.assertEqual(inst.call(2, None), {"present": ["urllib.parse"], "env": False})
        for request_id, event, message in ((3, "raise", "lazily"), (4, "raise without a path", "pathless")):
            header, _, _ = inst.invoke(request_id, event)
            self.assertEqual((header["op"], header["error"]["message"]), ("raised", message))
            self.assertTrue(header["error"]["traceback"].endswith(f"ValueError: {message}\n"), header)
            self.assertIn("in f\n", header["error"]["traceback"])

    def test_a_lazy_zygote_imports_ahead_for_code_that_names_a_standard_module(self):
        # The function's own token.py would otherwise be what traceback's imports
        # find (its code directory comes first on the path).
        code = self.code_dir(f=self.PRELOADED, token="""\
            raise ImportError("the function's token.py was imported")
            """)
        lazy = self.start_zygote(env={"SPROUT_ZYGOTE_LAZY": "1"})
        inst = self.loaded(lazy, 1, code)
        self.assertEqual(inst.call(1, None)["present"], ["inspect", "traceback", "urllib.parse"])
        header, _, _ = inst.invoke(2, "raise")
        self.assertTrue(header["error"]["traceback"].endswith("ValueError: lazily\n"), header)

    def test_handler_exception_is_raised_and_instance_keeps_serving(self):
        code = self.code_dir(
            f="""\
            def helper(x):
                raise ValueError("bad " + x)

            def f(event):
                if event.get("fail"):
                    helper(event["fail"])
                return "ok"
            """
        )
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code)
        header, payload, _ = inst.invoke(5, {"fail": "input"})
        self.assertEqual(header["op"], "raised")
        self.assertEqual(header["id"], 5)
        self.assertEqual(payload, b"")
        err = header["error"]
        self.assertEqual(err["type"], "ValueError")
        self.assertEqual(err["message"], "bad input")
        tb = err["traceback"]
        self.assertTrue(tb.startswith("Traceback (most recent call last):\n"), tb)
        self.assertIn(os.path.join(code, "f.py"), tb)
        self.assertIn("in f\n", tb)
        self.assertIn("in helper\n", tb)
        self.assertTrue(tb.endswith("ValueError: bad input\n"), tb)
        self.assertNotIn("sprout_runtime", tb)
        self.assertEqual(inst.call(6, {}), "ok")

    def test_system_exit_is_raised_not_fatal(self):
        code = self.code_dir(
            f="""\
            import sys
            def f(event):
                if event:
                    sys.exit(3)
                return "alive"
            """
        )
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code)
        header, _, _ = inst.invoke(1, True)
        self.assertEqual(header["op"], "raised")
        self.assertEqual(header["error"]["type"], "SystemExit")
        self.assertEqual(header["error"]["message"], "3")
        self.assertEqual(inst.call(2, False), "alive")

    def test_result_that_is_not_json(self):
        code = self.code_dir(
            f="""\
            def f(event):
                return {"set": {1, 2}} if event == "set" else float("nan") if event == "nan" else event
            """
        )
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code)
        header, payload, _ = inst.invoke(1, "set")
        self.assertEqual(header["op"], "raised")
        self.assertEqual(header["error"]["type"], "TypeError")
        self.assertIn("not JSON serializable", header["error"]["message"])
        self.assertNotIn("sprout_runtime", header["error"]["traceback"])
        header, _, _ = inst.invoke(2, "nan")
        self.assertEqual(header["op"], "raised")
        self.assertEqual(header["error"]["type"], "ValueError")
        self.assertEqual(inst.call(3, [1, "x"]), [1, "x"])

    def test_event_that_is_not_json(self):
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, self.code_dir(f=self.HELLO))
        header, _, _ = inst.invoke(1, None, raw=b"{not json")
        self.assertEqual(header["op"], "raised")
        self.assertEqual(header["error"]["type"], "JSONDecodeError")
        self.assertIn("event is not valid JSON", header["error"]["message"])
        self.assertEqual(inst.call(2, {"name": "X"}), "Hello, X!")

    def test_large_event_and_result(self):
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, self.code_dir(f="def f(event):\n    return event\n"))
        big = "x" * (3 << 20) + "é"
        self.assertEqual(inst.call(1, big), big)
        self.assertEqual(inst.call(2, {"small": True}), {"small": True})

    LAMBDA = """\
        import time

        def handler(event, context):
            if event.get("sleep"):
                time.sleep(event["sleep"])
            return {
                "event": event,
                "function_name": context.function_name,
                "function_version": context.function_version,
                "aws_request_id": context.aws_request_id,
                "memory_limit_in_mb": context.memory_limit_in_mb,
                "invoked_function_arn": context.invoked_function_arn,
                "log_group_name": context.log_group_name,
                "remaining": context.get_remaining_time_in_millis(),
            }
        """

    def test_lambda_handler_gets_a_context(self):
        zygote = self.start_zygote()
        about = {"namespace": "team", "version": 4, "memory_mb": 256, "timeout_ms": 3000}
        inst = self.loaded(zygote, 5, self.code_dir(f=self.LAMBDA), function="handler", about=about)
        result = inst.call(0x2A, {"k": 1})
        remaining = result.pop("remaining")
        self.assertEqual(
            result,
            {
                "event": {"k": 1},
                "function_name": "fn-5",
                "function_version": "4",
                "aws_request_id": "%032x" % 0x2A,
                "memory_limit_in_mb": "256",
                "invoked_function_arn": "arn:aws:lambda:sprout:team:function:fn-5",
                "log_group_name": "/aws/lambda/fn-5",
            },
        )
        self.assertTrue(2500 < remaining <= 3000, remaining)
        # The time left is counted from each invocation's arrival, not the load's.
        time.sleep(0.6)
        later = inst.call(0x2B, {"sleep": 0.5})
        self.assertEqual(later["aws_request_id"], "%032x" % 0x2B)
        self.assertTrue(2000 < later["remaining"] <= 2550, later["remaining"])

    def test_handler_shapes_that_get_no_context(self):
        code = self.code_dir(f="""\
            def one(event):
                return "one"

            def star(*args):
                return len(args)

            def optional(event, verbose=False):
                return verbose

            def three(a, b, c):
                return "never"
            """)
        zygote = self.start_zygote()
        self.assertEqual(self.loaded(zygote, 1, code, function="one").call(1, {}), "one")
        self.assertEqual(self.loaded(zygote, 2, code, function="star").call(1, {}), 1)
        # A second parameter with a default is the handler's own option, not a context.
        self.assertIs(self.loaded(zygote, 3, code, function="optional").call(1, {}), False)
        header, _, _ = self.loaded(zygote, 4, code, function="three").invoke(1, {})
        self.assertEqual(header["op"], "raised", header)
        self.assertEqual(header["error"]["type"], "TypeError")

    def test_lambda_context_without_about(self):
        # A load without namespace/version/memory/time limit (an older agent).
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 6, self.code_dir(f=self.LAMBDA), function="handler")
        result = inst.call(1, {})
        self.assertEqual(result["function_version"], "0")
        self.assertEqual(result["invoked_function_arn"], "arn:aws:lambda:sprout:_:function:fn-6")
        self.assertEqual(result["remaining"], 0)

    def test_openwhisk_main(self):
        code = self.code_dir(
            __main__="""\
            def main(args):
                return {"greeting": "Hello, " + args["name"] + "!", "module": __name__}

            if __name__ == "__main__":
                raise SystemExit("must not run")
            """
        )
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code, module="__main__", function="main")
        self.assertEqual(
            inst.call(1, {"name": "Alice"}),
            {"greeting": "Hello, Alice!", "module": "__sprout_main__"},
        )

    def test_package_module(self):
        code = self.code_dir()
        os.mkdir(os.path.join(code, "pkg"))
        with open(os.path.join(code, "pkg", "__init__.py"), "w"):
            pass
        with open(os.path.join(code, "pkg", "mod.py"), "w") as f:
            f.write("def run(event):\n    return ['pkg', event]\n")
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code, module="pkg.mod", function="run")
        self.assertEqual(inst.call(1, 4), ["pkg", 4])

    def test_module_named_like_a_module_the_zygote_imported(self):
        code = self.code_dir(struct="def f(event):\n    return 'mine'\n")
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code, module="struct", function="f")
        self.assertEqual(inst.call(1, None), "mine")

    def test_handler_returns_bytes(self):
        code = self.code_dir(
            f="""\
            import sprout
            def f(event):
                kind, n = event
                data = bytes(range(256)) * n
                if kind == "buffer":
                    buf = sprout.buffer(len(data))
                    buf[:] = data
                    return buf
                return {"bytes": data, "bytearray": bytearray(data), "view": memoryview(data)[::2]}[kind]
            """
        )
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code)
        header, payload, fds = inst.invoke(1, ["bytes", 1])
        self.assertEqual((header, fds), ({"op": "returned", "id": 1, "raw": True}, []))
        self.assertEqual(payload, bytes(range(256)))
        header, payload, _ = inst.invoke(2, ["bytearray", 1000])
        self.assertEqual(header, {"op": "returned", "id": 2, "raw": True})
        self.assertIsInstance(payload, mmap.mmap)  # over 64 KiB: shared
        self.assertEqual(bytes(payload), bytes(range(256)) * 1000)
        header, payload, _ = inst.invoke(3, ["view", 2])
        self.assertEqual(header, {"op": "returned", "id": 3, "raw": True})
        self.assertEqual(payload, (bytes(range(256)) * 2)[::2])
        self.assertEqual(inst.invoke(4, ["bytes", 0]), ({"op": "returned", "id": 4, "raw": True}, b"", []))
        header, payload, _ = inst.invoke(5, ["buffer", 1000])
        self.assertEqual(header, {"op": "returned", "id": 5, "raw": True})
        self.assertEqual(bytes(payload), bytes(range(256)) * 1000)
        self.assertEqual(self.zygote_log(zygote), "")

    def test_raw_event(self):
        code = self.code_dir(
            f="""\
            def f(event):
                if len(event) > 100:
                    return event  # a raw event handed back: a raw result
                return {"type": type(event).__name__, "readonly": event.readonly, "head": list(event[:4])}
            """
        )
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code)
        header, payload, _ = inst.invoke(1, None, raw=b"\x00\xff\x01{not json", raw_event=True)
        self.assertEqual(header, {"op": "returned", "id": 1})
        self.assertEqual(
            json.loads(payload), {"type": "memoryview", "readonly": True, "head": [0, 255, 1, 123]}
        )
        big = os.urandom(3 << 20)
        header, payload, _ = inst.invoke(2, None, raw=big, raw_event=True)
        self.assertEqual(header, {"op": "returned", "id": 2, "raw": True})
        self.assertEqual(bytes(payload), big)
        header, payload, _ = inst.invoke(3, None, raw=b"", raw_event=True)
        self.assertEqual(json.loads(payload), {"type": "memoryview", "readonly": True, "head": []})
        # Without "raw" the event is JSON again.
        self.assertEqual(inst.call(4, "x" * 200), "x" * 200)

    def test_handler_calls_a_function_through_its_calls_channel(self):
        sock_path = os.path.join(self.tmp.name, "agent.sock")
        code = self.code_dir(
            f="""\
            import sprout
            def f(event):
                sprout._AGENT_SOCKET = event["sock"]
                if "n" not in event:
                    return "no call"
                return sprout.call("g", {"n": event["n"]})
            """
        )
        spec = {"function": "g", "version": 2, "code_dir": "/code/g",
                "handler": {"module": "g", "function": "g"}, "timeout_ms": 5000}

        def agent(ch):
            header, payload, _ = ch.recv()
            self.assertEqual(header, {"op": "resolve", "id": header["id"], "function": "g"})
            ch.send({"op": "resolved", "id": header["id"], "spec": spec})

        peer = serve_agent(self, sock_path, agent)
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code)
        inst.ch.send({"op": "invoke", "id": 1, "depth": 3}, json.dumps({"sock": sock_path, "n": 5}).encode())
        header, _, _ = inst.calls.recv()
        self.assertEqual(header, {"op": "bind", "id": header["id"], "function": "g", "spec": spec})
        inst.calls.send({"op": "call_refused", "id": header["id"], "function": "g", "kind": "too_many_channels", "message": "full"})
        header, payload, fds = inst.calls.recv()
        self.assertEqual(header, {"op": "call", "id": header["id"], "function": "g", "depth": 4, "spec": spec})
        self.assertEqual((json.loads(payload), fds), ({"n": 5}, []))
        inst.calls.send({"op": "call_returned", "id": header["id"]}, b'{"got":5}')
        self.assertEqual(inst.ch.recv(), ({"op": "returned", "id": 1, "called": True}, b'{"got":5}', []))
        peer.join()
        # The spec is cached: the next invocation's call goes straight to the shim
        # (which is asked for a direct channel again, and refuses again).
        inst.ch.send({"op": "invoke", "id": 2}, json.dumps({"sock": sock_path, "n": 6}).encode())
        header, _, _ = inst.calls.recv()
        self.assertEqual(header["op"], "bind")
        inst.calls.send({"op": "call_refused", "id": header["id"], "function": "g", "kind": "too_many_channels", "message": "full"})
        header, payload, _ = inst.calls.recv()
        self.assertEqual((header["depth"], json.loads(payload)), (1, {"n": 6}))
        error = {"type": "ValueError", "message": "bad six", "traceback": "Traceback ...\n"}
        inst.calls.send({"op": "call_raised", "id": header["id"], "function": "g", "error": error})
        header, _, _ = inst.ch.recv()
        self.assertEqual((header["op"], header["called"]), ("raised", True))
        self.assertEqual(header["error"]["type"], "CallError")
        self.assertEqual(header["error"]["message"], "g raised ValueError: bad six")
        self.assertIn("in f\n", header["error"]["traceback"])
        # No call, no "called".
        header, payload, _ = inst.invoke(3, {"sock": sock_path})
        self.assertEqual((header, payload), ({"op": "returned", "id": 3}, b'"no call"'))
        self.assertEqual(self.zygote_log(zygote), "")

    def test_a_bound_instance_serves_its_caller_then_the_shim_again(self):
        code = self.code_dir(
            f="""\
            import os
            def f(event):
                if event == "env":
                    return os.environ.get("__OW_X")
                return event * 2
            """
        )
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, code)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(TIMEOUT)
        inst.ch.send({"op": "bind", "token": 5}, b"", [theirs.fileno()])
        theirs.close()
        direct = codec.Channel(ours)
        direct.send({"op": "invoke", "id": 1, "depth": 2}, b"21")
        self.assertEqual(direct.recv(), ({"op": "returned", "id": 1}, b"42", []))
        big = "y" * (100 << 10)  # a shared event and result
        direct.send({"op": "invoke", "id": 2, "depth": 2}, json.dumps(big).encode())
        header, payload, _ = direct.recv()
        self.assertEqual((header, json.loads(str(payload, "utf-8"))), ({"op": "returned", "id": 2}, big * 2))
        # What only the agent may send is refused here.
        direct.send({"op": "invoke", "id": 3, "env": {"__OW_X": "1"}}, b'"env"')
        header, _, _ = direct.recv()
        self.assertEqual((header["op"], header["error"]["message"]), ("raised", "an invoke on a direct channel carries no env"))
        direct.send({"op": "invoke", "id": 4, "depth": 17}, b"1")
        header, _, _ = direct.recv()
        self.assertEqual(header["error"]["message"], "call depth 17 exceeds the limit of 16")
        # The caller lets go: the instance says so and serves the shim again.
        direct.close()
        self.assertEqual(inst.ch.recv(), ({"op": "unbound", "token": 5}, b"", []))
        self.assertEqual(inst.call(5, 4), 8)
        self.assertEqual(self.zygote_log(zygote), "")

    # -- load failures

    def test_missing_module(self):
        err = self.load_failure(self.code_dir(g="def f(e): pass\n"))
        self.assertEqual(err["type"], "ModuleNotFoundError")
        self.assertEqual(err["message"], "No module named 'f'")
        self.assertNotIn("sprout_runtime", err["traceback"])
        self.assertNotIn("importlib", err["traceback"])

    def test_missing_main(self):
        err = self.load_failure(self.code_dir(f=self.HELLO), module="__main__", function="main")
        self.assertEqual(err["type"], "ModuleNotFoundError")
        self.assertIn("__main__", err["message"])

    def test_missing_function(self):
        err = self.load_failure(self.code_dir(f=self.HELLO), function="g")
        self.assertEqual(err["type"], "AttributeError")
        self.assertEqual(err["message"], "module 'f' has no attribute 'g'")
        self.assertNotIn("sprout_runtime", err["traceback"])

    def test_handler_not_callable(self):
        err = self.load_failure(self.code_dir(f="f = 42\n"))
        self.assertEqual(err["type"], "TypeError")
        self.assertEqual(err["message"], "handler f:f is not callable")

    def test_exception_at_import(self):
        code = self.code_dir(f="import os\n\nraise RuntimeError('boom at import')\n")
        err = self.load_failure(code)
        self.assertEqual(err["type"], "RuntimeError")
        self.assertEqual(err["message"], "boom at import")
        self.assertIn(os.path.join(code, "f.py"), err["traceback"])
        self.assertNotIn("sprout_runtime", err["traceback"])
        self.assertNotIn("<frozen importlib", err["traceback"])

    def test_syntax_error(self):
        err = self.load_failure(self.code_dir(f="def f(:\n"))
        self.assertEqual(err["type"], "SyntaxError")
        self.assertIn("f.py", err["traceback"])

    def test_missing_code_dir(self):
        err = self.load_failure(os.path.join(self.tmp.name, "nowhere"))
        self.assertEqual(err["type"], "FileNotFoundError")

    # -- instances and the zygote's bookkeeping

    def test_two_instances_are_separate_processes(self):
        code = self.code_dir(
            f="""\
            import os
            count = 0
            def f(event):
                global count
                count += 1
                return [os.getpid(), count]
            """
        )
        zygote = self.start_zygote()
        a = self.loaded(zygote, 1, code)
        b = self.loaded(zygote, 2, code)
        self.assertNotEqual(a.pid, b.pid)
        self.assertEqual(a.call(1, None), [a.pid, 1])
        self.assertEqual(a.call(2, None), [a.pid, 2])
        self.assertEqual(b.call(1, None), [b.pid, 1])
        os.kill(a.pid, signal.SIGKILL)
        with self.assertRaises(codec.ChannelClosed):
            a.ch.recv()
        self.assertEqual(b.call(2, None), [b.pid, 2])
        # The zygote ignores SIGCHLD, so the dead instance is not left a zombie.
        wait_until(lambda: not pid_alive(a.pid), what="killed instance to be reaped")

    def test_instance_exits_when_the_agent_closes_its_channel(self):
        zygote = self.start_zygote()
        inst = self.loaded(zygote, 1, self.code_dir(f=self.HELLO))
        inst.ch.close()
        wait_eof(inst.out)
        wait_eof(inst.err)
        wait_until(lambda: not pid_alive(inst.pid), what="instance to exit")
        # The zygote is unaffected.
        other = self.loaded(zygote, 2, self.code_dir("again", f=self.HELLO))
        self.assertEqual(other.call(1, {"name": "Z"}), "Hello, Z!")

    def test_pipelined_forks_do_not_leak_descriptors_into_earlier_instances(self):
        code = self.code_dir(f=self.HELLO)
        zygote = self.start_zygote()
        first = self.send_fork(zygote, 1, code)
        second = self.send_fork(zygote, 2, code)
        pid1 = self.await_forked(zygote, 1)
        pid2 = self.await_forked(zygote, 2)
        a = Instance(*first[:1], pid1, *first[1:])
        b = Instance(*second[:1], pid2, *second[1:])
        for inst in (a, b):
            self.assertEqual(inst.ch.recv()[0], {"op": "loaded"})
        # If the first instance held copies of the second's channel or pipes, the
        # agent would not see the second one die.
        os.kill(b.pid, signal.SIGKILL)
        with self.assertRaises(codec.ChannelClosed):
            b.ch.recv()
        with self.assertRaises(codec.ChannelClosed):
            b.calls.recv()
        wait_eof(b.out)
        self.assertEqual(a.call(1, {"name": "A"}), "Hello, A!")

    def test_bad_fork_requests_are_refused(self):
        zygote = self.start_zygote()
        r, w = os.pipe()
        zygote.send({"op": "fork", "instance": 3, "runtime": "python"}, b"", [w])
        os.close(w)
        header, _, _ = zygote.recv()
        self.assertEqual(header["op"], "fork_failed")
        self.assertEqual(header["instance"], 3)
        self.assertIn("descriptors", header["message"])
        wait_eof(r)  # the zygote closed what it was given
        os.close(r)
        zygote.send({"op": "no_such_op"})
        zygote.send({"op": "fork", "instance": 4, "runtime": "node"}, b"", [0, 1, 2, 0])
        header, _, _ = zygote.recv()
        self.assertEqual(header["op"], "fork_failed")
        self.assertEqual(header["instance"], 4)
        self.assertIn("runtime", header["message"])
        inst = self.loaded(zygote, 5, self.code_dir(f=self.HELLO))
        self.assertEqual(inst.call(1, {"name": "Y"}), "Hello, Y!")
        self.assertIn("no_such_op", self.zygote_log(zygote))

    def test_a_bad_load_request_is_a_load_failure(self):
        zygote = self.start_zygote()
        agent, inst = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        shim, inst_calls = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(shim.close)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        zygote.send(
            {"op": "fork", "instance": 9, "runtime": "python"},
            b"",
            [inst.fileno(), out_w, err_w, inst_calls.fileno()],
        )
        inst.close()
        inst_calls.close()
        os.close(out_w)
        os.close(err_w)
        pid = self.await_forked(zygote, 9)
        agent.settimeout(TIMEOUT)
        channel = codec.Channel(agent)
        self.addCleanup(channel.close)
        self.assertEqual(channel.recv()[0], {"op": "ready"})
        channel.send({"op": "load", "function": "x", "code_dir": "/", "handler": "f:f"})
        header, _, _ = channel.recv()
        self.assertEqual(header["op"], "load_failed", header)
        self.assertIn("handler", header["error"]["message"])
        wait_until(lambda: not pid_alive(pid), what="the instance to exit")
        for fd in (out_r, err_r):
            os.close(fd)


class TakesContextTest(unittest.TestCase):
    def test_a_plain_function_is_read_off_its_code_as_inspect_reads_it(self):
        import functools

        def wrapped(event, context):
            return event

        @functools.wraps(wrapped)
        def decorated(*args):
            return wrapped(*args)

        def signed(event):
            return event

        signed.__signature__ = inspect_signature(wrapped)

        async def coroutine(event, context):
            return event

        class Callable:
            def __call__(self, event, context):
                return event

            def method(self, event, context):
                return event

        cases = [
            lambda: 0, lambda e: 0, lambda e, c: 0, lambda e, c=1: 0, lambda e=1, c=2: 0,
            lambda e, c, d: 0, lambda *a: 0, lambda e, *a: 0, lambda e, c, *a: 0,
            lambda e, /, c: 0, lambda e, c, /: 0, lambda e, c, *, k: 0, lambda e, c, **kw: 0,
            lambda e, *, c: 0, wrapped, decorated, signed, coroutine, Callable(), Callable().method,
            functools.partial(lambda a, e, c: 0, 1), len, print,
        ]
        for handler in cases:
            self.assertEqual(
                instance._takes_context(handler), instance._takes_context_by_signature(handler), handler
            )
        self.assertTrue(instance._takes_context(wrapped))
        self.assertTrue(instance._takes_context(decorated))  # through __wrapped__
        self.assertTrue(instance._takes_context(signed))  # its __signature__ says two, its code one


def inspect_signature(function):
    import inspect

    return inspect.signature(function)


class ChannelTest(unittest.TestCase):
    def pair(self):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        ca, cb = codec.Channel(a), codec.Channel(b)
        self.addCleanup(ca.close)
        self.addCleanup(cb.close)
        return ca, cb

    def test_wire_layout_matches_ipc_frame_rs(self):
        a, b = self.pair()
        a.send({"op": "t", "n": 1}, b"xyz")
        raw = b.sock.recv(1000)
        header = b'{"op":"t","n":1}'
        self.assertEqual(raw, struct.pack("<III", len(header), 3, 0) + header + b"xyz")

    def test_headers_read_and_made_without_json_are_what_json_reads_and_makes(self):
        big = (1 << 64) - 1
        headers = [
            {"op": "invoke", "id": 0},
            {"op": "invoke", "id": 7, "depth": 3},
            {"op": "invoke", "id": big, "depth": big},
            {"op": "returned", "id": 12},
            {"op": "returned", "id": big},
            # Near misses: these go through json.
            {"op": "returned", "id": True},
            {"op": "returned", "id": -1},
            {"op": "returned", "id": big + 1},
            {"op": "returned", "id": 1.0},
            {"op": "returned", "id": 1, "raw": True},
            {"op": "invoke", "id": 1, "depth": False},
            {"op": "invoke", "id": 1, "depth": -2},
            {"op": "invoke", "id": 1, "raw": True},
            {"op": "invoke", "id": 1, "depth": 1, "raw": True},
            {"id": 1, "op": "returned"},
            {"op": "raised", "id": 1},
        ]
        for header in headers:
            made = codec.encode_header(header)
            self.assertEqual(json.loads(made), header)
            if list(header)[:2] == ["op", "id"]:
                self.assertEqual(made, json.dumps(header, separators=(",", ":")).encode(), header)
            self.assertEqual(codec.decode_header(made), header)
        # Byte strings near the fast shapes decode exactly as json.loads decodes them
        # (or are refused, as json refuses them).
        texts = [
            b'{"op":"returned","id":1}', b'{"op":"returned","id":01}', b'{"op":"returned","id":-1}',
            b'{"op":"returned","id":1 }', b'{"op":"returned", "id":1}', b'{"op":"returned","id":1,"id":2}',
            b'{"op":"returned","id":123456789012345678901234}', b'{"op":"invoke","id":5,"depth":0}',
            b'{"op":"invoke","id":5,"depth":}', b'{"op":"invoke","id":5,"depth":1,}', b'{"op":"invoke","id":5}x',
            b'x{"op":"invoke","id":5}', b'{"op":"invoke","id":5e0}', b'{"op":"invoke","id":5.0}',
            b'{"op":"invoke","id":\xd9\xa1}', b'{"op":"invok","id":5}', b'{"op":"returned","id":1}\n',
        ]
        for text in texts:
            try:
                want = json.loads(text.decode("utf-8"))
            except ValueError:
                with self.assertRaises(codec.ProtocolError, msg=text):
                    codec.decode_header(text)
                continue
            self.assertEqual(codec.decode_header(text), want, text)
            self.assertEqual(codec.decode_header(b"??" + text + b"!", 2, 2 + len(text)), want, text)
        # Nested past the interpreter's recursion limit: refused, as any bad header.
        for deep in (b"[" * 100_000, b'{"a":' * 100_000):
            with self.assertRaises(codec.ProtocolError):
                codec.decode_header(deep)
        a, b = self.pair()
        a.send({"op": "invoke", "id": 3, "depth": 1}, b"{}")
        a.send({"op": "returned", "id": 3}, b"4")
        self.assertEqual(b.recv(), ({"op": "invoke", "id": 3, "depth": 1}, b"{}", []))
        self.assertEqual(b.recv(), ({"op": "returned", "id": 3}, b"4", []))

    def test_hand_made_frame(self):
        a, b = self.pair()
        header = '{"op":"x","s":"é"}'.encode()
        b.sock.sendall(struct.pack("<III", len(header), 2, 0) + header + b"\x00\xff")
        self.assertEqual(a.recv(), ({"op": "x", "s": "é"}, b"\x00\xff", []))

    def test_many_frames_in_one_read_keep_their_order(self):
        a, b = self.pair()

        def send_all():
            for i in range(100):
                a.send({"op": "t", "n": i}, bytes([i]) * i)

        t = threading.Thread(target=send_all)
        t.start()
        self.addCleanup(t.join)
        for i in range(100):
            self.assertEqual(b.recv(), ({"op": "t", "n": i}, bytes([i]) * i, []))

    def test_frame_split_across_writes(self):
        a, b = self.pair()
        header = b'{"op":"slow"}'
        data = struct.pack("<III", len(header), 4, 0) + header + b"abcd"

        def dribble():
            for i in range(len(data)):
                a.sock.sendall(data[i:i + 1])
                time.sleep(0.001)

        t = threading.Thread(target=dribble)
        t.start()
        self.assertEqual(b.recv(), ({"op": "slow"}, b"abcd", []))
        t.join()

    def test_descriptors_follow_their_frame(self):
        a, b = self.pair()
        files = []
        for text in (b"one", b"two"):
            f = tempfile.TemporaryFile()
            f.write(text)
            f.flush()
            files.append(f)
            self.addCleanup(f.close)
        a.send({"op": "t", "n": 0})
        a.send({"op": "t", "n": 1}, b"p", [files[0].fileno(), files[1]])
        a.send({"op": "t", "n": 2})
        self.assertEqual(b.recv(), ({"op": "t", "n": 0}, b"", []))
        header, payload, fds = b.recv()
        self.assertEqual((header, payload, len(fds)), ({"op": "t", "n": 1}, b"p", 2))
        for fd, want in zip(fds, (b"one", b"two")):
            self.assertFalse(os.get_inheritable(fd))  # received close-on-exec
            self.assertEqual(os.pread(fd, 10, 0), want)
            os.close(fd)
        self.assertEqual(b.recv(), ({"op": "t", "n": 2}, b"", []))

    def test_largest_inline_frame_crosses_many_reads(self):
        # The caps' largest frame: a MAX_HEADER header and a MAX_PAYLOAD inline payload.
        a, b = self.pair()
        big = (bytes(range(251)) * (codec.MAX_PAYLOAD // 251 + 1))[:codec.MAX_PAYLOAD]
        header = b'{"op":"big","pad":"' + b"p" * (codec.MAX_HEADER - 21) + b'"}'
        self.assertEqual(len(header), codec.MAX_HEADER)
        t = threading.Thread(target=send_hand_made, args=(a.sock, header, len(big), [], False, big))
        t.start()
        header, payload, _ = b.recv()
        t.join()
        self.assertEqual((header["op"], len(header["pad"])), ("big", codec.MAX_HEADER - 21))
        self.assertIsInstance(payload, bytes)
        self.assertEqual(payload, big)
        a.send({"op": "after"}, b"1")
        self.assertEqual(b.recv(), ({"op": "after"}, b"1", []))

    def test_close_between_frames_and_inside_a_frame(self):
        a, b = self.pair()
        a.sock.close()
        with self.assertRaises(codec.ChannelClosed):
            b.recv()
        a, b = self.pair()
        a.sock.sendall(struct.pack("<III", 10, 10, 0) + b'{"op"')
        a.sock.close()
        with self.assertRaises(codec.ProtocolError):
            b.recv()

    def test_limits_and_malformed_headers(self):
        for prefix in (
            struct.pack("<III", codec.MAX_HEADER + 1, 0, 0),
            struct.pack("<III", 2, codec.MAX_PAYLOAD + 1, 0),
            struct.pack("<III", 2, 64 << 20, 0),
            struct.pack("<III", 2, 0, codec.MAX_FDS + 1),
        ):
            a, b = self.pair()
            a.sock.sendall(prefix)
            with self.assertRaises(codec.ProtocolError):
                b.recv()
        # The caps are the Rust side's (ipc::frame): 128 KiB of header, 64 KiB inline.
        self.assertEqual((codec.MAX_HEADER, codec.MAX_PAYLOAD), (128 << 10, 64 << 10))
        a, b = self.pair()
        a.sock.sendall(struct.pack("<III", 2, 64 << 20, 0))
        with self.assertRaisesRegex(codec.ProtocolError, "inline frame payload of 67108864 bytes exceeds the limit of 65536"):
            b.recv()
        for header in (b"not json", b"[1]", b"\xff\xfe"):
            a, b = self.pair()
            a.sock.sendall(struct.pack("<III", len(header), 0, 0) + header)
            with self.assertRaises(codec.ProtocolError):
                b.recv()
        a, b = self.pair()
        a.sock.sendall(struct.pack("<III", 2, 0, 1) + b"{}")
        with self.assertRaisesRegex(codec.ProtocolError, "1 descriptors but 0"):
            b.recv()
        with self.assertRaises(codec.ProtocolError):
            a.send({"op": "x"}, b"", list(range(codec.MAX_FDS + 1)))

    # -- shared payloads

    def test_a_buffer_is_handed_off_as_its_own_memfd(self):
        a, b = self.pair()
        size = (1 << 20) + 5
        buf = codec.Buffer(size)
        self.assertEqual((len(buf), os.fstat(buf._memfd).st_blocks * 512 >= size), (size, True))
        data = bytes(range(251)) * (size // 251) + b"x" * (size % 251)
        buf[: size - 5000] = data[: size - 5000]
        with self.assertRaisesRegex(codec.SharedPayloadError, r"bytes from \d+ on were never written"):
            a.send({"op": "half"}, buf)
        buf[size - 5000:] = data[size - 5000:]
        view = memoryview(buf)
        with self.assertRaisesRegex(codec.SharedPayloadError, "every memoryview of it released"):
            a.send({"op": "held"}, buf)
        self.assertFalse(readable(b), "nothing was sent")
        view.release()
        a.send({"op": "big"}, buf)
        self.assertTrue(buf.closed)
        seals = fcntl.fcntl(buf._memfd, fcntl.F_GET_SEALS)
        self.assertEqual(seals & codec._SEALS, codec._SEALS)
        # The receiver maps the very file the sender filled: no copy on the way.
        _, anc, _, _ = b.sock.recvmsg(64, socket.CMSG_SPACE(4))
        [(_, _, raw_fd)] = anc
        fd = struct.unpack("i", raw_fd[:4])[0]
        self.assertEqual(os.fstat(fd).st_ino, os.fstat(buf._memfd).st_ino)
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as got:
            self.assertEqual(got[:], data)
        os.close(fd)
        # Handed off again: the same sealed memfd.
        a.send({"op": "again"}, buf)
        header, payload, _ = b.recv()
        self.assertEqual((header, payload[:]), ({"op": "again"}, data))
        with self.assertRaises(ValueError):
            buf[0:1] = b"y"  # no longer writable here
        # A small buffer goes inline and stays the function's.
        small = codec.Buffer(10)
        small[:] = b"0123456789"
        a.send({"op": "small"}, small)
        self.assertEqual(b.recv(), ({"op": "small"}, b"0123456789", []))
        self.assertFalse(small.closed)
        for bad, error in ((0, ValueError), (codec.MAX_SHARED_PAYLOAD + 1, ValueError), (1.5, TypeError), (True, TypeError)):
            with self.assertRaises(error):
                codec.Buffer(bad)

    def test_shared_payload_round_trip(self):
        a, b = self.pair()
        big = bytes(range(253)) * ((3 << 20) // 253) + b"end"
        a.send({"op": "big"}, big)
        a.send({"op": "small"}, b"s")
        header, payload, fds = b.recv()
        self.assertEqual((header, fds), ({"op": "big"}, []))
        self.assertIsInstance(payload, mmap.mmap)
        self.assertEqual(len(payload), len(big))
        self.assertEqual(payload[:], big)
        with memoryview(payload) as view:
            self.assertTrue(view.readonly)
            self.assertEqual(str(view[-3:], "utf-8"), "end")
        self.assertEqual(b.recv(), ({"op": "small"}, b"s", []))
        # A received mapping can be sent on (copied into a memfd of its own).
        a.send({"op": "again"}, payload)
        header, again, _ = b.recv()
        self.assertEqual((header, again[:]), ({"op": "again"}, big))

    def test_threshold_between_inline_and_shared(self):
        a, b = self.pair()
        for size, shared in ((codec.SHARED_THRESHOLD, False), (codec.SHARED_THRESHOLD + 1, True)):
            data = b"x" * size
            a.send({"op": "t"}, bytearray(data))
            _, payload, _ = b.recv()
            self.assertEqual(isinstance(payload, mmap.mmap), shared, size)
            self.assertEqual(payload[:], data)

    def test_shared_frame_layout_and_seals(self):
        a, b = self.pair()
        big = b"\x07" * (100 << 10)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        a.send({"op": "t"}, big, [w])
        os.close(w)
        header = b'{"op":"t"}'
        data, anc, _, _ = b.sock.recvmsg(1 << 20, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC)
        # Prefix and header only: the payload is not in the stream.
        self.assertEqual(data, struct.pack("<III", len(header), len(big), 0x8000_0000 | 2) + header)
        fds = list(struct.unpack(f"{len(anc[0][2]) // 4}i", anc[0][2]))
        self.assertEqual(len(fds), 2)
        for fd in fds:
            self.addCleanup(os.close, fd)
        memfd = fds[-1]  # the payload's is the last descriptor
        seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
        want = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        self.assertEqual(seals & want, want)
        self.assertEqual(os.fstat(memfd).st_size, len(big))
        self.assertEqual(os.pread(memfd, len(big) + 1, 0), big)
        self.assertEqual(os.readlink(f"/proc/self/fd/{memfd}"), "/memfd:sprout-payload (deleted)")
        with self.assertRaises(OSError):
            os.pwrite(memfd, b"x", 0)

    def test_hand_made_shared_frame_in_the_rust_layout(self):
        a, b = self.pair()
        other = memfd_with(b"not a payload", seals=0)
        payload = memfd_with(b"0123456789tail")
        header = b'{"op":"shared","n":1}'
        # The frame's payload is the first 10 bytes of its last descriptor.
        send_hand_made(a.sock, header, 10, [other, payload], True)
        send_hand_made(a.sock, b'{"op":"empty"}', 0, [payload], True)
        a.send({"op": "after"}, b"inline")
        os.close(payload)
        got, data, fds = b.recv()
        self.assertEqual(got, {"op": "shared", "n": 1})
        self.assertEqual(data[:], b"0123456789")
        self.assertEqual(len(fds), 1)
        self.assertEqual(os.pread(fds[0], 100, 0), b"not a payload")
        os.close(fds[0])
        os.close(other)
        self.assertEqual(b.recv(), ({"op": "empty"}, b"", []))
        self.assertEqual(b.recv(), ({"op": "after"}, b"inline", []))

    def test_sealing_waits_out_a_reference_that_goes_away(self):
        # A writable shared mapping makes F_SEAL_WRITE fail with EBUSY while it lives,
        # as a page the kernel still holds does.
        fd = os.memfd_create("sprout-seal-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 4096)
            m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            m[0] = 1
            unmapper = threading.Timer(0.005, m.close)
            unmapper.start()
            codec._seal(fd)
            unmapper.join()
            self.assertTrue(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE)
            # One that stays is given up on, with EBUSY, soon.
            fd2 = os.memfd_create("sprout-seal-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd2, 4096)
            m2 = mmap.mmap(fd2, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            started = time.monotonic()
            with self.assertRaises(OSError) as caught:
                codec._seal(fd2)
            self.assertEqual(caught.exception.errno, errno.EBUSY)
            self.assertLess(time.monotonic() - started, 2)
            m2.close()
            os.close(fd2)
        finally:
            os.close(fd)

    def test_unsealed_or_short_shared_payloads_are_refused(self):
        a, b = self.pair()
        unsealed = memfd_with(b"x" * 100, seals=0)
        write_only = memfd_with(b"x" * 100, seals=fcntl.F_SEAL_WRITE)
        short = memfd_with(b"x" * 10)
        plain = tempfile.TemporaryFile()
        self.addCleanup(plain.close)
        plain.write(b"x" * 100)
        plain.flush()
        for fd in (unsealed, write_only):
            send_hand_made(a.sock, b'{"op":"t"}', 100, [fd], True)
            # Only that frame fails: it is consumed and the next one is read.
            with self.assertRaisesRegex(codec.ProtocolError, "not sealed"):
                b.recv()
        send_hand_made(a.sock, b'{"op":"t"}', 11, [short], True)
        with self.assertRaisesRegex(codec.ProtocolError, "holds 10 bytes"):
            b.recv()
        send_hand_made(a.sock, b'{"op":"t"}', 100, [plain.fileno()], True)
        with self.assertRaisesRegex(codec.ProtocolError, "not sealed"):
            b.recv()
        for fd in (unsealed, write_only, short):
            os.close(fd)
        a.send({"op": "after"})
        self.assertEqual(b.recv(), ({"op": "after"}, b"", []))
        # The refused descriptors were closed, not kept.
        self.assertEqual(len(b._fds), 0)

    def test_shared_limits(self):
        a, b = self.pair()
        a.sock.sendall(struct.pack("<III", 2, codec.MAX_SHARED_PAYLOAD + 1, 0x8000_0001))
        with self.assertRaisesRegex(codec.ProtocolError, "exceeds the limit of 1073741824"):
            b.recv()
        a, b = self.pair()
        a.sock.sendall(struct.pack("<III", 2, 5, 0x8000_0000) + b"{}")
        with self.assertRaisesRegex(codec.ProtocolError, "no descriptor"):
            b.recv()
        # Over the inline limit is fine for a shared frame (only the prefix is checked here).
        self.assertEqual(codec._decode_prefix(struct.pack("<III", 2, codec.MAX_PAYLOAD + 1, 0x8000_0001), 0),
                         (2, codec.MAX_PAYLOAD + 1, 1, True))
        with self.assertRaises(codec.ProtocolError):
            codec._decode_prefix(struct.pack("<III", 2, codec.MAX_PAYLOAD + 1, 1), 0)
        # The memfd counts as a descriptor.
        with self.assertRaisesRegex(codec.ProtocolError, "9 descriptors"):
            a.send({"op": "x"}, b"x" * (codec.SHARED_THRESHOLD + 1), [0] * codec.MAX_FDS)


SPEC = {
    "function": "g",
    "version": 3,
    "code_dir": "/code/g",
    "handler": {"module": "g", "function": "handle"},
    "timeout_ms": 1000,
}


def returned(ch, header, result, **extra):
    ch.send({"op": "call_returned", "id": header["id"], **extra}, json.dumps(result).encode())


class SdkTest(unittest.TestCase):
    """The sprout module in this process, against a fake shim (its calls channel) and a
    fake agent (a Unix socket at sprout._AGENT_SOCKET)."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.sock_path = os.path.join(tmp.name, "agent.sock")
        self.addCleanup(setattr, sdk.sprout, "_AGENT_SOCKET", sdk.sprout._AGENT_SOCKET)
        sdk.sprout._AGENT_SOCKET = self.sock_path
        shim, inst = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        shim.settimeout(TIMEOUT)
        self.shim_ch = codec.Channel(shim)
        self.addCleanup(self.shim_ch.close)
        self.state = sdk._start_calls(codec.Channel(inst))
        self.addCleanup(sdk._start_calls, None)
        self.addCleanup(self.state.close)
        self.sdk = sdk.sprout

    def test_a_forked_process_gets_a_call_state_of_its_own(self):
        self.state.specs["g"] = SPEC
        self.state.depth = 3
        pid = os.fork()
        if pid == 0:
            try:
                state = sdk._state()
                fresh = state is not self.state and state.calls is None and state.pid == os.getpid()
                kept = state.specs == {"g": SPEC} and state.depth == 3 and sdk._state() is state
                os._exit(0 if fresh and kept else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        self.assertIs(sdk._state(), self.state)

    def agent(self, script):
        return serve_agent(self, self.sock_path, script)

    def shim(self, script):
        return Peer(lambda: script(self.shim_ch))

    def finish(self, *peers):
        """Closes this process's call channels (a peer waiting for more sees the end),
        then joins the peers."""
        self.state.close()
        for peer in peers:
            peer.join()

    def expect_resolve(self, ch, name, spec):
        header, payload, fds = ch.recv()
        self.assertEqual((header, payload, fds), ({"op": "resolve", "id": header["id"], "function": name}, b"", []))
        ch.send({"op": "resolved", "id": header["id"], "spec": spec})
        return header["id"]

    def expect_call(self, ch, name, event, depth=1, spec=None, raw=False):
        header, payload, fds = ch.recv()
        want = {"op": "call", "id": header["id"], "function": name, "depth": depth}
        if raw:
            want["raw"] = True
        if spec is not None:
            want["spec"] = spec
        self.assertEqual((header, fds), (want, []))
        self.assertEqual(bytes(payload) if raw else json.loads(str(payload, "utf-8")), event)
        return header

    def expect_end(self, ch):
        with self.assertRaises(codec.ChannelClosed):
            ch.recv()

    def expect_bind(self, ch, name, spec=SPEC):
        header, payload, fds = ch.recv()
        self.assertEqual((header, payload, fds), ({"op": "bind", "id": header["id"], "function": name, "spec": spec}, b"", []))
        return header["id"]

    def refuse_bind(self, ch, name):
        """Answers the SDK's first ``bind`` of ``name`` as a shim that has as many
        bound as it allows."""
        req_id = self.expect_bind(ch, name)
        ch.send({"op": "call_refused", "id": req_id, "function": name, "kind": "too_many_channels", "message": "full"})

    def grant_bind(self, ch, name, callee, spec=SPEC, closed=False):
        """Answers a ``bind`` with a direct channel; returns the callee's end of it
        (``closed``: closes it before the answer, and returns None)."""
        req_id = self.expect_bind(ch, name, spec)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if closed:
            ours.close()
        ch.send({"op": "bound", "id": req_id, "callee": callee}, b"", [theirs.fileno()])
        theirs.close()
        if closed:
            return None
        ours.settimeout(TIMEOUT)
        return codec.Channel(ours)

    # -- call

    def test_local_call_through_the_shim_after_resolve(self):
        def agent(ch):
            self.expect_resolve(ch, "g", SPEC)
            self.expect_end(ch)  # later calls of g are not resolved again

        def shim(ch):
            self.refuse_bind(ch, "g")  # asked once, then never again
            for n in (1, 2):
                header = self.expect_call(ch, "g", {"n": n}, spec=SPEC)
                returned(ch, header, [n, "ok"])

        peers = self.agent(agent), self.shim(shim)
        self.assertEqual(self.sdk.call("g", {"n": 1}), [1, "ok"])
        self.assertEqual(self.sdk.call("g", {"n": 2}), [2, "ok"])
        self.finish(*peers)

    def test_remote_call_when_resolve_returns_null(self):
        big = ["x" * 1000] * 200  # over 64 KiB: a shared result

        def agent(ch):
            self.expect_resolve(ch, "g", None)
            header = self.expect_call(ch, "g", "first")
            returned(ch, header, big)
            header = self.expect_call(ch, "g", "second")  # no resolve this time
            returned(ch, header, None)
            self.expect_end(ch)

        peer = self.agent(agent)
        self.assertEqual(self.sdk.call("g", "first"), big)
        self.assertIsNone(self.sdk.call("g", "second"))
        self.assertFalse(readable(self.shim_ch), "nothing went to the shim")
        self.finish(peer)

    def test_call_raised_is_a_call_error(self):
        error = {"type": "KeyError", "message": "'k'", "traceback": "Traceback (most recent call last):\n..."}

        def agent(ch):
            self.expect_resolve(ch, "g", None)
            header = self.expect_call(ch, "g", {})
            ch.send({"op": "call_raised", "id": header["id"], "function": "g", "error": error})

        peer = self.agent(agent)
        with self.assertRaises(self.sdk.CallError) as caught:
            self.sdk.call("g", {})
        e = caught.exception
        self.assertIsInstance(e, Exception)
        self.assertEqual((e.function, e.type, e.message), ("g", "KeyError", "'k'"))
        self.assertEqual(e.remote_traceback, error["traceback"])
        self.assertEqual(str(e), "g raised KeyError: 'k'")
        self.finish(peer)

    def test_call_failed_is_a_call_error_and_is_not_cached(self):
        def agent(ch):
            header, _, _ = ch.recv()
            self.assertEqual(header["op"], "resolve")
            ch.send({"op": "call_failed", "id": header["id"], "function": "g", "message": "no function named 'g'"})
            self.expect_resolve(ch, "g", SPEC)  # asked again: failures are not cached

        def shim(ch):
            self.refuse_bind(ch, "g")
            header = self.expect_call(ch, "g", 1, spec=SPEC)
            ch.send({"op": "call_failed", "id": header["id"], "function": "g", "message": "timed out after 1000 ms"})

        peers = self.agent(agent), self.shim(shim)
        with self.assertRaises(self.sdk.CallError) as caught:
            self.sdk.call("g", 1)
        e = caught.exception
        self.assertEqual((e.function, e.type, e.message, e.remote_traceback),
                         ("g", "CallFailed", "no function named 'g'", ""))
        self.assertEqual(str(e), "call to g failed: no function named 'g'")
        with self.assertRaisesRegex(self.sdk.CallError, r"^call to g failed: timed out after 1000 ms$"):
            self.sdk.call("g", 1)
        self.finish(*peers)

    def test_depth_limit_is_checked_before_anything_is_sent(self):
        self.assertEqual(self.sdk.MAX_DEPTH, 16)

        def handler(event):
            out = []
            for attempt in (lambda: self.sdk.call("g", 1), lambda: self.sdk.map("g", [1]),
                            lambda: self.sdk.call_async("g", 1).result()):
                try:
                    attempt()
                except self.sdk.CallError as e:
                    out.append([e.function, e.type, e.message, str(e)])
            return out

        reply, body = instance.invoke(handler, 1, b"null", depth=16)
        self.assertEqual(reply, {"op": "returned", "id": 1})  # nothing was called
        message = "call depth limit of 16 exceeded calling 'g' (a call cycle or runaway recursion?)"
        self.assertEqual(json.loads(body), [["g", "CallFailed", message, "call to g failed: " + message]] * 3)
        self.assertIsNone(self.state.agent, "no connection to the agent was made")
        self.assertFalse(readable(self.shim_ch), "nothing went to the shim")

        # One level less is allowed, and the callee runs one deeper.
        def agent(ch):
            self.expect_resolve(ch, "g", None)
            returned(ch, self.expect_call(ch, "g", 1, depth=16), "deep")

        peer = self.agent(agent)
        reply, body = instance.invoke(lambda event: self.sdk.call("g", event), 2, b"1", depth=15)
        self.assertEqual((reply, body), ({"op": "returned", "id": 2, "called": True}, b'"deep"'))
        self.finish(peer)

    def test_events_that_cannot_be_sent_raise_in_the_caller(self):
        with self.assertRaises(TypeError):
            self.sdk.call("g", {1, 2})
        with self.assertRaises(ValueError):
            self.sdk.call("g", float("nan"))
        with self.assertRaises(TypeError):
            self.sdk.call_async("g", object())
        with self.assertRaises(TypeError):
            self.sdk.map("g", [1, 2, {3}])
        with self.assertRaises(TypeError):
            self.sdk.call(b"g", 1)
        self.assertIsNone(self.state.agent, "no connection to the agent was made")
        self.assertFalse(readable(self.shim_ch), "nothing went to the shim")
        self.assertEqual(self.sdk.map("g", []), [])
        self.assertFalse(self.state.called)

    # -- call_async and map

    def test_map_keeps_input_order_and_raises_the_first_failure(self):
        def agent(ch):
            headers = [self.expect_call(ch, "g", n) for n in range(4)]
            # Answered out of order; items 1 and 3 fail.
            for header in reversed(headers):
                n = headers.index(header)
                if n == 1:
                    ch.send({"op": "call_failed", "id": header["id"], "function": "g", "message": "died"})
                elif n == 3:
                    error = {"type": "ValueError", "message": "three", "traceback": ""}
                    ch.send({"op": "call_raised", "id": header["id"], "function": "g", "error": error})
                else:
                    returned(ch, header, n * 10)
            headers = [self.expect_call(ch, "g", n) for n in range(5)]
            for n in (3, 0, 4, 2, 1):
                returned(ch, headers[n], {"n": n})
            self.expect_end(ch)

        peer = self.agent(agent)
        with self.assertRaises(self.sdk.CallError) as caught:
            self.sdk.map("g", range(4))
        self.assertEqual(str(caught.exception), "call to g failed: died")
        self.assertEqual(self.state.replies, {}, "every reply was read")
        self.assertEqual(self.sdk.map("g", [0, 1, 2, 3, 4]), [{"n": n} for n in range(5)])
        self.assertFalse(readable(self.shim_ch), "map never goes to the shim")
        self.finish(peer)

    def test_call_async_future(self):
        go = threading.Event()

        def agent(ch):
            first = self.expect_call(ch, "g", "one")
            second = self.expect_call(ch, "h", "two")
            self.assertTrue(go.wait(TIMEOUT))
            returned(ch, second, "second")
            returned(ch, first, "first")
            self.expect_end(ch)

        peer = self.agent(agent)
        f1 = self.sdk.call_async("g", "one")
        f2 = self.sdk.call_async("h", "two")
        self.assertIsInstance(f1, self.sdk.Future)
        self.assertFalse(f1.done())
        with self.assertRaises(TimeoutError):
            f1.result(timeout=0.05)
        go.set()
        self.assertEqual(f1.result(timeout=TIMEOUT), "first")  # read past h's reply, filed it
        self.assertTrue(f2.done())
        self.assertEqual(f2.result(), "second")
        self.assertEqual(f1.result(), "first")
        self.assertFalse(readable(self.shim_ch), "call_async never goes to the shim")
        self.finish(peer)

    def test_threads_share_one_agent_connection(self):
        def agent(ch):
            headers = [ch.recv()[0] for _ in range(6)]
            for header in reversed(headers):
                ch.send({"op": "call_returned", "id": header["id"]}, str(header["id"] * 10).encode())

        peer = self.agent(agent)
        self.state.specs["g"] = None  # resolved before: through the agent
        results = {}

        def worker(n):
            results[n] = self.sdk.call("g", n)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        self.finish(peer)
        self.assertEqual(sorted(results), list(range(6)))
        self.assertEqual(sorted(results.values()), [n * 10 for n in range(1, 7)])
        self.assertEqual(self.state.replies, {})

    # -- raw bytes

    def test_raw_event_and_result(self):
        big = os.urandom(200 << 10)

        def agent(ch):
            self.expect_resolve(ch, "g", None)
            header = self.expect_call(ch, "g", b"\x00\xff", raw=True)
            ch.send({"op": "call_returned", "id": header["id"], "raw": True}, big)
            header = self.expect_call(ch, "g", b"ace", raw=True)
            ch.send({"op": "call_returned", "id": header["id"], "raw": True}, b"small")
            header = self.expect_call(ch, "g", b"\x01" * (100 << 10), raw=True)
            returned(ch, header, "json")

        peer = self.agent(agent)
        result = self.sdk.call("g", b"\x00\xff")
        self.assertIsInstance(result, memoryview)
        self.assertTrue(result.readonly)
        self.assertEqual(result.tobytes(), big)
        result = self.sdk.call_async("g", memoryview(b"abcdef")[::2]).result()
        self.assertEqual((type(result), bytes(result)), (memoryview, b"small"))
        self.assertEqual(self.sdk.call("g", bytearray(b"\x01" * (100 << 10))), "json")
        self.finish(peer)

    # -- direct channels

    def test_calls_go_on_the_direct_channel_the_shim_binds(self):
        quick = dict(SPEC, timeout_ms=300)

        def agent(ch):
            self.expect_resolve(ch, "g", quick)

        def shim(ch):
            direct = self.grant_bind(ch, "g", 7, quick)
            for n in (1, 2):
                header, payload, fds = direct.recv()
                self.assertEqual((header, json.loads(payload), fds), ({"op": "invoke", "id": header["id"], "depth": 1}, n, []))
                direct.send({"op": "returned", "id": header["id"]}, json.dumps(n * 10).encode())
            header, _, _ = direct.recv()
            error = {"type": "KeyError", "message": "'k'", "traceback": "tb"}
            direct.send({"op": "raised", "id": header["id"], "error": error})
            direct.recv()  # and never answers: the caller has it killed
            self.assertEqual(ch.recv(), ({"op": "unbind", "callee": 7}, b"", []))
            direct.close()
            # Bound again; this callee dies mid-call.
            direct = self.grant_bind(ch, "g", 8, quick)
            direct.recv()
            direct.close()
            # Bound again; its end is closed before the call: the call goes through the shim.
            self.grant_bind(ch, "g", 9, quick, closed=True)
            header = self.expect_call(ch, "g", 5, spec=quick)
            returned(ch, header, "relayed")

        peers = self.agent(agent), self.shim(shim)
        self.assertEqual(self.sdk.call("g", 1), 10)
        self.assertEqual(self.sdk.call("g", 2), 20)
        with self.assertRaisesRegex(self.sdk.CallError, r"^g raised KeyError: 'k'$"):
            self.sdk.call("g", 3)
        started = time.monotonic()
        with self.assertRaisesRegex(self.sdk.CallError, r"^call to g failed: g timed out after 300 ms$"):
            self.sdk.call("g", 4)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        with self.assertRaisesRegex(self.sdk.CallError, r"died while running"):
            self.sdk.call("g", 4)
        self.assertEqual(self.sdk.call("g", 5), "relayed")
        self.finish(*peers)

    def slow_reader_call(self, read_all):
        """A call whose event is sent in pieces, as fast as its callee reads: the
        caller's send buffer is small and the event large. The callee reads 1 KiB
        per 20 ms (``read_all`` False: the call is never all sent), or 4 KiB per
        20 ms until it has the whole frame (~250 ms) and then never answers. The call must time out when
        its 300 ms are up, whatever the sending took."""
        quick = dict(SPEC, timeout_ms=300)

        def agent(ch):
            self.expect_resolve(ch, "g", quick)

        def shim(ch):
            req_id = self.expect_bind(ch, "g", quick)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            ch.send({"op": "bound", "id": req_id, "callee": 7}, b"", [theirs.fileno()])
            theirs.close()
            ours.setblocking(False)
            got, want = 0, float("inf")
            until = time.monotonic() + 0.6
            while time.monotonic() < until and got < want:
                time.sleep(0.02)
                try:
                    chunk = ours.recv(4096 if read_all else 1024)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                if got == 0 and read_all:
                    hlen, plen, _ = struct.unpack_from("<III", chunk)
                    want = 12 + hlen + plen
                got += len(chunk)
            self.assertEqual(ch.recv(), ({"op": "unbind", "callee": 7}, b"", []))
            ours.close()

        peers = self.agent(agent), self.shim(shim)
        started = time.monotonic()
        with self.assertRaisesRegex(self.sdk.CallError, r"^call to g failed: g timed out after 300 ms$"):
            self.sdk.call("g", "x" * (48 << 10))
        took = time.monotonic() - started
        self.assertGreaterEqual(took, 0.3)
        self.assertLess(took, 0.45)
        self.finish(*peers)

    def test_a_callee_that_reads_slowly_gets_only_the_calls_time(self):
        self.slow_reader_call(read_all=False)

    def test_a_callee_that_read_the_call_slowly_gets_only_the_calls_time(self):
        self.slow_reader_call(read_all=True)

    def test_a_direct_reply_in_pieces_gets_only_the_calls_time(self):
        quick = dict(SPEC, timeout_ms=300)

        def agent(ch):
            self.expect_resolve(ch, "g", quick)

        def shim(ch):
            direct = self.grant_bind(ch, "g", 7, quick)
            header, _, _ = direct.recv()
            reply = codec.encode_header({"op": "returned", "id": header["id"]})
            time.sleep(0.2)
            direct.sock.sendall(struct.pack("<III", len(reply), 2, 0) + reply[:5])  # then nothing
            self.assertEqual(ch.recv(), ({"op": "unbind", "callee": 7}, b"", []))
            direct.close()

        peers = self.agent(agent), self.shim(shim)
        started = time.monotonic()
        with self.assertRaisesRegex(self.sdk.CallError, r"^call to g failed: g timed out after 300 ms$"):
            self.sdk.call("g", 1)
        took = time.monotonic() - started
        # Past 300 ms, not 200 ms plus a whole timeout more for the second read.
        self.assertGreaterEqual(took, 0.3)
        self.assertLess(took, 0.45)
        self.finish(*peers)

    def test_a_bind_that_fails_is_the_calls_failure_and_is_asked_again(self):
        error = {"type": "ImportError", "message": "no module g", "traceback": ""}

        def agent(ch):
            self.expect_resolve(ch, "g", SPEC)

        def shim(ch):
            req_id = self.expect_bind(ch, "g")
            ch.send({"op": "call_raised", "id": req_id, "function": "g", "error": error})
            req_id = self.expect_bind(ch, "g")  # not relayed, and asked again
            ch.send({"op": "call_failed", "id": req_id, "function": "g", "message": "could not start"})
            self.refuse_bind(ch, "g")
            header = self.expect_call(ch, "g", 3, spec=SPEC)
            returned(ch, header, "relayed")

        peers = self.agent(agent), self.shim(shim)
        with self.assertRaisesRegex(self.sdk.CallError, r"^g raised ImportError: no module g$"):
            self.sdk.call("g", 1)
        with self.assertRaisesRegex(self.sdk.CallError, r"^call to g failed: could not start$"):
            self.sdk.call("g", 2)
        self.assertEqual(self.sdk.call("g", 3), "relayed")
        self.finish(*peers)

    def test_a_bound_reply_without_its_descriptor_is_a_refusal(self):
        def agent(ch):
            self.expect_resolve(ch, "g", SPEC)

        def shim(ch):
            req_id = self.expect_bind(ch, "g")
            ch.send({"op": "bound", "id": req_id, "callee": 1})
            header = self.expect_call(ch, "g", 1, spec=SPEC)
            returned(ch, header, "ok")
            header = self.expect_call(ch, "g", 2, spec=SPEC)  # not asked again
            returned(ch, header, "ok")

        peers = self.agent(agent), self.shim(shim)
        self.assertEqual(self.sdk.call("g", 1), "ok")
        self.assertEqual(self.sdk.call("g", 2), "ok")
        self.finish(*peers)

    # -- channels that go away

    def test_closed_channels_fail_calls(self):
        def agent(ch):
            self.expect_resolve(ch, "g", SPEC)
            self.expect_resolve(ch, "h", None)
            self.expect_call(ch, "h", 1)

        def shim(ch):
            self.refuse_bind(ch, "g")
            self.expect_call(ch, "g", 1, spec=SPEC)
            ch.sock.shutdown(socket.SHUT_RDWR)

        peers = self.agent(agent), self.shim(shim)
        with self.assertRaisesRegex(self.sdk.CallError, "^call to g failed: the shim closed the calls channel$"):
            self.sdk.call("g", 1)
        with self.assertRaisesRegex(self.sdk.CallError, "shim closed"):
            self.sdk.call("g", 1)
        with self.assertRaisesRegex(self.sdk.CallError, "^call to h failed: the agent closed the call connection$"):
            self.sdk.call("h", 1)
        # There is one connection per process: it is not made again.
        future = self.sdk.call_async("h", 2)
        self.assertTrue(future.done())
        with self.assertRaisesRegex(self.sdk.CallError, "agent closed"):
            future.result()
        self.finish(*peers)

    def test_no_agent_to_connect_to(self):
        with self.assertRaisesRegex(self.sdk.CallError, "cannot connect to the agent's call socket"):
            self.sdk.call("g", 1)

    # -- the invocation's "called"

    def test_called_is_reported_only_when_the_handler_called(self):
        def agent(ch):
            self.expect_call(ch, "g", 1)  # call_async: no resolve
            header = self.expect_call(ch, "g", 2)
            returned(ch, header, "two")
            self.expect_end(ch)

        peer = self.agent(agent)

        def fire_and_forget(event):
            self.sdk.call_async("g", event)
            return b"raw"

        def call_then_raise(event):
            self.sdk.call_async("g", event).result()
            raise RuntimeError("after the call")

        self.assertEqual(instance.invoke(lambda e: e, 1, b"[1]"), ({"op": "returned", "id": 1}, b"[1]"))
        self.assertEqual(
            instance.invoke(fire_and_forget, 2, b"1"),
            ({"op": "returned", "id": 2, "raw": True, "called": True}, b"raw"),
        )
        reply, _ = instance.invoke(call_then_raise, 3, b"2")
        self.assertEqual((reply["op"], reply["error"]["message"], reply["called"]), ("raised", "after the call", True))
        reply, _ = instance.invoke(lambda e: 1 / 0, 4, b"null")
        self.assertNotIn("called", reply)
        self.finish(peer)

    def test_raw_event_reaches_the_handler_as_a_read_only_memoryview(self):
        seen = []

        def handler(event):
            seen.append((type(event), event.readonly, bytes(event)))
            return event

        reply, body = instance.invoke(handler, 1, b"\x00{not json", raw=True)
        self.assertEqual(seen, [(memoryview, True, b"\x00{not json")])
        self.assertEqual((reply, bytes(body)), ({"op": "returned", "id": 1, "raw": True}, b"\x00{not json"))
        reply, _ = instance.invoke(handler, 2, b"", depth=-1)
        self.assertEqual((reply["op"], reply["error"]["type"]), ("raised", "ProtocolError"))


class OpenWhiskActivationTest(unittest.TestCase):
    def test_an_activations_variables_are_set_while_it_runs_and_put_back_after(self):
        os.environ["SPROUT_TEST_KEPT"] = "before"
        os.environ.pop("__OW_NAMESPACE", None)
        seen = {}

        def handler(event):
            seen.update(ns=os.environ.get("__OW_NAMESPACE"), kept=os.environ.get("SPROUT_TEST_KEPT"))
            return event

        env = {"__OW_NAMESPACE": "ns", "SPROUT_TEST_KEPT": "during"}
        with instance._activation_env(env):
            reply, body = instance.invoke(handler, 1, b"{}", openwhisk=True)
        self.assertEqual((reply["op"], seen), ("returned", {"ns": "ns", "kept": "during"}))
        self.assertNotIn("__OW_NAMESPACE", os.environ)
        self.assertEqual(os.environ.pop("SPROUT_TEST_KEPT"), "before")
        self.assertIsNotNone(instance._check_env({"A=B": "x"}, "invoke env"))
        self.assertIsNotNone(instance._check_env({"A": 1}, "invoke env"))
        self.assertIsNone(instance._check_env({"A": ""}, "invoke env"))

    def test_an_activations_exception_writes_its_traceback_to_stderr(self):
        saved, sys.stderr = sys.stderr, __import__("io").StringIO()
        try:
            reply, _ = instance.invoke(lambda e: 1 / 0, 1, b"{}", openwhisk=True)
            written = sys.stderr.getvalue()
        finally:
            sys.stderr = saved
        self.assertEqual((reply["op"], reply["error"]["message"]), ("raised", "division by zero"))
        self.assertIn("Traceback", written)
        self.assertIn("ZeroDivisionError", written)


class ErrorSizeTest(unittest.TestCase):
    def test_an_error_fits_in_a_header_whatever_its_text(self):
        # Every character of the message and traceback needs a 12-byte JSON escape
        # (astral): the encoded error still fits in _MAX_ERROR, and the cuts say so.
        def handler(depth):
            if depth == 0:
                raise ValueError("\U0001F600" * 20000)
            return handler(depth - 1)

        try:
            handler(30)
        except ValueError as exc:
            err = errors.describe_error(exc)
        self.assertLessEqual(len(codec._dumps(err)), errors._MAX_ERROR)
        self.assertLess(errors._MAX_ERROR + 4096, codec.MAX_HEADER)
        self.assertTrue(err["message"].endswith(" ... (truncated)"), err["message"][-40:])
        self.assertTrue(err["message"].startswith("\U0001F600" * 100))
        # The traceback keeps its newest lines, the exception's own.
        self.assertTrue(err["traceback"].startswith("... (truncated)\n"))
        self.assertIn("\U0001F600", err["traceback"][-100:])
        # A small error is left alone.
        try:
            raise KeyError("k")
        except KeyError as exc:
            small = errors.describe_error(exc)
        self.assertNotIn("truncated", small["message"] + small["traceback"])


class HttpAppTest(unittest.TestCase):
    """OpenLambda's HTTP apps: which attribute is the app, and one request through
    WSGI and ASGI apps as ``serve_one`` runs it."""

    REQUEST = {
        "op": "http",
        "id": 1,
        "method": "POST",
        "script_name": "/run/f",
        "path": "/a%20b",
        "query": "x=1",
        "headers": [["Content-Type", "text/plain"], ["X-Test", "yes"], ["X-Test", "two"], ["X_Bad", "no"]],
    }

    def module(self, **attrs):
        import types

        m = types.ModuleType("m")
        for k, v in attrs.items():
            setattr(m, k, v)
        return m

    def test_which_attribute_is_the_app(self):
        def f(event):
            return event

        def wsgi(environ, start_response):
            return []

        async def asgi(scope, receive, send):
            pass

        class AsgiClass:
            async def __call__(self, scope, receive, send):
                pass

        self.assertEqual(http_app.find(self.module(f=f, app=wsgi), "f"), (None, f))
        self.assertEqual(http_app.find(self.module(app=wsgi), "f"), ("wsgi", wsgi))
        self.assertEqual(http_app.find(self.module(app=asgi), "f"), ("asgi", asgi))
        obj = AsgiClass()
        self.assertEqual(http_app.find(self.module(app=obj), "f"), ("asgi", obj))
        self.assertEqual(http_app.find(self.module(), "f"), (None, None))
        os.environ["OL_WSGI_ENTRY"] = "other"
        try:
            self.assertEqual(http_app.find(self.module(f=f, other=wsgi), "f"), ("wsgi", wsgi))
            with self.assertRaisesRegex(AttributeError, "OL_WSGI_ENTRY"):
                http_app.find(self.module(f=f), "f")
        finally:
            del os.environ["OL_WSGI_ENTRY"]

    def test_a_wsgi_request_and_its_response(self):
        seen = {}

        def app(environ, start_response):
            seen.update(environ)
            seen["body"] = environ["wsgi.input"].read()
            start_response("418 I'M A TEAPOT", [("A", "B")])
            return iter([b"hi", b"\n"])

        reply, body = http_app.serve_one("wsgi", app, None, self.REQUEST, b"data")
        self.assertEqual(reply, {"op": "responded", "status": 418, "headers": [["A", "B"]]})
        self.assertEqual(body, b"hi\n")
        self.assertEqual(seen["SCRIPT_NAME"], "/run/f")
        self.assertEqual(seen["PATH_INFO"], "/a b")
        self.assertEqual(seen["QUERY_STRING"], "x=1")
        self.assertEqual(seen["CONTENT_TYPE"], "text/plain")
        self.assertEqual(seen["CONTENT_LENGTH"], "4")
        self.assertEqual(seen["HTTP_X_TEST"], "yes,two")
        self.assertNotIn("HTTP_X_BAD", seen)
        self.assertEqual(seen["body"], b"data")

        def no_start(environ, start_response):
            return [b"x"]

        with self.assertRaises(http_app.BadResponse):
            http_app.serve_one("wsgi", no_start, None, self.REQUEST, b"")

        closed = []

        class Result:
            def __iter__(self):
                yield b"x" * (http_app.MAX_BODY // 2 + 1)
                yield b"x" * (http_app.MAX_BODY // 2 + 1)

            def close(self):
                closed.append(True)

        def big(environ, start_response):
            start_response("200 OK", [])
            return Result()

        with self.assertRaisesRegex(http_app.BadResponse, "over the limit"):
            http_app.serve_one("wsgi", big, None, self.REQUEST, b"")
        self.assertEqual(closed, [True], "the result is closed whatever happens")

    def test_an_asgi_request_and_its_response(self):
        seen = {}

        async def app(scope, receive, send):
            seen["scope"] = scope
            seen["first"] = await receive()
            await send({"type": "http.response.start", "status": 201, "headers": [(b"a", b"B")]})
            await send({"type": "http.response.body", "body": b"hi", "more_body": True})
            await send({"type": "http.response.body", "body": b"\n"})
            seen["then"] = await receive()

        runner = http_app.AsgiRunner()
        reply, body = http_app.serve_one("asgi", app, runner, self.REQUEST, b"data")
        self.assertEqual(reply, {"op": "responded", "status": 201, "headers": [["a", "B"]]})
        self.assertEqual(body, b"hi\n")
        scope = seen["scope"]
        self.assertEqual((scope["root_path"], scope["path"]), ("/run/f", "/run/f/a b"))
        self.assertEqual(scope["query_string"], b"x=1")
        self.assertIn((b"x-test", b"yes"), scope["headers"])
        self.assertEqual(seen["first"], {"type": "http.request", "body": b"data", "more_body": False})
        self.assertEqual(seen["then"], {"type": "http.disconnect"})
        # No rest of the path: "/" under the root, so a route "/" matches.
        request = dict(self.REQUEST, path="", method="HEAD")
        reply, body = http_app.serve_one("asgi", app, runner, request, b"")
        self.assertEqual(seen["scope"]["path"], "/run/f/")
        self.assertEqual(body, b"hi\n", "HEAD's body is the agent's to drop (its length is sent)")

        async def silent(scope, receive, send):
            pass

        with self.assertRaisesRegex(http_app.BadResponse, "http.response.start"):
            http_app.serve_one("asgi", silent, runner, self.REQUEST, b"")


if __name__ == "__main__":
    unittest.main()
