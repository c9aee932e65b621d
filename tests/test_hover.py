import dataclasses
import shutil

import pytest

from helpers import profiles
from helpers.data import hover, mini_world
from helpers.util.errors import TutorialError


def test_seed_splits(mini_profile):
    train, dev, test = hover.seed_splits(mini_profile)
    assert (len(train), len(dev), len(test)) == (600, 300, 550)
    claims = [x.claim for x in train + dev + test]
    assert len(set(claims)) == len(claims)
    assert all(len(x.titles) == 3 and list(x.inputs().keys()) == ["claim"] for x in dev)
    again = hover.seed_splits(mini_profile)[1]
    assert [x.claim for x in again] == [x.claim for x in dev]


def test_filter_keeps_first_claim_per_hpqa_id(mini_profile):
    raw = hover.load_raw(mini_profile)
    kept = hover.three_hop_unique(raw)
    three = [x for x in raw if x.num_hops == 3]
    assert len(kept) == len({x.hpqa_id for x in three}) < len(three)
    first = {}
    for x in three:
        first.setdefault(x.hpqa_id, x.claim)
    assert [x.claim for x in kept] == list(first.values())


def test_full_profile_loader_reads_a_hub_style_parquet_folder(mini_profile, tmp_path, monkeypatch):
    """The full profile's code path (no sha256 list, a dataset id) against a local parquet folder."""
    folder = tmp_path / "vincentkoc" / "hover-parquet"
    shutil.copytree(mini_profile.source_dir / mini_world.HOVER_FOLDER, folder)
    monkeypatch.setenv(profiles.CACHE_ENV, str(tmp_path / "cache"))
    full = profiles.get_profile("full")
    local_full = dataclasses.replace(full, hover_dataset=str(folder))
    assert not local_full.hover_sha256
    assert [x.claim for x in hover.seed_splits(local_full)[1]] == [x.claim for x in hover.seed_splits(mini_profile)[1]]


def test_tampered_or_missing_hover_file_is_one_line(mini_profile, tmp_path):
    folder = tmp_path / "hover"
    shutil.copytree(mini_profile.source_dir / mini_world.HOVER_FOLDER, folder)
    p = dataclasses.replace(mini_profile, hover_dataset=str(folder))
    (folder / mini_world.HOVER_FILES["validation"]).write_bytes(b"PAR1 tampered")
    with pytest.raises(TutorialError, match="fails its sha256 check"):
        hover.load_raw(p)
    shutil.rmtree(folder / "data")
    with pytest.raises(TutorialError, match="is missing"):
        hover.load_raw(p)


def test_unknown_dataset_is_one_line(mini_profile, tmp_path):
    p = dataclasses.replace(mini_profile, hover_dataset=str(tmp_path / "nothing-here"), hover_sha256={})
    with pytest.raises(TutorialError, match="cannot load HoVer") as err:
        hover.load_raw(p)
    assert "\n" not in str(err.value)


def test_seed_split_is_pinned(mini_profile):
    """The seed's Random(0) shuffle: another seed or order would change every stored notebook number."""
    import hashlib

    train, dev, test = hover.seed_splits(mini_profile)
    assert dev[0].claim == "The Silver City was made by a painter who studied at University of Port Zarso."
    digest = lambda xs: hashlib.sha256("\n".join(x.claim for x in xs).encode()).hexdigest()  # noqa: E731
    assert digest(dev) == "52bf14923db559b40958915532d8777be10d909f684e9e165b16442f9a869ace"
    assert digest(train + dev + test) == "f0d3f845d04329587ab4e2bc85a9ddb78810536940b7e321a0e393f3decb0359"


def test_unreachable_hub_is_named_in_one_line_without_retrying(mini_profile, tmp_path, monkeypatch):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(profiles.CACHE_ENV, str(tmp_path))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(TutorialError, match=r"Hugging Face hub at http://127\.0\.0\.1:\d+ is unreachable") as err:
        hover.load_raw(profiles.get_profile("full"))
    assert time.perf_counter() - start < 10 and "\n" not in str(err.value)
    assert "hover_dataset" not in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)


def test_offline_without_the_data_in_the_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(profiles.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never asked: offline mode skips the hub check
    with pytest.raises(TutorialError, match=r"HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and it is not in the cache") as err:
        hover.load_raw(profiles.get_profile("full"))
    assert "\n" not in str(err.value)
