import pandas


def f(event):
    n = int(event.get("n", 1000))
    frame = pandas.DataFrame({"x": range(n)})
    return {"pandas": pandas.__version__, "sum": int(frame["x"].sum())}
