"""A hostile function that goes after every descriptor it can see in its sandbox.

Used by tests/tests/hostile_descriptors.rs (issue 9, finding 1). Modes:

- ``probe``: for every ``/proc/<pid>/fd/<n>`` visible in the sandbox, tries to append
  a forged line (``O_WRONLY|O_APPEND``), to read (``O_RDONLY``), to truncate
  (``O_WRONLY|O_TRUNC``) and ``statvfs``, and reports what each gave; then writes
  ``flood_mb`` MiB into ``/proc/1/fd/2`` (the shim's stderr) if it can open it.
- ``call``: calls ``callee`` by name (in this sandbox: the shim forks a local callee).
- ``ping``: answers ``"pong"``.

Every descriptor it opens is non-blocking and closed before it answers.
"""

import os

import sprout


def _attempt(path, flags, action):
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return {"error": e.strerror or str(e)}
    try:
        return {"ok": action(fd)}
    except OSError as e:
        return {"error": e.strerror or str(e)}
    finally:
        os.close(fd)


def _statvfs(path):
    try:
        s = os.statvfs(path)
    except OSError as e:
        return {"error": e.strerror or str(e)}
    return {"fsid": s.f_fsid, "blocks": s.f_blocks, "bsize": s.f_bsize}


def _targets():
    found = []
    for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for n in sorted(fds, key=int):
            path = f"/proc/{pid}/fd/{n}"
            try:
                found.append((int(pid), int(n), path, os.readlink(path)))
            except OSError:
                continue
    return found


def probe(forged, flood_mb):
    me = os.getpid()
    seen = []
    for pid, n, path, target in _targets():
        if pid == me and n > 2:
            # The probe's own channels and what it opens while it probes.
            continue
        line = (forged + "\n").encode()
        seen.append({
            "pid": pid,
            "fd": n,
            "target": target,
            "append": _attempt(path, os.O_WRONLY | os.O_APPEND, lambda fd: os.write(fd, line)),
            "read": _attempt(
                path, os.O_RDONLY, lambda fd: os.read(fd, 4096).decode("utf-8", "replace")
            ),
            "truncate": _attempt(path, os.O_WRONLY | os.O_TRUNC, lambda fd: True),
            "statvfs": _statvfs(path),
        })
    flood = {"mb": flood_mb}
    if flood_mb:
        try:
            fd = os.open("/proc/1/fd/2", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            flood["error"] = e.strerror or str(e)
        else:
            chunk = (b"x" * 1023 + b"\n") * 64  # 64 KiB of 1 KiB lines
            written = 0
            try:
                while written < flood_mb << 20:
                    written += os.write(fd, chunk)
            except OSError as e:
                flood["error"] = e.strerror or str(e)
            finally:
                os.close(fd)
            flood["written"] = written
    return {"pid": me, "seen": seen, "flood": flood}


def f(event):
    mode = event["mode"]
    if mode == "probe":
        return probe(event["forged"], event.get("flood_mb", 0))
    if mode == "call":
        return sprout.call(event["callee"], {"mode": "ping"})
    return "pong"
