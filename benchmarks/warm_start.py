"""Warm start (behaviour cloning, NOT RL) on the mini profile: dev recall before vs after LoRA SFT on a scripted teacher.

Run: python benchmarks/warm_start.py [--dev 100] [--train 120] [--steps 40] [--batch 2] [--lr 2e-3] [--max-minutes 10]

1. The teacher alone, BM25 only (no LM): recall and hidden-page recall of its hop-1 query on the dev claims.
2. Baseline: ResearchHop(4, 2) greedy on the first ``--dev`` dev claims (05's saved report if it covers them).
3. SFT: LoRA on the live model, on the teacher's traces of ``--train`` train claims (every field call the
   GuidedChatAdapter makes, exact prompt ids), ``--steps`` steps of ``--batch`` calls, stopped at
   ``--max-minutes``.
4. The same greedy evaluation again; the gain with its paired bootstrap 95 % CI, hidden-page recall
   before/after, SFT minutes, and the NLL of held-out teacher rows before/after.
"""

import argparse
import resource
import time

from bench_args import at_most, positive, whole
from helpers import bootstrap


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dev", type=whole(1), default=100, help="dev claims scored before and after")
    parser.add_argument("--train", type=whole(1), default=120, help="train claims whose teacher traces are the SFT data")
    parser.add_argument("--steps", type=whole(1), default=40)
    parser.add_argument("--batch", type=whole(1), default=2, help="predictor calls per step (2 field rows each)")
    parser.add_argument("--lr", type=positive, default=2e-3)
    parser.add_argument("--seed", type=whole(0), default=0)
    parser.add_argument("--max-minutes", type=positive, default=None, help="a time cap for SFT (default: none)")
    parser.add_argument("--save", default="", help="folder to save the warm-start adapter to")
    args = parser.parse_args()
    profile = bootstrap.start("mini")

    import dspy

    from helpers.data import hover, sources
    from helpers.program import adapter_choice, evaluation, lm_setup
    from helpers.program.research_hop import ResearchHop
    from helpers.rl import warm_start
    from helpers.search import retrieval

    sources.prepare(profile)
    trainset, devset, _ = hover.seed_splits(profile)
    at_most(parser, "--dev", args.dev, len(devset), "dev claims")
    at_most(parser, "--train", args.train, len(trainset), "train claims")
    search = retrieval.load_search(profile)
    evalset = devset[: args.dev]
    adapter = adapter_choice.chosen_adapter(profile)
    eval_lm = lm_setup.make_lm(profile, temperature=0.0, cache=False)
    dspy.configure(lm=eval_lm, adapter=adapter)
    engine = lm_setup.embedded_engine(profile)

    teacher = warm_start.teacher_recall(evalset, search)
    print(f"teacher alone (BM25, no LM) on {len(evalset)} dev claims: recall {teacher['recall %']:.1f}%, "
          f"hidden-page recall {teacher['hidden-page recall %']:.1f}%")

    # 05's saved baseline when it covers the same claims (the untrained greedy run is deterministic)
    before = evaluation.load_or_run(profile, "bench_baseline_dev", ResearchHop(4, 2, search), evalset, profile.eval_threads,
                                    "ResearchHop (untrained)")
    print(f"baseline dev recall ({len(evalset)} claims): {before.score:.1f}%, hidden-page recall "
          f"{before.hidden_score:.1f}%  [{before.seconds:.0f} s]", flush=True)

    rows = warm_start.teacher_traces(ResearchHop(4, 2, search), trainset[: args.train], search, adapter=adapter)
    held_out = warm_start.teacher_traces(ResearchHop(4, 2, search), trainset[-4:], search, adapter=adapter)
    nll_before = warm_start.nll(engine, held_out)
    print(f"SFT data: {len(rows)} rows from {args.train} train claims; held-out teacher NLL {nll_before:.3f}/token",
          flush=True)
    log = warm_start.sft(engine, rows, steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed,
                         max_seconds=None if args.max_minutes is None else 60 * args.max_minutes, log_every=5)
    minutes = log.seconds / 60
    nll_after = warm_start.nll(engine, held_out)
    seen = min(len(rows), 2 * args.batch * log.steps)
    print(f"SFT: {log.steps} steps (~{seen} rows) in {minutes:.1f} min, loss {log.losses[0]:.3f} -> "
          f"{sum(log.losses[-5:]) / len(log.losses[-5:]):.3f} (last 5), held-out teacher NLL {nll_before:.3f} -> "
          f"{nll_after:.3f}", flush=True)
    if args.save:
        print(f"adapter saved to {warm_start.save_adapter(engine, args.save)}")

    after = evaluation.run_eval(ResearchHop(4, 2, search), evalset, profile.eval_threads)
    change, low, high = evaluation.gain(before, after, seed=args.seed)
    parse_before = int(before.per_claim["failed_module"].notna().sum())
    parse_after = int(after.per_claim["failed_module"].notna().sum())
    print(f"warm start: dev recall {before.score:.1f}% -> {after.score:.1f}% ({change:+.1f} points, 95% CI "
          f"{low:+.1f} to {high:+.1f}), hidden-page recall {before.hidden_score:.1f}% -> {after.hidden_score:.1f}%, "
          f"parse failures {parse_before} -> {parse_after}, SFT {minutes:.1f} min  [eval {after.seconds:.0f} s]")
    example = evalset[0]
    with dspy.context(trace=[]):
        pred = ResearchHop(4, 2, search)(claim=example.claim)
    print(f"example: {example.claim}\n  notes: {pred.key_facts}\n  query: {pred.queries[1:]}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"load average {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")
