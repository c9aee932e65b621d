import hashlib
import io
import socket
import tarfile

import pytest

from helpers import downloads
from helpers.errors import TutorialError
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
