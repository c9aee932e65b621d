"""The seeds' Arbor client code against the CPU Arbor server: ArborProvider, dspy's GRPO, ArborGRPO, and bad bodies.

The server runs as its own process on a free 127.0.0.1 port (``python -m helpers.rl.arbor_cpu serve --port 0``), with
the embedded SmolLM2; the client side is Arbor 0.2.17's own classes, loaded without Arbor's package ``__init__``.
"""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import dspy
import pytest
import requests

from helpers.backend import arbor_server
from helpers.data import hover
from helpers.program import lm_setup, metrics
from helpers.program.guided_adapter import GuidedChatAdapter
from helpers.program.research_hop import ResearchHop
from helpers.rl import grpo_presets, grpo_training
from helpers.search import retrieval
from helpers.tools import run_notebooks
from helpers.util import arbor_files

ROOT = Path(__file__).resolve().parents[1]
PROBE = [{"role": "system", "content": "Answer with one short phrase."},
         {"role": "user", "content": "Which city is the capital of the country where the Danube ends?"},
         {"role": "assistant", "content": "[[ ## answer ## ]]\n"}]
ROUND = arbor_server.ROUND_GROUPS  # batch ids announced per trainer step
ROLLOUTS = 2  # a group: two rollouts of one claim at temperature 1.0 (the seeds' ArborGRPO setting)
TRAIN_KWARGS = {  # optimizer steps of 2 x 2 rows; one claim a GRPO step: two groups of 2 (its two predictors)
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-2,
    "lora_config": grpo_presets.MINI_LORA, "temperature": 1.0, "beta": 0.0, "loss_type": "dapo", "scale_rewards": True,
    "max_completion_length": 64}


@pytest.fixture(scope="module")
def server(mini_cache, tmp_path_factory):
    """The CPU Arbor server in its own process (``run_notebooks.arbor_cpu_server``, as ``make tutorial-arbor`` starts
    it) on a free port; stopped after the module."""
    storage = tmp_path_factory.mktemp("arbor-cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLMH_CACHE_DIR", str(mini_cache.cache_dir.parent))
        mp.setenv("RLMH_PROFILE", "mini")
        with run_notebooks.arbor_cpu_server(storage / "server.log", "--storage", str(storage)) as url:
            yield url


