"""Downloads that resume, verify and never leave a half-written file (introduced in 02_corpus_indexing).

``fetch`` replaces ``dspy.utils.download``, which has no progress, resume or checksum and saves an
error page as if it were the file. ``extract_member`` replaces ``tar -xzvf`` with a safe extraction.
"""

import hashlib
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from helpers import atomic
from helpers.errors import TutorialError

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stamp_matches(path: Path, sha256: str | None) -> bool:
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    same_file = stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns
    return same_file and (sha256 is None or stamp.get("sha256") == sha256)


def _write_stamp(path: Path, digest: str) -> None:
    st = path.stat()
    atomic.write_text(_stamp_path(path), json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def verified_sha256(path: Path) -> str | None:
    """The sha256 recorded when ``path`` was last verified, if the file is unchanged since."""
    return json.loads(_stamp_path(path).read_text())["sha256"] if _stamp_matches(path, None) else None


def _open(url: str, offset: int, timeout: float):
    """Return (stream, total_size, resumed) for an http(s) or file URL, starting at ``offset`` if possible."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if not path.exists():
            raise TutorialError(f"source file {path} does not exist: run the cell that prepares the sources first")
        f = open(path, "rb")
        size = path.stat().st_size
        f.seek(min(offset, size))
        return f, size, True
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return None, offset, True  # the partial file is already complete
        raise TutorialError(f"download failed: HTTP {exc.code} {exc.reason} for {url}: check the URL in helpers/profiles.py") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TutorialError(f"cannot reach {parsed.netloc or url} ({reason}): check your network, or use the offline profile RLMH_PROFILE=mini") from None
    resumed = response.status == 206
    length = int(response.headers.get("Content-Length") or 0)
    total = (offset if resumed else 0) + length if length else 0
    return response, total, resumed


def fetch(url: str, dest_dir: Path, sha256: str | None = None, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download ``url`` into ``dest_dir`` (introduced in 02_corpus_indexing) and return the file's path.

    A file already verified against ``sha256`` is returned without touching the network. A partial
    ``.part`` file is resumed with an HTTP Range request. Nothing reaches the final name unverified.
    """
    dest_dir = Path(dest_dir)
    final = dest_dir / Path(urllib.parse.urlparse(url).path).name
    if final.exists():
        if _stamp_matches(final, sha256):
            return final
        digest = sha256_of(final)
        if sha256 is None or digest == sha256:
            _write_stamp(final, digest)
            return final
        final.replace(final.with_name(final.name + ".corrupt"))
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    stream, total, resumed = _open(url, offset, timeout)
    if stream is not None:
        if not resumed:
            offset = 0
        with stream, open(part, "ab" if offset else "wb") as out, tqdm(
            total=total or None, initial=offset, unit="B", unit_scale=True, desc=final.name, disable=not progress
        ) as bar:
            try:
                for block in iter(lambda: stream.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
            except (OSError, ValueError) as exc:
                raise TutorialError(f"download of {final.name} broke off ({exc}): run again to resume from {part.stat().st_size:,} bytes") from None
    got = part.stat().st_size
    if total and got < total:
        raise TutorialError(f"download of {final.name} stopped at {got:,} of {total:,} bytes: run again to resume")
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256:
        bad = final.with_name(final.name + ".corrupt")
        part.replace(bad)
        raise TutorialError(f"checksum mismatch for {final.name}: expected {sha256[:12]}…, got {digest[:12]}…; moved to {bad.name}, run again to download afresh")
    os.replace(part, final)
    _write_stamp(final, digest)
    return final


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise TutorialError(f"refusing to extract {archive.name}: member {name!r} would write outside the target folder")
    if member.issym() or member.islnk() or member.isdev():
        raise TutorialError(f"refusing to extract {archive.name}: member {name!r} is a link or device file")


def extract_member(archive: Path, member_name: str, dest_dir: Path) -> Path:
    """Safely extract one file from a .tar.gz (introduced in 02_corpus_indexing); cached by archive checksum."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    target = dest_dir / Path(member_name).name
    source_sha = verified_sha256(archive) if archive.exists() else None
    stamp = target.with_name(target.name + ".source.json")
    if target.exists() and source_sha and stamp.exists() and json.loads(stamp.read_text()).get("archive_sha256") == source_sha:
        return target
    try:
        with atomic.atomic_path(target) as tmp, tarfile.open(archive, "r:*") as tar:
            found = False
            for member in tar:  # every member is checked before the extracted file is committed
                _check_member(archive, member)
                if member.name.removeprefix("./") == member_name and member.isfile():
                    with tar.extractfile(member) as src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                    found = True
            if not found:
                raise TutorialError(f"{archive.name} has no file {member_name!r}: check Source.member in helpers/profiles.py")
    except FileNotFoundError:
        raise TutorialError(f"archive {archive} does not exist: run the download cell first") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise TutorialError(f"{archive.name} is corrupt or truncated ({type(exc).__name__}): delete it and run the download again") from None
    atomic.write_text(stamp, json.dumps({"archive_sha256": source_sha}))
    return target
