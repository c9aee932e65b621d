"""Atomic file and folder writes, so an interrupted step never leaves a half-written cache.

Introduced in 02_corpus_indexing; reused for indexes, scores and checkpoints. Results get the
permissions an ordinary write would (the umask decides); the data and the folder entry are fsynced before a rename
is trusted, so a power cut leaves the old or the new version, never an empty one. A temporary file or folder left
by a writer that was killed is removed by the next write of the same target, except a previous version that the
writer had moved aside: that is put back (``recover``).
"""

import contextlib
import glob
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

LEGACY_TEMP_AGE = 24 * 3600  # temps named without a pid (older versions): removed once this old


def _umask() -> int:
    try:  # Linux: read it without changing it (changing it would race with other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover(target: Path) -> None:
    """Put back the previous version of ``target`` that a killed ``atomic_dir`` had moved aside (``.name.old-<pid>``)
    before the new one was in place: with no ``target``, it is the only good copy."""
    target = Path(target)
    if target.exists():
        return
    try:
        aside = [p for p in target.parent.glob(f".{glob.escape(target.name)}.old-*")
                 if p.name.rsplit("-", 1)[-1].isdigit() and not _pid_alive(int(p.name.rsplit("-", 1)[-1]))]
    except OSError:
        return
    if aside:
        newest = max(aside, key=lambda p: p.lstat().st_mtime)
        os.replace(newest, target)
        _fsync_folder(target.parent)


def clean_stale(target: Path) -> None:
    """Remove temporaries of ``target`` left by writers that no longer run (``.name.<pid>.*.tmp``, ``.name.old-<pid>``),
    after putting back a previous version that had been moved aside and not replaced (``recover``)."""
    target = Path(target)
    recover(target)
    pattern = re.compile(r"\." + re.escape(target.name) + r"\.(?:(\d+)\..+\.tmp|old-(\d+)|([^.]+)(?:\..+)?\.tmp)")
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for path in siblings:
        match = pattern.fullmatch(path.name)
        if not match:
            continue
        if _abandoned(path, match.group(1) or match.group(2)):
            _remove(path)


_ANY_TEMP = re.compile(r"\..+\.(?:(\d+)\.[a-z0-9_]{8}(?:\..+)?\.tmp|old-(\d+))")
_LEGACY_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}(?:\..+)?\.tmp")  # written by older versions, without the writer's pid


def clean_folder(folder: Path) -> None:
    """Remove every temporary in ``folder`` left by a writer that no longer runs (e.g. a checkpoint folder at start)."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for path in entries:
        match = _ANY_TEMP.fullmatch(path.name)  # tried first: a name with a pid is judged by its pid, never by age
        pid = (match.group(1) or match.group(2)) if match else None
        if (match or _LEGACY_TEMP.fullmatch(path.name)) and _abandoned(path, pid):
            _remove(path)


def _abandoned(path: Path, pid: str | None) -> bool:
    """Whether a temporary's writer no longer runs: its pid is dead, or (no pid: older versions) it is a day old."""
    if pid is not None:
        return not _pid_alive(int(pid))
    try:
        return time.time() - path.lstat().st_mtime >= LEGACY_TEMP_AGE
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_folder(Path(root))


@contextlib.contextmanager
def turn(lock_file: Path, what: str):
    """Take turns with other processes on ``lock_file`` (an exclusive lock held for the block; waits, saying so, while
    another holds it). Downloads and trained-program saves and loads use it; without fcntl (Windows): no locking."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another {what} to finish…", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = ""):
    """Yield a temporary path beside ``target``; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target), suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target``.

    A previous ``target`` is swapped out and deleted only after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_folder(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
