import hashlib
import io
import socket
import tarfile

import pytest

from helpers.data import downloads
from helpers.util.errors import TutorialError
from tests.concurrency import at_once
from tests.fileserver import FileServer

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def server():
    with FileServer() as s:
        s.files["/data/corpus.tar.gz"] = PAYLOAD
        yield s


def test_download_verifies_and_stamps(server, tmp_path):
    path = downloads.fetch(server.url + "/data/corpus.tar.gz", tmp_path, sha256=SHA, progress=False)
    assert path.read_bytes() == PAYLOAD and downloads.verified_sha256(path) == SHA
    assert not list(tmp_path.glob("*.part"))


def test_cached_file_makes_no_network_call(server, tmp_path):
    url = server.url + "/data/corpus.tar.gz"
    downloads.fetch(url, tmp_path, sha256=SHA, progress=False)
    server.__exit__()  # the server is gone: a second call must not need it
    assert downloads.fetch(url, tmp_path, sha256=SHA, progress=False).read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_a_changed_pinned_sha256_is_checked_again_not_trusted_from_the_stamp(server, tmp_path):
    """The stamp records the sha256 the file was verified against: when the pin changes, the file is checked anew."""
    url = server.url + "/data/corpus.tar.gz"
    downloads.fetch(url, tmp_path, sha256=SHA, progress=False)
    other = "0" * 64  # a new pin the cached bytes do not match
    with pytest.raises(TutorialError, match="sha256") as err:
        downloads.fetch(url, tmp_path, sha256=other, progress=False)
    assert "\n" not in str(err.value)
    assert downloads.fetch(url, tmp_path, sha256=SHA, progress=False).read_bytes() == PAYLOAD


@pytest.mark.parametrize("header", ["abc", "-5", "1e9", ""])
def test_a_nonsense_content_length_is_no_crash(server, tmp_path, header):
    """Content-Length: abc (or -5) is no size at all (not a raw ValueError): the size is unknown and the sha256 decides."""
    url = server.url + "/data/corpus.tar.gz"
    server.length["/data/corpus.tar.gz"] = header
    assert downloads.fetch(url, tmp_path, sha256=SHA, progress=False).read_bytes() == PAYLOAD


