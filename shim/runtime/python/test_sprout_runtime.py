"""Tests for sprout_runtime.py: its framing, the sprout SDK against fake shim and agent
endpoints, and the real zygote driven as a subprocess.

Run from this directory with ``/usr/bin/python3 -B -m unittest -v test_sprout_runtime``.
"""

import fcntl
import importlib.util
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
RUNTIME = os.path.join(HERE, "sprout_runtime.py")
PYTHON = "/usr/bin/python3"
TIMEOUT = 10.0

_spec = importlib.util.spec_from_file_location("sprout_runtime", RUNTIME)
rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rt)


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


def memfd_with(data, seals=rt._SEALS):
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
        channel = rt.Channel(conn)
        try:
            script(channel)
        finally:
            channel.close()

    return Peer(run)


class Zygote(rt.Channel):
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

    def start_zygote(self):
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
            [PYTHON, "-I", "-B", RUNTIME],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=False,
            preexec_fn=at_fd_3,
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

    def send_fork(self, zygote, instance, code_dir, module="f", function="f"):
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
        channel = rt.Channel(agent)
        calls = rt.Channel(shim)
        self.addCleanup(channel.close)
        self.addCleanup(calls.close)
        # The spare says it is set up; then it is told what to load.
        self.assertEqual(channel.recv()[0], {"op": "ready"})
        channel.send({
            "op": "load",
            "function": "fn-%d" % instance,
            "code_dir": code_dir,
            "handler": {"module": module, "function": function},
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

    def fork(self, zygote, instance, code_dir, module="f", function="f"):
        channel, out_r, err_r, calls = self.send_fork(zygote, instance, code_dir, module, function)
        pid = self.await_forked(zygote, instance)
        return Instance(channel, pid, out_r, err_r, calls)

    def loaded(self, zygote, instance, code_dir, module="f", function="f"):
        inst = self.fork(zygote, instance, code_dir, module, function)
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
        with self.assertRaises(rt.ChannelClosed):
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
            def f(event):
                kind, n = event
                data = bytes(range(256)) * n
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
        header, payload, fds = inst.calls.recv()
        self.assertEqual(header, {"op": "call", "id": header["id"], "function": "g", "depth": 4, "spec": spec})
        self.assertEqual((json.loads(payload), fds), ({"n": 5}, []))
        inst.calls.send({"op": "call_returned", "id": header["id"]}, b'{"got":5}')
        self.assertEqual(inst.ch.recv(), ({"op": "returned", "id": 1, "called": True}, b'{"got":5}', []))
        peer.join()
        # The spec is cached: the next call goes straight to the shim.
        inst.ch.send({"op": "invoke", "id": 2}, json.dumps({"sock": sock_path, "n": 6}).encode())
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
        with self.assertRaises(rt.ChannelClosed):
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
        with self.assertRaises(rt.ChannelClosed):
            b.ch.recv()
        with self.assertRaises(rt.ChannelClosed):
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
        channel = rt.Channel(agent)
        self.addCleanup(channel.close)
        self.assertEqual(channel.recv()[0], {"op": "ready"})
        channel.send({"op": "load", "function": "x", "code_dir": "/", "handler": "f:f"})
        header, _, _ = channel.recv()
        self.assertEqual(header["op"], "load_failed", header)
        self.assertIn("handler", header["error"]["message"])
        wait_until(lambda: not pid_alive(pid), what="the instance to exit")
        for fd in (out_r, err_r):
            os.close(fd)


class ChannelTest(unittest.TestCase):
    def pair(self):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        ca, cb = rt.Channel(a), rt.Channel(b)
        self.addCleanup(ca.close)
        self.addCleanup(cb.close)
        return ca, cb

    def test_wire_layout_matches_ipc_frame_rs(self):
        a, b = self.pair()
        a.send({"op": "t", "n": 1}, b"xyz")
        raw = b.sock.recv(1000)
        header = b'{"op":"t","n":1}'
        self.assertEqual(raw, struct.pack("<III", len(header), 3, 0) + header + b"xyz")

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

    def test_large_inline_payload_crosses_many_reads(self):
        # Our own sends share payloads this large; a peer may still send them inline.
        a, b = self.pair()
        big = bytes(range(251)) * ((5 << 20) // 251)
        header = b'{"op":"big"}'
        t = threading.Thread(target=send_hand_made, args=(a.sock, header, len(big), [], False, big))
        t.start()
        header, payload, _ = b.recv()
        t.join()
        self.assertEqual(header, {"op": "big"})
        self.assertIsInstance(payload, bytes)
        self.assertEqual(payload, big)
        a.send({"op": "after"}, b"1")
        self.assertEqual(b.recv(), ({"op": "after"}, b"1", []))

    def test_close_between_frames_and_inside_a_frame(self):
        a, b = self.pair()
        a.sock.close()
        with self.assertRaises(rt.ChannelClosed):
            b.recv()
        a, b = self.pair()
        a.sock.sendall(struct.pack("<III", 10, 10, 0) + b'{"op"')
        a.sock.close()
        with self.assertRaises(rt.ProtocolError):
            b.recv()

    def test_limits_and_malformed_headers(self):
        for prefix in (
            struct.pack("<III", rt.MAX_HEADER + 1, 0, 0),
            struct.pack("<III", 2, rt.MAX_PAYLOAD + 1, 0),
            struct.pack("<III", 2, 0, rt.MAX_FDS + 1),
        ):
            a, b = self.pair()
            a.sock.sendall(prefix)
            with self.assertRaises(rt.ProtocolError):
                b.recv()
        for header in (b"not json", b"[1]", b"\xff\xfe"):
            a, b = self.pair()
            a.sock.sendall(struct.pack("<III", len(header), 0, 0) + header)
            with self.assertRaises(rt.ProtocolError):
                b.recv()
        a, b = self.pair()
        a.sock.sendall(struct.pack("<III", 2, 0, 1) + b"{}")
        with self.assertRaisesRegex(rt.ProtocolError, "1 descriptors but 0"):
            b.recv()
        with self.assertRaises(rt.ProtocolError):
            a.send({"op": "x"}, b"", list(range(rt.MAX_FDS + 1)))


if __name__ == "__main__":
    unittest.main()
