"""Arbor's own client, optimizer and request schemas, read from the installed ``arbor-ai`` without its package ``__init__``.

``import arbor`` starts from ``arbor/__init__.py``, which imports Arbor's CLI, server, trl and vllm: a notebook machine
would need a GPU stack just to talk to a server. The files the tutorial uses need far less -- the DSPy client
(``integrations/dspy/arbor_provider.py``: stdlib, dspy, openai, requests), the optimizer (``grpo_optimizer.py``: stdlib
and dspy) and the request/response models (``server/api/schemas.py``: pydantic) -- so they are loaded here by file
path from the installed distribution (``pip install --no-deps arbor-ai==0.2.17``). Using Arbor's own classes, not a
copy, keeps the seeds' code path exact; the price is a pinned version: another one is refused in one line, because
the file layout and the protocol may differ.
"""

import importlib.metadata
import importlib.util
import sys

from helpers.util.errors import TutorialError

ARBOR_VERSION = "0.2.17"
INSTALL = f"pip install --no-deps arbor-ai=={ARBOR_VERSION}"
FILES = {"provider": "arbor/integrations/dspy/arbor_provider.py",
         "optimizer": "arbor/integrations/dspy/grpo_optimizer.py",
         "schemas": "arbor/server/api/schemas.py"}


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("arbor-ai")
    except importlib.metadata.PackageNotFoundError:
        return None


def load(part: str):
    """The module of one of ``FILES`` ("provider", "optimizer", "schemas"), loaded once per process."""
    version = installed_version()  # checked on every call: a kernel may outlive a pip install
    if version is None:
        raise TutorialError(f"arbor-ai is not installed: `{INSTALL}` (its client needs only dspy, openai and requests)")
    if version != ARBOR_VERSION:
        raise TutorialError(f"arbor-ai {version} is installed, but the tutorial reads Arbor {ARBOR_VERSION}'s files: `{INSTALL}`")
    name = f"helpers_arbor_{part}"
    if name in sys.modules:
        return sys.modules[name]
    path = importlib.metadata.distribution("arbor-ai").locate_file(FILES[part])
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or not path.exists():
        raise TutorialError(f"arbor-ai {version} has no {FILES[part]}: reinstall it with `{INSTALL}`")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def provider_class():
    """Arbor's ``ArborProvider`` (the seeds' ``dspy.LM(..., provider=ArborProvider())``)."""
    return load("provider").ArborProvider


def grpo_class():
    """Arbor's ``ArborGRPO`` optimizer (seed 001)."""
    return load("optimizer").ArborGRPO


def schemas():
    """Arbor's pydantic request and response models (``extra="forbid"``): what its server accepts and answers."""
    return load("schemas")
