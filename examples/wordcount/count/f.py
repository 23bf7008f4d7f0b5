"""Counts the words of one chunk file in the workflow scratch (a sibling sandbox)."""

import os


def f(name):
    with open(os.path.join(os.environ["SPROUT_WORKFLOW_DIR"], name)) as chunk:
        return len(chunk.read().split())
