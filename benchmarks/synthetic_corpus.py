"""A fast, deterministic stand-in for the 5M Wikipedia abstracts: same "title | text" strings, Zipfian words.

Abstract lengths follow a log-normal (median ~45 words, long tail to 400), the vocabulary has
``vocab_size`` made-up words ranked by a Zipf-Mandelbrot law, with bm25s's English stopwords as the most
frequent ranks, as in real text. Same (n_docs, seed) -> same corpus. Used by benchmarks/retrieval.py.
"""

import numpy as np
from bm25s.stopwords import STOPWORDS_EN

SYLLABLES = [c + v for c in "b c d f g h j k l m n p r s t v w z br st tr ch sh".split() for v in "a e i o u ai ou".split()]


def vocabulary(size: int, rng) -> np.ndarray:
    """Stopwords first (the most frequent ranks), then unique made-up words of 1-4 syllables."""
    words, seen = list(STOPWORDS_EN), set(STOPWORDS_EN)
    syl = np.array(SYLLABLES)
    while len(words) < size:
        n = size - len(words)
        counts = rng.integers(1, 5, size=n)
        picks = rng.integers(0, len(syl), size=(n, 4))
        for row, c in zip(picks, counts):
            w = "".join(syl[row[:c]])
            if w not in seen:
                seen.add(w)
                words.append(w)
    return np.array(words[:size], dtype=object)


def generate(n_docs: int, seed: int = 0, vocab_size: int = 300_000) -> list[str]:
    rng = np.random.default_rng(seed)
    words = vocabulary(vocab_size, rng)
    ranks = np.arange(1, vocab_size + 1)
    p = 1.0 / (ranks + 2.7) ** 1.07
    cdf = np.cumsum(p / p.sum())
    lengths = np.clip(rng.lognormal(np.log(45), 0.65, size=n_docs).astype(np.int64), 5, 400)
    ids = np.minimum(np.searchsorted(cdf, rng.random(int(lengths.sum()))), vocab_size - 1)
    title_ids = rng.integers(len(STOPWORDS_EN), vocab_size // 4, size=(n_docs, 2))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    docs = []
    for d in range(n_docs):
        title = f"{words[title_ids[d, 0]].capitalize()} {words[title_ids[d, 1]].capitalize()}"
        body = " ".join(words[ids[starts[d]:ends[d]]])
        docs.append(f"{title} | {title} is {body}.")
    return docs


def queries(docs: list[str], n: int, seed: int = 1) -> list[str]:
    """Queries like the tutorial's: 4-12 consecutive words from a random abstract."""
    rng = np.random.default_rng(seed)
    out = []
    for d in rng.integers(0, len(docs), size=n):
        text = docs[d].split(" | ", 1)[1].split()
        size = int(rng.integers(4, 13))
        start = int(rng.integers(0, max(1, len(text) - size)))
        out.append(" ".join(text[start:start + size]))
    return out
