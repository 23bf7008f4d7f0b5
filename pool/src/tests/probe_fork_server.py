# Run as a fork server's process (root in its own user namespace): reports, as one
# JSON line on stdout, what it may do; then waits for its stdin to close.
import ctypes, json, os, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def err(ret):
    return 0 if ret == 0 else ctypes.get_errno()


def status(fields):
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in fields:
            out[key] = value.strip()
    return out


MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 0x40000
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x20000, 0x2000000, 0x4000000
CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x8000000, 0x20000000, 0x40000000

out = {
    "uid_map": open("/proc/self/uid_map").read(),
    "gid_map": open("/proc/self/gid_map").read(),
}
out.update(status({"Uid", "Gid", "CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs", "Seccomp"}))
fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
out["setns"] = err(libc.setns(fd, 0))
os.close(fd)
out["unshare"] = err(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWCGROUP))
out["private"] = err(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))
out["tmpfs"] = err(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=1777"))
out["sethostname"] = err(libc.sethostname(b"forked", 6))
out["sysfs"] = err(libc.mount(b"sysfs", b"/sys", b"sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | 1, None))
out["mqueue"] = err(libc.mount(b"mqueue", b"/dev/mqueue", b"mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, None))
target = int(sys.argv[1])
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    # PID 1 of the new pid namespace.
    child = {"pid": os.getpid()}
    child["proc"] = err(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None))
    try:
        child["proc_self"] = os.readlink("/proc/self")
    except OSError as e:
        child["proc_self"] = str(e)
    child["setgroups"] = err(libc.setgroups(0, None))
    child["setresgid"] = err(libc.setresgid(target, target, target))
    child["setresuid"] = err(libc.setresuid(target, target, target))
    child.update(status({"Uid", "Gid", "CapEff", "Groups"}))
    os.write(w, json.dumps(child).encode())
    os._exit(0)
os.close(w)
data = b""
while True:
    chunk = os.read(r, 65536)
    if not chunk:
        break
    data += chunk
os.waitpid(pid, 0)
out["child"] = json.loads(data or b"{}")
sys.stdout.write(json.dumps(out) + "\n")
sys.stdout.flush()
os.close(1)
os.close(2)
sys.stdin.buffer.read()
