"""GRPO learning goal on the mini profile: dev recall before vs after, per seed, on 2 CPU cores.

Run: python benchmarks/grpo_mini.py [--seeds 0 1] [--steps 6] [--dev 40] [--quick]
For each seed: a fresh LoRA adapter, the mini preset for ``--steps`` GRPO steps, then greedy dev recall.
Prints per-step seconds split into rollouts and training, peak memory, and per seed the gain in
recall points over the untrained baseline (measured once, same process), the ratio-style verdict last.
``--quick`` (make bench QUICK=1): one seed, one step, no dev evaluation: only the step's cost.
"""

import argparse
import resource
import time

from helpers import bootstrap


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the mini preset's)")
    parser.add_argument("--dev", type=int, default=None, help="dev claims scored (default: profile.dev_eval_size)")
    parser.add_argument("--quick", action="store_true", help="one seed, one step, no evaluation")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 1
    profile = bootstrap.start("mini")

    import dspy

    from helpers import adapter_choice, evaluation, grpo_backend, grpo_presets, grpo_training, hover, lm_setup
    from helpers import retrieval, sources
    from helpers.research_hop import ResearchHop

    sources.prepare(profile)
    search = retrieval.load_search(profile)
    trainset, devset, _ = hover.seed_splits(profile)
    evalset = devset[: args.dev or profile.dev_eval_size]
    adapter = adapter_choice.chosen_adapter(profile)
    eval_lm = lm_setup.make_lm(profile, temperature=profile.eval_temperature, cache=False)
    dspy.configure(lm=eval_lm, adapter=adapter)
    preset = grpo_presets.get_preset("mini")
    steps = args.steps or preset.compile_kwargs["num_train_steps"]
    reward = grpo_training.training_reward(preset, search)

    if not args.quick:
        before = evaluation.run_eval(ResearchHop(4, 2, search), evalset, profile.eval_threads)
        print(f"baseline dev recall ({len(evalset)} claims): {before.score:.1f}%  [{before.seconds:.0f} s]")
    results = []
    for seed in args.seeds:
        train_lm = lm_setup.make_lm(profile, trainable=True, temperature=preset.rollout_temperature)
        start = time.perf_counter()
        trained, job = grpo_training.train(ResearchHop(4, 2, search), trainset, train_lm, adapter, reward,
                                           preset, profile, num_train_steps=steps, seed=seed)
        minutes = (time.perf_counter() - start) / 60
        for s in job.history:
            print(f"  seed {seed} step {s.step}: rollouts {s.rollout_seconds:.0f} s, training {s.seconds:.0f} s, "
                  f"reward {s.mean_reward:.3f}, format failures {s.format_failures:.2f}, trained groups {s.trained_groups}/{s.groups}")
        if args.quick:
            s = job.history[-1]
            print(f"one step: {s.rollout_seconds + s.seconds:.0f} s = rollouts {s.rollout_seconds:.0f} s + training "
                  f"{s.seconds:.0f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
                  f"training share {s.seconds / (s.rollout_seconds + s.seconds):.2f}")
            return
        trained.set_lm(eval_lm)
        after = evaluation.run_eval(trained, evalset, profile.eval_threads)
        results.append((seed, after.score - before.score, minutes))
        print(f"seed {seed}: dev recall {before.score:.1f}% -> {after.score:.1f}% ({after.score - before.score:+.1f} points), "
              f"GRPO {minutes:.1f} min ({minutes / steps:.2f} min/step)")
        grpo_backend.remove_lora(lm_setup.embedded_engine(profile))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")
    for seed, gain, minutes in results:
        verdict = "meets" if gain >= 5 and minutes <= 20 else "misses"
        print(f"seed {seed}: {gain:+.1f} recall points in {minutes:.1f} min -> {verdict} the goal (>= +5 points in <= 20 min)")


if __name__ == "__main__":
    main()
