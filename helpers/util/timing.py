"""Measuring wall time in notebooks (introduced in 02_corpus_indexing), and a process's memory (benchmarks, tests)."""

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


def process_memory_mb(field: str) -> float | None:
    """A memory line of ``/proc/self/status`` in MB (``VmRSS`` now, ``VmHWM`` the peak); None where there is no /proc.

    ``VmHWM`` is this process's own peak: ``ru_maxrss`` keeps the forking parent's peak across ``exec``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
