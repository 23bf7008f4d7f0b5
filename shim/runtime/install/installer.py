"""sprout's installer: PID 1 of an install sandbox (``docs/protocol.md``, "Install
sandboxes").

It reads one request, a JSON object on one line, from its descriptor 0 (a socket to
the agent), waits for nothing else, runs pip or npm, and writes one answer line back
on the same socket. It writes only under ``/deps`` (its output directory) and
``/tmp``. It runs as the sandbox's unprivileged user with the sandbox's limits; the
packages it handles are hostile until the agent has checked what it wrote.
"""

import json
import os
import socket
import subprocess
import sys
import sysconfig
import urllib.parse

OUT = "/deps"
PYTHON = "/usr/bin/python3"
NPM = "/usr/bin/npm"
# What of an installer's output goes back in a failure (its end: the error is there).
MESSAGE_BYTES = 4000
# The largest request read.
MAX_REQUEST = 4 << 20
# The host's certificate authorities (bind-mounted read-only with /etc/ssl).
HOST_CAS = "/etc/ssl/certs/ca-certificates.crt"

PIP = [
    PYTHON, "-m", "pip",
    "--disable-pip-version-check", "--no-input", "--no-cache-dir",
]


def env():
    e = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "TMPDIR": os.path.join(OUT, "tmp"),
        # `--target` and `--dry-run` installs touch no system package; Debian's
        # marker would refuse them all the same.
        "PIP_BREAK_SYSTEM_PACKAGES": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        # No configuration file (the host's /usr/pip.conf is visible, a later
        # global or user one would be too): the index is the request's alone.
        "PIP_CONFIG_FILE": os.devnull,
    }
    os.makedirs(e["TMPDIR"], exist_ok=True)
    return e


def source(request, field):
    """The index or registry the agent names (the node's, `--package-index`,
    `--npm-registry`); None when it names none."""
    url = request.get(field)
    if isinstance(url, str) and url.startswith(("https://", "http://")) and url.isprintable() and " " not in url:
        return url
    return None


def index_args(index):
    """pip's arguments for the node's index; a plain-HTTP one (the operator's
    mirror on a private network) is trusted as named, as pip needs to be told."""
    args = ["--index-url", index]
    if index.startswith("http://"):
        args += ["--trusted-host", urllib.parse.urlsplit(index).netloc]
    return args


def npm_env(registry):
    """npm's environment: the node's registry, no configuration file of the host's or
    the function's, its cache in the sandbox's work area, and the host's certificate
    authorities on top of Node's own (for a TLS-inspecting proxy)."""
    e = env()
    e.update({
        "npm_config_registry": registry,
        # The host's /usr/etc/npmrc (sandboxes see /usr) and any ~/.npmrc stay out:
        # two empty files of the sandbox's own.
        "npm_config_globalconfig": os.path.join(OUT, "tmp", "global-npmrc"),
        "npm_config_userconfig": os.path.join(OUT, "tmp", "user-npmrc"),
        "npm_config_cache": os.path.join(OUT, "tmp", "npm-cache"),
        "npm_config_update_notifier": "false",
        "npm_config_fund": "false",
        "npm_config_audit": "false",
        "npm_config_progress": "false",
    })
    for name in ("global-npmrc", "user-npmrc"):
        open(os.path.join(OUT, "tmp", name), "w").close()
    if os.path.isfile(HOST_CAS):
        e["NODE_EXTRA_CA_CERTS"] = HOST_CAS
    return e


def tail(text):
    text = text.strip()
    if len(text) > MESSAGE_BYTES:
        text = "..." + text[-MESSAGE_BYTES:]
    return text


# What pip or npm prints, as it prints it: the agent quotes its end when the install
# runs out of time (docs/protocol.md, "Install sandboxes").
LOG = os.path.join(OUT, "installer.log")


def run(args, cwd=None, environment=None):
    """Runs ``args``; returns (ok, its output)."""
    with open(LOG, "wb") as log:
        done = subprocess.run(
            args, cwd=cwd, env=environment or env(), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT,
        )
    with open(LOG, "rb") as log:
        output = log.read()
    return done.returncode == 0, output.decode("utf-8", "replace")


def abi():
    return f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}".replace(".", "_")


