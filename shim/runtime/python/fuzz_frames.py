"""Fuzzes the Python runtime's frame decoder (``sprout_runtime.codec.Channel``) with atheris.

The input is a *send script*: what a hostile peer writes on one end of a Unix stream
socket, the runtime's ``Channel`` reading the other end. It is a sequence of sends::

    u8 control | u16 length (little-endian) | length bytes

``control`` bits 0-3 are how many descriptors go with the send (SCM_RIGHTS, 0-15;
the channel accepts at most 8 per frame), bits 4-5 their kind: 0 ``/dev/null``,
1 a memfd sealed like a shared payload holding the send's bytes, 2 the same memfd
unsealed, 3 one end of a socket pair. A short tail is sent as it is. The same
format is read by the Rust target ``ipc/fuzz`` (``frames``), so corpora can be shared.

Every frame received is put through what the runtime does with headers from its
peers (the invoke, load and fork checks and a call reply's outcome). What must
hold: the decoder raises only ``ProtocolError`` and ``ChannelClosed`` (an
``OSError`` where the kernel refused a send), never anything else, and every
descriptor it received is closed or handed out.

Run (engineering time; Debian's python3 with atheris in a venv)::

    python3 -m venv /tmp/atheris && /tmp/atheris/bin/pip install atheris
    cd shim/runtime/python
    nice -n 19 /tmp/atheris/bin/python fuzz_frames.py -max_len=65536 \
        -rss_limit_mb=4096 -max_total_time=1800 /tmp/sprout-fuzz-frames fuzz/corpus/frames

``-merge=1`` (to minimise a corpus) re-runs ``argv[0]`` through the shell, so give it an
executable wrapper that runs this file with the venv's python as ``argv[0]``::

    /tmp/atheris/bin/python -c 'import sys; sys.argv = ["/path/to/wrapper"] + sys.argv[1:];
        import fuzz_frames; fuzz_frames.main()' -merge=1 -use_counters=0 NEW_DIR /tmp/sprout-fuzz-frames

``test_fuzz_corpus.py`` replays ``fuzz/corpus/frames`` as an ordinary unittest.
"""

import fcntl
import json
import os
import socket
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# Descriptor kinds of a send (bits 4-5 of its control byte).
DEVNULL, SEALED_MEMFD, UNSEALED_MEMFD, SOCKET = range(4)


codec = instance = sdk = zygote = None


def load_runtime():
    """Imports the runtime's modules from the package in this directory (unless
    ``main`` already did, instrumented)."""
    global codec, instance, sdk, zygote
    if codec is None:
        sys.path.insert(0, HERE)
        from sprout_runtime import codec, instance, sdk, zygote


def parse_script(data):
    """Splits a send script into ``[(bytes, fd_count, fd_kind)]``."""
    sends = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            sends.append((data[i:], 0, DEVNULL))
            break
        control = data[i]
        (length,) = struct.unpack_from("<H", data, i + 1)
        i += 3
        chunk = data[i:i + length]
        i += len(chunk)
        sends.append((chunk, control & 0x0F, (control >> 4) & 0x03))
    return sends


