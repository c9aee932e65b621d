"""The two profiles, ``mini`` (default, offline CPU) and ``full`` (the seeds' GPU setting).

Chosen by the ``RLMH_PROFILE`` environment variable; introduced in 01_setup. Notebooks read every
data source, size and model setting from here, never hard-code them.
"""

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from helpers.util.errors import TutorialError
from helpers.util.paths import REPO_ROOT

PROFILE_ENV = "RLMH_PROFILE"
CACHE_ENV = "RLMH_CACHE_DIR"
LM_ENV = "RLMH_LM"  # embedded, arbor or openai: which LM notebooks 04-06 talk to (helpers.program.lm_setup)
ARBOR_URL_ENV = "RLMH_ARBOR_URL"  # the full profile's Arbor server, e.g. http://gpu-box:7453/v1/
DEFAULT_ARBOR_URL = "http://localhost:7453/v1/"


@dataclass(frozen=True)
class Source:
    """A downloadable file: where it lives and the sha256 it must have (None: recorded on first use)."""

    url: str
    sha256: str | None
    member: str = ""  # the file inside the archive that the notebooks read
    lines: int | None = None  # how many lines ``member`` has, when known (checked at extraction)


@dataclass(frozen=True)
class LMSettings:
    """How notebooks 04-06 reach their language model."""

    kind: str  # "embedded" (in-process SmolLM2) or "arbor" (Qwen behind an Arbor server)
    model: str
    temperature: float
    max_tokens: int
    api_base: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    offline: bool
    corpus: Source
    hover_dataset: str  # a Hugging Face dataset id, or a local folder of parquet files
    hover_sha256: dict = field(default_factory=dict)  # file name -> sha256, for local folders
    split_sizes: tuple = (600, 300)  # train, dev; the rest is test (the seeds' slicing)
    dev_eval_size: int = 300  # how many dev claims 05 evaluates
    eval_threads: int = 16
    eval_temperature: float = 0.7  # the seeds evaluate at the LM's sampling temperature
    adapter: str = "ChatAdapter"  # used until 04 has measured and saved a choice
    lm: LMSettings = None
    grpo_preset: str = "mini"
    warm_start: bool = False  # 06 runs helpers/rl/warm_start.py (a teacher written for the mini world) before GRPO
    seed: int = 0

    @property
    def cache_dir(self) -> Path:
        return cache_dir_for(self.name)

    @property
    def source_dir(self) -> Path:
        """Where the mini profile publishes its generated world (its stand-in for the download host)."""
        return self.cache_dir / "source"

    @property
    def downloads_dir(self) -> Path:
        return self.cache_dir / "downloads"

    @property
    def data_dir(self) -> Path:
        return self.cache_dir / "data"

    @property
    def index_dir(self) -> Path:
        return self.cache_dir / "index"


def cache_dir_for(name: str) -> Path:
    """``$RLMH_CACHE_DIR/<name>``, else ``cache/<name>`` in a checkout, else ``~/.cache/rl-multihop/<name>``."""
    root = os.environ.get(CACHE_ENV)
    base = _absolute(root) if root else _default_cache_root()
    folder = (base / name).resolve()
    for existing in (folder, *folder.parents):  # the nearest part that exists must be a folder
        if existing.exists():
            if not existing.is_dir():
                where = f"{CACHE_ENV}={root}" if root else f"the cache folder {base}"
                raise TutorialError(f"{where}: {existing} is a file, so {folder} is not a folder: "
                                    f"point {CACHE_ENV} at a folder (or delete the file)")
            break
    return folder


def _absolute(root: str) -> Path:
    """``$RLMH_CACHE_DIR`` as a folder: ``~`` expanded; a relative path is refused (notebooks run in notebooks/, the
    command line wherever it starts, so they would use two different caches)."""
    try:
        path = Path(root).expanduser()
    except RuntimeError:  # ~someone who is not a user here
        path = Path(root)
    if not path.is_absolute():
        raise TutorialError(f"{CACHE_ENV}={root} is not an absolute path: the notebooks and the command line would use "
                            f"different caches; give a full path, e.g. {CACHE_ENV}=$HOME/rlmh-cache")
    return path


