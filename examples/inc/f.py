"""One hop of a chain: counts and stamps the time (benchmarks use it)."""

import time


def f(event):
    event["n"] = event.get("n", 0) + 1
    event.setdefault("t", []).append(time.time_ns())
    return event
