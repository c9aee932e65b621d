"""Embedded LM: the tutorial's workload on the reference engine vs the engine, then single-stream vs batched throughput.

Run: python benchmarks/lm_throughput.py [--claims 24] [--rollouts 3x6] [--no-found] [--tokens 64] [--prompts 8]
[--beside-busy 12]
First, in a child process, sharing the machine: a greedy evaluation of ``--beside-busy`` dev claims alone, beside one
process that keeps a core busy, and alone again (``beside_busy``; goal <= 2.5x alone).
Then the workload, in one process: a greedy ResearchHop evaluation of ``--claims`` dev claims (same per-claim
results required) and one GRPO step's rollouts (claims x rollouts programs, sampled), "before" (the reference engine:
static batches gathered for 50 ms, one ``model.generate`` each, every prompt prefilled in full; see
``serve_static_batches``) and "after" (continuous batching and prefix reuse), with prompt tokens computed vs
reused, decode tokens and rows per decode step. Unless ``--no-found``, also the evaluation on the reference engine
(commit 282e64c's engine) in a child process whose OpenMP threads sleep at once (that engine's setting), and the same
evaluation on the engine in another child process: the two processes' peak memory side by side. Then the cold (GGUF) vs
cached load time and single-stream / one batched generate / 8 concurrent DSPy calls on short prompts, with
llama-cpp-python on the same GGUF when it happens to be installed (never a dependency).
llama.cpp on the same work (``pip install -e ".[bench]"`` builds llama-cpp-python: 33 min niced beside other work
here, unmeasured alone): the very calls of that
evaluation (the engine's prompt token ids, as many greedy tokens as the engine decoded) replayed one by one in
llama.cpp on the same GGUF, reusing the previous call's KV prefix; its prefill and decode tok/s, and the engine's
speed on the same work as a ratio (goal >= 0.5x). A single-stream replay, not llama.cpp's best: one KV sequence, no
AMX / repacked weights (see ``_llama``), and calls that ended on end-of-text get one decode step fewer than the engine ran.
"""

import argparse
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from bench_args import grid, whole  # noqa: E402
from helpers import bootstrap  # noqa: E402

bootstrap.configure_threads()

