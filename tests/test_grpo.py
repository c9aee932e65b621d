"""GRPO on CPU with the real embedded model: the on-policy data path, the backend, dspy's GRPO driving it, and faults."""

import json
import logging
import math

import dspy
import pytest
import torch

from helpers import bootstrap
from helpers.backend import lora_policy
from helpers.data import hover
from helpers.engine import local_lm
from helpers.program import lm_setup, metrics
from helpers.program.guided_adapter import GuidedChatAdapter
from helpers.program.research_hop import ResearchHop, SeedPatternResearchHop, traced_notes
from helpers.rl import grpo_presets, grpo_training
from helpers.search import retrieval
from helpers.util.errors import TutorialError
from tests.concurrency import at_once


MESSAGES = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Name a colour of the sky."}]


@pytest.fixture
def trainable(mini_cache, tmp_path):
    """A trainable LM on the live engine; LoRA layers are removed again afterwards."""
    lm = lm_setup.make_lm(mini_cache, trainable=True, temperature=0.7)
    engine = lm_setup.embedded_engine(mini_cache)
    yield lm, engine, tmp_path
    engine.recorder = None
    lora_policy.remove_lora(engine)


def _job(lm, tmp_path, **kw):
    return lm.reinforce(train_kwargs={"learning_rate": 1e-3, "checkpoint_dir": str(tmp_path), "groups_per_step": 1, **kw})


def _sampled_group(engine, rewards, temperature=1.2, messages=MESSAGES):
    """A GRPO group as dspy builds it, from replies the engine really sampled (the job's recorder sees them)."""
    n = len(rewards)
    conversation = [*messages, {"role": "assistant", "content": "[[ ## answer ## ]]\n"}]
    out = engine.generate([conversation] * n, local_lm.Sampling(temperature, 1.0, 0, 8), [("\n\n", "[[")] * n,
                          [local_lm.CallOptions(nonblank=True)] * n)
    return [{"messages": messages, "reward": r,
             "completion": {"role": "assistant", "content": f"[[ ## answer ## ]]\n{text.strip()}\n\n[[ ## completed ## ]]\n"}}
            for (text, *_), r in zip(out, rewards)]


def _distinct_group(engine, rewards, temperature=1.2):
    """Sample until the rollouts' texts all differ (a group of identical replies teaches nothing)."""
    for _ in range(10):
        engine.recorder.clear()
        group = _sampled_group(engine, rewards, temperature)
        if len({item["completion"]["content"] for item in group}) == len(group):
            return group
    raise AssertionError("the engine kept sampling identical replies")


def _lora_b(job):
    return torch.cat([p.detach().flatten().clone() for n, p in job.policy.model.named_parameters() if "lora_B" in n])


def _sequence_logprob(job, engine, record, temperature):
    with torch.no_grad():
        logps, mask = lora_policy._completion_logprobs(job.policy.model, engine.tokenizer,
                                                        [(record.prompt_ids, record.ids)], temperature)
    return float((logps * mask).sum())


@pytest.mark.model
def test_the_trace_keeps_the_notes_each_call_saw(mini_cache):
    """The seeds' pattern leaks each call's answer into its own traced inputs; ResearchHop's copies do not."""
    lm = lm_setup.make_lm(mini_cache, temperature=0.0, cache=False)
    search = retrieval.load_search(mini_cache)
    _, dev, _ = hover.seed_splits(mini_cache)
    seen = {}
    for cls in (ResearchHop, SeedPatternResearchHop):
        with dspy.context(lm=lm, adapter=GuidedChatAdapter(max_tokens_per_field=16)):
            program = cls(num_docs=4, num_hops=2, search=search)
            seen[cls.__name__] = traced_notes(program, dev[0].claim)
            notes = program(claim=dev[0].claim).key_facts
    # append_notes saw no notes, generate_query saw the one note
    assert seen["ResearchHop"] == [("append_notes", []), ("generate_query", notes)]
    # the leak: append_notes's trace shows its own answer
    assert seen["SeedPatternResearchHop"] == [("append_notes", notes), ("generate_query", notes)]


