"""Forked sandboxes: a child of the fork server's zygote makes a new sandbox of itself.

Every zygote imports this module, but only the fork server's uses it (``prepare``
loads ``ctypes``, which no other zygote does). The fork server's zygote moves into a
user namespace of its own (``prepare``), which the agent maps, and keeps
CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID and CAP_SETPCAP there (``wait_mapped``; none on
the host); its seccomp filter allows ``unshare`` and ``mount`` on top of the sandbox
filter. Its child (``make_sandbox``), on the new sandbox's channel to the agent:

1. sends ``forked`` with a pidfd of itself; the agent makes the sandbox's cgroup and
   sends the files it joins it through (``join``: it writes 0 into each, moving
   itself, which on cgroup v1 skips the kernel's global lock a move of another
   process takes), then ``enter`` (everything from here on is the sandbox's to pay);
2. unshares the mount, uts, ipc, network, cgroup and pid namespaces, names the host,
   makes its mount tree private and mounts the sandbox's own filesystems (the plan,
   ``forked.json``, is written by the agent from the same spec as every sandbox's);
3. forks PID 1 of the new pid namespace and (Python) PID 2, the sandbox's zygote,
   sends ``entered`` with a pidfd of PID 1, lets it go on, and exits. PID 1 mounts
   ``/proc`` (with the masked and read-only paths), drops every privilege (bounding
   set, groups, the sandbox's uid and gid, ``no_new_privs``, the sandbox's seccomp
   filter) and executes the shim, which adopts PID 2; PID 2 drops the same
   privileges and serves as the sandbox's zygote.

Every step that fails is reported to the agent as ``enter_failed`` with its reason;
the child then exits, and the agent destroys what was made.
"""

import gc
import json
import os
import signal
import socket
import sys

from .codec import Channel, ChannelClosed, _close_quietly

RUNTIME_DIR = "/.sprout"
SHIM = RUNTIME_DIR + "/shim"
PLAN = RUNTIME_DIR + "/forked.json"
SECCOMP = RUNTIME_DIR + "/seccomp.bpf"

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_STRICTATIME = 0x1000000
# OCI mount options that are flags; anything else goes to the file system as data.
FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "strictatime": MS_STRICTATIME,
}

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
# What the fork server's zygote keeps of the full set its user namespace gives it:
# CAP_SETGID (6), CAP_SETUID (7), CAP_SETPCAP (8), CAP_SYS_ADMIN (21).
KEEP_CAPS = (6, 7, 8, 21)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# How long the zygote waits for the agent to write its user namespace's id maps.
MAP_TIMEOUT_S = 10.0
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2

# Signals Python ignores or handles that the shim must get with their defaults.
_RESET_SIGNALS = (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT)
# The fork server's zygote only: what every child needs, read once (and ctypes,
# which no other zygote loads).
_prepared = None
ctypes = None
# A package fork server's zygote: its packages' mount points (``/deps/<key>``), which
# its children keep under their own /deps; and whether it forked a sandbox yet.
_kept = ()
_forked = False
DEPS = "/deps"
MS_MOVE = 0x2000


class EnterError(Exception):
    """A step of making the sandbox failed; the message names it."""


