"""GRPO learning goal on the mini profile: dev recall before vs after, per sampling seed, on 2 CPU cores.

Run: python benchmarks/grpo_mini.py [--seeds 0 1] [--steps N] [--dev 300] [--long] [--quick]
For each seed: a fresh LoRA adapter, rollouts sampled from that seed, the mini preset for ``--steps`` GRPO
steps on the train split, and the last step kept, as 06 does. Then greedy recall on ``--dev`` dev claims.
``--select N`` also holds the last N train claims back from training and lets them choose a checkpoint (never dev
or test), and reports it beside the last step. Prints per step: rollout and training seconds, fresh groups,
groups whose rewards differ, the data-path check (trained tokens that were sampled), the share of claims where a
rollout found a gold page the claim does not name; per seed: the gain at the fixed final step (and at the chosen
checkpoint), hidden-page recall before/after, GRPO minutes; then the pooled table:
the mean gain over seeds with a 95 % CI that resamples seeds and claims together (``stats.seeds_and_claims_ci``),
the share of seeds with a gain above 0, and the verdict against the goal.
``--long``: 16 steps (with ``--select``, the selection score after every 2nd step is the curve). ``--quick`` (make bench
QUICK=1): one seed, one step, no evaluation: only the step's cost.
``--warm-start``: before GRPO, behaviour cloning (LoRA SFT, not RL) of the scripted teacher on ``--warm-train``
train claims (``helpers/rl/warm_start.py``), merged into the base weights; prints baseline -> warm start, then per
seed warm start -> GRPO, so what RL itself added is its own line.
"""

import argparse
import dataclasses
import pathlib
import resource
import subprocess
import time

from bench_args import at_most, positive, whole
from helpers import bootstrap