def test_prefix_runs_keep_one_calls_fields_together_and_split_other_claims():
    system, claim_a, claim_b = list(range(50)), list(range(100, 400)), list(range(500, 800))
    a1, b1 = system + claim_a, system + claim_b
    a2, b2 = a1 + [7] * 12, b1 + [8] * 9  # a field's second call: the first call's prompt plus what it wrote
    assert lora_policy.prefix_runs([a1, a2, b1, b2], [12, 10, 9, 11]) == [range(0, 2), range(2, 4)]
    assert lora_policy.prefix_runs([a1] * 6, [20] * 6) == [range(0, 6)]  # six rollouts of one claim
    assert lora_policy.prefix_runs([a1], [3]) == [range(0, 1)]


@pytest.mark.model
def test_shared_prefix_logprobs_match_one_unpadded_row_at_a_time(trainable):
    lm, engine, _ = trainable
    tok, model, blank = engine.tokenizer, engine.model, engine.blank_tokens()
    base = local_lm.prompt_ids(tok, [*MESSAGES, {"role": "assistant", "content": "[[ ## answer ## ]]\n"}])
    longer = local_lm.prompt_ids(tok, [*MESSAGES, {"role": "assistant", "content": "[[ ## answer ## ]]\nBlue\n\n[[ ## why ## ]]\n"}])
    other = local_lm.prompt_ids(tok, [MESSAGES[0], {"role": "user", "content": "And grass, at noon?"}])
    encoded = [(base, tok("Blue.\n\n")["input_ids"]), (base, tok(" It is a deep green colour.")["input_ids"]),
               (longer, tok("Because.")["input_ids"]), (other, tok("Green")["input_ids"])]
    nonblank = [True, False, True, False]
    with torch.no_grad():
        assert len(lora_policy.prefix_runs([p for p, _ in encoded], [len(c) for _, c in encoded])) > 1
        shared, mask = lora_policy.shared_prefix_logprobs(model, tok, encoded, 0.7, nonblank, blank)
        padded, _ = lora_policy._completion_logprobs(model, tok, encoded, 0.7, nonblank, blank)
        for row, (p, c) in enumerate(encoded):
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
            if nonblank[row]:
                logits[0] = logits[0].masked_fill(blank, float("-inf"))
            alone = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            assert mask[row].sum() == len(c)
            assert torch.allclose(shared[row, : len(c)], alone, atol=2e-3), (row, shared[row], alone)
            assert torch.allclose(padded[row, : len(c)], alone, atol=2e-3), (row, padded[row], alone)


@pytest.mark.model
def test_rows_are_the_sampled_tokens_and_a_group_trains_once(trainable):
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path)
    group = _distinct_group(engine, [1.0, 0.0, 0.5])
    records = list(job.data.records)
    start = _lora_b(job)
    record = job.step([{"batch_id": 0, "group": group}], "grpo_chat")
    check = job.checks[-1]
    assert (check.fresh_groups, check.stale_groups, check.matched_items, check.items) == (1, 0, 3, 3)
    trained = [r for r, reward in zip(records, [1.0, 0.0, 0.5]) if reward != 0.5]  # the mean reward's row: no gradient
    assert check.trained_tokens == sum(len(r.ids) for r in trained) and record.sampled_share == 1.0
    prompt = local_lm.prompt_ids(engine.tokenizer, [*MESSAGES, {"role": "assistant", "content": "[[ ## answer ## ]]\n"}])
    assert all(r.prompt_ids == prompt for r in records)  # the generation-time prompt, prefilled marker included
    assert not torch.equal(start, _lora_b(job))
    trained = _lora_b(job)
    again = job.step([{"batch_id": 1, "group": group}], "grpo_chat")  # dspy's queue refilling with an old group
    assert (job.checks[-1].stale_groups, job.checks[-1].fresh_groups, again.trained_groups) == (1, 0, 0)
    assert torch.equal(trained, _lora_b(job))


