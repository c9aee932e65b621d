import bm25s
import pytest
import Stemmer

from helpers import corpus, retrieval, sources
from helpers.errors import TutorialError


@pytest.fixture(scope="module")
def abstracts(mini_cache):
    return corpus.load_abstracts(sources.corpus_file(mini_cache, progress=False))


def test_corpus_file_errors_are_one_line(tmp_path):
    with pytest.raises(TutorialError, match="is missing"):
        corpus.load_abstracts(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TutorialError, match="is empty"):
        corpus.load_abstracts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "A", "text": ["x"]}\n{"title": "B"}\n')
    with pytest.raises(TutorialError, match="line 2 is not a") as err:
        corpus.load_abstracts(bad)
    assert "\n" not in str(err.value)


def test_abstracts_in_seed_format(abstracts):
    assert len(abstracts) >= 20_000
    title, text = abstracts[0].split(" | ", 1)
    assert title and text and " | " not in title


def test_search_returns_what_the_seed_function_returns(abstracts, tmp_path):
    ours = retrieval.build_index(abstracts, tmp_path / "idx", "fp")
    reloaded = retrieval.load_index(tmp_path / "idx", "fp")
    # The seed's indexing and search code, verbatim in spirit, as the reference.
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25(k1=0.9, b=0.4)
    retriever.index(bm25s.tokenize(abstracts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)

    def seed_search(query, k):
        tokens = bm25s.tokenize(query, stopwords="en", stemmer=stemmer, show_progress=False)
        results, scores = retriever.retrieve(tokens, k=k, n_threads=1, show_progress=False)
        return list({abstracts[doc]: float(score) for doc, score in zip(results[0], scores[0])}.keys())

    for query in ["film director born in a port town", "University of Port Zarso painter", "record label headquartered"]:
        for k in (1, 4, 8):
            assert ours(query, k) == reloaded(query, k) == seed_search(query, k)


def test_stale_or_damaged_index_is_refused(abstracts, tmp_path):
    folder = tmp_path / "idx"
    retrieval.build_index(abstracts[:500], folder, "fp")
    with pytest.raises(TutorialError, match="another corpus"):
        retrieval.load_index(folder, "other-fp")
    (folder / "data.csc.index.npy").write_bytes(b"garbage")
    with pytest.raises(TutorialError, match="is damaged") as err:
        retrieval.load_index(folder, "fp")
    assert "\n" not in str(err.value)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(TutorialError, match="is damaged"):
        retrieval.load_index(folder, "fp")
    with pytest.raises(TutorialError, match="no index"):
        retrieval.load_index(tmp_path / "absent", "fp")


def test_load_search_rebuilds_a_damaged_cache(mini_profile, capsys):
    first = retrieval.load_search(mini_profile)
    (mini_profile.index_dir / "vocab.index.json").write_text("[")
    again = retrieval.load_search(mini_profile)
    assert "is damaged" in capsys.readouterr().out
    assert again("painting acquired by a gallery", 3) == first("painting acquired by a gallery", 3)
    assert retrieval.load_index(mini_profile.index_dir, retrieval.fingerprint(mini_profile))


def test_failed_build_leaves_previous_index_intact(abstracts, tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    retrieval.build_index(abstracts[:300], folder, "fp")

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(retrieval.DocStore, "write", staticmethod(boom))
    with pytest.raises(KeyboardInterrupt):
        retrieval.build_index(abstracts[:600], folder, "fp")
    assert len(retrieval.load_index(folder, "fp")) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
