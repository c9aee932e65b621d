"""GRPO on CPU with the real embedded model: the backend alone, driven by dspy's GRPO, and its faults."""

import logging
import math

import dspy
import pytest
import torch

from helpers import grpo_backend, grpo_presets, grpo_training, hover, lm_setup, metrics, retrieval
from helpers.errors import TutorialError
from helpers.guided_adapter import GuidedChatAdapter
from helpers.research_hop import ResearchHop


@pytest.fixture
def trainable(mini_cache, tmp_path):
    """A trainable LM on the live engine; LoRA layers are removed again afterwards."""
    lm = lm_setup.make_lm(mini_cache, trainable=True, temperature=0.7)
    engine = lm_setup.embedded_engine(mini_cache)
    yield lm, engine, tmp_path
    grpo_backend.remove_lora(engine)


def _group(reward_a, reward_b):
    messages = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Sky color?"}]
    return [{"messages": messages, "completion": {"role": "assistant", "content": "Blue."}, "reward": reward_a},
            {"messages": messages, "completion": {"role": "assistant", "content": "Green."}, "reward": reward_b}]


def _lora_b(job):
    return torch.cat([p.detach().flatten().clone() for n, p in job.peft_model.named_parameters() if "lora_B" in n])


def _job(lm, tmp_path, **kw):
    return lm.reinforce(train_kwargs={"learning_rate": 1e-3, "checkpoint_dir": str(tmp_path), "groups_per_step": 1, **kw})


def test_group_advantages():
    assert grpo_backend.group_advantages([1.0, 1.0, 1.0], scale_rewards=True) == [0.0, 0.0, 0.0]
    assert grpo_backend.group_advantages([1.0, 0.0], scale_rewards=False) == [0.5, -0.5]
    scaled = grpo_backend.group_advantages([1.0, 0.0], scale_rewards=True)
    assert scaled[0] == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4))


def test_completion_logprobs_match_one_unpadded_row_at_a_time(trainable):
    lm, engine, _ = trainable
    tok, model = engine.tokenizer, engine.model
    messages = _group(1, 0)[0]["messages"]
    encoded = [grpo_backend._encode(tok, messages, c, 32) for c in ("Blue.", "It is a deep green colour, mostly.")]
    encoded.append(grpo_backend._encode(tok, messages + [{"role": "user", "content": "And grass, at noon?"}], "Green.", 32))
    with torch.no_grad():
        batched, mask = grpo_backend._completion_logprobs(model, tok, encoded)
        for row, (p, c) in enumerate(encoded):
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
            alone = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            assert mask[row].sum() == len(c)
            assert torch.allclose(batched[row, : len(c)], alone, atol=2e-3), (row, batched[row], alone)


def test_a_step_moves_the_preferred_completion_up(trainable):
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path)
    tok = engine.tokenizer
    encoded = [grpo_backend._encode(tok, _group(1, 0)[0]["messages"], c, 16) for c in ("Blue.", "Green.")]
    with torch.no_grad():
        before, mask = grpo_backend._completion_logprobs(job.peft_model, tok, encoded)
    for _ in range(3):
        record = job.step([{"batch_id": 0, "group": _group(1.0, 0.0)}], "grpo_chat")
    with torch.no_grad():
        after, _ = grpo_backend._completion_logprobs(job.peft_model, tok, encoded)
    gain = ((after - before) * mask).sum(1)  # change in each completion's log-probability
    assert gain[0] - gain[1] > 1.0 and gain[1] < 0, gain  # the rewarded one gained on the other
    assert math.isfinite(record.loss) and record.trained_groups == 1
    assert (tmp_path / job.job_id / "step-0003" / job.job_id / "adapter_model.safetensors").exists()
    assert job.get_status()["pending_batch_ids"] == [3]


def test_equal_rewards_give_no_gradient_and_nonfinite_loss_is_skipped(trainable, caplog):
    lm, _, tmp_path = trainable
    job = _job(lm, tmp_path)
    start = _lora_b(job)
    record = job.step([{"batch_id": 0, "group": _group(0.5, 0.5)}], "grpo_chat")
    assert record.trained_groups == 0 and torch.equal(start, _lora_b(job))
    with caplog.at_level(logging.WARNING):
        record = job.step([{"batch_id": 1, "group": _group(float("nan"), 0.0)}], "grpo_chat")
    assert math.isnan(record.loss) and "non-finite" in caplog.text and torch.equal(start, _lora_b(job))


