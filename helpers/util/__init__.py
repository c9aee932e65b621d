"""Small pieces every part uses: atomic writes, the one error type, timing, statistics, dspy quirks."""