# the code this run measures: read at the start, before anything may check out another commit
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=pathlib.Path(__file__).parent).stdout.strip()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=whole(0), nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=whole(1), default=None, help="GRPO steps (default: the mini preset's; --long: 16)")
    parser.add_argument("--dev", type=whole(1), default=300, help="dev claims scored before and after (>= 100)")
    parser.add_argument("--select", type=whole(0), default=0,
                        help="train claims held back to choose a checkpoint (default 0: none, the last step is kept, as in 06)")
    parser.add_argument("--every", type=whole(1), default=2, help="score the checkpoint every this many steps")
    parser.add_argument("--long", action="store_true", help="16 steps: the curve shows the trend")
    parser.add_argument("--quick", action="store_true", help="one seed, one step, no evaluation")
    parser.add_argument("--warm-start", action="store_true", help="LoRA SFT on the scripted teacher before GRPO")
    parser.add_argument("--warm-train", type=whole(1), default=120, help="train claims whose teacher traces are the SFT data")
    parser.add_argument("--warm-minutes", type=positive, default=None, help="a time cap for SFT (default: none)")
    parser.add_argument("--temperature", type=positive, default=None, help="rollout temperature (default: the preset's)")
    parser.add_argument("--claims-per-step", type=whole(1), default=None, help="claims per GRPO step (default: the preset's)")
    parser.add_argument("--lr", type=positive, default=None, help="GRPO learning rate (default: the preset's)")
    parser.add_argument("--beta", type=positive, default=None,
                        help="KL penalty to the starting weights (default: the preset's, 0): keeps the policy near the warm start")
    parser.add_argument("--hidden-bonus", type=float, default=0.0,
                        help="add this times hidden-page recall to the reward (grpo_training.hidden_page_bonus; default 0)")
    parser.add_argument("--record", action="store_true",
                        help="write the pooled result to helpers/rl/grpo_distribution.json (06's verdict reads it); "
                             "needs --warm-start, >= 4 seeds and >= 100 dev claims")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 1
    if args.record and (args.quick or args.hidden_bonus or args.select or args.beta or not args.warm_start
                        or len(set(args.seeds)) < 4 or args.dev < 100):
        parser.error("argument --record: needs --warm-start, 4 or more different --seeds, --dev 100 or more, and no "
                     "--hidden-bonus, --beta or --select (06's set-up)")
    profile = bootstrap.start("mini")

    import dspy

    from helpers.backend import lora_policy
    from helpers.data import hover, sources
    from helpers.program import adapter_choice, evaluation, lm_setup
    from helpers.program.research_hop import ResearchHop
    from helpers.rl import grpo_presets, grpo_training
    from helpers.search import retrieval

    sources.prepare(profile)
    trainset, devset, _ = hover.seed_splits(profile)
    at_most(parser, "--dev", args.dev, len(devset), "dev claims")
    at_most(parser, "--select", args.select, len(trainset) - 1, "train claims that can be held back")
    search = retrieval.load_search(profile)
    trainset, selection = trainset[: len(trainset) - args.select], trainset[len(trainset) - args.select:]
    choose = bool(selection) and not args.quick
    evalset = devset[: args.dev]
    adapter = adapter_choice.chosen_adapter(profile)
    eval_lm = lm_setup.make_lm(profile, temperature=profile.eval_temperature, cache=False)
    dspy.configure(lm=eval_lm, adapter=adapter)
    preset = grpo_presets.get_preset("mini")
    preset = dataclasses.replace(
        preset, rollout_temperature=args.temperature or preset.rollout_temperature,
        compile_kwargs={**preset.compile_kwargs, "num_dspy_examples_per_grpo_step":
                        args.claims_per_step or preset.compile_kwargs["num_dspy_examples_per_grpo_step"]},
        train_kwargs={**preset.train_kwargs, "learning_rate": args.lr or preset.train_kwargs["learning_rate"],
                      "beta": args.beta or preset.train_kwargs.get("beta", 0.0)})
    print(f"GRPO: rollout temperature {preset.rollout_temperature}, "
          f"{preset.compile_kwargs['num_dspy_examples_per_grpo_step']} claims x "
          f"{preset.compile_kwargs['num_rollouts_per_grpo_step']} rollouts a step, lr {preset.train_kwargs['learning_rate']:g}, "
          f"KL beta {preset.train_kwargs['beta']:g}")
    steps = args.steps or (16 if args.long else preset.compile_kwargs["num_train_steps"])
    reward = grpo_training.training_reward(preset, search)
    if args.hidden_bonus:
        reward = grpo_training.hidden_page_bonus(reward, args.hidden_bonus)
        print(f"reward: {reward.__name__}")
    engine = lm_setup.embedded_engine(profile)

    if not args.quick:
        # 05's saved report when it covers the same claims (the untrained greedy run gives the same numbers)
        before = evaluation.load_or_run(profile, "bench_baseline_dev", ResearchHop(4, 2, search), evalset,
                                        profile.eval_threads, "ResearchHop (untrained)")
        select_before = _score(ResearchHop(4, 2, search), selection, profile.eval_threads)
        print(f"baseline dev recall ({len(evalset)} claims): {before.score:.1f}%, hidden-page recall "
              f"{before.hidden_score:.1f}%  [{before.seconds:.0f} s, {before.seconds / len(evalset):.2f} s/claim]"
              + (f"; selection ({len(selection)} train claims): {select_before:.1f}%" if choose else ""))
    if args.warm_start and not args.quick:
        before, select_before = _warm_start(args, profile, search, trainset, selection, evalset, adapter, engine, before)
    results = []
    for seed in args.seeds:
        train_lm = lm_setup.make_lm(profile, trainable=True, temperature=preset.rollout_temperature)
        on_step = held_back_recall(search, selection, eval_lm, profile.eval_threads, args.every) if choose else None
        start = time.perf_counter()
        trained, job = grpo_training.train(ResearchHop(4, 2, search), trainset, train_lm, adapter, reward, preset,
                                           profile, on_step=on_step, initial_score=select_before if choose else None,
                                           num_train_steps=steps, seed=seed)
        minutes = (time.perf_counter() - start) / 60
        for s in job.history:
            print(f"  seed {seed} step {s.step}: rollouts {s.rollout_seconds:.0f} s, training {s.seconds:.0f} s, "
                  f"reward {s.mean_reward:.3f}, fresh groups {s.fresh_groups}/{s.groups}, with variance "
                  f"{s.trained_groups}, sampled tokens {100 * s.sampled_share:.0f}%, items matched "
                  f"{100 * s.matched_share:.0f}%, hidden page found in {_pct(s.hidden_found)} of claims, "
                  f"selection recall {_pct(s.held_back_recall, scale=1)}")
        print(f"  prefix cache: {engine.prefix_cache.stats}")
        if args.quick:
            s = job.history[-1]
            print(f"one step: {s.rollout_seconds + s.seconds:.0f} s = rollouts {s.rollout_seconds:.0f} s + training "
                  f"{s.seconds:.0f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
                  f"training share {s.seconds / (s.rollout_seconds + s.seconds):.2f}")
            return
        trained.set_lm(eval_lm)
        chosen = evaluation.run_eval(trained, evalset, profile.eval_threads)  # terminate() loaded the chosen checkpoint
        final = chosen
        if job.best_checkpoint not in (None, job.last_checkpoint):  # the fixed final step: its own weights
            job.policy.load(job.checkpoints[job.last_checkpoint]["path"])
            final = evaluation.run_eval(trained, evalset, profile.eval_threads)
        run = {"seed": seed, "minutes": minutes, "checkpoint": job.best_checkpoint or job.last_checkpoint}
        start_from = "the warm start" if args.warm_start else "untrained"
        for label, after in (("final step", final), ("chosen checkpoint", chosen))[: 2 if choose else 1]:
            change, low, high = evaluation.gain(before, after, seed=seed)
            run[label] = {"gain": change, "diffs": _diffs(before, after), "hidden": after.hidden_score}
            print(f"seed {seed}, {label}: dev recall {before.score:.1f}% ({start_from}) -> {after.score:.1f}% "
                  f"({change:+.1f} points, claims-only 95% CI {low:+.1f} to {high:+.1f}), hidden-page recall "
                  f"{before.hidden_score:.1f}% -> {after.hidden_score:.1f}%")
        print(f"seed {seed}: GRPO {minutes:.1f} min ({minutes / steps:.2f} min/step), checkpoint kept "
              f"{run['checkpoint']}", flush=True)
        results.append(run)
        lora_policy.remove_lora(engine)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")
    pooled = pooled_table(results, before, len(evalset))
    if args.record:
        record_distribution(results, pooled, before, len(evalset), steps, preset)