def test_interrupted_checkpoint_leaves_the_last_good_one(trainable, monkeypatch):
    lm, _, tmp_path = trainable
    job = _job(lm, tmp_path)
    job.step([{"batch_id": 0, "group": _group(1.0, 0.0)}], "grpo_chat")
    good = tmp_path / job.job_id / "step-0001"
    files = sorted(p.name for p in good.rglob("*"))

    def interrupted(*args, **kwargs):
        (args[0] / "partial.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(job.peft_model, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        job.save_checkpoint("step-0001", score=1.0)
    assert sorted(p.name for p in good.rglob("*")) == files
    assert not [p for p in (tmp_path / job.job_id).iterdir() if p.name.startswith(".")]


def test_best_checkpoint_is_restored_on_terminate(trainable):
    lm, _, tmp_path = trainable
    job = _job(lm, tmp_path, initial_score=10.0)
    untrained = _lora_b(job)
    job.step([{"batch_id": 0, "group": _group(1.0, 0.0)}], "grpo_chat")  # unscored: no on_step callback
    assert not torch.equal(untrained, _lora_b(job))
    job.terminate()
    assert job.best_checkpoint == "step-0000" and torch.equal(untrained, _lora_b(job))


def test_dspy_grpo_drives_the_backend(trainable, mini_cache):
    lm, engine, _ = trainable
    search = retrieval.load_search(mini_cache)
    train, _, _ = hover.seed_splits(mini_cache)
    program = ResearchHop(num_docs=4, num_hops=2, search=search)
    preset = grpo_presets.get_preset("mini")
    adapter = GuidedChatAdapter(max_tokens_per_field=24)
    with dspy.context(adapter=adapter):
        trained, job = grpo_training.train(program, train[:4], lm, adapter, metrics.recall, preset, mini_cache,
                                           num_train_steps=2, num_dspy_examples_per_grpo_step=2,
                                           num_rollouts_per_grpo_step=2, num_threads=4)
    assert [s.step for s in job.history] == [1, 2]
    assert all(s.groups == 4 and 0 <= s.format_failures <= 1 for s in job.history)
    assert all(math.isfinite(s.loss) for s in job.history)
    assert {"step-0000", "step-0001", "step-0002"} <= set(job.checkpoints)
    saved = grpo_training.save_trained(mini_cache, trained, job)
    assert (saved / "program.json").exists() and (saved / "adapter").is_dir()


def test_unknown_preset_and_untrainable_lm_fail_in_one_line(mini_profile, monkeypatch):
    with pytest.raises(TutorialError, match="choose one of mini, seed_6gpu, seed_arbor_4gpu"):
        grpo_presets.get_preset("huge")
    monkeypatch.setenv("RLMH_LM", "openai")
    with pytest.raises(TutorialError, match="evaluation only"):
        lm_setup.make_lm(mini_profile, trainable=True)


def test_arbor_config_warns_on_obsolete_gpu_ids(tmp_path):
    from helpers import arbor_config

    assert set(arbor_config.read(grpo_training.Path(__file__).parents[1] / "arbor.yaml")) == arbor_config.KNOWN
    old = tmp_path / "old.yaml"
    old.write_text("inference:\n  gpu_ids: '0'\ntraining:\n  gpu_ids: '1, 2'\n")
    with pytest.warns(UserWarning, match="num_(inference|training)_gpus") as caught:
        arbor_config.read(old)
    assert len(caught) == 2
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(TutorialError, match="not valid YAML"):
        arbor_config.read(tmp_path / "bad.yaml")


def test_several_clipped_optimizer_steps_per_batch(trainable):
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=1, num_iterations=2,
               learning_rate=5e-4)
    tok = engine.tokenizer
    encoded = [grpo_backend._encode(tok, _group(1, 0)[0]["messages"], c, 16) for c in ("Blue.", "Green.")]
    with torch.no_grad():
        before, mask = grpo_backend._completion_logprobs(job.peft_model, tok, encoded)
    steps = []
    original = job.optimizer.step
    job.optimizer.step = lambda *a, **k: steps.append(1) or original(*a, **k)
    record = job.step([{"batch_id": 0, "group": _group(1.0, 0.0)}], "grpo_chat")
    with torch.no_grad():
        after, _ = grpo_backend._completion_logprobs(job.peft_model, tok, encoded)
    gain = ((after - before) * mask).sum(1)
    assert len(steps) == 4  # 2 completions, one per optimizer step, 2 passes
    assert gain[0] > 0 > gain[1] and math.isfinite(record.loss), gain
