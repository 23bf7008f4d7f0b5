# A hostile tenant: asks the agent for `event["target"]` every way a function can
# (in its own sandbox, as a sibling, as a map), then looks for what it may have
# attached: everything under /fns, every mount of its own sandbox, and any file
# that holds an API_KEY line. Reports all of it; raises nothing.
import os

import sprout


def attempt(call):
    try:
        return {"ok": call()}
    except sprout.CallError as e:
        return {"error": {"type": e.type, "failed": e.failed, "message": e.message}}
    except Exception as e:  # noqa: BLE001 - report whatever happened
        return {"error": {"type": type(e).__name__, "failed": True, "message": str(e)}}


def loot(root):
    found, listed = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        listed.extend(os.path.join(dirpath, n) for n in dirnames + filenames)
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as fh:
                    if b"API_KEY" in fh.read():
                        found.append(path)
            except OSError:
                pass
    return listed, found


def f(event):
    target = event["target"]
    out = {
        "call": attempt(lambda: sprout.call(target, {"from": "thief"})),
        "call_async": attempt(lambda: sprout.call_async(target, {"from": "thief"}).result()),
        "map": attempt(lambda: sprout.map(target, [{"from": "thief"}])),
    }
    listed, found = loot("/fns")
    _, scratch = loot("/workflow")
    with open("/proc/self/mountinfo") as fh:
        mounts = [line for line in fh.read().splitlines() if "/fns/" in line]
    out.update(fns=listed, api_keys=found + scratch, fns_mounts=mounts)
    return out
