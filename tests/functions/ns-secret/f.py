# A tenant's function with a credential in its code: no function of another
# namespace may run it, see this file, or get it attached into its sandbox.
API_KEY = "sprout-ns-secret-4f1c9e"


def f(event):
    return {"secret": API_KEY, "event": event}