def resolve(request):
    """Resolves requirement lines to exact versions and archives, with pip's resolver
    and nothing installed."""
    lines, index = request.get("requirements"), source(request, "index")
    if not isinstance(lines, list) or not all(isinstance(l, str) for l in lines) or not index:
        return {"op": "failed", "message": "resolve needs a list of requirement lines and an index"}
    path = os.path.join(OUT, "requirements.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    report = os.path.join(OUT, "report.json")
    ok, output = run(PIP + [
        "install", "--dry-run", "--ignore-installed", "--quiet", "--prefer-binary",
        "--report", report, "-r", path, *index_args(index),
    ])
    if not ok:
        return {"op": "failed", "message": tail(output)}
    with open(report) as f:
        data = json.load(f)
    packages = []
    for item in data.get("install", []):
        meta = item.get("metadata", {})
        info = item.get("download_info", {})
        hashes = info.get("archive_info", {}).get("hashes", {})
        sha256 = hashes.get("sha256")
        if not sha256:
            return {"op": "failed", "message": f"{meta.get('name')} {meta.get('version')}: the index gave no SHA-256 for {info.get('url')}"}
        packages.append({"name": meta.get("name"), "version": meta.get("version"), "sha256": sha256})
    return {"op": "resolved", "abi": abi(), "packages": packages}


def install(request):
    """Installs exactly one archive (name, version and SHA-256) into OUT/<dir>,
    without its dependencies (each is installed on its own)."""
    name, version, sha256, target = (request.get(k) for k in ("name", "version", "sha256", "dir"))
    index = source(request, "index")
    if not all(isinstance(v, str) and v for v in (name, version, sha256, target, index)) or "/" in target:
        return {"op": "failed", "message": "install needs name, version, sha256, index and dir"}
    path = os.path.join(OUT, "pinned.txt")
    with open(path, "w") as f:
        f.write(f"{name}=={version} --hash=sha256:{sha256}\n")
    ok, output = run(PIP + [
        "install", "--no-deps", "--require-hashes", "--prefer-binary", "--quiet",
        "--target", os.path.join(OUT, target), "-r", path, *index_args(index),
    ])
    if not ok:
        return {"op": "failed", "message": tail(output)}
    return {"op": "installed"}


def npm(request):
    """Installs a package.json's dependencies (with its lock, `npm ci`) into
    OUT/<dir>/node_modules."""
    manifest, lock, target = request.get("manifest"), request.get("lock"), request.get("dir")
    registry = source(request, "registry")
    if not isinstance(manifest, dict) or not isinstance(target, str) or "/" in target or not target or not registry:
        return {"op": "failed", "message": "npm needs a manifest, a registry and a dir"}
    where = os.path.join(OUT, target)
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, "package.json"), "w") as f:
        json.dump(manifest, f)
    args = [NPM, "install", "--omit=dev", "--no-audit", "--no-fund", "--no-update-notifier"]
    if isinstance(lock, dict):
        with open(os.path.join(where, "package-lock.json"), "w") as f:
            json.dump(lock, f)
        args = [NPM, "ci", "--omit=dev", "--no-audit", "--no-fund", "--no-update-notifier"]
    ok, output = run(args, cwd=where, environment=npm_env(registry))
    if not ok:
        # npm's log is in the sandbox, gone with it: its path says nothing.
        lines = [l for l in output.splitlines() if "A complete log of this run" not in l]
        return {"op": "failed", "message": tail("\n".join(lines))}
    os.makedirs(os.path.join(where, "node_modules"), exist_ok=True)
    return {"op": "installed"}


OPS = {"resolve": resolve, "install": install, "npm": npm}


def main():
    channel = socket.socket(fileno=0)
    line = b""
    while not line.endswith(b"\n"):
        chunk = channel.recv(65536)
        if not chunk:
            return 0
        line += chunk
        if len(line) > MAX_REQUEST:
            return 1
    request = json.loads(line)
    op = OPS.get(request.get("op"))
    try:
        answer = op(request) if op else {"op": "failed", "message": f"unknown op {request.get('op')!r}"}
    except Exception as exc:  # noqa: BLE001
        answer = {"op": "failed", "message": f"{type(exc).__name__}: {exc}"}
    channel.sendall((json.dumps(answer) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
