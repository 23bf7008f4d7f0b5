"""Calls another function by name (the seeds' pinger/ponger example).

    sprout invoke ./examples/pinger '"ponger"' --with ./examples/ponger

The call runs in this sandbox: the shim forks `ponger` from the zygote here.
"""

import sprout


def f(event):
    target = event if isinstance(event, str) else event.get("target", "ponger")
    answer = sprout.call(target, {"from": "pinger"})
    return f"ping to {target}...pong from {target}: {answer}"
