"""06 itself through the seeds' Arbor client code: ``make tutorial-arbor``'s path, at a tiny size.

``run_notebooks --arbor-cpu 06`` starts a CPU Arbor server and runs 06 with ``RLMH_LM=arbor``. Here 06 runs from a
copy made tiny the way papermill parametrises a notebook: one cell after the first shrinks the profile's claim counts,
and the literal sizes in the ``GRPO(...)`` call are replaced (each replacement must match exactly once, so a change to
06 fails here instead of running at full size). A last cell prints what the run did as JSON.
"""

import json

import nbformat
import pytest

from helpers.data import sources
from helpers.tools import run_notebooks

TINY = "import dataclasses\nprofile = dataclasses.replace(profile, dev_eval_size=2)  # a tiny run"
GRPO_SIZES = {"num_rollouts_per_grpo_step=4,": "num_rollouts_per_grpo_step=2,",
              "num_train_steps=4,": "num_train_steps=2,"}
REPORT = """import json
from helpers.engine import local_lm
print("RESULT " + json.dumps({
    "provider": type(train_lm.provider).__name__, "model": train_lm.model, "after_lm": after_lm.model,
    "job": job.job_id, "warm_start": profile.warm_start, "engine_in_kernel": local_lm.live_engine(local_lm.MODEL_NAME) is not None,
    "steps": [{"received": r, "fresh": c.fresh_groups, "items": c.items, "matched": c.matched_items,
               "trained": c.trained_tokens, "sampled": c.sampled_tokens}
              for c, r in zip(job.checks, job.received_items)],
    "claims": len(after_dev.per_claim), "same": same}))"""


def tiny_copy(folder):
    nb = nbformat.read(run_notebooks.NOTEBOOKS / "06_grpo_training.ipynb", as_version=4)
    [call] = [c for c in nb.cells if c.cell_type == "code" and "GRPO(" in c.source and "compiler = GRPO(" in c.source]
    for old, new in GRPO_SIZES.items():
        assert call.source.count(old) == 1, old
        call.source = call.source.replace(old, new)
    nb.cells.insert(2, nbformat.v4.new_code_cell(TINY))
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    folder.mkdir()
    nbformat.write(nb, folder / "06_grpo_training.ipynb")


@pytest.mark.model
@pytest.mark.slow
def test_06_trains_through_the_cpu_arbor_server(mini_profile, tmp_path, capsys):
    sources.prepare(mini_profile)
    tiny_copy(tmp_path / "notebooks")
    code = run_notebooks.main(["--notebooks", str(tmp_path / "notebooks"), "--out", str(tmp_path / "out"),
                               "--arbor-cpu", "06"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:] + (tmp_path / "out" / "arbor-cpu.log").read_text()[-3000:]
    assert "(RLMH_LM=arbor" in printed.out and "CPU Arbor server" in printed.out and "no GPUs, no vLLM" in printed.out
    nb = nbformat.read(tmp_path / "out" / "06_grpo_training.ipynb", as_version=4)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    assert result["provider"] == "ArborProvider" and not result["warm_start"]
    assert not result["engine_in_kernel"]  # every LM call went to the server
    assert result["model"].startswith("openai/arbor:grpo:smollm2-135m-instruct:") and "@w" in result["model"]
    assert result["after_lm"] == result["model"] and result["same"] is True and result["claims"] == 2
    # one trainer step per GRPO step, each with all of that step's groups (3 claims x 2 predictors) fresh: dspy's
    # queue keeps leftovers of 6 groups (64 is no multiple of 6), and none of this step's may wait for the next
    assert len(result["steps"]) == 2
    for step in result["steps"]:  # every fresh completion matched one of the server's sampled rows
        assert step["fresh"] == 6 and step["matched"] == step["items"] == 12 and step["sampled"] == step["trained"]
        assert step["received"] == 64 * 2
    assert "The program has the last step's weights: no checkpoint was chosen on held-back claims." in text
    assert "train 600 · dev 2 claims" in text
