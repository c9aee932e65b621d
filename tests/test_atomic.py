"""Atomic writes: ordinary permissions, and nothing left behind by a killed writer."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.util import atomic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_folders_follow_the_umask(tmp_path, umask_022):
    atomic.write_text(tmp_path / "scores.json", "{}")
    with atomic.atomic_dir(tmp_path / "index") as tmp:
        (tmp / "meta.json").write_text("{}")
    with atomic.atomic_path(tmp_path / "data.parquet", suffix=".parquet") as tmp:
        tmp.write_bytes(b"x")
    assert oct((tmp_path / "scores.json").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "data.parquet").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "index").stat().st_mode & 0o777) == oct(0o755)
    assert (tmp_path / "index" / "meta.json").read_text() == "{}"


def _killed_while_writing(target: Path, kind: str):
    """A real process that dies (SIGKILL) inside an atomic write of ``target``."""
    body = "(tmp / 'part').write_text('half')" if kind == "dir" else "tmp.write_text('half')"
    opener = "atomic_dir(target)" if kind == "dir" else "atomic_path(target)"
    script = (f"import os, signal\nfrom pathlib import Path\nfrom helpers.util import atomic\ntarget = Path({str(target)!r})\n"
              f"with atomic.{opener} as tmp:\n    {body}\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert run.returncode == -9, run.stderr


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path, kind):
    target = tmp_path / ("index" if kind == "dir" else "scores.json")
    _killed_while_writing(target, kind)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the killed write left its temp behind
    if kind == "dir":
        with atomic.atomic_dir(target) as tmp:
            (tmp / "meta.json").write_text("{}")
    else:
        atomic.write_text(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_live_writers_temp_is_left_alone(tmp_path):
    live = tmp_path / f".index.{os.getppid()}.abcdefgh.tmp"  # our parent process is alive
    live.mkdir()
    with atomic.atomic_dir(tmp_path / "index") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert live.exists()


def test_clean_folder_removes_only_dead_writers_temps(tmp_path):
    _killed_while_writing(tmp_path / "step-0003", "dir")
    _killed_while_writing(tmp_path / "scores.json", "file")
    live = tmp_path / f".step-0004.{os.getppid()}.abcdefgh.tmp"
    live.mkdir()
    (tmp_path / "step-0002").mkdir()
    atomic.clean_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "step-0002"]


def test_clean_folder_removes_old_temps_of_earlier_versions(tmp_path):
    """Temps written before names carried the writer's pid: removed once a day old, left alone while recent."""
    old, recent = tmp_path / ".step-0003.abcd1234.tmp", tmp_path / ".step-0004.efgh5678.tmp"
    live = tmp_path / f".step-0005.{os.getppid()}.ijkl9012.tmp"  # named with a running pid: kept, however old
    for folder in (old, recent, live):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    old_file = tmp_path / ".scores.json.mnop3456.part.tmp"
    old_file.write_text("{")
    day_ago = old.stat().st_mtime - atomic.LEGACY_TEMP_AGE - 60
    for path in (old, live, old_file):
        os.utime(path, (day_ago, day_ago))
    atomic.clean_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, live.name])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_crash_between_the_two_renames_keeps_the_good_copy(tmp_path):
    """atomic_dir moves the old folder aside, then the new one in: a writer killed between the two leaves the only
    good copy in .NAME.old-PID. The next reader or writer puts it back instead of deleting it."""
    target = tmp_path / "trained"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "program.json").write_text("good")
    aside = tmp_path / f".trained.old-{_dead_pid()}"
    os.replace(target, aside)  # the writer died here
    atomic.recover(target)
    assert (target / "program.json").read_text() == "good" and not aside.exists()
    os.replace(target, aside)
    with atomic.atomic_dir(target) as tmp:  # the next write: the good copy is recovered first, then replaced
        (tmp / "program.json").write_text("newer")
    assert (target / "program.json").read_text() == "newer" and list(tmp_path.iterdir()) == [target]


def test_a_write_that_fails_halfway_leaves_the_old_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "scores.json"
    atomic.write_text(target, "old and whole")

    def half_then_fail(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError):
        atomic.write_text(target, "new " * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old and whole" and list(tmp_path.iterdir()) == [target]


def test_files_and_their_folder_reach_the_disk_before_the_rename_is_trusted(tmp_path, monkeypatch):
    """A power cut after a rename must not leave a renamed-but-empty file: the data and the folder entry are fsynced."""
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", record)
    atomic.write_text(tmp_path / "a.json", "{}")
    assert any(str(s).startswith(str(tmp_path / ".a.json.")) for s in synced) and str(tmp_path) in synced
    synced.clear()
    with atomic.atomic_dir(tmp_path / "index") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "scores.npy").write_bytes(b"x" * 10)
    names = [Path(str(s)).name for s in synced]
    assert "scores.npy" in names and str(tmp_path) in synced
