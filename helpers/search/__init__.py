"""BM25 search over the abstracts: the seed's ``search(query, k)`` over a fast, cached index, and the seeds' code (02)."""
