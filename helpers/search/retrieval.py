"""BM25 search over the abstracts, as in the seeds but faster and cached (introduced in 02_corpus_indexing).

The index is built once with the seeds' settings (PyStemmer English stemmer, English stopwords,
k1=0.9, b=0.4) by ``fast_index`` (same scores as bm25s, on every core), saved atomically to the
profile's cache and reloaded with mmap afterwards. ``Search`` is the seed's ``search(query, k)`` over it,
written in 02_corpus_indexing (``#@save``) and kept identical here.
"""

import json
import threading
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from helpers.search import fast_index
from helpers.util import atomic
from helpers.util.errors import TutorialError

K1, B = 0.9, 0.4
INDEX_FORMAT = 2  # 2: built by fast_index (stem ids in first-seen order)


def _encoded(docs: list[str]):
    """Each document as UTF-8; a non-string or a lone surrogate (from a JSON ``\\ud800`` escape) is a one-line error."""
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise TutorialError(f"document {i} is a {type(doc).__name__}, not a string: pass the corpus as a list of \"title | text\" strings")
        try:
            yield doc.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TutorialError(f"document {i} ({doc[:40]!r}…) is not valid Unicode ({exc.reason} at character {exc.start}): fix or drop it in the corpus") from None


class DocStore:
    """The corpus strings as one UTF-8 blob plus offsets, memory-mapped so a reload costs nothing."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.offsets = np.load(self.folder / "offsets.npy", mmap_mode="r")
        if self.offsets.dtype != np.int64 or self.offsets.ndim != 1 or len(self.offsets) == 0 or self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets.npy is not an increasing list of document offsets")
        size = (self.folder / "docs.bin").stat().st_size
        if size != self.offsets[-1]:
            raise ValueError(f"docs.bin has {size:,} bytes, the offsets need {int(self.offsets[-1]):,}")
        self.blob = np.memmap(self.folder / "docs.bin", dtype=np.uint8, mode="r") if self.offsets[-1] else np.zeros(0, np.uint8)

    @staticmethod
    def write(folder: Path, docs: list[str]) -> None:
        encoded = list(_encoded(docs))
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        with open(Path(folder) / "docs.bin", "wb") as f:
            for e in encoded:
                f.write(e)
        np.save(Path(folder) / "offsets.npy", offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        try:
            return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8")
        except UnicodeDecodeError:
            raise TutorialError(f"index at {self.folder} is damaged (document {i} is not valid UTF-8): delete the folder and run 02_corpus_indexing to rebuild it") from None


class BM25Index:
    """The BM25 index and its documents: ``top_k(query, k)`` ranks, ``docs[i]`` is a ``"title | text"`` string.

    Thread-safe for DSPy's parallel evaluation; ``Search`` (below) turns it into the seed's ``search(query, k)``.
    """

    def __init__(self, retriever: bm25s.BM25, docs):
        self.retriever, self.docs = retriever, docs
        fast_index.warm_up()
        self._local = threading.local()  # PyStemmer objects must not be shared between threads

    @property
    def stemmer(self):
        if not hasattr(self._local, "stemmer"):
            self._local.stemmer = Stemmer.Stemmer("english")
        return self._local.stemmer

    def top_k(self, query: str, k: int):
        """``(doc_indices, scores)``: what the seed's ``retriever.retrieve`` returns for one query.

        ``k=0`` gives no documents (as the seed's ``search``); a negative or fractional ``k`` is an error.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise TutorialError(f"k must be a whole number of documents, 0 or more, not {k!r}: e.g. search(query, k=4)")
        if not isinstance(query, str):
            raise TutorialError(f"the query must be a string, not {type(query).__name__}: e.g. search(\"a claim\", k=4)")
        ids = fast_index.query_ids(query, self.stemmer, self.retriever.vocab_dict)
        return fast_index.top_k(self.retriever.scores, ids, min(int(k), len(self.docs)))  # k past the corpus: all

    def __len__(self):
        return len(self.docs)

    def __deepcopy__(self, memo):
        return self  # read-only and memory-mapped: copies of a program (DSPy makes them) share one index


class Search:  #@save
    """The seed's ``search(query, k)``: the top-``k`` abstracts as ``"title | text"`` strings, best first."""

    def __init__(self, index):
        self.index = index

    def __call__(self, query: str, k: int) -> list[str]:
        doc_ids, scores = self.index.top_k(query, k)
        run = {self.index.docs[doc]: float(score) for doc, score in zip(doc_ids, scores)}
        return list(run.keys())


def index(corpus: list[str], workers: int | None = None) -> bm25s.BM25:
    """A ``bm25s.BM25`` holding the seeds' index of ``corpus``, built by ``fast_index`` on ``workers`` processes."""
    tokens = fast_index.tokenize(corpus, Stemmer.Stemmer("english"), workers)
    retriever = bm25s.BM25(k1=K1, b=B)
    retriever.scores = fast_index.bm25_scores(tokens, K1, B)
    retriever.vocab_dict = tokens.vocab
    retriever.unique_token_ids_set = set(tokens.vocab.values())
    retriever.nonoccurrence_array = None
    return retriever


def build_index(corpus: list[str], folder: Path, fingerprint: str, workers: int | None = None) -> BM25Index:
    """Tokenize and index ``corpus`` with the seeds' settings, then save it atomically to ``folder``."""
    for _ in _encoded(corpus):  # a bad document fails here, in one line, before minutes of indexing
        pass
    retriever = index(corpus, workers)
    save_index(retriever, corpus, folder, fingerprint)
    return BM25Index(retriever, corpus)


def save_index(retriever: bm25s.BM25, corpus: list[str], folder: Path, fingerprint: str) -> None:
    """Write the index, the documents and a meta.json naming what they were built from; all or nothing."""
    with atomic.atomic_dir(folder) as tmp:
        retriever.save(tmp, show_progress=False)
        DocStore.write(tmp, corpus)
        meta = {"format": INDEX_FORMAT, "fingerprint": fingerprint, "num_docs": len(corpus), "k1": K1, "b": B}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def load_index(folder: Path, fingerprint: str) -> BM25Index:
    """Reload a saved index with mmap; raises TutorialError if it is missing, stale or damaged.

    Temporary folders left beside it by a killed save are removed first.
    """
    folder = Path(folder)
    atomic.clean_stale(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        raise TutorialError(f"no index at {folder}: run 02_corpus_indexing to build it") from None
    except ValueError:
        raise TutorialError(f"index at {folder} is damaged (meta.json unreadable): run 02_corpus_indexing to rebuild it") from None
    if not isinstance(meta, dict):
        raise TutorialError(f"index at {folder} is damaged (meta.json holds no settings): run 02_corpus_indexing to rebuild it")
    if meta.get("format") != INDEX_FORMAT or meta.get("fingerprint") != fingerprint:
        raise TutorialError(f"index at {folder} was built from another corpus or version: run 02_corpus_indexing to rebuild it")
    try:
        retriever = bm25s.BM25.load(folder, mmap=True, show_progress=False)
        if not isinstance(retriever.vocab_dict, dict):
            raise ValueError("vocab.index.json holds no vocabulary")
        docs = DocStore(folder)
        if len(docs) != meta["num_docs"] or retriever.scores["num_docs"] != meta["num_docs"]:
            raise ValueError("document count does not match meta.json")
        _check_postings(retriever.scores, len(retriever.vocab_dict))
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, json.JSONDecodeError) as exc:
        raise TutorialError(f"index at {folder} is damaged ({exc}): run 02_corpus_indexing to rebuild it") from None
    return BM25Index(retriever, docs)


def _check_postings(scores: dict, vocab_size: int) -> None:
    """The posting lists fit together and name only existing documents (else a query reads outside memory)."""
    data, indices, indptr, num_docs = scores["data"], scores["indices"], scores["indptr"], scores["num_docs"]
    kinds = {"scores": (data, np.float32), "posting ids": (indices, np.int32), "posting-list pointers": (indptr, np.int64)}
    for what, (array, dtype) in kinds.items():  # what fast_index writes; anything else fails inside compiled code
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != 1:
            raise ValueError(f"the {what} are {getattr(array, 'dtype', type(array).__name__)} "
                             f"{getattr(array, 'shape', '')}, not a list of {np.dtype(dtype).name}")
    if indptr.ndim != 1 or len(indptr) != vocab_size or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ValueError("the posting-list pointers do not match the vocabulary")
    if not len(data) == len(indices) == indptr[-1]:
        raise ValueError(f"{len(indices):,} posting ids and {len(data):,} scores for {int(indptr[-1]):,} postings")
    if len(indices) and (indices.min() < 0 or indices.max() >= num_docs):
        raise ValueError(f"posting ids run from {int(indices.min()):,} to {int(indices.max()):,}, "
                         f"outside the {num_docs:,} documents")


def fingerprint(profile) -> str:
    """What the cached index must match: the corpus checksum (or URL) and the BM25 settings."""
    corpus_id = profile.corpus.sha256 or profile.corpus.url
    return f"{profile.name}:{corpus_id}:bm25s-{bm25s.__version__}:k1={K1}:b={B}"


def load_search(profile) -> Search:
    """The profile's search function: reload the cached index, or (re)build it if missing or damaged.

    Notebooks 03-06 call this; 02 shows the steps one by one.
    """
    from helpers.data import corpus, sources

    try:
        return Search(load_index(profile.index_dir, fingerprint(profile)))
    except TutorialError as exc:
        print(f"{exc} — building it now.")
    sources.prepare(profile)
    docs = corpus.load_abstracts(sources.corpus_file(profile, progress=False))
    return Search(build_index(docs, profile.index_dir, fingerprint(profile)))
