"""The full-profile and OpenAI-compatible LM paths fail in one line before any long work."""

import socket

import pytest

from helpers import profiles
from helpers.program import lm_setup
from helpers.util import arbor_files
from helpers.util.errors import TutorialError
from tests.fileserver import FileServer


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(err):
    assert "\n" not in str(err.value)


def test_openai_endpoint_needs_its_variables(monkeypatch):
    for name in ("RLMH_OPENAI_BASE_URL", "RLMH_OPENAI_MODEL", "RLMH_OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(lm_setup.LM_ENV, "openai")
    with pytest.raises(TutorialError, match="RLMH_OPENAI_BASE_URL, RLMH_OPENAI_MODEL, RLMH_OPENAI_API_KEY") as err:
        lm_setup.make_lm(profiles.get_profile("mini"))
    _one_line(err)


def test_unreachable_openai_endpoint_fails_before_work(monkeypatch):
    monkeypatch.setenv(lm_setup.LM_ENV, "openai")
    monkeypatch.setenv("RLMH_OPENAI_BASE_URL", f"http://127.0.0.1:{_closed_port()}/v1/")
    monkeypatch.setenv("RLMH_OPENAI_MODEL", "some-model")
    monkeypatch.setenv("RLMH_OPENAI_API_KEY", "key")
    with pytest.raises(TutorialError, match="unreachable") as err:
        lm_setup.make_lm(profiles.get_profile("mini"))
    _one_line(err)


def test_reachable_openai_endpoint_gives_a_dspy_lm(monkeypatch):
    with FileServer() as server:
        monkeypatch.setenv(lm_setup.LM_ENV, "openai")
        monkeypatch.setenv("RLMH_OPENAI_BASE_URL", server.url + "/v1/")
        monkeypatch.setenv("RLMH_OPENAI_MODEL", "some-model")
        monkeypatch.setenv("RLMH_OPENAI_API_KEY", "key")
        lm = lm_setup.make_lm(profiles.get_profile("mini"))
    assert lm.model == "openai/some-model" and server.requests[0][0] == "/v1/models"


def test_unreachable_arbor_fails_in_one_line(monkeypatch):
    full = profiles.get_profile("full")
    import dataclasses

    settings = dataclasses.replace(full.lm, api_base=f"http://127.0.0.1:{_closed_port()}/v1/")
    monkeypatch.delenv(lm_setup.LM_ENV, raising=False)
    with pytest.raises(TutorialError, match="the Arbor server .* is unreachable") as err:
        lm_setup.make_lm(dataclasses.replace(full, lm=settings))
    _one_line(err)


def test_arbor_missing_or_of_another_version_fails_in_one_line(monkeypatch):
    import dataclasses

    full = profiles.get_profile("full")
    with FileServer() as server:
        settings = dataclasses.replace(full.lm, api_base=server.url + "/v1/")
        monkeypatch.delenv(lm_setup.LM_ENV, raising=False)
        monkeypatch.setattr(arbor_files, "installed_version", lambda: None)
        with pytest.raises(TutorialError, match="arbor-ai is not installed: `pip install --no-deps arbor-ai==0.2.17`"):
            lm_setup.make_lm(dataclasses.replace(full, lm=settings))
        monkeypatch.setattr(arbor_files, "installed_version", lambda: "0.3.0")  # another layout, maybe another protocol
        with pytest.raises(TutorialError, match="arbor-ai 0.3.0 is installed, but the tutorial reads Arbor 0.2.17") as err:
            lm_setup.make_lm(dataclasses.replace(full, lm=settings))
        _one_line(err)


def test_bad_api_base_and_unknown_lm_kind(monkeypatch):
    with pytest.raises(TutorialError, match="must end in /v1/"):
        lm_setup.check_reachable("http://127.0.0.1:1/v1", "the Arbor server")
    monkeypatch.setenv(lm_setup.LM_ENV, "gpt5")
    with pytest.raises(TutorialError, match="embedded, arbor or openai"):
        lm_setup.make_lm(profiles.get_profile("mini"))


def test_lm_choice_is_trimmed_and_lower_cased(monkeypatch):
    for name in ("RLMH_OPENAI_BASE_URL", "RLMH_OPENAI_MODEL", "RLMH_OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(lm_setup.LM_ENV, " OpenAI ")
    with pytest.raises(TutorialError, match="RLMH_LM=openai needs"):
        lm_setup.make_lm(profiles.get_profile("mini"))
    monkeypatch.setenv(lm_setup.LM_ENV, " arbor")
    monkeypatch.setenv(profiles.ARBOR_URL_ENV, f"http://127.0.0.1:{_closed_port()}/v1/")
    with pytest.raises(TutorialError, match="the Arbor server .* is unreachable"):
        lm_setup.make_lm(profiles.get_profile("full"))


def test_blank_lm_choice_means_the_profiles_own(monkeypatch):
    monkeypatch.setenv(lm_setup.LM_ENV, "  ")
    monkeypatch.setenv(profiles.ARBOR_URL_ENV, f"http://127.0.0.1:{_closed_port()}/v1/")
    with pytest.raises(TutorialError, match="the Arbor server .* is unreachable"):  # full's own: arbor
        lm_setup.make_lm(profiles.get_profile("full"))


def test_an_arbor_url_without_v1_names_the_variable(monkeypatch):
    monkeypatch.delenv(lm_setup.LM_ENV, raising=False)
    monkeypatch.setenv(profiles.ARBOR_URL_ENV, "http://127.0.0.1:1/")
    with pytest.raises(TutorialError, match=f"must end in /v1/ \\(set {profiles.ARBOR_URL_ENV}\\)"):
        lm_setup.make_lm(profiles.get_profile("full"))


def test_unreachable_arbor_names_the_url_variable(monkeypatch):
    monkeypatch.delenv(lm_setup.LM_ENV, raising=False)
    monkeypatch.setenv(profiles.ARBOR_URL_ENV, f"http://127.0.0.1:{_closed_port()}/v1/")
    with pytest.raises(TutorialError, match=profiles.ARBOR_URL_ENV) as err:
        lm_setup.make_lm(profiles.get_profile("full"))
    _one_line(err)


def test_a_non_http_listener_is_one_line(monkeypatch):
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\nProtocol mismatch.\r\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        with pytest.raises(TutorialError, match="not an HTTP server") as err:
            lm_setup.check_reachable(f"http://127.0.0.1:{listener.getsockname()[1]}/v1/", "the Arbor server")
        _one_line(err)
    finally:
        listener.close()


@pytest.mark.parametrize("url", ["garbage/v1/", "localhost:7453/v1/", "ftp://host/v1/", "http:///v1/"])
def test_an_arbor_url_that_is_no_http_url_names_the_variable(monkeypatch, url):
    monkeypatch.setenv("RLMH_ARBOR_URL", url)
    with pytest.raises(TutorialError, match="RLMH_ARBOR_URL") as err:
        lm_setup.make_lm(profiles.get_profile("full"))
    assert "\n" not in str(err.value) and "http://" in str(err.value)