@pytest.mark.model
@pytest.mark.parametrize("tamper", ["ids", "logprobs", "prompt"])
def test_the_sampled_share_falls_when_the_loss_gets_what_was_not_sampled(trainable, tamper):
    """The data check compares what the loss consumed with the engine's records: a row whose ids, log-probs or prompt
    are not the sampled ones counts against it (06 shows this share; it must be able to read less than 100 %)."""
    import dataclasses

    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path)
    group = _distinct_group(engine, [1.0, 0.0])
    make_rows = job.data.rows

    tampered = []

    def tampered_rows(groups):
        rows, check = make_rows(groups)
        first = rows[0]
        change = {"ids": dict(completion_ids=[*first.completion_ids[:-1], (first.completion_ids[-1] + 1) % 1000]),
                  "logprobs": dict(old_logprobs=[x * 0.5 for x in first.old_logprobs]),
                  "prompt": dict(prompt_ids=[*first.prompt_ids[:-1], (first.prompt_ids[-1] + 1) % 1000])}[tamper]
        tampered.append(len(first.completion_ids))
        return [dataclasses.replace(first, **change), *rows[1:]], check

    job.data.rows = tampered_rows
    record = job.step([{"batch_id": 0, "group": group}], "grpo_chat")
    check = job.checks[-1]
    assert check.trained_tokens == sum(len(ids) for _, ids, _ in job.policy.consumed) > tampered[0]
    assert check.sampled_tokens == check.trained_tokens - tampered[0] and record.sampled_share < 1.0


@pytest.mark.model
def test_update_starts_at_ratio_one_through_its_own_call_path(trainable):
    """``update()`` itself computes the new log-probs at the rows' sampling temperature: its first pass, at the
    rollout weights, finds the rollout's own log-probs (at T=1 they would differ by far more)."""
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path, lora_config=grpo_presets.MINI_LORA)
    group = _distinct_group(engine, [1.0, 0.0], temperature=0.7)
    job.step([{"batch_id": 0, "group": group}], "grpo_chat")
    assert job.policy.first_max_logratio < 2e-3, job.policy.first_max_logratio


@pytest.mark.model
def test_gradient_clipping_bounds_the_update(trainable):
    """``max_grad_norm`` reaches the optimizer step: clipped to almost nothing, the same rows barely move the weights."""
    lm, engine, tmp_path = trainable
    moved, rows = [], None
    for clip in (1e-12, 1.0):
        job = _job(lm, tmp_path, max_grad_norm=clip, job_id=f"clip-{len(moved)}")
        if rows is None:
            rows, _ = job.data.rows([_distinct_group(engine, [1.0, 0.0])])
        start = _lora_b(job)
        job.policy.update(rows, job.train_kwargs, 1)
        moved.append(float((_lora_b(job) - start).abs().max()))
    assert moved[0] < 1e-3 * moved[1], moved


@pytest.mark.model
def test_an_item_with_only_some_fields_sampled_is_not_trained(trainable):
    """Two fields, the first sampled, the second never: the item is not trained at all (not with its whole
    advantage on the one field found)."""
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path)
    group = _distinct_group(engine, [1.0, 0.0])
    partial = [{**item, "completion": {"role": "assistant", "content": item["completion"]["content"].replace(
        "[[ ## completed ## ]]\n", "[[ ## extra ## ]]\nnever sampled\n\n[[ ## completed ## ]]\n")}} for item in group]
    start = _lora_b(job)
    job.step([{"batch_id": 0, "group": partial}], "grpo_chat")
    check = job.checks[-1]
    assert check.matched_items == 0 and check.trained_tokens == 0 and torch.equal(start, _lora_b(job))


@pytest.mark.model
def test_the_matched_share_counts_every_item_of_a_fresh_group(trainable):
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path)
    group = _distinct_group(engine, [1.0, 0.0, 0.5])
    group[1] = {**group[1], "completion": {"role": "assistant", "content": "[[ ## answer ## ]]\nnever sampled\n\n"
                                                                          "[[ ## completed ## ]]\n"}}
    record = job.step([{"batch_id": 0, "group": group}], "grpo_chat")
    check = job.checks[-1]
    assert (check.fresh_groups, check.items, check.matched_items) == (1, 3, 2)
    assert record.matched_share == pytest.approx(2 / 3)


@pytest.mark.model
def test_an_item_whose_prompt_was_never_sampled_is_not_trained(trainable):
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path)
    group = _distinct_group(engine, [1.0, 0.0])
    leaked = [{**item, "messages": [MESSAGES[0], {"role": "user", "content": MESSAGES[1]["content"] + " Blue."}]}
              for item in group]
    start = _lora_b(job)
    job.step([{"batch_id": 0, "group": leaked}], "grpo_chat")
    assert job.checks[-1].stale_groups == 1 and job.checks[-1].trained_tokens == 0
    assert torch.equal(start, _lora_b(job))