def _diffs(before, after) -> list[float]:
    """Per-claim recall change in points, in before's claim order (``evaluation.gain`` pairs the same way)."""
    b = before.per_claim.set_index("claim")["recall"]
    return list(100 * (after.per_claim.set_index("claim")["recall"].reindex(b.index) - b))


def pooled_table(results, before, claims):
    """Per seed and pooled over seeds and claims (``stats.seeds_and_claims_ci``), at the final step (and at the
    chosen checkpoint, with ``--select``); the goal: pooled mean >= +5 points with the interval above 0, every seed
    > 0, hidden-page recall up on average, <= 20 min of GRPO per seed."""
    import numpy as np

    from helpers.util import stats

    print(f"\nGRPO over {len(results)} sampling seeds, {claims} dev claims, gain in dev recall points vs the start "
          f"(hidden-page recall {before.hidden_score:.1f}% at the start):")
    print("| | " + " | ".join(f"seed {r['seed']}" for r in results) + " | pooled (95% CI over seeds and claims) | seeds > 0 |")
    print("|---|" + "---:|" * len(results) + "---|---:|")
    verdicts, pooled = [], {}
    for label in [k for k in ("final step", "chosen checkpoint") if k in results[0]]:
        gains = [r[label]["gain"] for r in results]
        mean, low, high = stats.seeds_and_claims_ci([r[label]["diffs"] for r in results])
        positive = sum(g > 0 for g in gains)
        hidden = float(np.mean([r[label]["hidden"] for r in results]))
        print(f"| {label} | " + " | ".join(f"{g:+.1f}" for g in gains) +
              f" | **{mean:+.1f}** ({low:+.1f} to {high:+.1f}) | {positive} of {len(results)} |")
        print(f"| {label}: hidden-page recall | " + " | ".join(f"{r[label]['hidden']:.1f}%" for r in results) +
              f" | {hidden:.1f}% ({hidden - before.hidden_score:+.1f}) | |")
        met = mean >= 5 and low > 0 and positive == len(results) and hidden > before.hidden_score
        pooled[label] = {"mean": mean, "low": low, "high": high, "hidden": hidden}
        verdicts.append(f"{label}: {'meets' if met else 'misses'}")
    minutes = max(r["minutes"] for r in results)
    print(f"| GRPO minutes | " + " | ".join(f"{r['minutes']:.1f}" for r in results) + " | | |")
    print(f"goal (pooled >= +5 with the CI above 0, every seed > 0, hidden-page recall up, <= 20 min a seed; "
          f"longest {minutes:.1f} min): " + "; ".join(verdicts))
    return pooled


