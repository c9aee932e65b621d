"""Downloads that resume, verify and never leave a half-written file (introduced in 02_corpus_indexing).

``fetch`` replaces ``dspy.utils.download``, which has no progress, resume or checksum and saves an
error page as if it were the file. ``extract_member`` replaces ``tar -xzvf`` with a safe extraction.

With a pinned sha256 the file must match it. Without one (the full corpus), what can be checked is:
no HTML page, the announced size, a gzip stream read to its end (CRC and length) and, for a tar,
its end-of-archive marker; the sha256 of the first good download is then recorded and checked later.
"""

import errno
import gzip
import hashlib
import http.client
import json
import os
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from helpers.util import atomic
from helpers.util.errors import TutorialError

CHUNK = 1 << 20
_NUL_BLOCKS = bytes(1024)  # a tar ends with two 512-byte blocks of zeros
_READ_ERRORS = (OSError, ValueError, EOFError, zlib.error, tarfile.TarError)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _read_stamp(path: Path) -> dict:
    try:
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _stamp_matches(path: Path, sha256: str | None) -> bool:
    stamp = _read_stamp(path)
    try:
        st = path.stat()
    except OSError:
        return False
    same_file = stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns
    return same_file and (sha256 is None or stamp.get("sha256") == sha256)


def _write_stamp(path: Path, digest: str) -> None:
    st = path.stat()
    atomic.write_text(_stamp_path(path), json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def verified_sha256(path: Path) -> str | None:
    """The sha256 recorded when ``path`` was last verified, if the file is unchanged since."""
    return _read_stamp(path).get("sha256") if _stamp_matches(path, None) else None


def _looks_like_html(head: bytes) -> bool:
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:64].lower()  # after a byte-order mark or blank lines
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--"))


def _html_error(url: str) -> TutorialError:
    return TutorialError(f"the server returned an HTML page, not the archive ({url}): the URL needs a login or has "
                         "moved; open it in a browser and fix the URL in helpers/profiles.py")


def check_archive(path: Path) -> None:
    """Read a ``.gz`` to its end (CRC and length checked) and, for a ``.tar(.gz)``, find its end-of-archive marker.

    Raises TutorialError; ``EOFError`` is kept as the cause when the file simply ends too early.
    """
    path = Path(path)
    name = path.name.removesuffix(".part")
    with open(path, "rb") as f:
        if _looks_like_html(f.read(1024)):
            raise TutorialError(f"{name}: the server returned an HTML page, not the archive")
    try:
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(path, "r:*") as tar:
                _read_tar_to_end(tar, name)
        elif name.endswith(".gz"):
            with gzip.open(path, "rb") as gz:
                while gz.read(CHUNK):
                    pass
    except EOFError as exc:
        raise TutorialError(f"{name} is incomplete (the compressed stream ends early)") from exc
    except _READ_ERRORS as exc:
        raise TutorialError(f"{name} is corrupt ({type(exc).__name__}: {exc})") from None


def _read_tar_to_end(tar: tarfile.TarFile, name: str, member_hook=None) -> None:
    """Iterate every member, then check the end-of-archive marker and read the (gzip) stream to its end.

    tarfile stops quietly at a damaged header and never reads past the end marker, so without this a
    bit flip or a cut yields a shorter or wrong member with no error and gzip's CRC is never checked.
    """
    for member in tar:
        if member_hook is not None:
            member_hook(member)
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(len(_NUL_BLOCKS)) != _NUL_BLOCKS:
        raise tarfile.ReadError("no end-of-archive marker after the last member readable")
    while tar.fileobj.read(CHUNK):  # gzip checks its CRC and length only when the stream is read to its end
        pass


def _size(header: str | None) -> int:
    """A Content-Length as a byte count; 0 (unknown: the sha256 or the archive's own checks decide) when it is not
    a whole number."""
    text = (header or "").strip()
    return int(text) if text.isdigit() else 0