def _post(url, route, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(url + route, data=data, headers={"Content-Type": "application/json"}, timeout=300)
    return response.status_code, response.json()


def _steps(url):
    with urllib.request.urlopen(url + "cpu/steps", timeout=30) as response:
        return json.loads(response.read())["jobs"]


def _arbor_lm(profile, url, monkeypatch, **overrides):
    """The profile's LM as the seeds build it, selected with RLMH_LM=arbor and RLMH_ARBOR_URL."""
    monkeypatch.setenv(lm_setup.LM_ENV, "arbor")
    monkeypatch.setenv("RLMH_ARBOR_URL", url)
    lm = lm_setup.make_lm(profile, trainable=True, **overrides)
    assert type(lm.provider).__name__ == "ArborProvider" and lm.model == "openai/arbor:SmolLM2-135M-Instruct"
    return lm


def _answer(lm, model=None):
    with warnings.catch_warnings():  # dspy 3.4.1 prefers lm15 Requests; messages= is what the adapters send
        warnings.simplefilter("ignore", DeprecationWarning)
        return (lm.copy(model=model) if model else lm)(messages=PROBE, max_tokens=12, stop=["\n\n"])[0]


def test_one_arbor_version_is_pinned_everywhere():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["arbor"] == [f"arbor-ai=={arbor_files.ARBOR_VERSION}"] == [arbor_files.INSTALL.split()[-1]]
    assert f"ARBOR := arbor-ai=={arbor_files.ARBOR_VERSION}" in (ROOT / "Makefile").read_text()


def test_the_client_loads_without_arbors_server_stack():
    """Arbor's client, optimizer and schemas come from their files: ``import arbor`` (vllm, trl, the server) never runs."""
    probe = ("import sys; from helpers.util import arbor_files as a; a.provider_class(); a.grpo_class(); a.schemas(); "
             "print(sorted(m for m in ('arbor', 'vllm', 'trl', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def _research_hop(search):
    return ResearchHop(num_docs=2, num_hops=2, search=search)  # two hops; two pages each keep prompts short


def _evaluate(lm, adapter, search, claims):
    """04's program on ``claims`` through ``lm`` (greedy), scored with the seeds' recall."""
    with dspy.context(lm=lm, adapter=adapter):
        return dspy.Evaluate(devset=claims, metric=metrics.recall, num_threads=3)(_research_hop(search))


def _outputs(result):
    return [prediction.toDict() for _, prediction, _ in result.results]


@pytest.mark.model
def test_research_hop_and_dspy_grpo_through_arbor_provider(server, mini_profile, monkeypatch):
    """Seed 000's path: 04's program evaluated through ArborProvider, then ``GRPO(...)`` over HTTP: initialize,
    steps trained on exactly what the server sampled, terminate (a final checkpoint; the job's model keeps answering)."""
    from dspy.teleprompt.grpo import GRPO

    schemas = arbor_files.schemas()
    search = retrieval.load_search(mini_profile)
    train, dev, _ = hover.seed_splits(mini_profile)
    adapter = GuidedChatAdapter(max_tokens_per_field=10)
    greedy = _arbor_lm(mini_profile, server, monkeypatch, temperature=0.0)  # DSPy's cache on, as in the notebooks
    before = _evaluate(greedy, adapter, search, dev[:2])
    assert 0.0 <= before.score <= 100.0
    probe = _answer(greedy)

    lm = _arbor_lm(mini_profile, server, monkeypatch, temperature=1.0)  # rollouts
    program = _research_hop(search)
    program.set_lm(lm)
    compiler = GRPO(metric=shaped_recall, adapter=adapter, train_kwargs=dict(TRAIN_KWARGS), num_train_steps=1,
                    num_dspy_examples_per_grpo_step=1, num_rollouts_per_grpo_step=ROLLOUTS, exclude_demos=True, multitask=True,
                    num_threads=4, use_train_as_val=False, report_train_scores=False, failure_score=0.0,
                    format_failure_score=-1.0, seed=0)
    with dspy.context(adapter=adapter), grpo_training.one_line_per_step():
        trained = compiler.compile(student=program, trainset=train[:4], valset=None)

    model = lm.model.removeprefix("openai/arbor:")  # the client wrote the server's current_model back
    job_id = model.split("@w")[0]
    assert re.fullmatch(r"grpo:smollm2-135m-instruct:\w+:\d{8}", job_id) and "@w" in model
    status, payload = _post(server, "fine_tuning/grpo/status", {"job_id": job_id})
    status_ = schemas.GRPOStatus.model_validate(payload)
    assert status == 200 and status_.current_model == model and status_.status == "succeeded"
    assert status_.last_checkpoint == "checkpoint_final" and Path(status_.checkpoints["checkpoint_final"]["path"]).is_dir()
    steps = _steps(server)[job_id]["steps"]
    assert [s["step"] for s in steps] == [1]
    for step in steps:  # one claim, two predictors: two fresh groups of two, every item found; the round's repeats are not
        assert (step["groups"], step["fresh_groups"], step["data"]["stale_groups"]) == (ROUND, 2, ROUND - 2)
        assert step["data"]["matched_items"] == step["data"]["items"] == 4 and step["sampled_share"] == 1.0
        assert math.isfinite(step["loss"]) and step["seconds"] > 0 and step["trained_groups"] > 0

    # the trained weights answer for the job's name; DSPy's cache keeps the base name's answer; an older name is refused
    after = _evaluate(greedy.copy(model=lm.model), adapter, search, dev[:2])
    assert _outputs(after) != _outputs(before)
    assert _outputs(_evaluate(greedy, adapter, search, dev[:2])) == _outputs(before)  # DSPy's cache: never sent
    assert _answer(greedy) == probe  # the same: the server would refuse the base name now
    refused, payload = _post(server, "chat/completions", {"model": "arbor:SmolLM2-135M-Instruct", "messages": PROBE})
    assert (refused, payload["type"]) == (409, "ModelBusy") and model in payload["message"]
    stale, payload = _post(server, "chat/completions", {"model": f"{job_id}@w000000000000", "messages": PROBE})
    assert (stale, payload["type"]) == (409, "StaleModel")
    with dspy.context(adapter=adapter):
        assert trained(claim=dev[0].claim).retrieved_docs  # the compiled program answers through the job's model

    wrong, payload = _post(server, "fine_tuning/grpo/step", {"job_id": job_id, "model": model, "batch_id": 0,
                                                             "batch": [{"messages": PROBE, "completion": {}, "reward": 1}]})
    assert (wrong, payload["type"]) == (409, "JobTerminated")


def shaped_recall(example, pred, trace=None):
    """The seeds' recall plus a tie-break below 0.001 that is a fixed function of the LM's queries and notes: two
    rollouts that wrote different text never tie (on the mini world most rollouts of a claim tie on recall, and a
    tied group has no gradient). It makes the tiny runs here train; it teaches nothing."""
    text = json.dumps([getattr(pred, "queries", None), getattr(pred, "key_facts", None)], default=str)
    return metrics.recall(example, pred, trace) + int(hashlib.sha256(text.encode()).hexdigest()[:6], 16) / 16**6 / 1000


class WeightsMoved:
    """Training reward: ``shaped_recall``. Validation (examples marked ``validation``): 1.0 once the LM's name -- the
    server's current_model, which carries a digest of the weights -- differs from the name before training. Two steps
    on a 135M model need not raise recall; this makes ArborGRPO's best-so-far logic take its checkpoint whenever a
    step changed the weights."""

    def __init__(self, lm):
        self.lm, self.start, self.__name__ = lm, None, "weights_moved"

    def __call__(self, example, pred, trace=None):
        if not example.get("validation"):
            return shaped_recall(example, pred, trace)
        self.start = self.start or self.lm.model
        return float(self.lm.model != self.start)


@pytest.mark.model
def test_arbor_grpo_takes_its_checkpoint_over_http(server, mini_profile, monkeypatch):
    """Seed 001's path: Arbor's own ``ArborGRPO`` with a validation set, so it calls /checkpoint when the score rises."""
    search = retrieval.load_search(mini_profile)
    train, dev, _ = hover.seed_splits(mini_profile)
    adapter = GuidedChatAdapter(max_tokens_per_field=10)
    lm = _arbor_lm(mini_profile, server, monkeypatch, temperature=1.0)
    program = _research_hop(search)
    program.set_lm(lm)
    metric = WeightsMoved(lm)
    preset = grpo_presets.get_preset("seed_arbor_4gpu")
    train_kwargs = {**TRAIN_KWARGS, "top_k": -1, "top_p": 1.0, "repetition_penalty": 1.0}
    compiler = grpo_training.make_compiler(preset, metric, adapter, train_kwargs, lm=lm, num_train_steps=2,
                                           num_dspy_examples_per_grpo_step=1, num_rollouts_per_grpo_step=ROLLOUTS,
                                           num_threads=4, num_steps_for_val=1, format_failure_score=-1.0)
    assert type(compiler).__name__ == "ArborGRPO"
    valset = [dev[0].copy(validation=True)]
    with dspy.context(adapter=adapter), grpo_training.one_line_per_step():
        compiler.compile(student=program, trainset=train[4:8], valset=valset)

    assert compiler.best_validation_step == 1 and compiler.best_validation_score > 0
    job_id = lm.model.removeprefix("openai/arbor:").split("@w")[0]
    status, payload = _post(server, "fine_tuning/grpo/status", {"job_id": job_id})
    status_ = arbor_files.schemas().GRPOStatus.model_validate(payload)
    assert {"model_checkpoint_best", "checkpoint_final"} <= set(status_.checkpoints)
    saved = Path(status_.checkpoints["model_checkpoint_best"]["path"])
    assert any(saved.rglob("adapter_model.safetensors"))
    steps = _steps(server)[job_id]["steps"]
    assert len(steps) == 2 and all(s["fresh_groups"] == 2 and s["data"]["matched_items"] == s["data"]["items"] == 4
                                   and s["sampled_share"] == 1.0 for s in steps)
    assert steps[0]["trained_groups"] > 0  # the first step had a gradient: that is what the validation score saw
    wrong, payload = _post(server, "fine_tuning/grpo/initialize", {"model": "Qwen/Qwen2.5-7B-Instruct",
                                                                   "trainer_config": {"num_generations": 2},
                                                                   "inference_config": {"model": "x"}})
    assert (wrong, payload["type"]) == (404, "ModelNotFound")


@pytest.mark.model
def test_bad_bodies_are_answered_4xx_in_one_line(server):
    schemas = arbor_files.schemas()
    with urllib.request.urlopen(server + "models", timeout=30) as response:
        served = json.loads(response.read())["data"][-1]["id"]  # the live job's model (the GRPO tests ran first)
    huge = {"model": served, "messages": [{"role": "user", "content": "word " * 9000}]}
    cases = [
        ("chat/completions", b"{not json", 400, "JSONDecodeError"),
        ("chat/completions", [1, 2], 422, "RequestValidationError"),
        ("chat/completions", {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, 404, "ModelNotFound"),
        ("chat/completions", {**huge, "logprobs": True}, 422, "RequestValidationError"),  # a field it does not read
        ("chat/completions", {**huge, "messages": [{"role": "tool", "content": "x"}]}, 422, "RequestValidationError"),
        ("chat/completions", huge, 400, "ContextWindowError"),  # 9,000 words: past the 8,192-token context
        ("chat/launch", {"model": "openai/arbor:SmolLM2-135M-Instruct", "launch_kwargs": {}}, 422,
         "RequestValidationError"),  # what ArborProvider.launch sends: Arbor's server refuses it too
        ("chat/kill", b"", 400, "JSONDecodeError"),  # ArborProvider.kill sends no body
        ("fine_tuning/grpo/status", {"job_id": "grpo:none"}, 404, "KeyError"),
        ("fine_tuning/grpo/status", {"job_id": "grpo:none", "extra": 1}, 422, "RequestValidationError"),
        ("fine_tuning/grpo/step", {"job_id": "grpo:none", "model": "m", "batch_id": 0, "batch": []}, 404, "KeyError"),
        ("fine_tuning/grpo/initialize", {"model": "SmolLM2-135M-Instruct", "trainer_config": {"num_generations": 2}},
         422, "RequestValidationError"),  # no inference_config
        ("fine_tuning/grpo/terminate", {"job_id": "grpo:none"}, 404, "KeyError"),
        ("fine_tuning/grpo/nowhere", {}, 404, "NotFound"),
    ]
    for route, body, status, kind in cases:
        got, payload = _post(server, route, body)
        assert (got, payload["type"]) == (status, kind), (route, payload)
        assert set(payload) == {"type", "message", "timestamp"} and "\n" not in payload["message"], payload
    status, reply = _post(server, "chat/completions", {"model": f"openai/arbor:{served}", "messages": PROBE,
                                                       "max_tokens": 8, "temperature": 0.7, "n": 3, "top_k": -1,
                                                       "repetition_penalty": 1.0, "stop": ["\n\n"]})
    assert status == 200 and len(schemas.ChatCompletionModel.model_validate(reply).choices) == 3  # still serving

    # a job of its own (the body ArborProvider sends, trimmed): groups of the wrong size or shape, bad names, a second job
    status, payload = _post(server, "fine_tuning/grpo/initialize", {
        "model": "SmolLM2-135M-Instruct", "trainer_config": {"num_generations": 2, "learning_rate": 1e-3},
        "inference_config": {"model": "SmolLM2-135M-Instruct"}})
    job = schemas.GRPOStatus.model_validate(payload)
    assert status == 200 and job.pending_batch_ids == list(range(ROUND))  # a round: one trainer step
    assert _post(server, "fine_tuning/grpo/terminate", {"job_id": job.job_id})[0] == 200
    status, payload = _post(server, "fine_tuning/grpo/initialize", {  # a trainer step of one group of two
        "model": "SmolLM2-135M-Instruct", "trainer_config": {"num_generations": 2, "per_device_train_batch_size": 2,
                                                             "gradient_accumulation_steps": 1},
        "inference_config": {"model": "SmolLM2-135M-Instruct"}})
    job = schemas.GRPOStatus.model_validate(payload)
    assert status == 200 and job.pending_batch_ids == list(range(ROUND))
    item = {"messages": PROBE[:2], "completion": {"role": "assistant", "content": "Vienna"}, "reward": 1.0}
    step = {"job_id": job.job_id, "model": job.current_model, "batch_id": 7}
    cases = [
        ("fine_tuning/grpo/step", {**step, "batch": [item] * 3}, 400, "Expected 2 samples in the group, received 3"),
        ("fine_tuning/grpo/step", {**step, "batch": [item, {**item, "reward": "high"}]}, 400, "is not a number"),
        ("fine_tuning/grpo/step", {**step, "batch": [item, {"messages": PROBE}]}, 400, "must contain"),
        ("fine_tuning/grpo/checkpoint", {"job_id": job.job_id, "checkpoint_name": "../elsewhere"}, 422, "names a folder"),
        ("fine_tuning/grpo/initialize", {"model": "SmolLM2-135M-Instruct", "trainer_config": {"num_generations": 2},
                                         "inference_config": {"model": "x"}}, 409, "terminate it first"),
    ]
    for route, body, status, said in cases:
        got, payload = _post(server, route, body)
        assert got == status and said in payload["message"] and "\n" not in payload["message"], (route, payload)
    # completions the engine never sampled: the step runs, trains nothing, and says how many it could not match
    status, payload = _post(server, "fine_tuning/grpo/step", {**step, "batch": [item, {**item, "reward": 0.0}]})
    stepped = schemas.GRPOStatus.model_validate(payload)
    assert status == 200 and stepped.pending_batch_ids == list(range(1, ROUND))  # the server's batch ids, not the client's 7
    assert _steps(server)[job.job_id]["steps"] == []  # the round is not complete yet
    group = [item, {**item, "reward": 0.0}]
    status, payload = _post(server, "fine_tuning/grpo/step", {**step, "batch": [group] * (ROUND - 1)})
    stepped = schemas.GRPOStatus.model_validate(payload)
    assert status == 200 and stepped.pending_batch_ids == list(range(ROUND, 2 * ROUND))  # the next round
    assert stepped.current_model == job.current_model  # the weights did not change
    [record] = _steps(server)[job.job_id]["steps"]
    assert (record["received_items"], record["unmatched_items"], record["matched_of_received"]) == (2 * ROUND, 2 * ROUND, 0.0)
    assert record["data"]["stale_groups"] == ROUND and record["loss"] == 0.0
    status, payload = _post(server, "fine_tuning/grpo/terminate", {"job_id": job.job_id})
    assert status == 200 and schemas.GRPOStatus.model_validate(payload).last_checkpoint == "checkpoint_final"
    earlier = [name for name in _steps(server) if name != job.job_id]  # the GRPO tests' jobs: their LoRA left the model
    for name in earlier:
        got, payload = _post(server, "chat/completions", {"model": name, "messages": PROBE})
        assert (got, payload["type"]) == (409, "ModelReplaced")