def record_distribution(results, pooled, before, claims, steps, preset):
    """Write the pooled run (the last step, 06's set-up) to ``helpers/rl/grpo_distribution.json``: 06's verdict reads
    it beside its own run."""
    import datetime
    import json

    from helpers.rl import grpo_training
    from helpers.util import atomic

    record = {"date": datetime.date.today().isoformat(), "commit": COMMIT or "?", "claims": claims,
              "settings": {"steps": steps, **{k: preset.compile_kwargs[k] for k in
                                              ("num_dspy_examples_per_grpo_step", "num_rollouts_per_grpo_step")},
                           "learning_rate": preset.train_kwargs["learning_rate"], "warm_start": True},
              "start_hidden": before.hidden_score,
              "seeds": [{"seed": r["seed"], "minutes": round(r["minutes"], 1), "final step": round(r["final step"]["gain"], 2)}
                        for r in results],
              "pooled": {label: {k: round(v, 2) for k, v in p.items()} for label, p in pooled.items()}}
    atomic.write_text(grpo_training.DISTRIBUTION_FILE, json.dumps(record, indent=1) + "\n")
    print(f"recorded in {grpo_training.DISTRIBUTION_FILE.name}")


def _warm_start(args, profile, search, trainset, selection, evalset, adapter, engine, baseline):
    """SFT on the teacher's traces, merged into the base; returns the warm-started dev report and selection score."""
    from helpers.program import evaluation
    from helpers.program.research_hop import ResearchHop
    from helpers.rl import warm_start

    settings = warm_start.Settings(train_claims=args.warm_train, max_minutes=args.warm_minutes)
    log = warm_start.run(ResearchHop(4, 2, search), trainset, search, adapter, settings, log_every=10)
    warm = evaluation.run_eval(ResearchHop(4, 2, search), evalset, profile.eval_threads, name="warm start")
    change, low, high = evaluation.gain(baseline, warm)
    select = _score(ResearchHop(4, 2, search), selection, profile.eval_threads)
    print(f"warm start (behaviour cloning, {log.rows} rows, {log.steps} SFT steps in {log.seconds / 60:.1f} min): dev "
          f"recall {baseline.score:.1f}% -> {warm.score:.1f}% ({change:+.1f} points, 95% CI {low:+.1f} to {high:+.1f}), "
          f"hidden-page recall {baseline.hidden_score:.1f}% -> {warm.hidden_score:.1f}%"
          + (f"; selection {select:.1f}%" if selection else "") + "; the GRPO lines below start from the warm start",
          flush=True)
    return warm, select


def _score(program, examples, threads):
    """Recall (%) on the held-back claims, or None when none are held back."""
    from helpers.program.evaluation import run_eval

    return run_eval(program, examples, threads).score if examples else None


def held_back_recall(search, examples, lm, threads: int, every: int):
    """``on_step`` for ``--select``: recall (%) of a fresh ResearchHop on the held-back claims, every ``every`` steps;
    the job then loads the best-scoring checkpoint (step 0, the starting weights, included) instead of the last."""
    from helpers.program.research_hop import ResearchHop

    def measure(record):
        if record.step % every:
            return None
        program = ResearchHop(num_docs=4, num_hops=2, search=search)
        program.set_lm(lm)
        return _score(program, examples, threads)

    return measure


def _pct(value, scale=100):
    return "-" if value is None else f"{scale * value:.0f}%"


if __name__ == "__main__":
    main()
