"""Computed attention states (KV) kept by token prefix, so a prompt that starts like an earlier one is not re-read.

The engine (``helpers.engine.local_lm``) asks ``lookup(ids)`` before prefilling a prompt and ``store(ids, kv)``
after. What it reuses, in the tutorial's workload:

* GuidedChatAdapter's second field call repeats the first call's whole prompt, then adds a few tokens;
* the rollouts of one claim in a GRPO step start with the identical prompt;
* every call of one predictor starts with the same system message.

This is the idea of vLLM's automatic prefix caching and SGLang's radix cache, kept in-process and simple:
a list of entries compared token by token, least recently used evicted past a memory budget. Entries
hold the states of one set of weights only: ``clear()`` must run whenever the weights change (GRPO's
updates do), or a rollout would be computed partly by the old policy.
"""

from collections import OrderedDict
from dataclasses import dataclass

# With the engine's packed weights (+513 MB) this keeps it under +1 GB over the engine without reuse (measured:
# 512 MB made it +1,040 MB). The 24-claim evaluation reused as much with 256 MB (16,497 of 16,507 tokens) and
# nearly as much with 128 MB (16,384): what it reuses is mostly the previous field call of the same row.
DEFAULT_BUDGET_MB = 384.0


@dataclass
class CacheStats:
    """Prompt tokens the engine computed vs took from the cache (benchmarks print these)."""

    computed_tokens: int = 0
    reused_tokens: int = 0
    entries: int = 0
    megabytes: float = 0.0
    clears: int = 0


class PrefixCache:
    """KV states by token prefix, LRU-evicted past ``budget_mb``. Not thread-safe: the engine's lock guards it."""

    def __init__(self, budget_mb: float = DEFAULT_BUDGET_MB):
        self.budget_bytes = int(budget_mb * 2**20)
        self.entries: OrderedDict[tuple, list] = OrderedDict()  # token ids -> [(key, value) per layer]
        self.bytes = 0
        self.stats = CacheStats()

    def lookup(self, ids: list[int]) -> tuple[int, list | None]:
        """The longest cached prefix of ``ids``: ``(length, kv cut to that length)``, or ``(0, None)``."""
        best, best_key = 0, None
        for key in self.entries:
            n = _common_prefix(key, ids)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        kv = self.entries[best_key]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in kv]

    def store(self, ids: list[int], kv: list) -> None:
        """Keep ``kv`` (one ``(key, value)`` pair per layer, batch 1) for ``ids``; entries it extends are dropped."""
        key = tuple(ids)
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if size > self.budget_bytes:
            return
        for old in [o for o in self.entries if len(o) <= len(key) and key[: len(o)] == o]:
            self._drop(old)
        self.entries[key] = kv
        self.bytes += size
        while self.bytes > self.budget_bytes:
            self._drop(next(iter(self.entries)))
        self._update_stats()

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
        self.stats.clears += 1
        self._update_stats()

    def _drop(self, key) -> None:
        kv = self.entries.pop(key)
        self.bytes -= sum(k.nbytes + v.nbytes for k, v in kv)

    def _update_stats(self) -> None:
        self.stats.entries, self.stats.megabytes = len(self.entries), self.bytes / 2**20


def _common_prefix(a: tuple, b: list) -> int:
    n = min(len(a), len(b))
    if a[:n] == tuple(b[:n]):
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
