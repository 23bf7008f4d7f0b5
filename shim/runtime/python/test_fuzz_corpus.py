"""Replays the Python frame decoder's fuzz corpus (``fuzz/corpus/frames``, kept small
and minimised; every crash input found is kept there too) as an ordinary test: each
input through ``fuzz_frames.one_input``, the function atheris runs.

Run from this directory with ``/usr/bin/python3 -B -m unittest -v test_fuzz_corpus``;
no atheris needed.
"""

import os
import tracemalloc
import unittest

import fuzz_frames

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "fuzz", "corpus", "frames")


def corpus():
    return [os.path.join(CORPUS, name) for name in sorted(os.listdir(CORPUS))]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


class FuzzCorpus(unittest.TestCase):
    def test_corpus_replays_cleanly(self):
        paths = corpus()
        self.assertGreaterEqual(len(paths), 10, f"the corpus at {CORPUS} was lost")
        for path in paths:
            with self.subTest(input=os.path.basename(path)):
                # Anything but the decoder's own errors propagates and fails here.
                fuzz_frames.one_input(read(path))

    def test_replay_closes_every_descriptor(self):
        paths = corpus()
        before = open_fds()
        for path in paths:
            fuzz_frames.one_input(read(path))
        self.assertEqual(open_fds(), before)

    def test_memory_follows_the_bytes_received(self):
        # A peer's prefix may announce a large frame; before its bytes arrive the
        # channel spends at most a small fixed amount on it (a frame in the stream is
        # at most ~192 KiB; larger payloads are shared), not what the prefix announces.
        limit = 512 << 10
        tracemalloc.start()
        try:
            for path in corpus():
                data = read(path)
                tracemalloc.reset_peak()
                fuzz_frames.one_input(data)
                _, peak = tracemalloc.get_traced_memory()
                with self.subTest(input=os.path.basename(path)):
                    self.assertLessEqual(
                        peak, 4 * len(data) + limit, f"{len(data)} bytes in made the channel hold {peak} bytes"
                    )
        finally:
            tracemalloc.stop()

    def test_every_seed_is_in_the_corpus(self):
        for name, script in fuzz_frames.seeds().items():
            path = os.path.join(CORPUS, f"seed-{name}")
            self.assertTrue(
                os.path.exists(path), f"{path} is missing (python3 fuzz_frames.py --write-seeds {CORPUS})"
            )
            self.assertEqual(read(path), script, f"{path} is not the seed {name}")

    def test_script_format(self):
        self.assertEqual(fuzz_frames.parse_script(b""), [])
        self.assertEqual(fuzz_frames.parse_script(b"\x01\x02"), [(b"\x01\x02", 0, fuzz_frames.DEVNULL)])
        script = fuzz_frames.send(b"abc", 2, fuzz_frames.SOCKET) + b"\x00\xff\xffxy"
        self.assertEqual(
            fuzz_frames.parse_script(script),
            [(b"abc", 2, fuzz_frames.SOCKET), (b"xy", 0, fuzz_frames.DEVNULL)],
        )


if __name__ == "__main__":
    unittest.main()