@pytest.mark.model
def test_ratio_is_one_at_the_rollout_weights(trainable):
    """New log-probs at the rollout temperature, no dropout, the first token under the non-blank mask it was drawn
    with: the trainer's log-probs equal the rollout's own, so the PPO ratio starts at 1."""
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path, lora_config=grpo_presets.MINI_LORA)
    _distinct_group(engine, [1.0, 0.0], temperature=0.7)
    records = job.data.records
    assert all(r.nonblank for r in records)
    job.policy.model.train()
    try:
        with torch.no_grad():
            logps, mask = lora_policy.shared_prefix_logprobs(job.policy.model, engine.tokenizer,
                                                               [(r.prompt_ids, r.ids) for r in records], 0.7,
                                                               [r.nonblank for r in records], engine.blank_tokens())
        for row, record in enumerate(records):
            ratio = torch.exp(logps[row, : len(record.ids)] - torch.tensor(record.logprobs))
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=2e-3), ratio
    finally:
        job.policy.model.eval()


@pytest.mark.model
def test_a_step_moves_the_preferred_completion_up(trainable):
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path)
    for i in range(3):
        group = _distinct_group(engine, [1.0, 0.0])
        best, worst = list(job.data.records)
        before = [_sequence_logprob(job, engine, r, 1.2) for r in (best, worst)]
        record = job.step([{"batch_id": i, "group": group}], "grpo_chat")
        after = [_sequence_logprob(job, engine, r, 1.2) for r in (best, worst)]
        assert after[0] - before[0] > after[1] - before[1], (before, after)
    assert math.isfinite(record.loss) and record.trained_groups == 1
    assert (tmp_path / job.job_id / "step-0003" / job.job_id / "adapter_model.safetensors").exists()
    assert job.get_status()["pending_batch_ids"] == [3, 4]  # twice groups_per_step: see LocalReinforceJob.get_status


@pytest.mark.model
def test_equal_rewards_give_no_gradient_and_nonfinite_rewards_are_skipped(trainable, caplog):
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path)
    start = _lora_b(job)
    record = job.step([{"batch_id": 0, "group": _distinct_group(engine, [0.5, 0.5])}], "grpo_chat")
    assert record.trained_groups == 0 and job.checks[-1].fresh_groups == 1 and torch.equal(start, _lora_b(job))
    with caplog.at_level(logging.WARNING):
        record = job.step([{"batch_id": 1, "group": _distinct_group(engine, [float("nan"), 0.0])}], "grpo_chat")
    assert job.checks[-1].nonfinite_groups == 1 and "non-finite reward" in caplog.text
    assert record.loss == 0.0 and torch.equal(start, _lora_b(job))


@pytest.mark.model
def test_seeds_change_the_rollouts(trainable):
    lm, engine, tmp_path = trainable
    texts = []
    for seed in (0, 1, 0):
        job = _job(lm, tmp_path, seed=seed)
        texts.append([item["completion"]["content"] for item in _sampled_group(engine, [0.0] * 4)])
        job.terminate()
    assert texts[0] == texts[2] and texts[0] != texts[1]


@pytest.mark.model
def test_interrupted_checkpoint_leaves_the_last_good_one(trainable, monkeypatch):
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path)
    job.step([{"batch_id": 0, "group": _distinct_group(engine, [1.0, 0.0])}], "grpo_chat")
    good = tmp_path / job.job_id / "step-0001"
    files = sorted(p.name for p in good.rglob("*"))

    def interrupted(*args, **kwargs):
        (args[0] / "partial.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(job.policy.model, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        job.save_checkpoint("step-0001", score=1.0)
    assert sorted(p.name for p in good.rglob("*")) == files
    assert not [p for p in (tmp_path / job.job_id).iterdir() if p.name.startswith(".")]


@pytest.mark.model
def test_a_new_job_removes_killed_saves_and_writes_its_own_folder(trainable, capsys):
    lm, _, tmp_path = trainable
    dead = tmp_path / "grpo-old" / ".step-0003.999999.abcd1234.tmp"  # a save killed in an earlier run (no such pid)
    dead.mkdir(parents=True)
    (dead / "adapter_model.safetensors").write_bytes(b"half")
    job = _job(lm, tmp_path)
    assert not dead.exists() and job.job_folder == tmp_path / job.job_id and (job.job_folder / "step-0000").is_dir()
    said = f"GRPO job {job.job_id}: checkpoints in {bootstrap.display_path(job.job_folder)}"
    assert said in capsys.readouterr().out  # the run says where


@pytest.mark.model
def test_a_job_id_already_taken_is_refused_not_reused(trainable):
    lm, engine, tmp_path = trainable
    first = _job(lm, tmp_path, job_id="grpo-mine")
    trained = _lora_b(first)
    with pytest.raises(TutorialError, match="grpo-mine"):
        _job(lm, tmp_path, job_id="grpo-mine")
    assert torch.equal(trained, _lora_b(first))


@pytest.mark.model
def test_best_checkpoint_is_restored_on_terminate(trainable):
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path, initial_score=10.0)
    untrained = _lora_b(job)
    job.step([{"batch_id": 0, "group": _distinct_group(engine, [1.0, 0.0])}], "grpo_chat")  # unscored
    assert not torch.equal(untrained, _lora_b(job))
    job.terminate()
    assert job.best_checkpoint == "step-0000" and torch.equal(untrained, _lora_b(job))


