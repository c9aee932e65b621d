"""The first cell of every notebook: environment set-up and the profile banner."""

import logging
import os
import sys
import warnings

from helpers.engine.threads import configure_threads
from helpers.profiles import get_profile, Profile
from helpers.util.errors import TutorialError
from helpers.util.paths import display_path


def configure_environment(profile: Profile) -> None:
    """Set the variables that must be in place before torch, datasets or DSPy are imported."""
    cache = profile.cache_dir
    configure_threads()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("DSPY_CACHEDIR", str(cache / "dspy"))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # Libraries import tqdm.auto, which warns (with this machine's paths) when ipywidgets is absent.
    warnings.filterwarnings("ignore", message="IProgress not found")
    # A small model often hits max_tokens; the parse-rate table and per-claim tables report what matters.
    logging.getLogger("dspy.clients.lm").addFilter(_drop_truncation_warnings)
    if profile.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _drop_truncation_warnings(record: logging.LogRecord) -> bool:
    return "LM response was truncated" not in record.getMessage()


def start(name: str | None = None) -> Profile:
    """Resolve the profile, prepare the environment and print a one-line banner (every notebook)."""
    profile = get_profile(name)
    configure_environment(profile)
    try:
        profile.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TutorialError(f"cannot create the cache folder {profile.cache_dir} ({exc.strerror}): set RLMH_CACHE_DIR "
                            "to a folder you can write") from None
    where = "Colab" if "google.colab" in sys.modules else "local"
    print(f"rl-multihop · profile {profile.name!r} ({profile.summary}) · {where} · cache {display_path(profile.cache_dir)}")
    return profile


LIBRARIES = ("dspy", "litellm", "bm25s", "PyStemmer", "datasets", "transformers", "peft", "torch", "jax", "numba")


def library_versions() -> dict:
    """Installed versions of the libraries the tutorial depends on (01_setup)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def profile_settings(profile: Profile) -> dict:
    """The active profile's settings as a flat name -> value mapping (01_setup)."""
    return {
        "profile": profile.name,
        "corpus source": profile.corpus.url.replace(profile.cache_dir.as_uri(), "<cache>"),
        "corpus sha256": (profile.corpus.sha256 or "recorded on first download")[:16],
        "HoVer dataset": profile.hover_dataset.replace(str(profile.cache_dir), "<cache>"),
        "train / dev split": " / ".join(map(str, profile.split_sizes)),
        "dev claims evaluated": profile.dev_eval_size,
        "LM": f"{profile.lm.model} ({profile.lm.kind})",
        "LM temperature / max tokens": f"{profile.lm.temperature} / {profile.lm.max_tokens}",
        "GRPO preset": profile.grpo_preset,
    }


def check_cache_writable(profile: Profile) -> str:
    """Write, read back and delete a probe file in the cache; raise a one-line error if that fails."""
    from helpers.util import atomic

    probe = profile.cache_dir / ".write-probe"
    try:
        atomic.write_text(probe, "ok")
        ok = probe.read_text() == "ok"
        probe.unlink()
    except OSError as exc:
        raise TutorialError(f"cache folder {profile.cache_dir} is not writable ({exc.strerror}): set RLMH_CACHE_DIR to a writable folder") from None
    return "cache is writable" if ok else "cache returned different bytes"