def _content_range(response) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header, None where absent or unknown."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (response.headers.get("Content-Range") or "").strip())
    if not match:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _open(url: str, offset: int, timeout: float):
    """Return (stream, start, total_size) for an http(s) or file URL.

    ``start`` is the byte the stream begins at (``offset`` if the server resumed, else 0); ``total`` is
    the whole file's size, 0 if unknown. ``stream`` is None when ``offset`` already covers the file.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if not path.is_file():
            raise TutorialError(f"source file {path} does not exist: run the cell that prepares the sources first")
        size = path.stat().st_size
        if offset > size:
            return open(path, "rb"), 0, size
        f = open(path, "rb")
        f.seek(offset)
        return f, offset, size
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            _, total = _content_range(exc)
            exc.close()
            if total is not None and total < offset:  # the .part is longer than the file: not a prefix of it
                return _open(url, 0, timeout)
            return None, offset, total or offset  # the partial file is already complete
        raise TutorialError(f"download failed: HTTP {exc.code} {exc.reason} for {url}: check the URL in helpers/profiles.py") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        raise TutorialError(f"cannot reach {parsed.netloc or url} ({reason}): check your network, or use the offline profile RLMH_PROFILE=mini") from None
    if "html" in (response.headers.get("Content-Type") or "").lower():
        response.close()
        raise _html_error(url)
    length = _size(response.headers.get("Content-Length"))
    if response.status == 206:
        first, total = _content_range(response)
        if first is None:
            first = offset  # no Content-Range: trust the Range we asked for
        if first not in (0, offset):
            response.close()
            raise TutorialError(f"the server resumed {url} at byte {first:,} instead of {offset:,}: delete the .part "
                                "file in the downloads folder and run again")
        return response, first, total or (first + length if length else 0)
    return response, 0, length


def fetch(url: str, dest_dir: Path, sha256: str | None = None, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download ``url`` into ``dest_dir`` (introduced in 02_corpus_indexing) and return the file's path.

    A file already verified against ``sha256`` is returned without touching the network. A partial
    ``.part`` file is resumed with an HTTP Range request. Nothing reaches the final name unverified.
    Two processes fetching the same file take turns (a ``.lock`` file beside it).
    """
    dest_dir = Path(dest_dir)
    final = dest_dir / Path(urllib.parse.urlparse(url).path).name
    if final.exists() and _stamp_matches(final, sha256):
        return final
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TutorialError(f"cannot create the downloads folder {dest_dir} ({exc.strerror}): set RLMH_CACHE_DIR to a writable folder") from None
    with atomic.turn(final.with_name(final.name + ".lock"), "download of " + final.name):
        if final.exists():
            if _keep_existing(final, sha256):
                return final
        return _download(url, final, sha256, timeout, progress)


def _keep_existing(final: Path, sha256: str | None) -> bool:
    """Whether an already downloaded ``final`` passes its checks (it is set aside as ``.corrupt`` if not)."""
    if _stamp_matches(final, sha256):
        return True
    expected = sha256 or _read_stamp(final).get("sha256")  # unpinned: the sha recorded on first success
    digest = sha256_of(final)
    ok = digest == expected if expected else _archive_ok(final)
    if ok:
        _write_stamp(final, digest)
        return True
    final.replace(final.with_name(final.name + ".corrupt"))
    return False


def _archive_ok(path: Path) -> bool:
    try:
        check_archive(path)
    except TutorialError:
        return False
    return True