@pytest.mark.model
def test_several_clipped_optimizer_steps_per_batch(trainable):
    lm, engine, tmp_path = trainable
    job = _job(lm, tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=1, num_iterations=2,
               learning_rate=5e-4)
    group = _distinct_group(engine, [1.0, 0.0])
    best, worst = list(job.data.records)
    before = [_sequence_logprob(job, engine, r, 1.2) for r in (best, worst)]
    steps = []
    original = job.policy.optimizer.step
    job.policy.optimizer.step = lambda *a, **k: steps.append(1) or original(*a, **k)
    record = job.step([{"batch_id": 0, "group": group}], "grpo_chat")
    after = [_sequence_logprob(job, engine, r, 1.2) for r in (best, worst)]
    assert len(steps) == 4  # 2 completions, one per optimizer step, 2 passes
    assert after[0] > before[0] and after[1] < before[1] and math.isfinite(record.loss), (before, after)


@pytest.mark.model
def test_dspy_grpo_drives_the_backend_on_policy(trainable, mini_cache):
    """A real rollout through dspy's GRPO: every item is found among the sampled rows, for both predictors."""
    lm, engine, _ = trainable
    search = retrieval.load_search(mini_cache)
    train, _, _ = hover.seed_splits(mini_cache)
    preset = grpo_presets.get_preset("mini")
    adapter = GuidedChatAdapter(max_tokens_per_field=16)
    with dspy.context(adapter=adapter):
        trained, job = grpo_training.train(ResearchHop(num_docs=4, num_hops=2, search=search), train[:4], lm, adapter,
                                           metrics.recall, preset, mini_cache, num_train_steps=2,
                                           num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=2,
                                           num_threads=4, seed=3)
    assert [s.step for s in job.history] == [1, 2] and job.train_kwargs["seed"] == 3
    for step, check in zip(job.history, job.checks):
        # 2 claims x 2 predictors, fresh; the job asks for twice as many, so dspy adds 4 repeats, not trained
        assert (check.groups, check.fresh_groups, check.stale_groups) == (8, 4, 4)
        assert check.matched_items == check.items == 8 and step.sampled_share == 1.0
        assert step.format_failures == 0.0 and math.isfinite(step.loss) and step.hidden_found is not None
    assert {"step-0000", "step-0001", "step-0002"} <= set(job.checkpoints)
    saved = grpo_training.save_trained(mini_cache, trained, job)
    assert (saved / "program.json").exists() and (saved / "adapter").is_dir()
    _reload_checks(mini_cache, saved, trained, search, train[0].claim, adapter)