class _Prepared:
    """What the fork server's zygote reads once: libc, the mount plan, the filter."""

    def __init__(self):
        global ctypes
        import ctypes as _ctypes

        ctypes = _ctypes

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        class CapHeader(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class CapData(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

        self.CapHeader, self.CapData = CapHeader, CapData
        import resource

        self.resource = resource
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        libc.unshare.argtypes = [ctypes.c_int]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        self.libc = libc
        with open(PLAN, "rb") as f:
            plan = json.loads(f.read(1 << 20))
        self.mounts = [_parse_mount(m) for m in plan["mounts"]]
        self.masked = [str(p) for p in plan["masked_paths"]]
        self.readonly = [str(p) for p in plan["readonly_paths"]]
        with open(SECCOMP, "rb") as f:
            bpf = f.read(1 << 20)
        if not bpf or len(bpf) % 8 or len(bpf) // 8 > 4096:
            raise EnterError(f"{SECCOMP}: {len(bpf)} bytes is not a seccomp program")
        self.filter = ctypes.create_string_buffer(bpf, len(bpf))
        self.fprog = SockFprog(len(bpf) // 8, ctypes.addressof(self.filter))


def _parse_mount(m):
    flags, data = 0, []
    for option in m.get("options") or ():
        if option in FLAGS:
            flags |= FLAGS[option]
        else:
            data.append(option)
    return (m["destination"], m.get("type") or "", m.get("source") or "none", flags, ",".join(data))


def prepare():
    """The fork server's zygote, at start: loads what every child needs and moves
    into a user namespace of its own, whose id maps the agent writes (see
    ``wait_mapped``)."""
    global _prepared
    _prepared = _Prepared()
    _check(_prepared.libc.unshare(CLONE_NEWUSER), "unshare the fork server's user namespace")


def wait_mapped():
    """Waits until the agent has mapped the user namespace (inside 0 is the fork
    server's host uid, the agent's sandbox uids after it), then keeps only the four
    capabilities making a sandbox needs there."""
    import time

    deadline = time.monotonic() + MAP_TIMEOUT_S
    while True:
        with open("/proc/self/uid_map") as u, open("/proc/self/gid_map") as g:
            if u.read().strip() and g.read().strip():
                break
        if time.monotonic() > deadline:
            raise EnterError(f"the agent did not map the fork server's user namespace in {MAP_TIMEOUT_S:.0f} s")
        time.sleep(0.001)
    libc = _prepared.libc
    _drop_bounding(keep=KEEP_CAPS)
    _limit_this_namespace()
    keep = sum(1 << c for c in KEEP_CAPS)
    header = _prepared.CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_prepared.CapData * 2)(_prepared.CapData(keep, keep, 0), _prepared.CapData(0, 0, 0))
    libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    _check(libc.capset(ctypes.addressof(header), ctypes.addressof(data)), "keep the fork server's capabilities")


def _drop_bounding(keep=()):
    """Drops every capability but ``keep`` from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(64):
        if cap in keep:
            continue
        if _prepared.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == 22 and cap > 0:  # EINVAL: past the last capability
                return
            raise EnterError(f"drop capability {cap} from the bounding set: {os.strerror(err)}")


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise EnterError(f"{what}: {os.strerror(err)} (errno {err})")


def _mount(source, target, fstype, flags, data=""):
    libc = _prepared.libc
    _check(
        libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {fstype or 'bind'} on {target}",
    )


def _prctl(option, arg, what):
    _check(_prepared.libc.prctl(option, arg, 0, 0, 0), what)


def keep_mounts(paths):
    """A package fork server's zygote: its children keep ``paths`` (its packages,
    attached by the agent under /deps) under their own /deps."""
    global _kept
    _kept = tuple(paths)


def _own_mounts():
    """The sandbox's own file systems over the fork server's (not /proc: PID 1 mounts
    that once it is in the new pid namespace). Under a package fork server the
    package mounts it inherits are moved onto its own /deps."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for target, fstype, source, flags, data in _prepared.mounts:
        if target == DEPS and _kept:
            _deps_keeping(source, fstype, flags, data)
        elif target != "/proc":
            _mount(source, target, fstype, flags, data)


def _deps_keeping(source, fstype, flags, data):
    """A new /deps with the inherited package mounts on it: each is bound to a
    staging point on the sandbox's new /tmp (a copy it may move, read-only all the
    same: the kernel locks the flags of mounts inherited from a more privileged
    namespace), the new /deps is mounted, and each copy is moved onto its own mount
    point there."""
    staged = []
    for i, path in enumerate(_kept):
        stage = f"/tmp/.sprout-deps-{i}"
        os.mkdir(stage, 0o700)
        _mount(path, stage, None, MS_BIND | MS_REC)
        staged.append((stage, path))
    _mount(source, DEPS, fstype, flags, data)
    for stage, path in staged:
        os.mkdir(path, 0o755)
        _mount(stage, path, None, MS_MOVE)
        os.rmdir(stage)


def _proc():
    """A /proc of the new pid namespace, with the spec's masked and read-only paths."""
    for target, fstype, source, flags, data in _prepared.mounts:
        if target == "/proc":
            _mount(source, target, fstype, flags | MS_NOSUID | MS_NODEV | MS_NOEXEC, data)
    for path in _prepared.masked:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY)
        elif os.path.exists(path):
            _mount("/dev/null", path, None, MS_BIND)
    for path in _prepared.readonly:
        if os.path.exists(path):
            _mount(path, path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _load_seccomp():
    _check(
        _prepared.libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(_prepared.fprog), 0, 0),
        "load the seccomp filter",
    )


