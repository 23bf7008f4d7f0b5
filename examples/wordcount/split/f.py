"""Writes the text's lines into the workflow scratch, a file per chunk."""

import os


def f(event):
    scratch = os.environ["SPROUT_WORKFLOW_DIR"]
    lines = event["text"].splitlines()
    size = max(1, len(lines) // event.get("chunks", 4))
    files = []
    for i in range(0, len(lines), size):
        name = f"chunk-{i // size}.txt"
        with open(os.path.join(scratch, name), "w") as out:
            out.write("\n".join(lines[i:i + size]))
        files.append(name)
    return {"files": files}