def test_a_full_disk_says_so_and_keeps_what_arrived(server, tmp_path, monkeypatch):
    import builtins
    import errno

    url = server.url + "/data/corpus.tar.gz"
    real_open = builtins.open

    class FillsUp:
        def __init__(self, f):
            self.f, self.room = f, 200_000

        def write(self, block):
            if self.room < len(block):
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(block)
            return self.f.write(block)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def opening(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FillsUp(f) if str(path).endswith(".part") and "b" in mode and ("a" in mode or "w" in mode) else f

    monkeypatch.setattr(downloads, "open", opening, raising=False)
    monkeypatch.setattr(downloads, "CHUNK", 1 << 16)  # several blocks arrive before the disk is full
    with pytest.raises(TutorialError, match="no space left") as err:
        downloads.fetch(url, tmp_path, sha256=SHA, progress=False)
    assert "\n" not in str(err.value) and "free" in str(err.value)
    parts = list(tmp_path.glob("*.part"))
    assert parts and parts[0].stat().st_size > 0  # what arrived is kept, to resume from
    monkeypatch.undo()
    assert downloads.fetch(url, tmp_path, sha256=SHA, progress=False).read_bytes() == PAYLOAD


def test_404_is_one_line(server, tmp_path):
    with pytest.raises(TutorialError, match=r"HTTP 404") as err:
        downloads.fetch(server.url + "/missing.tar.gz", tmp_path, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "missing.tar.gz").exists() and not list(tmp_path.glob("*.part"))


def test_connection_refused_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(TutorialError, match=r"cannot reach 127\.0\.0\.1.*RLMH_PROFILE=mini"):
        downloads.fetch(f"http://127.0.0.1:{port}/x.tar.gz", tmp_path, progress=False)


def test_truncated_download_is_resumed_with_range(server, tmp_path):
    url = server.url + "/data/corpus.tar.gz"
    server.cut["/data/corpus.tar.gz"] = 300_000
    with pytest.raises(TutorialError, match="run again to resume"):
        downloads.fetch(url, tmp_path, sha256=SHA, progress=False)
    part = tmp_path / "corpus.tar.gz.part"
    assert part.stat().st_size == 300_000 and not (tmp_path / "corpus.tar.gz").exists()
    path = downloads.fetch(url, tmp_path, sha256=SHA, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/data/corpus.tar.gz", "bytes=300000-")


def test_checksum_mismatch_keeps_nothing_under_the_final_name(server, tmp_path):
    with pytest.raises(TutorialError, match="checksum mismatch") as err:
        downloads.fetch(server.url + "/data/corpus.tar.gz", tmp_path, sha256="0" * 64, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "corpus.tar.gz").exists()
    assert (tmp_path / "corpus.tar.gz.corrupt").read_bytes() == PAYLOAD


def _tar_gz(members):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _archive(tmp_path, members):
    path = tmp_path / "a.tar.gz"
    path.write_bytes(_tar_gz(members))
    return path


def test_extracts_the_member(tmp_path):
    archive = _archive(tmp_path, [("wiki.jsonl", b'{"title": "A", "text": ["x"]}\n')])
    out = downloads.extract_member(archive, "wiki.jsonl", tmp_path / "out")
    assert out.read_bytes().startswith(b'{"title"')


@pytest.mark.parametrize("bad", ["../evil.txt", "/etc/evil.txt", "a/../../evil.txt"])
def test_path_traversal_member_is_refused(tmp_path, bad):
    archive = _archive(tmp_path, [("wiki.jsonl", b"{}\n"), (bad, b"boom")])
    with pytest.raises(TutorialError, match="would write outside"):
        downloads.extract_member(archive, "wiki.jsonl", tmp_path / "out")
    assert not (tmp_path / "out" / "wiki.jsonl").exists() and not (tmp_path / "evil.txt").exists()


def test_corrupt_tarball_is_one_line(tmp_path):
    good = _tar_gz([("wiki.jsonl", b"{}\n" * 10_000)])
    path = tmp_path / "a.tar.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(TutorialError, match="corrupt or truncated"):
        downloads.extract_member(path, "wiki.jsonl", tmp_path / "out")
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(TutorialError, match="corrupt or truncated"):
        downloads.extract_member(path, "wiki.jsonl", tmp_path / "out")
    assert not (tmp_path / "out" / "wiki.jsonl").exists()


def test_missing_member_is_one_line(tmp_path):
    archive = _archive(tmp_path, [("other.jsonl", b"{}\n")])
    with pytest.raises(TutorialError, match="has no file 'wiki.jsonl'"):
        downloads.extract_member(archive, "wiki.jsonl", tmp_path / "out")


# --- round 2: unpinned downloads verify what they can, misbehaving servers, concurrency ---------------------------

def _jsonl(lines=4000, seed=1):
    import random

    rng = random.Random(seed)
    words = [f"w{rng.randrange(10**6)}" for _ in range(5000)]
    return "".join(f'{{"title": "T{i}", "text": ["{" ".join(rng.choices(words, k=12))}"]}}\n'
                   for i in range(lines)).encode()


ARCHIVE = _tar_gz([("wiki.jsonl", _jsonl())])
ARCHIVE_SHA = hashlib.sha256(ARCHIVE).hexdigest()


@pytest.fixture
def archive_server():
    with FileServer() as s:
        s.files["/a/wiki.tar.gz"] = ARCHIVE
        yield s


def _unpinned(server, tmp_path):
    return downloads.fetch(server.url + "/a/wiki.tar.gz", tmp_path, sha256=None, progress=False)


def test_unpinned_download_is_checked_and_its_sha_recorded(archive_server, tmp_path, capsys):
    path = _unpinned(archive_server, tmp_path)
    assert path.read_bytes() == ARCHIVE and downloads.verified_sha256(path) == ARCHIVE_SHA
    assert f"recorded sha256 {ARCHIVE_SHA[:16]}" in capsys.readouterr().out


def test_unpinned_file_changed_since_its_sha_was_recorded_is_fetched_again(archive_server, tmp_path):
    path = _unpinned(archive_server, tmp_path)
    other = _tar_gz([("wiki.jsonl", _jsonl(seed=2))])  # a well-formed archive: only the recorded sha can tell
    path.write_bytes(other)
    requests = len(archive_server.requests)
    assert _unpinned(archive_server, tmp_path).read_bytes() == ARCHIVE and len(archive_server.requests) > requests
    assert (tmp_path / "wiki.tar.gz.corrupt").read_bytes() == other


@pytest.mark.parametrize("how", ["content-type", "sniffed"])
def test_unpinned_html_page_is_refused(archive_server, tmp_path, how):
    archive_server.files["/a/wiki.tar.gz"] = b"<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>\n"
    if how == "content-type":
        archive_server.content_type["/a/wiki.tar.gz"] = "text/html; charset=utf-8"
    with pytest.raises(TutorialError, match="the server returned an HTML page, not the archive") as err:
        _unpinned(archive_server, tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "wiki.tar.gz").exists() and not (tmp_path / "wiki.tar.gz.part").exists()


def test_unpinned_truncated_body_without_length_is_resumed_not_verified(archive_server, tmp_path):
    archive_server.no_length.add("/a/wiki.tar.gz")
    archive_server.cut["/a/wiki.tar.gz"] = len(ARCHIVE) // 2
    with pytest.raises(TutorialError, match="incomplete.*run again to resume"):
        _unpinned(archive_server, tmp_path)
    assert not (tmp_path / "wiki.tar.gz").exists()
    assert _unpinned(archive_server, tmp_path).read_bytes() == ARCHIVE
    assert archive_server.requests[-1][1] == f"bytes={len(ARCHIVE) // 2}-"


def test_unpinned_206_from_byte_zero_is_not_appended(archive_server, tmp_path):
    archive_server.cut["/a/wiki.tar.gz"] = 100_000
    with pytest.raises(TutorialError, match="run again to resume"):
        _unpinned(archive_server, tmp_path)
    archive_server.range_from_zero.add("/a/wiki.tar.gz")
    assert _unpinned(archive_server, tmp_path).read_bytes() == ARCHIVE


def test_unpinned_overlong_part_is_discarded(archive_server, tmp_path):
    (tmp_path / "wiki.tar.gz.part").write_bytes(ARCHIVE + b"left over from something else" * 100)
    assert _unpinned(archive_server, tmp_path).read_bytes() == ARCHIVE


def test_unpinned_corrupt_gzip_is_refused(archive_server, tmp_path):
    bad = bytearray(ARCHIVE)
    bad[len(bad) // 2] ^= 0x10
    archive_server.files["/a/wiki.tar.gz"] = bytes(bad)
    with pytest.raises(TutorialError, match="corrupt") as err:
        _unpinned(archive_server, tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "wiki.tar.gz").exists() and (tmp_path / "wiki.tar.gz.corrupt").exists()


def test_chunked_truncation_is_one_line_and_resumes(archive_server, tmp_path):
    archive_server.chunked.add("/a/wiki.tar.gz")
    archive_server.cut["/a/wiki.tar.gz"] = 150_000
    with pytest.raises(TutorialError, match="run again to resume") as err:
        downloads.fetch(archive_server.url + "/a/wiki.tar.gz", tmp_path, sha256=ARCHIVE_SHA, progress=False)
    assert "\n" not in str(err.value)
    path = downloads.fetch(archive_server.url + "/a/wiki.tar.gz", tmp_path, sha256=ARCHIVE_SHA, progress=False)
    assert path.read_bytes() == ARCHIVE


def test_wrong_pin_on_a_fresh_download_says_the_pin_may_be_wrong(server, tmp_path):
    with pytest.raises(TutorialError, match="pinned sha256 .* may be wrong") as err:
        downloads.fetch(server.url + "/data/corpus.tar.gz", tmp_path, sha256="0" * 64, progress=False)
    assert "run again" not in str(err.value)


def test_already_downloaded_file_with_a_wrong_sha_is_set_aside_and_fetched_again(server, tmp_path):
    url = server.url + "/data/corpus.tar.gz"
    path = downloads.fetch(url, tmp_path, sha256=SHA, progress=False)
    path.write_bytes(b"x" * len(PAYLOAD))  # same size, new mtime: the stamp no longer vouches for it
    assert downloads.fetch(url, tmp_path, sha256=SHA, progress=False).read_bytes() == PAYLOAD
    assert (tmp_path / "corpus.tar.gz.corrupt").read_bytes() == b"x" * len(PAYLOAD)
    assert len(server.requests) == 2


def test_two_downloads_of_the_same_file_at_once(server, tmp_path):
    server.delay["/data/corpus.tar.gz"] = 0.05  # ~0.8 s per download, so the two overlap
    results, errors = at_once(lambda: downloads.fetch(server.url + "/data/corpus.tar.gz", tmp_path, sha256=SHA,
                                                      progress=False), 2)
    assert errors == [] and [p.read_bytes() == PAYLOAD for p in results] == [True, True]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "corpus.tar.gz", "corpus.tar.gz.verified.json"]


def test_tar_without_end_marker_is_refused(tmp_path):
    import gzip

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = _jsonl(50)
        info = tarfile.TarInfo("wiki.jsonl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    body = raw.getvalue()
    header_and_data = 512 + (len(data) + 511) // 512 * 512
    path = tmp_path / "a.tar.gz"
    path.write_bytes(gzip.compress(body[:header_and_data]))  # a valid gzip of a tar cut before its end blocks
    with pytest.raises(TutorialError, match="end-of-archive marker"):
        downloads.extract_member(path, "wiki.jsonl", tmp_path / "out")


def test_single_bit_flips_never_give_a_silently_wrong_jsonl(mini_cache, tmp_path):
    from helpers.data import mini_world

    good = (mini_cache.source_dir / mini_world.CORPUS_ARCHIVE).read_bytes()
    expected = downloads.extract_member(mini_cache.source_dir / mini_world.CORPUS_ARCHIVE,
                                        mini_world.CORPUS_MEMBER, tmp_path / "ref").read_bytes()
    flipped = tmp_path / "flipped.tar.gz"
    silent = []
    for i, position in enumerate(list(range(0, 24)) + list(range(100, len(good) - 8, len(good) // 30))
                                 + list(range(len(good) - 8, len(good)))):
        data = bytearray(good)
        data[position] ^= 1 << (i % 8)
        flipped.write_bytes(bytes(data))
        try:
            out = downloads.extract_member(flipped, mini_world.CORPUS_MEMBER, tmp_path / f"out{i}")
        except TutorialError:
            continue
        if out.read_bytes() != expected:
            silent.append(position)
    assert silent == []


def test_truncated_extracted_jsonl_is_not_reused(tmp_path):
    source = tmp_path / "src" / "wiki.tar.gz"
    source.parent.mkdir()
    source.write_bytes(ARCHIVE)
    archive = downloads.fetch(source.as_uri(), tmp_path / "dl", sha256=ARCHIVE_SHA, progress=False)
    jsonl = downloads.extract_member(archive, "wiki.jsonl", tmp_path / "data")
    full = jsonl.read_bytes()
    jsonl.write_bytes(b"".join(full.splitlines(keepends=True)[:1000]))  # cut at a line boundary
    assert downloads.extract_member(archive, "wiki.jsonl", tmp_path / "data").read_bytes() == full
    jsonl.write_bytes(full.replace(b"T1", b"T9", 1))  # same size, different bytes
    assert downloads.extract_member(archive, "wiki.jsonl", tmp_path / "data").read_bytes() == full


def test_extracted_line_count_is_checked_when_known(tmp_path):
    archive = _archive(tmp_path, [("wiki.jsonl", _jsonl(30))])
    with pytest.raises(TutorialError, match="has 30 lines, expected 31"):
        downloads.extract_member(archive, "wiki.jsonl", tmp_path / "out", expected_lines=31)
    assert downloads.extract_member(archive, "wiki.jsonl", tmp_path / "out", expected_lines=30).exists()
