"""06's last cell reads its own run: the verdict separates the warm start (SFT) from what GRPO added."""

from types import SimpleNamespace

import pandas as pd

from helpers.program import evaluation
from helpers.rl import grpo_training


def report(recalls, hidden):
    rows = pd.DataFrame({"claim": [f"c{i}" for i in range(len(recalls))], "recall": recalls, "hidden": hidden,
                         "found_hop0": 0, "found_later": 0, "failed_module": None})
    return evaluation.EvalReport("r", 100 * sum(recalls) / len(recalls), rows, 1.0)


def job(best, found):
    return SimpleNamespace(best_checkpoint=best, history=[SimpleNamespace(hidden_found=f) for f in found])


BEFORE = report([0.0] * 50 + [0.5] * 50, [0.0] * 100)
WARM = report([0.5] * 100, [0.5] * 50 + [0.0] * 50)


def test_warm_start_and_grpo_get_their_own_lines():
    text = grpo_training.verdict(BEFORE, WARM, job("step-0000", [0.0, 0.0]), warm=WARM)
    lines = text.splitlines()
    assert lines[0].startswith("Warm start (behaviour cloning, not RL): dev recall 25.0% -> 50.0%, +25.0 points")
    assert lines[1].startswith("GRPO on top of the warm start: dev recall 50.0% -> 50.0%, +0.0 points")
    assert "the warm-started model" in lines[2] and "did not help" in lines[2]
    assert "multi-hop skill itself was not reinforced." in text and "comes first" not in text
    assert lines[-1].startswith("Both stages: dev recall 25.0% -> 50.0%")


def test_without_a_warm_start_grpo_gets_the_whole_change():
    text = grpo_training.verdict(BEFORE, WARM, job("step-0004", [0.0, 0.33]))
    assert text.splitlines()[0].startswith("GRPO: dev recall 25.0% -> 50.0%, +25.0 points")
    assert "GRPO improved the program" in text and "up to 33%" in text
    assert "Warm start" not in text and "Both stages" not in text
    worse = grpo_training.verdict(WARM, BEFORE, job("step-0002", [0.0]))
    assert "made the program worse" in worse and "comes first" in worse


def test_gain_pairs_claims_by_claim_not_by_position():
    """The headline gain and its CI: after's rows in another order pair with the same claims (the CI depends on it)."""
    import random

    before = report([0.0, 0.5, 1.0, 0.0, 1.0, 0.5, 0.0, 1.0] * 5, [None] * 40)
    after = report([0.5, 0.5, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0] * 5, [None] * 40)
    shuffled = after.per_claim.sample(frac=1.0, random_state=random.Random(0).randrange(1000)).reset_index(drop=True)
    assert list(shuffled["claim"]) != list(after.per_claim["claim"])
    expected = evaluation.gain(before, after)
    assert evaluation.gain(before, evaluation.EvalReport("r", after.score, shuffled, 1.0)) == expected
    other = after.per_claim.assign(claim=[f"x{i}" for i in range(40)])
    import pytest

    from helpers.util.errors import TutorialError

    with pytest.raises(TutorialError, match="different claims"):
        evaluation.gain(before, evaluation.EvalReport("r", after.score, other, 1.0))


def test_the_verdict_reads_one_run_beside_the_benchmarks_seeds(tmp_path, capsys):
    """06's verdict quotes the recorded distribution (how often GRPO helps, by how much) and where this run falls."""
    import json

    record = {"date": "2026-12-04", "commit": "abc1234", "claims": 100,
              "seeds": [{"seed": s, "final step": g} for s, g in enumerate([0.0, 2.0, -1.0, 3.0])],
              "pooled": {"final step": {"mean": 1.0, "low": -0.5, "high": 2.5}}}
    path = tmp_path / "grpo_distribution.json"
    path.write_text(json.dumps(record))
    distribution = grpo_training.recorded_distribution(path)
    text = grpo_training.verdict(BEFORE, WARM, job("step-0002", [0.5]), distribution=distribution)
    assert "GRPO's last step gained +0.0, +2.0, -1.0, +3.0 points" in text and "above 0 in 2 of 4 seeds" in text
    assert "This run's +25.0 is above that range" in text and "not yet reliable" in text
    assert grpo_training.recorded_distribution(tmp_path / "missing.json") is None
    path.write_text(json.dumps({**record, "pooled": {}}))
    assert grpo_training.recorded_distribution(path) is None and "is damaged (KeyError)" in capsys.readouterr().out


def test_a_run_without_a_checkpoint_choice_keeps_its_last_step():
    """06 (in this kernel or through Arbor) chooses no checkpoint: the verdict must not say step 0 won."""
    text = grpo_training.verdict(BEFORE, WARM, job(None, []))
    assert "beat step 0" not in text and "did not help" not in text
    assert "The program has the last step's weights: no checkpoint was chosen on held-back claims." in text
    assert "GRPO improved the program" in text


def test_a_job_on_arbors_own_server_has_no_steps_but_06s_tables_still_show(capsys):
    """Arbor's own server has no /v1/cpu/steps: 06's curve cell selects its columns, and the data check says why empty."""
    from helpers.rl.arbor_job import ArborJob

    job = ArborJob(job_id="grpo:qwen:run:20261205", current_model="grpo:qwen:run:20261205", last_checkpoint="checkpoint_final",
                   checkpoints={"checkpoint_final": {"path": None}})
    steps = grpo_training.curve(job, initial_score=40.0)
    columns = ["mean_reward", "trained_groups", "fresh_groups", "hidden_found", "held_back_recall", "rollout_seconds", "seconds"]
    assert list(steps[columns].index) == [0] and steps.loc[0, "held_back_recall"] == 40.0
    assert grpo_training.data_check(job).empty
    assert "does not report what it trained" in capsys.readouterr().out
