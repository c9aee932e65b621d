"""The first cell of every notebook: environment set-up and the profile banner."""

import os
import sys

from helpers.profiles import Profile, get_profile


def configure_environment(profile: Profile) -> None:
    """Set the variables that must be in place before torch, datasets or DSPy are imported."""
    cache = profile.cache_dir
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # else torch's threads spin and collapse under load
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("DSPY_CACHEDIR", str(cache / "dspy"))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if profile.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def start(name: str | None = None) -> Profile:
    """Resolve the profile, prepare the environment and print a one-line banner (every notebook)."""
    profile = get_profile(name)
    configure_environment(profile)
    profile.cache_dir.mkdir(parents=True, exist_ok=True)
    where = "Colab" if "google.colab" in sys.modules else "local"
    print(f"rl-multihop · profile {profile.name!r} ({profile.summary}) · {where} · cache {profile.cache_dir}")
    return profile
