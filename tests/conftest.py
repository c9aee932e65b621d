"""Shared fixtures: one generated mini world per test session, in a temporary cache."""

import os

import pytest

from helpers import bootstrap, profiles
from helpers.data import mini_world

bootstrap.configure_threads()  # before any test module imports torch

# Tests never reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def world():
    return mini_world.generate(seed=0)


@pytest.fixture(scope="session")
def mini_cache(tmp_path_factory):
    """A mini-profile cache folder with the world published into it (shared, read-only by convention)."""
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(profiles.CACHE_ENV, str(root))
    profile = profiles.get_profile("mini")
    mini_world.publish(profile.source_dir, seed=0)
    yield profile
    mp.undo()


@pytest.fixture
def mini_profile(mini_cache, monkeypatch):
    monkeypatch.setenv(profiles.CACHE_ENV, str(mini_cache.cache_dir.parent))
    return profiles.get_profile("mini")


def pytest_collection_modifyitems(items):
    """Notebooks under nbval are `slow` (`make test-fast` leaves them out; `make test` runs everything)."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
