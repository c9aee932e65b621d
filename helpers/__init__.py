"""Shared code for the rl-multihop notebooks: one module per concern, imported explicitly.

Nothing here runs at import time; notebooks start with ``bootstrap.start()``.
"""

__version__ = "0.1.0"
