def f(event):
    return {}
