import numpy


def f(event):
    n = int(event.get("n", 1000))
    return {"numpy": numpy.__version__, "sum": int(numpy.arange(n).sum())}