def _default_cache_root() -> Path:
    if (REPO_ROOT / "pyproject.toml").exists():  # a source checkout: keep caches beside the notebooks
        return REPO_ROOT / "cache"
    return Path.home() / ".cache" / "rl-multihop"


def _mini() -> Profile:
    cache = cache_dir_for("mini")
    return Profile(
        name="mini",
        summary="offline, CPU-only: synthetic mini world + embedded SmolLM2-135M-Instruct",
        offline=True,
        corpus=Source(
            url=(cache / "source" / "wiki.abstracts.2017.tar.gz").as_uri(),
            sha256=MINI_CORPUS_SHA256,
            member="wiki.abstracts.2017.jsonl",
            lines=20_340,
        ),
        hover_dataset=str(cache / "source" / "hover-parquet"),
        hover_sha256=MINI_HOVER_SHA256,
        dev_eval_size=100,  # >= 100 claims: per-claim sd is ~0.24, so 24 claims gave a standard error of ~5 points
        eval_threads=16,
        eval_temperature=0.0,  # greedy fp32 decoding: the same recall on every run (nbval compares it)
        adapter="GuidedChatAdapter",
        lm=LMSettings(kind="embedded", model="SmolLM2-135M-Instruct", temperature=0.7, max_tokens=256),
        grpo_preset="mini",
        warm_start=True,
    )


def _full() -> Profile:
    return Profile(
        name="full",
        summary="the seeds' setting: 5M Wikipedia 2017 abstracts, HoVer, Qwen2.5-7B via Arbor on GPUs",
        offline=False,
        corpus=Source(
            url="https://huggingface.co/dspy/cache/resolve/main/wiki.abstracts.2017.tar.gz",
            sha256=None,
            member="wiki.abstracts.2017.jsonl",
        ),
        hover_dataset="vincentkoc/hover-parquet",
        dev_eval_size=300,
        eval_threads=16,
        lm=LMSettings(
            kind="arbor",
            model="Qwen/Qwen2.5-7B-Instruct",
            temperature=0.7,
            max_tokens=2048,
            api_base=os.environ.get(ARBOR_URL_ENV, "").strip() or DEFAULT_ARBOR_URL,
        ),
        grpo_preset="seed_6gpu",
    )


# Checksums of the mini world generated with seed 0 (tests/test_mini_world.py regenerates and compares).
MINI_CORPUS_SHA256 = "e4d22de94fbc7b77018456b447a187555ae7b0bf33afc7cee49d5c172d7ee7f3"
MINI_HOVER_SHA256 = {
    "data/train-00000-of-00001.parquet": "b04470c1dc83f4570dc286b9e204e477c1b55d453af83e6f59eab7aa594d93b5",
    "data/validation-00000-of-00001.parquet": "d44f4273b4c6ac03a3ce871a8a6a8e03e13db7604e3d4f25379b3d77ada84a37",
}

PROFILES = {"mini": _mini, "full": _full}


def get_profile(name: str | None = None) -> Profile:
    """The active profile: ``name``, else ``$RLMH_PROFILE``, else ``mini``.

    With ``RLMH_LM=arbor`` the model 06 trains lives in an Arbor server, and Arbor has no route for supervised
    training, so the profile has no warm start (as the full profile)."""
    name = (name or os.environ.get(PROFILE_ENV) or "mini").strip().lower()
    if name not in PROFILES:
        valid = ", ".join(sorted(PROFILES))
        raise TutorialError(f"unknown profile {name!r} in {PROFILE_ENV}: choose one of {valid}")
    profile = PROFILES[name]()
    if (os.environ.get(LM_ENV) or "").strip().lower() == "arbor" and profile.warm_start:
        profile = dataclasses.replace(profile, warm_start=False)
    return profile
