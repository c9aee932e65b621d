"""BM25 the seeds' way, computed faster (used by retrieval, measured in 02_corpus_indexing and benchmarks/).

The seeds call ``bm25s.tokenize(corpus, stopwords="en", stemmer=...)`` then ``BM25(k1, b).index(...)``,
and per query ``bm25s.tokenize(query)`` then ``retrieve(..., n_threads=1)``. Each of those loops over
documents in Python. Here the same steps run on every core (tokenizing), in a compiled counting pass
plus vectorised NumPy (scoring) and in two small compiled loops (query scoring and top-k). The output is
the same: the same stems and float32 scores per (stem, document), and the same top-k with the same tie
order (higher score first, then lower document index). ``tests/test_retrieval.py`` checks this against
bm25s itself.

Memory while building: the kept stem ids (int32, 4 bytes a token) and the index itself (int32 document +
float32 score, 8 bytes a posting), plus bounded per-chunk and per-block scratch; no (stem, document)
pairs are ever sorted or held in int64.
"""

import itertools
import multiprocessing
import os
import re
import warnings
from collections import defaultdict
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
    words: dict[str, int] = defaultdict(itertools.count().__next__)  # a new word gets the next id, in C
    word_id = words.__getitem__
    lengths = np.empty(end - start, dtype=np.int64)
    ids: list[int] = []
    extend = ids.extend
    for i, doc in enumerate(_corpus_for_workers[start:end]):
        tokens = findall(doc.lower())
        lengths[i] = len(tokens)
        extend(map(word_id, tokens))
    return list(words), np.fromiter(ids, dtype=np.int32, count=len(ids)), lengths


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
    """What ``bm25s.tokenize(corpus, stopwords="en", stemmer=stemmer)`` computes, on ``workers`` processes.

    Each chunk is stemmed and stripped of stopwords as it arrives (new words stemmed once, in first-seen
    order, so stem ids are bm25s's), so only the kept stem ids (int32) of the whole corpus are ever held.
    """
    global _corpus_for_workers
    workers = workers or os.cpu_count() or 1
    _corpus_for_workers = corpus
    words: dict[str, int] = defaultdict(itertools.count().__next__)  # raw word -> id, in first-seen order
    word_id = words.__getitem__
    vocab: dict[str, int] = {}
    word_to_stem = np.zeros(0, dtype=np.int32)  # raw word id -> stem id, -1 for a stopword
    parts, lengths_kept = [], np.zeros(len(corpus), dtype=np.int64)
    done = 0
    try:
        for chunk_words, chunk_ids, chunk_lengths in _chunk_results(len(corpus), workers):
            seen = len(words)
            to_global = np.fromiter(map(word_id, chunk_words), dtype=np.int32, count=len(chunk_words))
            new_words = [chunk_words[i] for i in np.flatnonzero(to_global >= seen).tolist()]  # in first-seen order
            if new_words:
                new_stems = stemmer.stemWords(new_words)
                word_to_stem = np.concatenate([word_to_stem, np.fromiter(
                    (-1 if w in STOPWORDS else vocab.setdefault(st, len(vocab)) for w, st in zip(new_words, new_stems)),
                    dtype=np.int32, count=len(new_words))])
            stem_ids = word_to_stem[to_global[chunk_ids]]
            keep = stem_ids >= 0
            kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
            np.cumsum(keep, out=kept_before[1:])
            ends = np.cumsum(chunk_lengths)
            lengths_kept[done:done + len(chunk_lengths)] = kept_before[ends] - kept_before[ends - chunk_lengths]
            done += len(chunk_lengths)
            parts.append(stem_ids[keep])
    finally:
        _corpus_for_workers = []
    ids = np.empty(sum(len(part) for part in parts), dtype=np.int32)
    at = 0
    while parts:  # copy and free part by part: never the parts and the whole array twice over
        part = parts.pop(0)
        ids[at:at + len(part)] = part
        at += len(part)
    offsets = np.zeros(len(corpus) + 1, dtype=np.int64)
    np.cumsum(lengths_kept, out=offsets[1:])
    vocab[""] = len(vocab)
    return TokenizedCorpus(ids=ids, offsets=offsets, vocab=vocab)


@numba.njit(cache=True, nogil=True)
def _postings(ids, offsets, n_vocab):
    """CSC by stem of the (stem, document) term frequencies, by counting: no sort, no (stem, document) pairs.

    Pass 1 counts each stem's documents (``df``), which gives each stem's column; pass 2 walks the documents
    in order and appends each new (stem, document) to its column, so every column is sorted by document.
    ``tf`` is float32 (exact: a document has far fewer than 2**24 tokens) and becomes the score in place.
    """
    n_docs = len(offsets) - 1
    last = np.full(n_vocab, -1, dtype=np.int64)
    df = np.zeros(n_vocab, dtype=np.int64)
    for d in range(n_docs):
        for j in range(offsets[d], offsets[d + 1]):
            t = ids[j]
            if last[t] != d:
                last[t] = d
                df[t] += 1
    indptr = np.zeros(n_vocab + 1, dtype=np.int64)
    for t in range(n_vocab):
        indptr[t + 1] = indptr[t] + df[t]
    indices = np.empty(indptr[n_vocab], dtype=np.int32)
    tf = np.empty(indptr[n_vocab], dtype=np.float32)
    cursor = indptr[:n_vocab].copy()
    last[:] = -1
    for d in range(n_docs):
        for j in range(offsets[d], offsets[d + 1]):
            t = ids[j]
            if last[t] != d:
                last[t] = d
                indices[cursor[t]] = d
                tf[cursor[t]] = 1
                cursor[t] += 1
            else:
                tf[cursor[t] - 1] += 1
    return df, indptr, indices, tf


SCORE_BLOCK = 1 << 20  # postings scored per NumPy step: bounds the float64 temporaries (8 MB each)


def bm25_scores(tokens: TokenizedCorpus, k1: float, b: float, block: int = SCORE_BLOCK) -> dict:
    """bm25s's index (method "lucene", float32, CSC by stem) from tokenized documents, without a per-document loop.

    Memory: the postings are counted straight into their final arrays (int32 documents, float32 scores:
    8 bytes a posting), then scored ``block`` postings at a time; any ``block`` gives the same index.
    """
    n_docs, n_vocab = len(tokens.offsets) - 1, len(tokens.vocab) - 1  # "" has no column, as in bm25s
    if n_docs >= 2**31:
        raise ValueError(f"{n_docs:,} documents do not fit bm25s's int32 document ids")
    lengths = tokens.lengths
    df, indptr, indices, data = _postings(tokens.ids, tokens.offsets, n_vocab)
    # bm25s: idf in float64 (math.log), stored as float32; tf component in float64; product stored as float32
    idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
    avg_len = lengths.mean() if n_docs else np.float64(0)
    block = max(1, int(block))
    # whole stems per step: cut the columns where the running posting count crosses a multiple of block
    cuts = np.unique(np.searchsorted(indptr, np.arange(0, indptr[-1], block), side="right") - 1)
    for s0, s1 in zip(cuts.tolist(), cuts[1:].tolist() + [n_vocab]):
        a, z = int(indptr[s0]), int(indptr[s1])
        if a == z:
            continue
        stem = np.repeat(np.arange(s0, s1), df[s0:s1])
        doc = indices[a:z]
        tf32 = data[a:z]
        tfc = tf32 / (k1 * ((1 - b) + b * lengths[doc] / avg_len) + tf32)
        data[a:z] = (idf[stem] * tfc).astype(np.float32)
    return {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}


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
