def f(event):
    return "Hello, " + event.get("name", "world") + "!"