def make_fds(count, kind, chunk, opened):
    """Opens ``count`` descriptors of ``kind``; each is recorded in ``opened``."""
    fds = []
    for _ in range(count):
        if kind == SOCKET:
            a, b = socket.socketpair()
            opened.append(b.detach())
            fd = a.detach()
        elif kind in (SEALED_MEMFD, UNSEALED_MEMFD):
            fd = os.memfd_create("sprout-fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            if chunk:
                os.write(fd, chunk)
            if kind == SEALED_MEMFD:
                seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        else:
            fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        opened.append(fd)
        fds.append(fd)
    return fds


def use_frame(header, payload, fds):
    """Does with a received frame what the runtime does with one from a peer."""
    assert isinstance(header, dict), header
    assert all(isinstance(fd, int) and fd >= 0 for fd in fds), fds
    instance._check_invoke(header.get("depth", 0), header.get("raw", False))
    instance._check_load(header)
    zygote._check_spec(header, fds)
    try:
        sdk._outcome("fuzz", header, payload)
    except sdk.CallError:
        pass
    memoryview(payload).release()


def drain(channel, received):
    """Takes every complete frame and reads what the socket holds, without blocking.
    Returns False once the channel failed (as a peer's channel is then dropped)."""
    while True:
        try:
            frame = channel.try_recv()
            if frame is not None:
                header, payload, fds = frame
                received.extend(fds)
                use_frame(header, payload, fds)
                continue
            if channel.fill() == 0:
                if channel._end > channel._start:
                    raise codec.ProtocolError("peer closed the channel in the middle of a frame")
                raise codec.ChannelClosed("peer closed the channel")
        except BlockingIOError:
            return True
        except (codec.ProtocolError, codec.ChannelClosed):
            return False


def one_input(data):
    """Runs one send script against a fresh channel. Raises on a broken rule."""
    load_runtime()
    sender, receiver = socket.socketpair()
    sender.setblocking(False)
    receiver.setblocking(False)
    channel = codec.Channel(receiver)
    opened, received = [], []
    try:
        alive = True
        for chunk, count, kind in parse_script(data):
            fds = make_fds(count, kind, chunk, opened)
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
                if chunk or anc:
                    sender.sendmsg([chunk], anc)
            except BlockingIOError:
                break
            except OSError:
                # The kernel refused the send (e.g. descriptors on an empty send,
                # too many descriptors): nothing reached the channel.
                pass
            alive = drain(channel, received)
            if not alive:
                break
        if alive:
            sender.shutdown(socket.SHUT_WR)
            drain(channel, received)
    finally:
        sender.close()
        channel.close()
        for fd in opened + received:
            try:
                os.close(fd)
            except OSError:
                pass


def frame(header, payload=b"", nfds=0, shared=False):
    """The bytes of one well-formed frame."""
    hdr = json.dumps(header, separators=(",", ":")).encode()
    word = nfds | ((1 << 31) if shared else 0)
    return struct.pack("<III", len(hdr), len(payload), word) + hdr + (b"" if shared else payload)


def send(data, nfds=0, kind=DEVNULL):
    """One send of a script."""
    return struct.pack("<BH", nfds | (kind << 4), len(data)) + data


def seeds():
    """``{name: script}``: well-formed traffic of every channel the runtime reads."""
    invoke = frame({"op": "invoke", "id": 1}, b'{"a":[1,2,3]}')
    return {
        "invoke": send(invoke),
        "invoke_raw_depth": send(frame({"op": "invoke", "id": 2, "depth": 3, "raw": True}, b"\x00\xff")),
        "two_invokes_one_send": send(invoke + frame({"op": "invoke", "id": 2}, b"{}")),
        "invoke_split": send(invoke[:5]) + send(invoke[5:17]) + send(invoke[17:]),
        "load": send(
            frame(
                {"op": "load", "function": "f", "code_dir": "/code", "handler": {"module": "m", "function": "f"}}
            )
        ),
        "fork": send(frame({"op": "fork", "instance": 7, "runtime": "python"}, nfds=4), 4, SOCKET),
        "call_returned": send(frame({"op": "call_returned", "id": 1}, b'{"ok":true}')),
        "call_returned_raw": send(frame({"op": "call_returned", "id": 1, "raw": True}, b"bytes")),
        "call_raised": send(
            frame(
                {
                    "op": "call_raised",
                    "id": 1,
                    "function": "g",
                    "error": {"type": "ValueError", "message": "m", "traceback": "t"},
                }
            )
        ),
        "call_failed": send(frame({"op": "call_failed", "id": 1, "function": "g", "message": "no"})),
        # A shared payload: the memfd holds the send's own bytes, the prefix among them.
        "shared": send(frame({"op": "call_returned", "id": 3, "raw": True}, b"\x00" * 12, nfds=1, shared=True), 1, SEALED_MEMFD),
        "shared_unsealed": send(frame({"op": "invoke", "id": 3}, b"\x00" * 4, nfds=1, shared=True), 1, UNSEALED_MEMFD),
        "fds_without_frame": send(b"", 8, DEVNULL),
        "huge_prefix": send(struct.pack("<III", 1 << 20, 64 << 20, 0)),
        "bad_json": send(frame({"op": "invoke"})[:12] + b"{not json"),
    }


def write_seeds(directory):
    os.makedirs(directory, exist_ok=True)
    for name, script in seeds().items():
        with open(os.path.join(directory, f"seed-{name}"), "wb") as f:
            f.write(script)


def main():
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(sys.argv[2])
        return
    import atheris

    with atheris.instrument_imports(include=["sprout_runtime"]):
        load_runtime()
    atheris.instrument_func(one_input)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