@pytest.mark.model
def test_a_short_step_leaves_no_stale_groups_in_dspys_queue(trainable, mini_cache):
    """A rollout that ends before the query call gives dspy one group fewer; dspy refills the step with shuffled
    copies and keeps the extra ones queued for the next step. Every step must still train all of its own groups."""
    import threading

    lm, engine, _ = trainable
    search = retrieval.load_search(mini_cache)
    train, _, _ = hover.seed_splits(mini_cache)
    calls, lock = [0], threading.Lock()

    class EndsEarlyOnce(ResearchHop):
        def forward(self, claim):
            with lock:
                calls[0] += 1
                short = calls[0] == 5  # the first rollout of step 2 (step 1 makes 2 claims x 2 rollouts)
            if not short:
                return super().forward(claim)
            results = self.search(claim, k=self.num_docs)  # hop 0 and its notes, then it stops: no query call
            notes = self.append_notes(claim=claim, key_facts=[], new_search_results=results).new_key_facts
            return dspy.Prediction(key_facts=[notes], retrieved_docs=results, queries=[claim])

    adapter = GuidedChatAdapter(max_tokens_per_field=12)
    with dspy.context(adapter=adapter):
        _, job = grpo_training.train(EndsEarlyOnce(num_docs=4, num_hops=2, search=search), train[:4], lm, adapter,
                                     metrics.recall, grpo_presets.get_preset("mini"), mini_cache, num_train_steps=3,
                                     num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=2, num_threads=4)
    fresh = [check.fresh_groups for check in job.checks]
    assert fresh == [4, 3, 4], fresh  # step 2: one query group fewer; step 3: all four of its own again


def _reload_checks(profile, saved, trained, search, claim, adapter):
    """A saved program is data: it reloads to the same prediction, its LM settings are never applied, and a damaged
    or foreign file is refused in one line before any weight changes."""
    import json

    eval_lm = lm_setup.make_lm(profile, temperature=0.0, cache=False)
    trained.set_lm(eval_lm)
    with dspy.context(adapter=adapter):
        expected = trained(claim=claim).retrieved_docs
        fresh = lambda: ResearchHop(num_docs=4, num_hops=2, search=search)  # noqa: E731
        assert grpo_training.load_trained(profile, fresh(), lm=eval_lm)(claim=claim).retrieved_docs == expected
        program_file = saved / "program.json"
        good = json.loads(program_file.read_text())
        hostile = json.loads(program_file.read_text())
        for name in ("generate_query.predict", "append_notes.predict"):  # prompts to another host, a module to import
            hostile[name]["lm"] = {"_dspy_lm_class": "http.server.HTTPServer", "model": "openai/elsewhere",
                                   "api_base": "http://127.0.0.1:9/v1", "model_type": "chat"}
        program_file.write_text(json.dumps(hostile))
        reloaded = grpo_training.load_trained(profile, fresh(), lm=eval_lm)
        assert all(p.lm is eval_lm for p in reloaded.predictors())
        assert reloaded(claim=claim).retrieved_docs == expected  # answered by the engine, not the file's endpoint
        engine = local_lm.live_engine(local_lm.MODEL_NAME)
        damaged = [("{", "unreadable"), (json.dumps([1]), "not this program's predictors"),
                   (json.dumps({**good, "extra.predict": {}}), "not this program's predictors"),
                   (json.dumps({**good, "append_notes.predict": {**good["append_notes.predict"], "forward": 1}}),
                    "program.save does not write")]
        for text, said in damaged:
            program_file.write_text(text)
            adapters = set(engine.peft_model.peft_config) if engine.peft_model is not None else set()
            with pytest.raises(TutorialError, match=said) as err:
                grpo_training.load_trained(profile, fresh(), lm=eval_lm, adapter_name="never")
            assert "\n" not in str(err.value)
            after = set(engine.peft_model.peft_config) if engine.peft_model is not None else set()
            assert "never" not in after and after == adapters  # refused before the adapter was loaded
        program_file.write_text(json.dumps(good))
        _damaged_adapters_are_refused(profile, saved, fresh, eval_lm, engine)
        record = json.loads((saved / "trained.json").read_text())
        (saved / "trained.json").write_text(json.dumps({**record, "warm_start": True}))  # says so, holds none
        with pytest.raises(TutorialError, match="warm_start/ folder is missing"):
            grpo_training.load_trained(profile, fresh(), lm=eval_lm, adapter_name="never")
        (saved / "trained.json").write_text(json.dumps(record))


@pytest.mark.model
def test_unknown_preset_untrainable_lm_and_arbor_with_the_embedded_lm_fail_in_one_line(mini_profile, monkeypatch):
    with pytest.raises(TutorialError, match="choose one of mini, seed_6gpu, seed_arbor_4gpu"):
        grpo_presets.get_preset("huge")
    lm = lm_setup.make_lm(mini_profile, trainable=True)
    with pytest.raises(TutorialError, match="ArborGRPO, which needs an Arbor server") as err:
        grpo_training.make_compiler(grpo_presets.get_preset("seed_arbor_4gpu"), metrics.recall, None, {}, lm=lm)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("RLMH_LM", "openai")
    with pytest.raises(TutorialError, match="evaluation only"):
        lm_setup.make_lm(mini_profile, trainable=True)


