"""BM25 the seeds' way, computed faster (used by retrieval, measured in 02_corpus_indexing and benchmarks/).

The seeds call ``bm25s.tokenize(corpus, stopwords="en", stemmer=...)`` then ``BM25(k1, b).index(...)``,
and per query ``bm25s.tokenize(query)`` then ``retrieve(..., n_threads=1)``. Each of those loops over
documents in Python. Here the same steps run on every core (tokenizing), in vectorised NumPy (scoring)
and in two small compiled loops (query scoring and top-k). The output is the same: the same stems and
float32 scores per (stem, document), and the same top-k with the same tie order (higher score first,
then lower document index). ``tests/test_retrieval.py`` checks this against bm25s itself.
"""

import multiprocessing
import os
import re
import warnings
from dataclasses import dataclass

import numba
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")  # bm25s.tokenize's default (scikit-learn's) pattern
STOPWORDS = frozenset(STOPWORDS_EN)
CHUNK_DOCS = 20_000
PARALLEL_FROM_DOCS = 100_000  # below this, starting worker processes costs more than it saves

_corpus_for_workers: list[str] = []  # set before forking, so workers read it without pickling


@dataclass
class TokenizedCorpus:
    """Stem ids of every document, flattened: ``ids[offsets[d]:offsets[d + 1]]`` is document ``d``."""

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, len = documents + 1
    vocab: dict  # stem -> id, as bm25s stores it (plus "" last, bm25s's empty-query token)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _tokenize_range(bounds):
    """Raw (unstemmed, stopwords kept) word ids of documents ``start:end``, with the chunk's own word list."""
    start, end = bounds
    findall = TOKEN_PATTERN.findall
    words: dict[str, int] = {}
    add = words.setdefault
    lengths = np.empty(end - start, dtype=np.int64)
    ids: list[int] = []
    for i, doc in enumerate(_corpus_for_workers[start:end]):
        tokens = findall(doc.lower())
        lengths[i] = len(tokens)
        ids.extend([add(t, len(words)) for t in tokens])
    return list(words), np.array(ids, dtype=np.int32), lengths


def _chunk_results(n_docs: int, workers: int):
    bounds = [(s, min(s + CHUNK_DOCS, n_docs)) for s in range(0, n_docs, CHUNK_DOCS)]
    if workers > 1 and n_docs >= PARALLEL_FROM_DOCS and "fork" in multiprocessing.get_all_start_methods():
        with warnings.catch_warnings():
            # JAX (imported by bm25s) warns on every fork; the workers only run regex and NumPy, never JAX.
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            pool = multiprocessing.get_context("fork").Pool(workers)
        with pool:
            yield from pool.imap(_tokenize_range, bounds)
    else:
        yield from map(_tokenize_range, bounds)


def tokenize(corpus: list[str], stemmer, workers: int | None = None) -> TokenizedCorpus:
    """What ``bm25s.tokenize(corpus, stopwords="en", stemmer=stemmer)`` computes, on ``workers`` processes."""
    global _corpus_for_workers
    workers = workers or os.cpu_count() or 1
    _corpus_for_workers = corpus
    try:
        words: dict[str, int] = {}
        add = words.setdefault
        parts, lengths = [], []
        for chunk_words, chunk_ids, chunk_lengths in _chunk_results(len(corpus), workers):
            to_global = np.fromiter((add(w, len(words)) for w in chunk_words), dtype=np.int32, count=len(chunk_words))
            parts.append(to_global[chunk_ids])
            lengths.append(chunk_lengths)
    finally:
        _corpus_for_workers = []
    raw_ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    raw_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)

    word_list = list(words)
    stems = stemmer.stemWords(word_list)
    vocab: dict[str, int] = {}
    word_to_stem = np.fromiter(
        (-1 if w in STOPWORDS else vocab.setdefault(s, len(vocab)) for w, s in zip(word_list, stems)),
        dtype=np.int32, count=len(word_list))
    stem_ids = word_to_stem[raw_ids]
    keep = stem_ids >= 0
    doc_of_token = np.repeat(np.arange(len(raw_lengths)), raw_lengths)
    lengths_kept = np.bincount(doc_of_token[keep], minlength=len(raw_lengths))
    offsets = np.zeros(len(raw_lengths) + 1, dtype=np.int64)
    np.cumsum(lengths_kept, out=offsets[1:])
    vocab[""] = len(vocab)
    return TokenizedCorpus(ids=stem_ids[keep], offsets=offsets, vocab=vocab)


