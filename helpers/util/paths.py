"""Where the checkout is, and paths as the notebooks print them (no machine-specific folder in stored outputs)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def display_path(path) -> str:
    """``path`` as printed in notebooks: relative to the working folder inside the checkout, ``~/...`` under home.

    Stored outputs then show no machine-specific folder (a kernel starts in ``notebooks/``: ``../cache/mini``).
    """
    path, here = Path(path).resolve(), Path.cwd().resolve()
    if path.is_relative_to(REPO_ROOT) and here.is_relative_to(REPO_ROOT):
        return os.path.relpath(path, here)
    if path.is_relative_to(Path.home()):
        return "~/" + str(path.relative_to(Path.home()))
    return str(path)
