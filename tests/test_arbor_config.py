"""arbor.yaml: unreadable files and YAML errors in one line, misspelled keys warned about."""

import warnings
from pathlib import Path

import pytest

from helpers.rl import arbor_config
from helpers.util.errors import TutorialError

ROOT = Path(__file__).resolve().parents[1]


def test_repository_arbor_yaml_reads_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert arbor_config.read(ROOT / "arbor.yaml") == {"storage_path": "~/.arbor/storage", "inactivity_timeout": 30}


def test_binary_file_is_one_line(tmp_path):
    path = tmp_path / "arbor.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(TutorialError, match="is not a UTF-8 text file") as err:
        arbor_config.read(path)
    assert "\n" not in str(err.value)


def test_directory_is_one_line(tmp_path):
    with pytest.raises(TutorialError, match="is a folder, not a file"):
        arbor_config.read(tmp_path)


def test_yaml_error_keeps_line_and_column(tmp_path):
    path = tmp_path / "arbor.yaml"
    path.write_text("storage_path: ~/.arbor\ninactivity_timeout: [30,\n")
    with pytest.raises(TutorialError, match=r"line 3, column 1") as err:
        arbor_config.read(path)
    assert "\n" not in str(err.value)


def test_misspelled_key_warns_with_the_closest_valid_one(tmp_path):
    path = tmp_path / "arbor.yaml"
    path.write_text("storge_path: ~/.arbor\ninactivity_timeout: 30\nfoo: 1\ntrainning:\n  gpu_ids: [1]\n")
    with pytest.warns(UserWarning) as caught:
        config = arbor_config.read(path)
    messages = [str(w.message) for w in caught]
    assert any("`storge_path`" in m and "did you mean `storage_path`" in m for m in messages), messages
    assert any("`foo`" in m and "inactivity_timeout, inference, storage_path, training" in m for m in messages), messages
    assert any("`trainning`" in m and "did you mean `training`" in m for m in messages), messages  # sections too
    assert config["storge_path"] == "~/.arbor"  # still returned as written