def bm25_scores(tokens: TokenizedCorpus, k1: float, b: float) -> dict:
    """bm25s's index (method "lucene", float32, CSC by stem) from tokenized documents, without a per-document loop."""
    n_docs, n_vocab = len(tokens.offsets) - 1, len(tokens.vocab) - 1  # "" has no column, as in bm25s
    lengths = tokens.lengths
    doc_of_token = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)
    pairs, tf = np.unique(tokens.ids.astype(np.int64) * max(n_docs, 1) + doc_of_token, return_counts=True)
    stem, doc = np.divmod(pairs, max(n_docs, 1))
    df = np.bincount(stem, minlength=n_vocab)
    # bm25s: idf in float64 (math.log), stored as float32; tf component in float64; product stored as float32
    idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
    avg_len = lengths.mean() if n_docs else np.float64(0)
    tf32 = tf.astype(np.float32)
    tfc = tf32 / (k1 * ((1 - b) + b * lengths[doc] / avg_len) + tf32)
    indptr = np.zeros(n_vocab + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    return {"data": (idf[stem] * tfc).astype(np.float32), "indices": doc.astype(np.int32), "indptr": indptr,
            "num_docs": n_docs}


def query_ids(query: str, stemmer, vocab: dict) -> list[int]:
    """The query's stem ids, as the seeds' per-query ``bm25s.tokenize`` + ``retrieve`` would look them up."""
    words = [w for w in TOKEN_PATTERN.findall(query.lower()) if w not in STOPWORDS]
    ids = [vocab[s] for s in stemmer.stemWords(words) if s in vocab]
    return ids or [vocab[""]]


@numba.njit(cache=True, nogil=True)
def _scores(data, indices, indptr, num_docs, ids):
    scores = np.zeros(num_docs, dtype=np.float32)
    n_columns = len(indptr) - 1
    for t in ids:
        if 0 <= t < n_columns:  # "" has no column: an empty query scores every document 0
            for j in range(indptr[t], indptr[t + 1]):
                d = indices[j]
                if 0 <= d < num_docs:  # load_index refuses such an index; never write outside the array
                    scores[d] += data[j]
    return scores


@numba.njit(cache=True, nogil=True)
def _top_k(scores, k):
    """Indices of the k highest scores, higher first, ties to the lower index (jax.lax.top_k's order)."""
    k = max(0, min(k, len(scores)))
    best = np.empty(k, dtype=np.int64)
    if k == 0:  # best[k - 1] below would read before the array
        return best
    filled = 0
    for i in range(len(scores)):
        s = scores[i]
        if filled == k and s <= scores[best[k - 1]]:
            continue
        j = filled if filled < k else k - 1
        while j > 0 and scores[best[j - 1]] < s:
            best[j] = best[j - 1]
            j -= 1
        best[j] = i
        if filled < k:
            filled += 1
    return best


def top_k(scores_index: dict, ids: list[int], k: int):
    """``(doc_indices, scores)`` of the k best documents for stem ``ids`` (releases the GIL while scoring).

    ``k`` of 0 gives empty arrays; a larger ``k`` than there are documents gives every document.
    """
    s = scores_index
    scores = _scores(s["data"], s["indices"], s["indptr"], s["num_docs"], np.asarray(ids, dtype=np.int64))
    best = _top_k(scores, k)
    return best, scores[best]


def warm_up() -> None:
    """Compile (or load from numba's cache) the two loops once, so the first real query is not slow."""
    index = {"data": np.ones(1, np.float32), "indices": np.zeros(1, np.int32), "indptr": np.array([0, 1], np.int64),
             "num_docs": 1}
    top_k(index, [0], 1)
