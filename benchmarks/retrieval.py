"""Retrieval: the seeds' BM25 code vs ``helpers`` on synthetic corpora, plus a rank_bm25 peer check.

Run: python benchmarks/retrieval.py [--sizes 100000 1000000] [--full] [--queries 300] [--no-peer]
Each (pipeline, size) runs in a fresh process, so its peak memory is its own; the corpus is generated
inside it (same seed, same corpus) and is not timed. Memory is the peak RSS above the RSS with the corpus
loaded, per phase (the kernel's high-water mark is reset between phases; where it cannot be, the process's
peak so far). A tokenizing worker's RSS is given whole: it counts the corpus pages it shares with the
parent from the fork, so it is not "above the corpus". The seeds' code has no save/reload: every kernel
restart rebuilds, so its "reload" is its build. Ratios (ours / seeds') come last; lower is better.
"""

import argparse
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_args import whole  # noqa: E402
from helpers.util.timing import process_memory_mb  # noqa: E402

TARGETS = {"build": 0.5, "query_single": 0.3, "build_memory": 1.0}
RELOAD_TARGET_S = 1.0


def _rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


class PhasePeaks:
    """Peak RSS of each phase above the RSS with the corpus loaded (``/proc/self/clear_refs`` resets the peak)."""

    def __init__(self):
        import gc

        gc.collect()
        self.base = process_memory_mb("VmRSS") or _rss_mb()
        self.peaks: dict[str, float] = {}
        self.highest = 0.0  # absolute, over all phases
        self.resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return process_memory_mb("VmHWM") is not None
        except OSError:
            return False

    def end(self, phase: str) -> None:
        peak = process_memory_mb("VmHWM") if self.resettable else None
        peak = peak if peak is not None else _rss_mb()
        self.peaks[phase] = peak - self.base
        self.highest = max(self.highest, peak)
        if self.resettable:
            self._reset()


def _corpus(n_docs, n_queries):
    import synthetic_corpus

    docs = synthetic_corpus.generate(n_docs)
    return docs, synthetic_corpus.queries(docs, n_queries)


def measure(pipeline: str, n_docs: int, n_queries: int) -> dict:
    """Build, (save, reload,) query: seconds, peak RSS above the corpus, and each query's top-4 ids."""
    import bm25s
    import Stemmer

    from helpers.search import retrieval, seed_bm25

    docs, queries = _corpus(n_docs, n_queries)
    rss_corpus = _rss_mb()
    phases = PhasePeaks()
    out = {"pipeline": pipeline, "docs": n_docs}
    start = time.perf_counter()
    if pipeline == "seeds":
        retriever = seed_bm25.build(docs)
        out["build"] = time.perf_counter() - start
        phases.end("build")
        out["reload"] = out["build"]
        stemmer = Stemmer.Stemmer("english")
        seed_bm25.search(retriever, stemmer, queries[0], 4)  # same warm-up as ours: first call pays imports/JIT
        start = time.perf_counter()
        top = [seed_bm25.search(retriever, stemmer, q, 4)[0].tolist() for q in queries]
        out["query_single"] = (time.perf_counter() - start) / len(queries)
        start = time.perf_counter()
        tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, show_progress=False)
        retriever.retrieve(tokens, k=4, n_threads=1, show_progress=False)
        out["query_batched"] = (time.perf_counter() - start) / len(queries)
        phases.end("query")
    else:
        retriever = retrieval.index(docs)
        out["build"] = time.perf_counter() - start
        phases.end("build")
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            retrieval.save_index(retriever, docs, Path(folder) / "index", "bench")
            out["save"] = time.perf_counter() - start
            phases.end("save")
            del retriever
            start = time.perf_counter()
            search = retrieval.load_index(Path(folder) / "index", "bench")  # includes the numba warm-up
            out["reload"] = time.perf_counter() - start
            search.top_k(queries[0], 4)
            start = time.perf_counter()
            top = [search.top_k(q, 4)[0].tolist() for q in queries]
            out["query_single"] = (time.perf_counter() - start) / len(queries)
            start = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:  # the scoring loops release the GIL, as under DSPy's threads
                list(pool.map(lambda q: search.top_k(q, 4), queries))
            out["query_batched"] = (time.perf_counter() - start) / len(queries)
            del search
        phases.end("reload+query")
    out["top"] = top
    out["rss_mb"] = max(phases.peaks.values())
    out["rss_phases_mb"] = phases.peaks
    out["rss_mb_old"] = max(phases.highest, rss_corpus) - rss_corpus  # earlier measure: above the generator's peak
    out["rss_workers_mb"] = _rss_mb(resource.RUSAGE_CHILDREN)  # the largest worker's whole RSS (see above)
    return out


