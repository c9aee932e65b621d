"""Embedded LM throughput: single-stream vs one batched generate vs 8 concurrent DSPy calls (dynamic batching).

Run: python benchmarks/lm_throughput.py [--tokens 64] [--prompts 8]
Prints the cold (GGUF) vs cached load time, the three throughputs on the same prompts, llama-cpp-python on
the same GGUF when it happens to be installed (never a dependency), and the ratio last.
"""

import argparse
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from helpers import local_lm  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="lm-bench-")
    try:
        _, _, cold = local_lm.load_model(cache)
        model, tok, warm = local_lm.load_model(cache)
        print(f"load: cold (GGUF parse + convert) {cold.seconds:.1f} s · cached safetensors {warm.seconds:.1f} s")
        import dspy

        logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)  # replies cut at --tokens are expected

        engine = local_lm.BatchingEngine(model, tok)
        lm = dspy.LM("local/bench", engine=engine, temperature=0.0, max_tokens=args.tokens, cache=False)
        prompts = [f"Write a short paragraph about town number {i} and its river." for i in range(args.prompts)]
        greedy = local_lm.Sampling(0.0, 1.0, 0, args.tokens)
        engine.generate([[{"role": "user", "content": "warm up"}]], local_lm.Sampling(0.0, 1.0, 0, 4))

        start = time.perf_counter()
        single_tokens = sum(engine.generate([[{"role": "user", "content": p}]], greedy)[0][2] for p in prompts)
        single = single_tokens / (time.perf_counter() - start)

        start = time.perf_counter()
        batch_tokens = sum(r[2] for r in engine.generate([[{"role": "user", "content": p}] for p in prompts], greedy))
        one_batch = batch_tokens / (time.perf_counter() - start)

        before, tokens_before = len(engine.stats.batch_sizes), engine.stats.generated_tokens
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: lm(p), prompts))
        batched = (engine.stats.generated_tokens - tokens_before) / (time.perf_counter() - start)
        print(f"single-stream generate: {single:.1f} tok/s ({single_tokens} tokens)")
        print(f"one batched generate of {len(prompts)}: {one_batch:.1f} tok/s ({batch_tokens} tokens)")
        llama_cpp_peer(prompts, args.tokens)
        print(f"8 concurrent DSPy calls: {batched:.1f} tok/s, batch sizes {engine.stats.batch_sizes[before:]}")
        print(f"ratio concurrent/single: {batched / single:.2f}x (target >= 3x)")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def llama_cpp_peer(prompts, max_tokens):
    """Single-stream tok/s of llama-cpp-python on the same GGUF file, if it is installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python: not installed, peer comparison skipped (optional: pip install llama-cpp-python)")
        return
    llm = Llama(model_path=str(local_lm.gguf_folder() / local_lm.GGUF_FILE), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    start, tokens = time.perf_counter(), 0
    for p in prompts:
        out = llm.create_chat_completion([{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0.0)
        tokens += out["usage"]["completion_tokens"]
    print(f"llama-cpp-python single-stream: {tokens / (time.perf_counter() - start):.1f} tok/s ({tokens} tokens)")


if __name__ == "__main__":
    main()