from helpers.engine import local_lm  # noqa: E402
from helpers.util import timing  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=whole(1), default=64)
    parser.add_argument("--prompts", type=whole(1), default=8)
    parser.add_argument("--claims", type=whole(0), default=24, help="dev claims of the evaluation workload (0: skip it)")
    parser.add_argument("--rollouts", type=grid, default="3x6", help="claims x rollouts of the GRPO rollout workload")
    parser.add_argument("--found", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the evaluation on the reference engine (282e64c), in a child process (threads sleeping)")
    parser.add_argument("--beside-busy", type=whole(0), default=12, metavar="CLAIMS",
                        help="time a greedy evaluation of CLAIMS dev claims alone and beside one busy process (0: skip)")
    parser.add_argument("--child", choices=("found", "now", "busy"), help=argparse.SUPPRESS)  # the child processes below
    args = parser.parse_args()
    if args.child == "busy":
        return beside_busy(args.claims)
    if args.child:
        return child_evaluation(args.claims, args.child)
    if args.beside_busy:  # in a child process: its engine must not share this process's threads or caches
        run_beside_busy(args.beside_busy)
    if args.claims:  # first: the short runs below (llama.cpp's above all) measurably slowed what ran after them
        workload(args.claims, *args.rollouts, found=args.found)
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


def _setup():
    import dspy

    from helpers.data import hover, sources
    from helpers.program import adapter_choice, lm_setup
    from helpers.search import retrieval

    profile = bootstrap.start("mini")
    sources.prepare(profile)
    search = retrieval.load_search(profile)
    train, dev, _ = hover.seed_splits(profile)
    engine = lm_setup.embedded_engine(profile)
    greedy_lm = lm_setup.make_lm(profile, temperature=0.0, cache=False)
    dspy.configure(lm=greedy_lm, adapter=adapter_choice.chosen_adapter(profile))
    return profile, search, train, dev, engine


def serve_static_batches(self, waiting):
    """The reference engine's serving, swapped into an engine by ``use_reference_serving``: the calls that arrive
    within 50 ms form a static batch per sampling setting, run by one ``model.generate`` with every prompt prefilled
    in full (``BatchingEngine.generate_reference``)."""
    deadline = time.monotonic() + 0.05
    while len(waiting) < self.max_batch:
        try:
            job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if job is local_lm._STOP:  # the engine is stopping: serve what is here, then end
            self._stopping = True
            break
        waiting.append(job)
    batch, waiting[:] = waiting[: self.max_batch], waiting[self.max_batch:]
    groups = {}
    for job in batch:
        groups.setdefault((job.sampling, job.stop), []).append(job)
    for jobs in groups.values():
        try:
            results = self._reference([local_lm.prompt_ids(self.tokenizer, j.messages) for j in jobs], jobs[0].sampling,
                                      [j.stop for j in jobs])
        except BaseException as exc:
            for job in jobs:
                job.future.set_exception(exc)
            continue
        for job, result in zip(jobs, results):
            job.future.set_result(result)


def use_reference_serving(engine, on: bool) -> None:
    """``on``: ``engine`` serves its calls as the reference engine does (``serve_static_batches``); off: its own way."""
    if on:
        engine._serve = types.MethodType(serve_static_batches, engine)
    else:
        engine.__dict__.pop("_serve", None)


def child_evaluation(claims: int, kind: str):
    """The evaluation alone in this (child) process, and the process's peak memory.

    ``kind="found"``: on the reference engine, 282e64c's (static batches of ``model.generate``, every prompt prefilled
    in full, and, set by the parent, OpenMP threads that sleep at once: OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=0).
    ``kind="now"``: on the engine (prefix cache, packed weights where they are used).
    """
    from helpers.program import evaluation
    from helpers.program.research_hop import ResearchHop

    profile, search, _, dev, engine = _setup()
    use_reference_serving(engine, kind == "found")
    report = evaluation.run_eval(ResearchHop(4, 2, search), dev[:claims], profile.eval_threads)
    print("child:", json.dumps({"seconds": report.seconds, "recall": list(report.per_claim["recall"]),
                                "peak_mb": _own_peak_mb(),
                                "cache_mb": engine.prefix_cache.stats.megabytes,
                                "packed_mb": engine.packed.bytes / 2**20 if engine.packed else 0.0,
                                "loaded_from": engine.load_info.source}))


def beside_busy(claims: int):
    """The evaluation alone, beside one process that keeps a core busy, and alone again (same process, same claims).

    A learner's laptop runs other work beside JupyterLab: beside one busy process a fair share of 2 cores is 2x the
    time alone. Goal <= 2.5x, with the time alone no worse.
    """
    from helpers.program import evaluation
    from helpers.program.research_hop import ResearchHop

    profile, search, _, dev, engine = _setup()
    program, claims_set = ResearchHop(4, 2, search), dev[:claims]
    evaluation.run_eval(program, dev[claims: claims + 2], profile.eval_threads)  # warm-up: packed weights, kernels
    runs = {}
    for label in ("alone", "beside one busy process", "alone again"):
        engine.weights_changed(base=False)  # no prefix states carried from the run before
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if "busy" in label else None
        try:
            runs[label] = evaluation.run_eval(program, claims_set, profile.eval_threads)
        finally:
            if busy:
                busy.kill()
                busy.wait()
    alone = min(runs["alone"].seconds, runs["alone again"].seconds)
    same = len({tuple(r.per_claim["recall"]) for r in runs.values()}) == 1
    print("beside-busy: " + json.dumps({"cpus": os.cpu_count(), "claims": claims, "same_recall": same,
                                        **{k: round(r.seconds, 2) for k, r in runs.items()},
                                        "ratio": round(runs["beside one busy process"].seconds / alone, 2)}))


def run_beside_busy(claims: int):
    """``beside_busy`` in a child process; prints its seconds per claim and the ratio (goal <= 2.5x)."""
    out = subprocess.run([sys.executable, __file__, "--child", "busy", "--claims", str(claims)],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(next(line for line in out.splitlines() if line.startswith("beside-busy: "))[len("beside-busy: "):])
    print(f"sharing the machine ({r['cpus']} CPUs), greedy evaluation of {claims} claims: alone "
          f"{r['alone']:.1f} s / {r['alone again']:.1f} s, beside one busy process {r['beside one busy process']:.1f} s "
          f"-> {r['ratio']:.2f}x alone (fair share {r['cpus'] / max(1, r['cpus'] - 1):.1f}x, goal <= 2.5x); "
          f"same per-claim recall: {r['same_recall']}")


def _own_peak_mb() -> float:
    """This process's peak RSS (VmHWM; ``ru_maxrss`` would keep the parent's peak from before the exec; it is the
    fallback where there is no /proc, in bytes on macOS)."""
    peak = timing.process_memory_mb("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return peak


def run_child(claims: int, kind: str) -> dict:
    """``child_evaluation`` in a child process (thread settings only count before torch loads)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"} if kind == "found" else None
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--claims", str(claims)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("child: "))[len("child: "):])


def workload(claims: int, rollout_claims: int, rollouts: int, found: bool = True):
    """The tutorial's own LM work, before (no prefix reuse) and after, in this process."""
    import dspy

    from helpers.engine import weight_packing
    from helpers.program import evaluation, lm_setup
    from helpers.program.research_hop import ResearchHop

    # first, while this process holds no model: the reference engine, then the engine (the same evaluation, for peak memory)
    found, now = (run_child(claims, "found"), run_child(claims, "now")) if found else (None, None)
    if found and found["loaded_from"] != "cache":  # it converted the GGUF first, which added to its peak memory
        found = run_child(claims, "found")
    profile, search, train, dev, engine = _setup()
    sampled_lm = lm_setup.make_lm(profile, temperature=0.7, cache=False)
    calls = []  # (prompt ids, tokens decoded) of every call of the "after" evaluation, for llama.cpp's replay

    def recorded(row, reply):
        calls.append((row.prompt_ids, reply[2]))

    timings = {}
    for mode in ("before", "after"):
        use_reference_serving(engine, mode == "before")
        engine.weights_changed()
        stats, tokens = engine.prefix_cache.stats, engine.stats.generated_tokens
        computed, reused, prefilled = stats.computed_tokens, stats.reused_tokens, engine.stats.reference_prompt_tokens
        lm_seconds, steps, rows = engine.stats.generate_seconds, engine.stats.decode_steps, engine.stats.decode_rows
        listening = [recorded] if mode == "after" else []
        engine.listeners.extend(listening)
        try:
            report = evaluation.run_eval(ResearchHop(4, 2, search), dev[:claims], profile.eval_threads)
        finally:
            for listener in listening:
                engine.listeners.remove(listener)
        lm_seconds = engine.stats.generate_seconds - lm_seconds  # inside the engine (no retrieval, no DSPy)
        steps, rows = engine.stats.decode_steps - steps, engine.stats.decode_rows - rows
        start = time.perf_counter()
        with dspy.context(lm=sampled_lm):
            rollout_set = [ex for ex in train[:rollout_claims] for _ in range(rollouts)]
            dspy.Evaluate(devset=rollout_set, metric=lambda *a: 0.0, num_threads=profile.eval_threads,
                          display_progress=False, max_errors=len(rollout_set) + 1)(ResearchHop(4, 2, search))
        rollout_seconds = time.perf_counter() - start
        timings[mode] = (report, rollout_seconds, lm_seconds)
        label = "before (static batches, full prefill)" if mode == "before" else "after (continuous batching, prefix reuse)"
        print(f"{label}: evaluation of {claims} claims {report.seconds:.1f} s "
              f"({report.seconds / claims:.2f} s/claim, recall {report.score:.2f}%), rollouts of "
              f"{rollout_claims}x{rollouts} programs {rollout_seconds:.1f} s; prompt tokens computed "
              f"{stats.computed_tokens - computed + engine.stats.reference_prompt_tokens - prefilled}, "
              f"reused {stats.reused_tokens - reused}; decode tokens "
              f"{engine.stats.generated_tokens - tokens}" + (f"; evaluation decode steps {steps}, "
              f"{rows / steps:.1f} rows per step" if steps else ""))
    use_reference_serving(engine, False)
    (b, b_roll, _), (a, a_roll, a_lm) = timings["before"], timings["after"]
    same = list(b.per_claim["recall"]) == list(a.per_claim["recall"])
    print(f"ratio after/before: evaluation {a.seconds / b.seconds:.2f}x per claim (target <= 0.33x), "
          f"same per-claim recall: {same}; rollout phase {a_roll / b_roll:.2f}x (target <= 0.33x); "
          f"cache {engine.prefix_cache.stats.megabytes:.0f} MB of {engine.prefix_cache.budget_bytes / 2**20:.0f} MB; "
          f"weights packed for oneDNN: " + (f"yes ({engine.packed.bytes / 2**20:.0f} MB)" if engine.packed else
                                            f"no ({weight_packing.cpu_vendor() or 'unknown'} CPU)"))
    if found:
        print(f"the reference engine, 282e64c (static batches, full prefill, threads sleeping at once; child process): "
              f"evaluation {found['seconds']:.1f} s ({found['seconds'] / claims:.2f} s/claim), same per-claim recall: "
              f"{found['recall'] == list(a.per_claim['recall'])}; after/found {a.seconds / found['seconds']:.2f}x "
              f"(target <= 0.33x)")
        print(f"peak memory of a process that loads the model and evaluates {claims} claims: reference "
              f"{found['peak_mb']:.0f} MB, now {now['peak_mb']:.0f} MB (cache {now['cache_mb']:.0f} MB, packed weights "
              f"{now['packed_mb']:.0f} MB), {now['peak_mb'] - found['peak_mb']:+.0f} MB (target <= +1024 MB); same "
              f"per-claim recall: {now['recall'] == found['recall']}")
    llama_cpp_workload(calls, a.seconds, a_lm, claims)


def llama_cpp_workload(calls, engine_seconds, engine_lm_seconds, claims):
    """Replay the evaluation's calls in llama.cpp, one by one, its KV prefix kept between calls (single stream)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print('llama.cpp replay: llama-cpp-python not installed (pip install -e ".[bench]" builds it), skipped')
        return
    llm = _llama(Llama, n_ctx=max(len(p) + n for p, n in calls) + 16)
    prefill_s = decode_s = 0.0
    computed = reused = decoded = 0
    for prompt, n_out in calls:
        keep = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], prompt[:-1]):  # the last prompt token is always evaluated
            if a != b:
                break
            keep += 1
        llm.n_tokens = keep  # eval() drops the KV cells past n_tokens
        start = time.perf_counter()
        llm.eval(prompt[keep:])
        middle = time.perf_counter()
        for i in range(n_out):
            token = llm.sample(temp=0.0)
            if i < n_out - 1:
                llm.eval([token])
        decode_s += time.perf_counter() - middle
        prefill_s += middle - start
        computed, reused, decoded = computed + len(prompt) - keep, reused + keep, decoded + n_out
    total = prefill_s + decode_s
    print(f"llama.cpp single-stream replay, the same {len(calls)} calls of the {claims}-claim evaluation one by one: prefill "
          f"{computed} tokens ({reused} reused) at {computed / prefill_s:.0f} tok/s, decode {decoded} tokens at "
          f"{decoded / decode_s:.1f} tok/s, {total:.1f} s in all; the engine: {engine_lm_seconds:.1f} s inside generate, "
          f"{engine_seconds:.1f} s for the whole evaluation -> engine speed {total / engine_lm_seconds:.2f}x llama.cpp's "
          f"on the LM work, {total / engine_seconds:.2f}x counting retrieval and DSPy (goal >= 0.5x)")


def _llama(Llama, n_ctx):
    """llama.cpp on the engine's GGUF (Q4_1 weights; the engine runs them dequantized to fp32), all cores.

    Loaded without llama.cpp's extra weight buffers (AMX / repacked layouts): on the Xeon with AMX this was measured
    on, llama-cpp-python 0.3.36 with them crashed in its first ``llama_decode`` (segmentation fault).
    """
    import llama_cpp
    from llama_cpp import llama as llama_module

    default = llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return Llama(model_path=str(local_lm.gguf_folder() / local_lm.GGUF_FILE), n_ctx=n_ctx,
                     n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), verbose=False)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


def llama_cpp_peer(prompts, max_tokens):
    """Single-stream tok/s of llama-cpp-python on the same GGUF file, if it is installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python: not installed, peer comparison skipped (optional: pip install llama-cpp-python)")
        return
    llm = _llama(Llama, n_ctx=2048)
    start, tokens = time.perf_counter(), 0
    for p in prompts:
        out = llm.create_chat_completion([{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0.0)
        tokens += out["usage"]["completion_tokens"]
    print(f"llama-cpp-python single-stream: {tokens / (time.perf_counter() - start):.1f} tok/s ({tokens} tokens)")


if __name__ == "__main__":
    main()
