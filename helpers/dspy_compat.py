"""Workarounds for DSPy 3.4.1 behaviours that hurt a slow local LM (used by 05 and 06 through helpers).

DSPy's ParallelExecutor (behind ``Evaluate`` and GRPO's rollouts) re-submits any task still running
after 120 s once three or fewer remain, and abandons the original. On a 2-core CPU a ResearchHop
call routinely takes longer, so the same claim ran twice and the abandoned copies kept competing
for the CPU. Within ``stragglers_not_resubmitted()`` that straggler timeout is off.
"""

from contextlib import contextmanager

from dspy.utils.parallelizer import ParallelExecutor



@contextmanager
def stragglers_not_resubmitted():
    """Set ParallelExecutor's default ``timeout`` to 0 (its "no straggler check" value) for the block."""
    defaults = ParallelExecutor.__init__.__defaults__
    names = ParallelExecutor.__init__.__code__.co_varnames[1:ParallelExecutor.__init__.__code__.co_argcount]
    index = len(defaults) - len(names) + names.index("timeout")
    patched = defaults[:index] + (0,) + defaults[index + 1:]
    ParallelExecutor.__init__.__defaults__ = patched
    try:
        yield
    finally:
        ParallelExecutor.__init__.__defaults__ = defaults
