from pathlib import Path

import pytest
import Stemmer

from helpers.data import corpus, hover, sources
from helpers.search import fast_index, retrieval, seed_bm25
from helpers.util.errors import TutorialError


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
    assert len(abstracts) == 20_340
    title, text = abstracts[0].split(" | ", 1)
    assert title and text and " | " not in title


@pytest.fixture(scope="module")
def seed_retriever(abstracts):
    return seed_bm25.build(abstracts)


def _column(retriever, stem):
    """(document, score) pairs of one stem's column, or None when the stem has no column ("")."""
    s, i = retriever.scores, retriever.vocab_dict[stem]
    if i >= len(s["indptr"]) - 1:
        return None
    a, b = s["indptr"][i], s["indptr"][i + 1]
    return list(zip(s["indices"][a:b].tolist(), s["data"][a:b].tolist()))


def test_fast_index_equals_the_seeds_bm25s_index(abstracts, seed_retriever):
    ours = retrieval.index(abstracts, workers=2)
    assert set(ours.vocab_dict) == set(seed_retriever.vocab_dict)
    assert ours.scores["num_docs"] == seed_retriever.scores["num_docs"] == len(abstracts)
    assert ours.scores["data"].dtype == seed_retriever.scores["data"].dtype
    different = [stem for stem in seed_retriever.vocab_dict if _column(ours, stem) != _column(seed_retriever, stem)]
    assert different == []  # same documents, bit-identical float32 scores, for every stem


def test_fast_tokenize_is_the_same_on_one_or_two_workers(abstracts):
    one = fast_index.tokenize(abstracts[:45_000], Stemmer.Stemmer("english"), workers=1)
    two = fast_index.tokenize(abstracts[:45_000], Stemmer.Stemmer("english"), workers=2)
    assert one.vocab == two.vocab and (one.ids == two.ids).all() and (one.offsets == two.offsets).all()


def test_block_boundaries_do_not_change_the_index(abstracts, monkeypatch):
    """Tokenizing in chunks of 7 documents and scoring 1 or 1,000 postings at a time gives the one-block index."""
    import numpy as np

    stemmer = Stemmer.Stemmer("english")
    docs = abstracts[:3_000] + ["The | of and", "Solo | zzqq"]  # a document of stopwords only, a one-off stem
    whole = fast_index.tokenize(docs, stemmer, workers=1)
    monkeypatch.setattr(fast_index, "CHUNK_DOCS", 7)
    small = fast_index.tokenize(docs, stemmer, workers=1)
    assert small.vocab == whole.vocab and small.ids.dtype == whole.ids.dtype == np.int32
    assert np.array_equal(small.ids, whole.ids) and np.array_equal(small.offsets, whole.offsets)
    one = fast_index.bm25_scores(whole, retrieval.K1, retrieval.B, block=10**9)
    for block in (1, 1_000):
        other = fast_index.bm25_scores(small, retrieval.K1, retrieval.B, block=block)
        assert other["num_docs"] == one["num_docs"] == len(docs)
        for key in ("data", "indices", "indptr"):
            assert other[key].dtype == one[key].dtype and other[key].tobytes() == one[key].tobytes(), (block, key)
    assert one["data"].dtype == np.float32 and one["indices"].dtype == np.int32 and one["indptr"].dtype == np.int64


def test_search_returns_what_the_seed_function_returns(abstracts, seed_retriever, mini_profile, tmp_path):
    ours = retrieval.build_index(abstracts, tmp_path / "idx", "fp")
    reloaded = retrieval.load_index(tmp_path / "idx", "fp")
    stemmer = Stemmer.Stemmer("english")
    trainset, devset, _ = hover.seed_splits(mini_profile)
    # every claim, plus queries with no known word, only stopwords, repeats, and many tied scores
    queries = [x.claim for x in trainset[:300] + devset] + [
        "", "the of and", "zzzqqq unknownword", "city city cities", "The claim is not supported by any evidence.",
        "film director born in a port town", "University of Port Zarso painter"]
    for query in queries:
        seed_docs, seed_scores = seed_bm25.search(seed_retriever, stemmer, query, 8)
        for search in (ours, reloaded):
            docs, scores = search.top_k(query, 8)
            assert docs.tolist() == seed_docs.tolist() and scores.tolist() == seed_scores.tolist(), query
        assert retrieval.Search(ours)(query, 4) == [abstracts[d] for d in seed_docs[:4]]


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
    reloaded = retrieval.load_index(mini_profile.index_dir, retrieval.fingerprint(mini_profile))
    assert len(reloaded) == len(first.index) == 20_340
    assert retrieval.Search(reloaded)("painting acquired by a gallery", 3) == first("painting acquired by a gallery", 3)


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


