"""How torch's threads behave: how they wait (set before torch is imported), and how many the engine uses while
other processes keep cores busy (``FairShare``)."""

import math
import os
import time


# torch's OpenMP threads wait for the next parallel region by spinning a bounded while, then sleep. Measured on
# a 12-claim evaluation (2 cores): sleeping at once (PASSIVE) 47 s, spinning for ever (ACTIVE) 53 s, bounded 31 s.
THREAD_WAITING = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "200000"}


def configure_threads() -> None:
    """Set how torch's threads wait (``THREAD_WAITING``); it only counts before torch is imported."""
    for name, value in THREAD_WAITING.items():
        os.environ.setdefault(name, value)


def busy_jiffies(stat_path: str = "/proc/stat") -> int | None:
    """CPU time all processes have used since boot, in clock ticks (Linux's first ``/proc/stat`` line); None elsewhere."""
    try:
        with open(stat_path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, *rest = (int(x) for x in fields[1:])
    steal = rest[0] if rest else 0
    return user + nice + system + irq + softirq + steal


class FairShare:
    """How many threads to use: every core alone, one fewer for each core other processes keep busy (at least one).

    Why: the engine's threads spin a while before they sleep, which is fastest alone; beside a busy process they and
    it take turns on the same cores, and a 12-claim evaluation took 3.6x its time alone where a fair share of 2 cores is
    2x. With a thread per free core it stays near 2x (``benchmarks/lm_throughput.py --beside-busy``).

    Others' load is what all processes used (``/proc/stat``) less this process's own time (``os.times``, every
    thread), over the last ``every`` seconds or more. Where there is no ``/proc/stat`` (macOS), always every core.
    """

    def __init__(self, cores: int, every: float = 0.5, stat_path: str = "/proc/stat"):
        self.cores, self.every, self.stat_path = max(1, int(cores)), every, stat_path
        self.threads = self.cores
        self.others = 0.0  # cores other processes kept busy over the last interval
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._reading()

    def _reading(self):
        busy = busy_jiffies(self.stat_path)
        if busy is None:
            return None
        own = os.times()
        return time.monotonic(), busy / self._tick, own.user + own.system

    def update(self) -> int:
        """The number of threads for now (read again at most every ``every`` seconds)."""
        if self._last is None:
            return self.threads
        now = self._reading()
        if now is None or now[0] - self._last[0] < self.every:
            return self.threads
        (t0, all0, own0), (t1, all1, own1) = self._last, now
        self._last = now
        self.others = max(0.0, ((all1 - all0) - (own1 - own0)) / (t1 - t0))
        taken = math.floor(self.others + 0.5)  # a core counts as taken from half of it busy
        self.threads = max(1, min(self.cores, self.cores - taken))
        return self.threads
