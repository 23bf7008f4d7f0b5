"""sprout's Python runtime: a zygote that forks function instances.

The shim starts it with ``bootstrap.py`` (``python3 -I -B -c <bootstrap> /.sprout/python``),
with its control channel to the shim inherited as fd 3 (a connected AF_UNIX stream
socket). Importing the package or any of its modules has no side effects; the zygote
starts only when ``zygote.zygote_main()`` is called.

The modules, each importing only those before it:

- ``codec``: the frame codec (``Channel``), byte-for-byte ipc/src/frame.rs.
- ``errors``: the ``error`` object of ``raised``/``load_failed`` (tracebacks that show
  the function's own code), and the runtime's log lines.
- ``sdk``: the ``sprout`` module handlers import (``call``, ``call_async``, ``map``).
- ``instance``: a forked instance: load the handler, serve invocations.
- ``zygote``: serve the shim's fork requests.

Every message on every channel is a frame (all integers little-endian)::

    u32 header_len | u32 payload_len | u32 fd_count | header (UTF-8 JSON object) | payload

with ``fd_count`` descriptors passed by SCM_RIGHTS on the sendmsg that carries the
frame's first byte. Bit 31 of ``fd_count`` marks a *shared* payload: it is not in
the stream but the first ``payload_len`` bytes of the frame's last descriptor, a
memfd sealed against writing, resizing and further sealing (the low 31 bits count
the descriptors, that one included). Payloads over 64 KiB go that way. This must
stay byte-for-byte compatible with ipc/src/frame.rs.

Zygote (fd 3, talking to the shim)::

    zygote -> shim   {"op":"ready","pid":P}
    shim -> zygote   {"op":"fork","instance":N,"runtime":"python"}
                     + fds [instance channel, stdout write end, stderr write end,
                            calls channel]
    zygote -> shim   {"op":"forked","instance":N,"pid":P}
                   | {"op":"fork_failed","instance":N,"message":..}

Instance (its own channel: the shim's, then the agent's)::

    instance -> shim   {"op":"ready"}                      (a spare, set up)
    agent -> instance  {"op":"load","function":..,"code_dir":..,
                        "handler":{"module":..,"function":..}}
    instance -> agent  {"op":"loaded"} | {"op":"load_failed","error":E}   (then exits 1)
    agent -> instance  {"op":"invoke","id":K,"depth":D?,"raw":bool?} + payload = event
    instance -> agent  {"op":"returned","id":K,"raw":bool?,"called":true?} + payload = result
                     | {"op":"raised","id":K,"error":E,"called":true?}
    E = {"type":"ValueError","message":..,"traceback":..}

An event or a result is JSON text, or with ``raw`` bytes: a raw event reaches the
handler as a read-only ``memoryview``, and a handler that returns ``bytes``,
``bytearray`` or a ``memoryview`` answers raw. ``called`` says the handler called
other functions.

Calls between functions (the ``sprout`` module every instance can import)::

    instance -> agent  {"op":"resolve","id":N,"function":F}          (call socket)
    agent -> instance  {"op":"resolved","id":N,"spec":S|null}
    instance -> shim   {"op":"call","id":N,"function":F,"depth":D,"raw":bool?,"spec":S}
                       + event                                   (calls channel)
    instance -> agent  {"op":"call","id":N,"function":F,"depth":D,"raw":bool?}
                       + event                                   (call socket)
    shim/agent -> instance
                       {"op":"call_returned","id":N,"raw":bool?} + result
                     | {"op":"call_raised","id":N,"function":F,"error":E}
                     | {"op":"call_failed","id":N,"function":F,"message":..}
                     | {"op":"call_refused","id":N,"function":F,"kind":K,"message":..}
                                                                 (agent only)

The calls channel is the fourth descriptor of ``fork``; the call socket is
``/.sprout/agent.sock``, connected on first use, where replies may come in any order.

Standard library only.
"""
