"""Argument types for the benchmarks' command lines: a bad value stops the run at once, in one line, before any work.

argparse turns the ``ArgumentTypeError`` into ``<script>: error: argument --dev: ...`` and exit status 2.
"""

import argparse
import math


def whole(low: int = 1, high: int | None = None):
    """A whole number from ``low`` (to ``high``): e.g. ``type=whole(1)`` for a count of claims or steps."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a whole number {span}")
        return value

    parse.__name__ = "whole number"
    return parse


def positive(text: str) -> float:
    """A finite number above 0 (a learning rate, a temperature, minutes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def grid(text: str) -> tuple[int, int]:
    """``AxB``, two whole numbers of 1 or more: e.g. ``3x6`` claims x rollouts."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form AxB with whole numbers of 1 or more, e.g. 3x6")
    return int(parts[0]), int(parts[1])


def at_most(parser: argparse.ArgumentParser, option: str, value: int, available: int, what: str) -> None:
    """Stop with argparse's one-line error when ``value`` asks for more than the ``available`` items."""
    if value > available:
        parser.error(f"argument {option}: {value} is more than the {available} {what}")
