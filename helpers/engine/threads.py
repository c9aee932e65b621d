"""How torch's OpenMP threads wait between parallel regions: set before torch is imported (notebooks, tests, benchmarks)."""

import os


# torch's OpenMP threads wait for the next parallel region by spinning a bounded while, then sleep. Measured on
# a 12-claim evaluation (2 cores): sleeping at once (PASSIVE) 47 s, spinning for ever (ACTIVE) 53 s, bounded 31 s.
THREAD_WAITING = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "200000"}


def configure_threads() -> None:
    """Set how torch's threads wait (``THREAD_WAITING``); it only counts before torch is imported."""
    for name, value in THREAD_WAITING.items():
        os.environ.setdefault(name, value)