def _download(url: str, final: Path, sha256: str | None, timeout: float, progress: bool) -> Path:
    part = final.with_name(final.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    stream, start, total = _open(url, offset, timeout)
    fresh = start == 0
    if stream is not None:
        with stream, open(part, "r+b" if start else "wb") as out, tqdm(
            total=total or None, initial=start, unit="B", unit_scale=True, desc=final.name, disable=not progress
        ) as bar:
            out.seek(start)
            out.truncate()
            first = True
            try:
                for block in iter(lambda: stream.read(CHUNK), b""):
                    if first and start == 0 and _looks_like_html(block[:1024]):
                        raise _html_error(url)
                    first = False
                    out.write(block)
                    bar.update(len(block))
            except TutorialError:
                out.close()
                part.unlink(missing_ok=True)
                raise
            except (OSError, ValueError, http.client.HTTPException) as exc:
                out.flush()
                if getattr(exc, "errno", None) == errno.ENOSPC:
                    raise TutorialError(f"no space left on the disk holding {part.parent}: free some space, then run "
                                        f"again to resume from {part.stat().st_size:,} bytes") from None
                raise TutorialError(f"download of {final.name} broke off ({type(exc).__name__}): run again to resume from {part.stat().st_size:,} bytes") from None
    got = part.stat().st_size
    if total and got < total:
        raise TutorialError(f"download of {final.name} stopped at {got:,} of {total:,} bytes: run again to resume")
    bad = final.with_name(final.name + ".corrupt")
    if total and got > total:
        part.replace(bad)
        raise TutorialError(f"download of {final.name} is {got:,} bytes, longer than the server's {total:,}: moved to {bad.name}, run again to download afresh")
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256:
        part.replace(bad)
        if fresh:
            raise TutorialError(f"checksum mismatch for {final.name} on a complete fresh download (expected {sha256[:12]}…, got {digest[:12]}…): the source is damaged or the pinned sha256 in helpers/profiles.py may be wrong; moved to {bad.name} (mini profile: sources.prepare rewrites a damaged source)")
        raise TutorialError(f"checksum mismatch for {final.name}: expected {sha256[:12]}…, got {digest[:12]}…; moved to {bad.name}, run again to download afresh")
    if sha256 is None:
        try:
            check_archive(part)
        except TutorialError as exc:
            if isinstance(exc.__cause__, EOFError) and not total:
                raise TutorialError(f"download of {final.name} is incomplete (the server sent no size and the stream ends early): run again to resume from {got:,} bytes") from None
            part.replace(bad)
            raise TutorialError(f"download of {final.name} failed its checks ({exc}): moved to {bad.name}, run again to download afresh") from None
    os.replace(part, final)
    _write_stamp(final, digest)
    if sha256 is None:
        print(f"{final.name}: no sha256 is pinned for it, so recorded sha256 {digest[:16]}… of this download "
              "(gzip CRC and tar end checked); later runs compare against it")
    return final


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise TutorialError(f"refusing to extract {archive.name}: member {name!r} would write outside the target folder")
    if member.issym() or member.islnk() or member.isdev():
        raise TutorialError(f"refusing to extract {archive.name}: member {name!r} is a link or device file")


def _extracted_stamp_ok(target: Path, stamp: Path, source_sha: str | None) -> bool:
    """The extracted file is the one the stamp describes: same archive, size and sha256."""
    try:
        recorded = json.loads(stamp.read_text())
        size = target.stat().st_size
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or not source_sha or recorded.get("archive_sha256") != source_sha:
        return False
    return recorded.get("size") == size and recorded.get("sha256") == sha256_of(target)


def extract_member(archive: Path, member_name: str, dest_dir: Path, expected_lines: int | None = None) -> Path:
    """Safely extract one file from a .tar.gz (introduced in 02_corpus_indexing).

    The archive is read to its end, so gzip's CRC and the tar's end marker are checked. The result is
    reused only while the archive's verified sha256 and the extracted file's size and sha256 match
    the stamp written beside it. ``expected_lines``: the line count the file must have, when known.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    target = dest_dir / Path(member_name).name
    source_sha = verified_sha256(archive) if archive.exists() else None
    stamp = target.with_name(target.name + ".source.json")
    if target.exists() and _extracted_stamp_ok(target, stamp, source_sha):
        return target
    digest, lines = hashlib.sha256(), 0
    try:
        with atomic.atomic_path(target) as tmp, tarfile.open(archive, "r:*") as tar:
            found = False

            def take(member):  # every member is checked before the extracted file is committed
                nonlocal found, lines
                _check_member(archive, member)
                if member.name.removeprefix("./") == member_name and member.isfile():
                    with tar.extractfile(member) as src, open(tmp, "wb") as out:
                        for block in iter(lambda: src.read(CHUNK), b""):
                            out.write(block)
                            digest.update(block)
                            lines += block.count(b"\n")
                    found = True

            _read_tar_to_end(tar, archive.name, take)
            if not found:
                raise TutorialError(f"{archive.name} has no file {member_name!r}: check Source.member in helpers/profiles.py")
            if expected_lines is not None and lines != expected_lines:
                raise TutorialError(f"{member_name} in {archive.name} has {lines:,} lines, expected {expected_lines:,}: delete {archive} and download it again")
    except FileNotFoundError:
        raise TutorialError(f"archive {archive} does not exist: run the download cell first") from None
    except TutorialError:
        raise
    except _READ_ERRORS as exc:
        detail = f"{type(exc).__name__}: {str(exc)[:160]}" if str(exc) else type(exc).__name__
        raise TutorialError(f"{archive.name} is corrupt or truncated ({detail}): delete it and run the download again") from None
    atomic.write_text(stamp, json.dumps({"archive_sha256": source_sha, "size": target.stat().st_size,
                                         "sha256": digest.hexdigest(), "lines": lines}))
    return target
