from pathlib import Path

import pytest

from helpers import bootstrap, profiles
from helpers.util.errors import TutorialError


def test_default_is_mini(monkeypatch):
    monkeypatch.delenv(profiles.PROFILE_ENV, raising=False)
    p = profiles.get_profile()
    assert p.name == "mini" and p.offline and p.lm.kind == "embedded"
    assert p.corpus.sha256 == profiles.MINI_CORPUS_SHA256


def test_env_switch_selects_full(monkeypatch):
    monkeypatch.setenv(profiles.PROFILE_ENV, "FULL")
    p = profiles.get_profile()
    assert p.name == "full" and p.hover_dataset == "vincentkoc/hover-parquet"
    assert p.lm.api_base.endswith("/v1/") and p.grpo_preset == "seed_6gpu"


def test_unknown_profile_fails_in_one_line_listing_valid_ones(monkeypatch):
    monkeypatch.setenv(profiles.PROFILE_ENV, "medium")
    with pytest.raises(TutorialError) as err:
        profiles.get_profile()
    msg = str(err.value)
    assert "\n" not in msg and "'medium'" in msg and "full, mini" in msg


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(profiles.CACHE_ENV, str(tmp_path))
    assert profiles.get_profile("mini").cache_dir == tmp_path / "mini"
    assert profiles.get_profile("full").index_dir == tmp_path / "full" / "index"


def test_cache_not_writable_is_one_line(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(profiles.CACHE_ENV, str(blocker))
    with pytest.raises(TutorialError, match="RLMH_CACHE_DIR"):
        bootstrap.check_cache_writable(profiles.get_profile("mini"))


def test_cache_dir_that_is_a_file_is_one_line_at_start(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(profiles.CACHE_ENV, str(blocker))
    with pytest.raises(TutorialError, match=r"RLMH_CACHE_DIR=.*file.* is not a folder") as err:
        bootstrap.start()
    assert "\n" not in str(err.value)
    monkeypatch.setenv(profiles.CACHE_ENV, str(blocker / "deeper"))
    with pytest.raises(TutorialError, match="RLMH_CACHE_DIR"):
        profiles.get_profile("mini")


def test_arbor_url_comes_from_an_env_var(monkeypatch):
    monkeypatch.setenv(profiles.ARBOR_URL_ENV, "http://gpu-box:9000/v1/")
    assert profiles.get_profile("full").lm.api_base == "http://gpu-box:9000/v1/"
    monkeypatch.delenv(profiles.ARBOR_URL_ENV)
    assert profiles.get_profile("full").lm.api_base == "http://localhost:7453/v1/"


def test_banner_shows_the_cache_relative_to_the_notebook_folder(monkeypatch, tmp_path, capsys):
    # Stored notebook outputs must not carry this machine's paths: a cache inside the checkout is shown relative
    # to where the kernel runs (notebooks/), one elsewhere under the home folder as ~/...
    monkeypatch.delenv("RLMH_CACHE_DIR", raising=False)
    monkeypatch.chdir(profiles.REPO_ROOT / "notebooks")
    bootstrap.start("mini")
    assert capsys.readouterr().out.rstrip().endswith("· cache ../cache/mini")
    assert bootstrap.display_path(Path.home() / "x" / "cache") == "~/x/cache"
    assert bootstrap.display_path(Path("/opt/elsewhere")) == "/opt/elsewhere"


@pytest.mark.parametrize("value", ["relative/cache", "~nosuchuser-rlmh/x"])
def test_a_relative_cache_dir_is_refused_in_one_line(monkeypatch, value):
    """A relative folder means one cache for the notebooks (they run in notebooks/) and another for the command line."""
    monkeypatch.setenv(profiles.CACHE_ENV, value)
    with pytest.raises(TutorialError, match=r"RLMH_CACHE_DIR=.* is not an absolute path") as err:
        profiles.get_profile("mini")
    assert "\n" not in str(err.value)


def test_a_read_only_cache_dir_is_one_line_in_the_first_cell(monkeypatch, tmp_path):
    import os

    if os.geteuid() == 0:  # root writes anywhere: make the folder a read-only mount's stand-in instead
        import errno

        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(profiles.Path, "mkdir", refuse)
    else:
        tmp_path.chmod(0o500)
    monkeypatch.setenv(profiles.CACHE_ENV, str(tmp_path))
    with pytest.raises(TutorialError, match=r"cannot create the cache folder .* \(Read-only file system|Permission denied") as err:
        bootstrap.start()
    assert "\n" not in str(err.value) and "RLMH_CACHE_DIR" in str(err.value)
