def f(event):
    return "ponged"