def test_identical_abstracts_collapse_as_in_the_seed(tmp_path):
    docs = ["Alpha | river town harbor", "Alpha | river town harbor", "Beta | mountain pass"]
    search = retrieval.build_index(docs, tmp_path / "idx", "fp")
    seed_docs, _ = seed_bm25.search(seed_bm25.build(docs), search.stemmer, "river harbor", 2)
    assert seed_docs.tolist() == search.top_k("river harbor", 2)[0].tolist() == [0, 1]
    assert retrieval.Search(search)("river harbor", 2) == ["Alpha | river town harbor"]


# --- round 2: bad inputs never crash the kernel or load a damaged index ----------------------------------------

DOCS = ["Alpha | river town harbor", "Beta | mountain pass river", "Gamma | harbor lights", "Delta | quiet valley"]


@pytest.fixture
def small(tmp_path):
    return retrieval.Search(retrieval.build_index(DOCS, tmp_path / "idx", "fp")), tmp_path / "idx"


@pytest.mark.slow  # four child processes
def test_k_zero_returns_nothing_and_never_crashes(mini_profile):
    """``search(q, 0)`` read past an empty array in the compiled top-k loop: a segfault about half the time."""
    import subprocess
    import sys

    retrieval.load_search(mini_profile)
    script = (
        "from helpers import profiles\nfrom helpers.search import retrieval\n"
        "s = retrieval.load_search(profiles.get_profile('mini'))\n"
        "claims = ['film director born in a port town', 'painting acquired by a gallery', 'river'] * 100\n"
        "print(sum(len(s(q, 0)) + len(s.index.top_k(q, 0)[0]) for q in claims))\n")
    # what the empty array reads is decided once per process, so try a few processes
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parents[1]) for _ in range(4)]
    outcomes = [(run.wait(timeout=300), run.communicate()[0].strip()) for run in runs]
    assert outcomes == [(0, "0")] * 4


def test_bad_k_is_one_line(small):
    search, _ = small
    assert search("river harbor", 0) == []
    assert len(search("river harbor", 99)) == 4  # k past the corpus: every document, as the seed
    for bad in (-1, 2.5, "3", None, True):
        with pytest.raises(TutorialError, match="k must be a whole number") as err:
            search("river harbor", bad)
        assert "\n" not in str(err.value)
    with pytest.raises(TutorialError, match="query must be a string"):
        search(None, 2)


def _rewrite_npy(path, change):
    import numpy as np

    array = np.load(path).copy()
    change(array)
    np.save(path, array)


def test_posting_ids_past_the_last_document_are_refused_at_load(small):
    _, folder = small
    _rewrite_npy(folder / "indices.csc.index.npy", lambda a: a.__setitem__(0, 1_000_000))
    with pytest.raises(TutorialError, match="is damaged .*run 02_corpus_indexing to rebuild it"):
        retrieval.load_index(folder, "fp")


def test_docs_cut_in_half_are_refused_at_load(small):
    _, folder = small
    blob = (folder / "docs.bin").read_bytes()
    (folder / "docs.bin").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(TutorialError, match="is damaged"):
        retrieval.load_index(folder, "fp")


def test_damaged_postings_or_offsets_are_refused_at_load(small):
    _, folder = small
    _rewrite_npy(folder / "indices.csc.index.npy", lambda a: a.__setitem__(0, -5))
    with pytest.raises(TutorialError, match="is damaged"):
        retrieval.load_index(folder, "fp")