def test_arbor_config_warns_on_obsolete_gpu_ids(tmp_path):
    from helpers.rl import arbor_config

    assert set(arbor_config.read(grpo_training.Path(__file__).parents[1] / "arbor.yaml")) == arbor_config.KNOWN
    old = tmp_path / "old.yaml"
    old.write_text("inference:\n  gpu_ids: '0'\ntraining:\n  gpu_ids: '1, 2'\n")
    with pytest.warns(UserWarning, match="num_(inference|training)_gpus") as caught:
        arbor_config.read(old)
    assert len(caught) == 2
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(TutorialError, match="not valid YAML"):
        arbor_config.read(tmp_path / "bad.yaml")


@pytest.mark.model
def test_back_at_step_0_the_greedy_text_is_that_of_before_the_job(trainable):
    """Why 06 reuses the warm start's report when GRPO keeps step 0: step 0's adapter changes no greedy output."""
    lm, engine, tmp_path = trainable
    greedy = local_lm.Sampling(0.0, 1.0, 0, 16)
    conversations = [MESSAGES, [{"role": "user", "content": "Describe a river town in one sentence."}]]
    before = engine.generate(conversations, greedy)
    job = _job(lm, tmp_path, initial_score=10.0)
    job.step([{"batch_id": 0, "group": _distinct_group(engine, [1.0, 0.0])}], "grpo_chat")  # unscored: step 0 stays best
    assert _lora_b(job).abs().max() > 0  # the step moved the weights
    job.terminate()
    assert job.best_checkpoint == "step-0000" and _lora_b(job).abs().max() == 0
    assert engine.generate(conversations, greedy) == before


def test_the_backend_follows_the_grpo_call_it_serves(mini_profile):
    """06 writes GRPO(...) out and invites changes: the job's groups per step, the step count and the format reward
    must follow the call, not the preset the backend settings started from."""
    from dspy.teleprompt.grpo import GRPO

    preset = grpo_presets.get_preset("mini")
    program = ResearchHop(4, 2, search=lambda query, k: [])
    reward = grpo_training.HiddenPageLog(metrics.recall)
    train_kwargs = grpo_training.backend_kwargs(preset, mini_profile, program, reward, progress=True)
    steps = preset.compile_kwargs["num_train_steps"]
    assert train_kwargs["groups_per_step"] == 3 * 2 and reward.steps == steps != 2  # the preset's, not the call's below
    compiler = GRPO(metric=reward, multitask=True, exclude_demos=True, num_dspy_examples_per_grpo_step=5,
                    num_rollouts_per_grpo_step=4, num_train_steps=2, failure_score=0.0, format_failure_score=-0.5,
                    train_kwargs=train_kwargs)
    assert grpo_training.fit_backend(compiler, train_kwargs) is train_kwargs
    assert train_kwargs["groups_per_step"] == 5 * 2 and train_kwargs["format_failure_score"] == -0.5
    assert reward.steps == 2


def test_two_saves_of_the_same_trained_program_take_turns(mini_profile, tmp_path):
    """Two writers of one trained folder take turns (colliding, they raise FileNotFoundError / 'Directory not empty')."""
    from types import SimpleNamespace

    adapter_dir = tmp_path / "ckpt"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    job = SimpleNamespace(best_checkpoint="step-0001", last_checkpoint="step-0001", job_id="grpo-test",
                          checkpoints={"step-0001": {"path": adapter_dir}})
    program = ResearchHop(4, 2, search=lambda query, k: [])
    def save_many():
        for _ in range(15):
            grpo_training.save_trained(mini_profile, program, job, name="turns")

    _, errors = at_once(save_many, 3)
    assert errors == []
    folder = mini_profile.cache_dir / "trained" / "turns"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "program.json", "trained.json"]


