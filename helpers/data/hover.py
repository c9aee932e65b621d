"""Loading HoVer and cutting the seeds' splits (introduced in 03_hover_loading)."""

import os
import random
import urllib.error
import urllib.request
from pathlib import Path

import dspy
from dspy.datasets import DataLoader

from helpers.data import sources
from helpers.profiles import Profile
from helpers.util.errors import TutorialError

FIELDS = ("claim", "supporting_facts", "hpqa_id", "num_hops")


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_hub_reachable(timeout: float = 5.0) -> None:
    """One quick request to the Hugging Face hub (``HF_ENDPOINT``), instead of ``datasets``' long retries."""
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(endpoint + "/api/whoami-v2", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (401 without a token): reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TutorialError(f"the Hugging Face hub at {endpoint} is unreachable ({getattr(exc, 'reason', exc)}): "
                            "check your network (or HF_ENDPOINT); if HoVer is already in the cache, set HF_HUB_OFFLINE=1; "
                            "or use the offline profile RLMH_PROFILE=mini") from None


def load_raw(profile: Profile, split: str = "train") -> list[dspy.Example]:
    """Every HoVer row of ``split`` as a ``dspy.Example`` with the seed's fields, through ``datasets``."""
    dataset = sources.hover_folder(profile)
    from_hub = not Path(dataset).exists() and not Path(dataset).is_absolute() and dataset.count("/") == 1  # "owner/name"
    if from_hub and not _offline():
        check_hub_reachable()
    try:
        return DataLoader().from_huggingface(
            dataset_name=dataset, split=split, fields=FIELDS, input_keys=("claim",),
            cache_dir=str(profile.cache_dir / "hf-datasets"),
        )
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        if from_hub and _offline():
            raise TutorialError(f"cannot load HoVer {dataset!r}: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and it is not "
                                f"in the cache {profile.cache_dir / 'hf-datasets'}: unset them on a machine with network access") from None
        raise TutorialError(f"cannot load HoVer from {dataset!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): check the profile's hover_dataset") from None


def three_hop_unique(raw: list[dspy.Example]) -> list[dspy.Example]:
    """The seed's filter: 3-hop claims, first claim per ``hpqa_id``, gold ``titles`` deduplicated."""
    hpqa_ids = set()
    return [
        dspy.Example(claim=x.claim, titles=list(set([y["key"] for y in x.supporting_facts]))).with_inputs("claim")
        for x in raw
        if x["num_hops"] == 3 and x["hpqa_id"] not in hpqa_ids and not hpqa_ids.add(x["hpqa_id"])
    ]


def seed_splits(profile: Profile):
    """``trainset, devset, testset`` exactly as the seed cuts them: shuffle with Random(0), 600/300/rest."""
    hover = three_hop_unique(load_raw(profile))
    n_train, n_dev = profile.split_sizes
    if len(hover) <= n_train + n_dev:
        raise TutorialError(f"only {len(hover)} unique 3-hop claims; the splits need more than {n_train + n_dev}")
    random.Random(0).shuffle(hover)
    return hover[:n_train], hover[n_train:n_train + n_dev], hover[n_train + n_dev:]
