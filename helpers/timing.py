"""Measuring wall time in notebooks (introduced in 02_corpus_indexing)."""

import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Elapsed:
    seconds: float = 0.0

    def __str__(self):
        return f"{self.seconds:.2f} s"


@contextmanager
def stopwatch():
    """``with stopwatch() as t: ...`` then ``t.seconds``."""
    elapsed, start = Elapsed(), time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed.seconds = time.perf_counter() - start