def peer_check(n_docs: int, n_queries: int) -> dict:
    """rank_bm25 (BM25Okapi) vs bm25s method="robertson", same tokens, same k1/b: latency and top-10 overlap."""
    import bm25s
    import numpy as np
    import Stemmer
    from rank_bm25 import BM25Okapi

    docs, queries = _corpus(n_docs, n_queries)
    stemmer = Stemmer.Stemmer("english")
    tokens = bm25s.tokenize(docs, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    query_tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    start = time.perf_counter()
    peer = BM25Okapi(tokens, k1=0.9, b=0.4)
    peer_build = time.perf_counter() - start
    start = time.perf_counter()
    peer_top = [np.argsort(-peer.get_scores(q), kind="stable")[:10].tolist() for q in query_tokens]
    peer_query = (time.perf_counter() - start) / len(queries)
    ours = bm25s.BM25(k1=0.9, b=0.4, method="robertson")
    start = time.perf_counter()
    ours.index(tokens, show_progress=False)
    ours_build = time.perf_counter() - start
    start = time.perf_counter()
    ours_top = [ours.retrieve([q], k=10, show_progress=False)[0][0].tolist() for q in query_tokens]
    ours_query = (time.perf_counter() - start) / len(queries)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(peer_top, ours_top)])
    return {"docs": n_docs, "peer_build": peer_build, "peer_query": peer_query, "bm25s_build": ours_build,
            "bm25s_query": ours_query, "top10_overlap": overlap}


def run_isolated(fn, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=whole(10), nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--full", action="store_true", help="add the real corpus size, 5M documents (~20 GB RAM)")
    parser.add_argument("--queries", type=whole(1), default=300)
    parser.add_argument("--no-peer", action="store_true", help="skip the rank_bm25 check (pip install rank-bm25)")
    args = parser.parse_args()
    sizes = args.sizes + ([5_000_000] if args.full else [])
    print(f"retrieval benchmark · synthetic corpus · {args.queries} queries, k=4 · sizes {sizes}", flush=True)
    rows = []
    for n in sizes:
        seeds = run_isolated(measure, "seeds", n, args.queries)
        ours = run_isolated(measure, "helpers", n, args.queries)
        same = sum(a == b for a, b in zip(seeds.pop("top"), ours.pop("top")))
        for r in (seeds, ours):
            print(f"  {n:>9,} docs · {r['pipeline']:7} build {r['build']:7.2f} s · reload {r['reload']:7.3f} s · "
                  f"query {1000 * r['query_single']:6.2f} ms single, {1000 * r['query_batched']:6.2f} ms batched · "
                  f"peak RSS +{r['rss_mb']:.0f} MB ("
                  + ", ".join(f"{k} +{v:.0f}" for k, v in r["rss_phases_mb"].items())
                  + f"; largest worker {r['rss_workers_mb']:.0f} MB in all"
                  + f"; earlier measure +{r['rss_mb_old']:.0f})"
                  + (f" · save {r['save']:.2f} s" if "save" in r else ""), flush=True)
        print(f"  {n:>9,} docs · identical top-4 for {same}/{args.queries} queries", flush=True)
        rows.append((n, seeds, ours, same))
    if not args.no_peer:
        peer = run_isolated(peer_check, 100_000, 100)
        print(f"  peer check at {peer['docs']:,} docs: rank_bm25 build {peer['peer_build']:.1f} s, "
              f"query {1000 * peer['peer_query']:.1f} ms · bm25s(robertson) build {peer['bm25s_build']:.1f} s, "
              f"query {1000 * peer['bm25s_query']:.2f} ms · top-10 overlap {100 * peer['top10_overlap']:.1f}% · "
              f"bm25s is {peer['peer_query'] / peer['bm25s_query']:.0f}x faster per query")
    print("ratios, helpers / seeds' code (lower is better):")
    for n, seeds, ours, same in rows:
        checks = [f"build {ours['build'] / seeds['build']:.2f} (target <= {TARGETS['build']})",
                  f"query {ours['query_single'] / seeds['query_single']:.2f} (target <= {TARGETS['query_single']})",
                  f"batched {ours['query_batched'] / seeds['query_batched']:.2f}",
                  f"build memory {ours['rss_phases_mb']['build'] / seeds['rss_phases_mb']['build']:.2f} "
                  f"(target <= {TARGETS['build_memory']})",
                  f"reload {ours['reload']:.2f} s vs {seeds['reload']:.1f} s rebuild (target <= {RELOAD_TARGET_S} s)",
                  f"same results {same}/{args.queries}"]
        print(f"  {n:>9,} docs: " + " · ".join(checks))


if __name__ == "__main__":
    main()
