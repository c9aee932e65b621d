"""Shared code for the rl-multihop notebooks, by part (imported explicitly; nothing runs at import time).

What a learner meets: ``bootstrap`` (every notebook's first cell), ``profiles`` (mini / full), ``plots``;
``data`` (abstracts, mini world, HoVer), ``search`` (BM25), ``program`` (ResearchHop, recall, evaluation, the LM),
``rl`` (warm start, GRPO). CPU machinery a learner may skip: ``engine`` (the embedded SmolLM2) and ``backend``
(the local GRPO job). ``util`` holds small shared pieces; ``tools`` the notebook runner.
Code marked ``#@save`` is written in a notebook first and kept identical here (tests/test_project.py).
"""

__version__ = "0.1.0"