# Per-user kernel limits counted per user namespace up to the host's: every sandbox
# forked from this fork server is also counted, at the host's level, as the fork
# server's user (the namespace's owner), so they share one budget there. Each
# sandbox gets at most half of it (per uid in this namespace), so that one sandbox
# alone can never exhaust it for the others.
_SHARED_SYSCTLS = (
    ("/proc/sys/fs/inotify/max_user_instances", "/proc/sys/user/max_inotify_instances"),
    ("/proc/sys/fs/inotify/max_user_watches", "/proc/sys/user/max_inotify_watches"),
    ("/proc/sys/fs/fanotify/max_user_groups", "/proc/sys/user/max_fanotify_groups"),
    ("/proc/sys/fs/fanotify/max_user_marks", "/proc/sys/user/max_fanotify_marks"),
)


def _limit_this_namespace():
    """This user namespace's own limits: half the host's shared budgets per uid
    (above), and no user namespace inside it (below)."""
    for host, ours in _SHARED_SYSCTLS:
        try:
            with open(host) as f:
                limit = int(f.read())
        except FileNotFoundError:
            continue  # a kernel without it
        with open(ours, "w") as f:
            f.write(str(max(1, limit // 2)))
    # No user namespace may be made inside this one: a new one would give whoever
    # made it every capability over namespaces of its own (and the kernel code they
    # reach). Nothing here needs one, and without CAP_SYS_RESOURCE this cannot be
    # raised again.
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")


def _halve_shared_rlimits():
    """The rlimits counted the same way (POSIX message queue bytes, queued signals)."""
    resource = _prepared.resource
    for which in (resource.RLIMIT_MSGQUEUE, resource.RLIMIT_SIGPENDING):
        soft, hard = resource.getrlimit(which)
        half = max(1, hard // 2) if hard != resource.RLIM_INFINITY else soft
        resource.setrlimit(which, (min(soft, half), half))


def _inside(host_id, map_file):
    """The id inside the fork server's user namespace of host id ``host_id``."""
    with open(map_file) as f:
        for line in f:
            inside, outside, count = (int(v) for v in line.split())
            if outside <= host_id < outside + count:
                return inside + host_id - outside
    raise EnterError(f"{map_file.split('/')[-1].split('_')[0]} {host_id} is not mapped in the fork server's user namespace")


def _inside_ids(spec):
    """The sandbox's uid and gid inside the fork server's user namespace."""
    uid = _inside(spec["uid"], "/proc/self/uid_map")
    gid = _inside(spec["gid"], "/proc/self/gid_map")
    if uid == 0 or gid == 0:
        raise EnterError(f"uid {spec['uid']} or gid {spec['gid']} is the fork server's own")
    return uid, gid


def _drop(uid, gid):
    _halve_shared_rlimits()
    _drop_bounding()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # Changing uid made this process non-dumpable; the sandbox's zygote is forked
    # from it (no exec resets that), and a sandbox made by libcontainer has it
    # dumpable (its /proc entries its own uid's), as here.
    _prctl(PR_SET_DUMPABLE, 1, "set dumpable")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    _load_seccomp()


def _shim_env(spec):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPROUT_")}
    env["SPROUT_SANDBOX"] = spec["sandbox"]
    env["SPROUT_WORKFLOW_DIR"] = os.environ["SPROUT_WORKFLOW_DIR"]  # every sandbox's
    env["SPROUT_RUNTIME"] = spec["runtime"]
    return env


def _become_pid1(spec, ids, go_read, channel, zygote_fd):
    """PID 1 of the new sandbox: waits until the agent has heard of it, finishes the
    sandbox (its /proc), drops privileges and becomes the shim, which adopts the
    sandbox's zygote (PID 2, forked by the child beside this one) on ``zygote_fd``."""
    # `entered` is sent (nothing of ours may reach the agent first); without the
    # byte the child failed, and there is no sandbox to make.
    go = os.read(go_read, 1)
    os.close(go_read)
    if go != b"1":
        os._exit(0)
    _proc()
    _drop(*ids)
    channel.close()  # its own copy; the shim has the agent's channel on descriptor 0
    env = _shim_env(spec)
    if zygote_fd is not None:
        os.set_inheritable(zygote_fd, True)
        env["SPROUT_ZYGOTE_FD"] = str(zygote_fd)
        env["SPROUT_ZYGOTE_PID"] = "2"  # the second process of a new pid namespace
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.execve(SHIM, [SHIM], env)


def _become_zygote(spec, ids, sock, zygote_main):
    """PID 2 of the new sandbox: drops privileges and serves as its zygote on
    ``sock`` (a copy of the fork server's zygote: no interpreter boot)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # the agent's channel is the shim's alone
    os.close(null)
    _drop(*ids)
    env = _shim_env(spec)
    os.environ.clear()
    os.environ.update(env)
    return zygote_main(sock.detach(), fork_server=False) or 0


def _join_cgroup(channel):
    """Moves this process into the sandbox's cgroup through the files the agent sends
    (``join``: write 0, this process, into each), until ``enter``. Returns whether to
    go on (False: the agent said something else; a write that fails is reported)."""
    while True:
        header, _payload, fds = channel.recv()
        op = header.get("op")
        try:
            if op != "join":
                return op == "enter"
            for fd in fds:
                os.write(fd, b"0")
        except OSError as exc:
            channel.send({"op": "enter_failed", "message": f"join the sandbox's cgroup: {exc}"})
            return False
        finally:
            for fd in fds:
                _close_quietly(fd)


def make_sandbox(zygote, spec, chan_fd, output_fd, zygote_main):
    """The zygote's child: makes sandbox ``spec`` (see the module's doc). Returns the
    exit status; PID 1 never returns (it becomes the shim, after forking the
    sandbox's zygote, which runs ``zygote_main``)."""
    # Nothing before the move but the handshake: what this process writes until the
    # agent has moved it is charged to the fork server (on cgroup v1 it moves with
    # the process; the agent bounds how many children wait at once).
    # The zygote's channel to the fork server's shim first: held here, it would keep
    # the shim from seeing the zygote die.
    zygote.close()
    sock = socket.socket(fileno=chan_fd)
    channel = Channel(sock)
    try:
        pidfd = os.pidfd_open(os.getpid())
        channel.send({"op": "forked"}, fds=[pidfd])
        os.close(pidfd)
        if not _join_cgroup(channel):
            return 0
    except (ChannelClosed, OSError):
        return 0  # the agent gave up on this sandbox
    # The shim's descriptors: its channel on 0, the sandbox's output on 1 and 2;
    # nothing else of the zygote's stays open.
    os.dup2(chan_fd, 0)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    sock.detach()  # chan_fd goes with the others below, not with this object
    os.closerange(3, 1 << 20)
    for fd in (0, 1, 2):
        os.set_inheritable(fd, True)
    sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", closefd=False)
    channel = Channel(socket.socket(fileno=os.dup(0)))
    try:
        ids = _inside_ids(spec)
        _check(_prepared.libc.unshare(NAMESPACES), "unshare the sandbox's namespaces")
        socket.sethostname(spec["sandbox"])
        _own_mounts()
        python = spec["runtime"] == "python"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) if python else (None, None)
        go_read, go_write = os.pipe()
        gc.freeze()
        pid1 = os.fork()
        if pid1 == 0:
            os.close(go_write)
            try:
                if theirs is not None:
                    theirs.close()
                _become_pid1(spec, ids, go_read, channel, ours.detach() if ours else None)
            except BaseException as exc:  # noqa: BLE001
                # Before it became the shim: the agent hears why on the channel.
                try:
                    channel.send({"op": "enter_failed", "message": f"PID 1: {exc}"[:4096]})
                except BaseException:  # noqa: BLE001
                    pass
            os._exit(70)
        if python:
            # The sandbox's zygote, beside PID 1 (so its set-up runs while PID 1
            # becomes the shim); it is reparented to PID 1 when this process exits.
            ours.close()
            pid2 = os.fork()
            if pid2 == 0:
                status = 70
                try:
                    os.close(go_read)
                    os.close(go_write)
                    channel.close()
                    status = _become_zygote(spec, ids, theirs, zygote_main)
                except BaseException as exc:  # noqa: BLE001
                    try:
                        os.write(2, f"sprout: forked sandbox {spec['sandbox']}: zygote: {exc}\n".encode())
                    except OSError:
                        pass
                os._exit(status)
            theirs.close()
        os.close(go_read)
        pidfd = os.pidfd_open(pid1)
        channel.send({"op": "entered"}, fds=[pidfd])
        os.close(pidfd)
        os.write(go_write, b"1")
        os.close(go_write)
        return 0
    except (EnterError, OSError) as exc:
        try:
            channel.send({"op": "enter_failed", "message": str(exc)[:4096]})
        except OSError:
            pass
        return 0
