import dataclasses
import shutil

import pytest

from helpers import hover, mini_world, profiles
from helpers.errors import TutorialError


def test_seed_splits(mini_profile):
    train, dev, test = hover.seed_splits(mini_profile)
    assert (len(train), len(dev)) == (600, 300) and len(test) >= 300
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
