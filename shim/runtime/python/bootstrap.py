# What the shim runs with `python3 -I -B -c`, with the directory that holds the
# `sprout_runtime` package (/.sprout/python) as its one argument. It imports the
# package (from its bytecode in __pycache__ when that was made for this interpreter,
# else from source), leaves no trace of it in sys.argv, sys.path or sys.modules (a
# handler sees what it saw when the runtime was one file) and runs the zygote.
import sys

sys.path.insert(0, sys.argv.pop(1))
from sprout_runtime.zygote import zygote_main

del sys.path[0]
for name in [n for n in sys.modules if n == "sprout_runtime" or n.startswith("sprout_runtime.")]:
    del sys.modules[name]
sys.exit(zygote_main())
