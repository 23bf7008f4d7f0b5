import six


def f(event):
    return {"six": six.__version__, "text": six.ensure_str(event.get("text", "hi"))}
