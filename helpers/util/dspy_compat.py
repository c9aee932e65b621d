"""Workarounds for DSPy 3.4.1 behaviours that hurt a slow local LM (used by 05 and 06 through helpers).

DSPy's ParallelExecutor (behind ``Evaluate`` and GRPO's rollouts) re-submits any task still running
after 120 s once three or fewer remain, and abandons the original. On a 2-core CPU a ResearchHop
call routinely takes longer, so the same claim ran twice and the abandoned copies kept competing
for the CPU. Within ``stragglers_not_resubmitted()`` that straggler timeout is off.

DSPy also logs one line per failed example or unparsed rollout; ``loggers_quieted`` silences those
where our per-claim tables and step logs count them instead. GRPO's rollouts draw an unlabelled
``Average Metric`` bar per step (``bootstrap_trace_data`` hard-codes it); ``rollout_bars_hidden`` turns
it off where 06 prints one labelled line per step instead.
"""

import logging
from contextlib import contextmanager

from dspy.teleprompt import bootstrap_trace
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


@contextmanager
def loggers_quieted(level: int, *names: str, root_filter=None):
    """Raise the named loggers to ``level`` (and add ``root_filter`` to the root logger) for the block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    if root_filter is not None:
        logging.getLogger().addFilter(root_filter)
    try:
        yield
    finally:
        if root_filter is not None:
            logging.getLogger().removeFilter(root_filter)
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


@contextmanager
def rollout_bars_hidden():
    """Within the block, GRPO's rollouts run ``dspy.Evaluate`` without its progress bar."""
    original = bootstrap_trace.Evaluate

    def quiet(*args, **kwargs):
        return original(*args, **{**kwargs, "display_progress": False})

    bootstrap_trace.Evaluate = quiet
    try:
        yield
    finally:
        bootstrap_trace.Evaluate = original
