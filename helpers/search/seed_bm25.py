"""The seeds' BM25 code, kept as the reference the faster path must match (02_corpus_indexing, tests, benchmarks).

Same calls, same arguments as the seed tutorial: tokenize the whole corpus with ``bm25s.tokenize``,
index with ``BM25(k1=0.9, b=0.4)``, and tokenize each query again before ``retrieve(..., n_threads=1)``.
"""

import bm25s
import Stemmer


def build(corpus: list[str], k1: float = 0.9, b: float = 0.4) -> bm25s.BM25:
    stemmer = Stemmer.Stemmer("english")
    corpus_tokens = bm25s.tokenize(corpus, stopwords="en", stemmer=stemmer, show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(corpus_tokens, show_progress=False)
    return retriever


def search(retriever: bm25s.BM25, stemmer, query: str, k: int):
    """``(doc_indices, scores)`` for one query, exactly as the seed's ``search`` computes them."""
    tokens = bm25s.tokenize(query, stopwords="en", stemmer=stemmer, show_progress=False)
    results, scores = retriever.retrieve(tokens, k=k, n_threads=1, show_progress=False)
    return results[0], scores[0]
