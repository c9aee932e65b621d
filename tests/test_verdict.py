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