def test_load_search_rebuilds_after_docs_are_cut(mini_profile, capsys):
    expected = retrieval.load_search(mini_profile)("film director born in a port town", 4)
    blob = mini_profile.index_dir / "docs.bin"  # cut in place: no Search may still map it (SIGBUS)
    blob.write_bytes(blob.read_bytes()[:1000])
    again = retrieval.load_search(mini_profile)
    assert "is damaged" in capsys.readouterr().out
    assert again("film director born in a port town", 4) == expected
    assert all(" | " in d for d in again("film director born in a port town", 4))


def test_lone_surrogate_in_a_document_is_one_line_and_writes_nothing(tmp_path):
    docs = ["Alpha | fine", "Beta | broken \ud800 text"]
    with pytest.raises(TutorialError, match="document 1 .*not valid Unicode") as err:
        retrieval.build_index(docs, tmp_path / "idx", "fp")
    assert "\n" not in str(err.value) and not (tmp_path / "idx").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("line, problem", [
    (b'{"title": "Beta", "text": "a string, not a list"}', r"line 2\b.*text.*list of strings"),
    (b'{"title": null, "text": ["x"]}', r"line 2\b.*title.*string"),
    (b'{"title": "Beta", "text": ["x", 3]}', r"line 2\b.*text.*list of strings"),
    (b'{"title": "Be\xffta", "text": ["x"]}', r"line 2 is not valid UTF-8"),
    (b'{"title": "Beta \\ud800", "text": ["x"]}', r"line 2 .*not valid Unicode"),
    (b'[1, 2]', r"line 2 is not a \{title, text\} JSON object"),
])
def test_bad_corpus_rows_are_one_line_errors(tmp_path, line, problem):
    path = tmp_path / "wiki.jsonl"
    path.write_bytes(b'{"title": "Alpha", "text": ["One.", "Two."]}\n' + line + b"\n")
    with pytest.raises(TutorialError, match=problem) as err:
        corpus.load_abstracts(path)
    assert "\n" not in str(err.value)


def test_a_killed_index_save_leaves_nothing_once_the_index_is_loaded(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "idx"
    retrieval.build_index(DOCS, folder, "fp")
    script = ("import os, signal\nfrom pathlib import Path\nfrom helpers.search import retrieval\n"
              "retrieval.DocStore.write = staticmethod(lambda *a: os.kill(os.getpid(), signal.SIGKILL))\n"
              f"retrieval.build_index({DOCS!r}, Path({str(folder)!r}), 'fp')\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], capture_output=True, timeout=300)
    assert run.returncode == -9, run.stderr[-500:]
    assert len(list(tmp_path.iterdir())) == 2  # the index and the killed save's temp folder
    assert len(retrieval.load_index(folder, "fp")) == len(DOCS)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


@pytest.mark.parametrize("damage", [
    ("meta.json", "null"), ("meta.json", "[]"), ("vocab.index.json", "[1, 2]"), ("vocab.index.json", "null"),
    ("data.csc.index.npy", lambda a: a.astype("float64")), ("indices.csc.index.npy", lambda a: a.astype("float32")),
    ("indptr.csc.index.npy", lambda a: a.reshape(1, -1)), ("offsets.npy", lambda a: a.astype("float64")),
], ids=["meta-null", "meta-list", "vocab-list", "vocab-null", "scores-f64", "ids-f32", "indptr-2d", "offsets-f64"])
def test_damaged_files_of_every_kind_are_refused_at_load_and_rebuilt(small, damage):
    """Valid JSON or arrays of the wrong kind fail the load checks (not later: AttributeError, numba typing errors at
    the first query); each is 'damaged: rebuild', so load_search rebuilds the index."""
    search, folder = small
    name, change = damage
    if callable(change):
        import numpy as np

        np.save(folder / name, change(np.load(folder / name)))
    else:
        (folder / name).write_text(change)
    with pytest.raises(TutorialError, match="is damaged|built from another corpus") as err:
        retrieval.load_index(folder, "fp")
    assert "\n" not in str(err.value) and "02_corpus_indexing" in str(err.value)


def test_a_huge_k_returns_every_document(small):
    search, _ = small
    assert len(search("river harbor", 2**64)) == len(search("river harbor", 99)) == 4