def _damaged_adapters_are_refused(profile, saved, fresh, lm, engine):
    """Adapter tensors named for another model (peft reports them "loaded" with no effect), NaN weights, a rank
    mismatch or a truncated file (raw errors): each is refused in one line, before any weight changes."""
    from safetensors.torch import load_file, save_file

    weights = next((saved / "adapter").rglob("adapter_model.safetensors"))
    original = weights.read_bytes()
    tensors = load_file(weights)
    first_a = next(k for k in tensors if ".lora_A." in k)
    cases = [({k.replace("self_attn", "cross_attn"): v for k, v in tensors.items()}, "does not have"),
             ({**tensors, first_a: tensors[first_a] * float("nan")}, "NaN"),
             ({k: (v[:4] if ".lora_A." in k else v) for k, v in tensors.items()}, "shape")]
    try:
        for bad, said in cases:
            save_file(bad, weights)
            adapters = set(engine.peft_model.peft_config) if engine.peft_model is not None else set()
            with pytest.raises(TutorialError, match=said) as err:
                grpo_training.load_trained(profile, fresh(), lm=lm, adapter_name="never")
            assert "\n" not in str(err.value)
            assert (set(engine.peft_model.peft_config) if engine.peft_model is not None else set()) == adapters
        weights.write_bytes(original[:1000])
        with pytest.raises(TutorialError, match="is damaged"):
            grpo_training.load_trained(profile, fresh(), lm=lm, adapter_name="never")
    finally:
        weights.write_bytes(original)



def test_a_program_trained_through_arbor_saves_and_loads_with_the_servers_lm(mini_profile, tmp_path):
    """Through Arbor the weights stay on the server: the saved record names the model that serves them, loading needs
    an LM naming that job (one line otherwise), and an adapter folder from the embedded backend needs the embedded LM."""
    import types

    from helpers.rl.arbor_job import ArborJob

    served = "grpo:smollm2-135m-instruct:run1:20261205@w0123456789ab"
    job = ArborJob(job_id=served.split("@w")[0], current_model=served, last_checkpoint="checkpoint_final",
                   checkpoints={"checkpoint_final": {"path": "/on/the/gpu/box/checkpoint_final"}})
    program = ResearchHop(4, 2, search=lambda query, k: [])
    folder = grpo_training.save_trained(mini_profile, program, job, name="via_arbor")
    assert sorted(p.name for p in folder.iterdir()) == ["program.json", "trained.json"]  # the adapter is on the server
    lm = dspy.LM(f"openai/arbor:{served}", api_base="http://127.0.0.1:9/v1/", api_key="arbor")
    loaded = grpo_training.load_trained(mini_profile, ResearchHop(4, 2, search=lambda query, k: []), lm=lm,
                                        name="via_arbor")
    assert all(p.lm is lm for p in loaded.predictors())
    other = lm.copy(model="openai/arbor:grpo:smollm2-135m-instruct:run2:20261205")
    with pytest.raises(TutorialError, match="trained as grpo:smollm2-135m-instruct:run1:20261205 on an Arbor server"):
        grpo_training.load_trained(mini_profile, ResearchHop(4, 2, search=lambda query, k: []), lm=other, name="via_arbor")

    nowhere = ArborJob(job_id=job.job_id, current_model=served, last_checkpoint="checkpoint_final",
                       checkpoints={"checkpoint_final": {"path": None}})  # the server did not say where
    folder = grpo_training.save_trained(mini_profile, program, nowhere, name="via_arbor")
    assert sorted(p.name for p in folder.iterdir()) == ["program.json", "trained.json"]  # not the working folder
    record = json.loads((folder / "trained.json").read_text())
    for bad, said in (({**record, "served_as": ""}, "holds an adapter for the embedded model"),
                      ({**record, "warm_start": True}, "trained on a warm start")):
        (folder / "trained.json").write_text(json.dumps(bad))
        with pytest.raises(TutorialError, match=said) as err:
            grpo_training.load_trained(mini_profile, ResearchHop(4, 2, search=lambda query, k: []), lm=lm, name="via_arbor")
        assert "\n" not in str(err.value)

    adapter_dir = tmp_path / "ckpt"  # a save from the embedded backend: its weights are an adapter, not a served model
    adapter_dir.mkdir()
    embedded = types.SimpleNamespace(best_checkpoint="step-0001", last_checkpoint="step-0001", job_id="grpo-test",
                               checkpoints={"step-0001": {"path": adapter_dir}})
    grpo_training.save_trained(mini_profile, program, embedded, name="embedded")
    with pytest.raises(TutorialError, match="holds an adapter for the embedded model"):
        grpo_training.load_trained(mini_profile, ResearchHop(4, 2, search=lambda query, k: []), lm=lm, name="embedded")
