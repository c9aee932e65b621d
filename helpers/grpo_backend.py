"""GRPO on CPU for the embedded model: a DSPy Provider whose ReinforceJob trains LoRA adapters (06_grpo_training).

Arbor needs NVIDIA GPUs. ``LocalGRPOProvider`` gives ``dspy.teleprompt.grpo.GRPO`` the same job interface
Arbor does -- ``initialize``, ``get_status``, ``step``, ``save_checkpoint``, ``terminate`` -- but trains the
in-process SmolLM2 weights. The LoRA layers are injected into the very model the engine generates with, so the
next rollout already uses the updated weights; the engine's lock keeps generation and training apart.

What is trained is not dspy's re-formatted text but the engine's own records of what it sampled
(``helpers.grpo_data.OnPolicyData``); the loss is ``helpers.grpo_loss``. The path, in order:
the engine's records (``BatchingEngine._finished``) → ``OnPolicyData.rows`` → ``_update`` (log-probs at the rollout temperature,
PPO ratio to the rollout's log-probs) → ``grpo_loss.policy_loss`` → ``grpo_loss.clipped_step``.

Arbor's ``ArborGRPO`` compile loop cannot drive this job: it writes ``repetition_penalty`` and
``top_k=-1`` onto the LM, which dspy 3.4.1's custom-engine path refuses (``grpo_training.make_compiler``
says so before any work).
"""

import json
import logging
import math
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from dspy.clients.provider import Provider, ReinforceJob
from dspy.clients.utils_finetune import TrainDataFormat

from helpers import atomic, bootstrap, decoding, grpo_loss, local_lm
from helpers.errors import TutorialError
from helpers.grpo_data import DataCheck, OnPolicyData

log = logging.getLogger(__name__)

DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,  # dropout would make the PPO ratio != 1 at equal weights
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]}


@dataclass
class StepLog:
    """One training step, as 06 plots it."""

    step: int
    groups: int  # groups dspy's GRPO handed over
    trained_groups: int  # fresh groups whose rewards differ; equal rewards give no gradient
    mean_reward: float
    format_failures: float  # share of completions rewarded at or below the format-failure score
    loss: float
    grad_norm: float
    seconds: float  # training (the weight update) only
    rollout_seconds: float = 0.0  # since the previous step ended: GRPO's rollouts and data preparation
    dev_recall: float | None = None
    checkpoint: str | None = None
    fresh_groups: int = 0  # groups built from this step's rollouts (repeats and leftovers are not trained)
    matched_share: float = 1.0  # items whose every field was found among the engine's sampled rows
    sampled_share: float = 1.0  # trained tokens that are sampled tokens (the data-path check: must be 1.0)
    hidden_found: float | None = None  # share of claims with a rollout that found a gold page the claim does not name


@contextmanager
def quiet_peft():
    """peft 0.21 reads a transformers property deprecated in v5 when it wraps a model; nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class LocalReinforceJob(ReinforceJob):
    """Trains LoRA adapters on the live embedded model from what the engine sampled during GRPO's rollouts."""

    def __init__(self, lm, train_kwargs=None):
        super().__init__(lm, train_kwargs)
        self.engine = local_lm.live_engine(local_lm.MODEL_NAME)
        if self.engine is None:
            raise TutorialError("no embedded LM is loaded: build the LM with lm_setup.make_lm(profile) first")
        self.job_id = self.train_kwargs.get("job_id") or f"grpo-{uuid.uuid4().hex[:8]}"
        self.checkpoint_dir = self.train_kwargs.get("checkpoint_dir")
        self.history: list[StepLog] = []
        self.checks: list[DataCheck] = []
        self.best_checkpoint = None
        self.data = OnPolicyData(self.engine, scale_rewards=bool(self.train_kwargs.get("scale_rewards", True)))
        self._batch_id = 0
        self._steps = 0

    # --- the ReinforceJob protocol ---------------------------------------------------------
    def initialize(self):
        import torch
        from peft import LoraConfig, get_peft_model

        kw = self.train_kwargs
        config = LoraConfig(task_type="CAUSAL_LM", **{**DEFAULT_LORA, **(kw.get("lora_config") or {})})
        seed = int(kw.get("seed", 0))
        with self.engine.lock:
            torch.manual_seed(seed)  # LoRA's A matrices start random
            self.engine.seed_sampling(seed)  # and the rollouts differ from seed to seed
            peft_model = getattr(self.engine, "peft_model", None)
            if peft_model is None:
                with quiet_peft():
                    peft_model = get_peft_model(self.engine.model, config, adapter_name=self.job_id)
                self.engine.peft_model = peft_model
            else:
                peft_model.add_adapter(self.job_id, config)
            peft_model.set_adapter(self.job_id)
            self.params = [p for n, p in peft_model.named_parameters() if self.job_id in n and "lora_" in n]
            for p in self.params:
                p.requires_grad_(True)
            self.optimizer = torch.optim.AdamW(self.params, lr=float(kw.get("learning_rate", 1e-5)),
                                               weight_decay=float(kw.get("weight_decay", 0.0)))
            self.engine.weights_changed()
        self.peft_model = peft_model
        if self.checkpoint_dir:  # one folder per job (its id is new each run); killed saves of earlier jobs leave nothing
            for folder in [Path(self.checkpoint_dir), *Path(self.checkpoint_dir).glob("grpo-*")]:
                atomic.clean_folder(folder)
            print(f"GRPO job {self.job_id}: checkpoints in {bootstrap.display_path(self.job_folder)}", flush=True)
            self.save_checkpoint("step-0000", score=kw.get("initial_score"), metadata={"step": 0})
        self.data.start()
        self._last_end = time.perf_counter()

    @property
    def job_folder(self):
        return Path(self.checkpoint_dir) / self.job_id

    def get_status(self):
        return {"job_id": self.job_id, "status": "running", "current_model": self.lm.model,
                "checkpoints": {k: v["path"] for k, v in self.checkpoints.items()},
                "last_checkpoint": self.last_checkpoint,
                "pending_batch_ids": list(range(self._batch_id, self._batch_id + int(self.train_kwargs.get("groups_per_step", 1))))}

    def step(self, train_data, train_data_format=None):
        if train_data_format not in (None, TrainDataFormat.GRPO_CHAT, TrainDataFormat.GRPO_CHAT.value):
            raise TutorialError(f"LocalReinforceJob trains GRPO_CHAT data, not {train_data_format}")
        rollout_seconds = time.perf_counter() - self._last_end
        groups = [item["group"] if isinstance(item, dict) and "group" in item else item for item in train_data]
        self._batch_id += len(train_data)
        self._steps += 1
        record = self._train(groups)
        record.rollout_seconds = rollout_seconds
        self.history.append(record)
        on_step = self.train_kwargs.get("on_step")
        score = None  # a step's rollout reward measures the weights before it, so it cannot rank this checkpoint
        if on_step is not None:  # e.g. 06 measures recall on held-out claims; unmeasured steps do not compete for "best"
            measured = on_step(record)
            score = record.dev_recall = None if measured is None else float(measured)
        if self.checkpoint_dir and self.train_kwargs.get("checkpoint_every_step", True):
            record.checkpoint = f"step-{self._steps:04d}"
            self.save_checkpoint(record.checkpoint, score=score, metadata=asdict(record))
        self._last_end = time.perf_counter()
        return record

    def save_checkpoint(self, checkpoint_name, score=None, metadata=None):
        """Write the adapter to ``<checkpoint_dir>/<job_id>/<name>`` atomically; the best score is kept."""
        if not self.checkpoint_dir:
            raise TutorialError("no checkpoint_dir in train_kwargs: the job cannot save checkpoints")
        path = self.job_folder / checkpoint_name
        with self.engine.lock, atomic.atomic_dir(path) as tmp, warnings.catch_warnings():
            # peft looks for the base model's config.json where the GGUF was read from; the vocabulary is unchanged
            warnings.filterwarnings("ignore", message="Could not find a config file")
            self.peft_model.save_pretrained(tmp, selected_adapters=[self.job_id])
            (tmp / "checkpoint.json").write_text(json.dumps({"score": score, "metadata": metadata or {}}, default=str))
        self.checkpoints[checkpoint_name] = {"path": str(path), "score": score}
        self.last_checkpoint = checkpoint_name
        best = self.checkpoints.get(self.best_checkpoint, {}).get("score")
        if score is not None and (best is None or score > best):
            self.best_checkpoint = checkpoint_name

    def terminate(self):
        """Stop recording; load the best-scoring checkpoint's adapter (with no scores at all, the last weights stay)."""
        self.data.stop()
        if self.best_checkpoint and self.best_checkpoint != self.last_checkpoint:
            self.load_adapter(self.checkpoints[self.best_checkpoint]["path"])
        self.peft_model.eval()

    def cancel(self):
        self.terminate()

    def status(self):
        return self.get_status()

    # --- weights ---------------------------------------------------------------------------
    def load_adapter(self, path):
        """Copy a saved adapter's LoRA weights into this job's adapter."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = _adapter_folder(path, self.job_id)
        with self.engine.lock:
            set_peft_model_state_dict(self.peft_model, load_file(folder / "adapter_model.safetensors"), adapter_name=self.job_id)
            self.engine.weights_changed()

    # --- training --------------------------------------------------------------------------
    def _train(self, groups) -> StepLog:
        kw = self.train_kwargs
        start = time.perf_counter()
        failure_score = float(kw.get("format_failure_score", -1))
        rewards = [float(c["reward"]) for g in groups for c in g]
        rows, check = self.data.rows(groups)
        self.checks.append(check)
        if check.nonfinite_groups:
            log.warning("GRPO step %d: %d group(s) with a non-finite reward skipped", self._steps, check.nonfinite_groups)
        trainable = [r for r in rows if abs(r.advantage) > 1e-8]
        loss_value, grad_norm = 0.0, 0.0
        if trainable:
            loss_value, grad_norm = self._update(trainable)
        return StepLog(step=self._steps, groups=len(groups), trained_groups=check.groups_with_variance,
                       mean_reward=sum(rewards) / max(1, len(rewards)),
                       format_failures=sum(r <= failure_score for r in rewards) / max(1, len(rewards)),
                       loss=loss_value, grad_norm=grad_norm, seconds=time.perf_counter() - start,
                       fresh_groups=check.fresh_groups, matched_share=check.matched_share,
                       sampled_share=check.sampled_share)

    def _update(self, rows):
        """Optimizer steps on ``rows`` (``grpo_data.TrainRow``: sampled ids, rollout log-probs, advantage).

        Each optimizer step takes ``per_device_train_batch_size * gradient_accumulation_steps`` rows (all of
        them when ``gradient_accumulation_steps`` is unset), and the rows are passed ``num_iterations`` times,
        as in TRL. The loss is PPO's clipped ratio to the log-probabilities the rollout sampled with
        (``epsilon``, 0.2 by default): 1 at the first pass, so that step is plain policy gradient.
        """
        import torch

        kw = self.train_kwargs
        tok, model = self.engine.tokenizer, self.peft_model
        micro = int(kw.get("per_device_train_batch_size", 4))
        accumulation = kw.get("gradient_accumulation_steps")
        per_step = micro * int(accumulation) if accumulation else len(rows)
        iterations = int(kw.get("num_iterations", 1))
        epsilon = float(kw.get("epsilon", 0.2))
        loss_type, beta = kw.get("loss_type", "dapo"), float(kw.get("beta", 0.0))
        max_len = kw.get("max_completion_length") or 256
        temperatures = {r.temperature for r in rows}
        if len(temperatures) != 1 or not next(iter(temperatures)) > 0:
            raise TutorialError(f"GRPO rows must share one sampling temperature > 0, got {sorted(temperatures)}")
        temperature = temperatures.pop()
        rows = sorted(rows, key=lambda r: r.prompt_ids)  # rows sharing a prompt prefix side by side
        encoded = [(r.prompt_ids, r.completion_ids[:max_len]) for r in rows]
        masked = [r.nonblank for r in rows]
        blank = self.engine.blank_tokens() if any(masked) else None
        old = [torch.tensor(r.old_logprobs[:max_len]) for r in rows]
        advantages = torch.tensor([r.advantage for r in rows], dtype=torch.float32)
        steps = _optimizer_steps(len(rows), micro, per_step)
        losses, norm = [], 0.0
        # Checkpointing recomputes activations (less memory) but drops the shared-prefix states; sharing is faster.
        checkpointing = bool(kw.get("gradient_checkpointing", False))
        logprobs = _completion_logprobs if checkpointing else shared_prefix_logprobs
        with self.engine.lock, _checkpointing(model, checkpointing):
            model.train()
            for _ in range(iterations):
                for step_chunks in steps:
                    tokens = sum(len(encoded[i][1]) for c in step_chunks for i in c)
                    completions = sum(len(c) for c in step_chunks)
                    for chunk in step_chunks:
                        batch = [encoded[i] for i in chunk]
                        first = [masked[i] for i in chunk]
                        # fp32 like the rollouts (see local_lm.load_model): the ratio is 1 at the sampling weights
                        logps, masks = logprobs(model, tok, batch, temperature, first, blank)
                        ref = None
                        if beta > 0:
                            with torch.no_grad(), model.disable_adapter():
                                ref, _ = logprobs(model, tok, batch, temperature, first, blank)
                        old_logps = torch.zeros_like(logps)
                        for row, i in enumerate(chunk):
                            old_logps[row, : len(old[i])] = old[i]
                        loss = grpo_loss.policy_loss(logps.float(), old_logps, advantages[chunk.start:chunk.stop], masks,
                                                     epsilon, loss_type, beta, ref,
                                                     denominator=max(1, tokens if loss_type == "dapo" else completions))
                        if not torch.isfinite(loss):
                            log.warning("GRPO step %d: non-finite loss skipped", self._steps)
                            self.optimizer.zero_grad(set_to_none=True)
                            model.eval()
                            return float("nan"), 0.0
                        loss.backward()
                        losses.append(loss.item())
                    norm = grpo_loss.clipped_step(self.optimizer, self.params, float(kw.get("max_grad_norm", 1.0)))
                    if not math.isfinite(norm):
                        log.warning("GRPO step %d: non-finite gradient skipped", self._steps)
                    self.engine.weights_changed()
            model.eval()
        return sum(losses) / max(1, iterations * len(steps)), norm


def _optimizer_steps(n: int, micro: int, per_step: int) -> list[list[range]]:
    """Split ``n`` items into optimizer steps of ``per_step`` items, each a list of micro-batches (index ranges)."""
    return [[range(i, min(i + micro, j + per_step, n)) for i in range(j, min(j + per_step, n), micro)]
            for j in range(0, n, per_step)]


@contextmanager
def _checkpointing(model, enabled: bool):
    """Recompute activations in the backward pass instead of keeping them (train_kwargs gradient_checkpointing)."""
    if not enabled:
        yield
        return
    base = model.get_base_model()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        base.activation_checkpointing_disable()


def _completion_logprobs(model, tokenizer, encoded, temperature: float = 1.0, nonblank=None, blank_mask=None):
    """Per-token log-probabilities of each completion under ``model`` at ``temperature``, and their mask.

    Rows flagged in ``nonblank`` were sampled with blank first tokens masked out (``decoding``); their first
    token's log-probability is taken under the same mask, as it was sampled.

    Rows are left-padded so every completion ends at the right edge; the LM head then runs only on the
    last ``longest completion + 1`` positions (``logits_to_keep``), not on the long prompts, which cuts
    the step's peak memory and time several-fold. Positions follow the attention mask, as in generation.
    """
    import torch

    width = max(len(p) + len(c) for p, c in encoded)
    keep = max(len(c) for _, c in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (p, c) in enumerate(encoded):
        ids[row, width - len(p) - len(c):] = torch.tensor(p + c)
        attention[row, width - len(p) - len(c):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep + 1,
                   use_cache=False).logits[:, :-1]
    if nonblank is not None and any(nonblank):
        logits = decoding.mask_blank_first(logits, [keep - len(c) if flag else None
                                                    for (_, c), flag in zip(encoded, nonblank)], blank_mask)
    logps = grpo_loss.token_logprobs(logits, ids[:, width - keep:], temperature)
    out = torch.zeros(len(encoded), keep)
    mask = torch.zeros(len(encoded), keep)
    for row, (_, c) in enumerate(encoded):
        out[row, : len(c)] = logps[row, keep - len(c):]
        mask[row, : len(c)] = 1
    return out, mask


def shared_prefix_logprobs(model, tokenizer, encoded, temperature: float = 1.0, nonblank=None, blank_mask=None):
    """``_completion_logprobs`` computed once for the prompt prefix the rows share (the default, without checkpointing).

    The rollouts of one claim start with the same long prompt (the claim, the search results); a field's
    second call repeats the first call's prompt. So the longest common prefix of the rows' prompts runs
    once, batch 1, and every row continues from its states (gradients flow back into it); only each row's
    own prompt tail and completion are computed per row. Same values as the padded computation.
    """
    import torch
    from transformers import DynamicCache

    prompts = [p for p, _ in encoded]
    shared = min(len(p) for p in prompts)
    for p in prompts[1:]:
        n = 0
        while n < shared and p[n] == prompts[0][n]:
            n += 1
        shared = n
    shared = max(1, shared)
    body = (model.get_base_model() if hasattr(model, "get_base_model") else model)  # LoRA layers sit inside it
    head = body.model(input_ids=torch.tensor([prompts[0][:shared]]), use_cache=True)
    rows = len(encoded)
    tails = [p[shared:] + c for p, c in encoded]
    width = max(len(t) for t in tails)
    ids = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((rows, shared + width), dtype=torch.long)
    attention[:, :shared] = 1
    for row, tail in enumerate(tails):
        ids[row, : len(tail)] = torch.tensor(tail)
        attention[row, shared: shared + len(tail)] = 1
    past = DynamicCache(ddp_cache_data=[(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                                        for layer in head.past_key_values.layers])
    positions = torch.arange(shared, shared + width)[None].expand(rows, -1)
    hidden = body.model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=past,
                        use_cache=True).last_hidden_state
    # the state that predicts tail token j sits at j - 1; the head's last state predicts tail token 0
    states = torch.cat([head.last_hidden_state[:, -1:].expand(rows, -1, -1), hidden[:, :-1]], dim=1)
    keep = max(len(c) for _, c in encoded)
    index = torch.zeros((rows, keep), dtype=torch.long)
    targets = torch.zeros((rows, keep), dtype=torch.long)
    mask = torch.zeros(rows, keep)
    for row, (p, c) in enumerate(encoded):
        start = len(p) - shared
        index[row, : len(c)] = torch.arange(start, start + len(c))
        targets[row, : len(c)] = torch.tensor(c)
        mask[row, : len(c)] = 1
    # the LM head (49k words) runs only where a completion token is predicted: most of the memory otherwise
    picked = body.lm_head(states.gather(1, index[..., None].expand(-1, -1, states.shape[-1])))
    if nonblank is not None and any(nonblank):
        picked = decoding.mask_blank_first(picked, [0 if flag else None for flag in nonblank], blank_mask)
    return grpo_loss.token_logprobs(picked, targets, temperature) * mask, mask


def _adapter_folder(path, adapter_name=None):
    """The folder holding ``adapter_config.json``: ``path`` itself, or the sub-folder peft writes for a named adapter."""
    from pathlib import Path

    folder = Path(path)
    if (folder / "adapter_config.json").exists():
        return folder
    nested = sorted(p.parent for p in folder.glob("*/adapter_config.json"))
    if adapter_name and (folder / adapter_name / "adapter_config.json").exists():
        return folder / adapter_name
    if len(nested) == 1:
        return nested[0]
    raise TutorialError(f"no single LoRA adapter in {folder}: expected one adapter_config.json")


class LocalGRPOProvider(Provider):
    """The provider to pass as ``dspy.LM(..., provider=LocalGRPOProvider())`` for the embedded model."""

    def __init__(self):
        super().__init__()
        self.reinforceable = True
        self.jobs = []  # every job this provider started, newest last (06 reads the training log)
        provider = self

        class _Job(LocalReinforceJob):
            def initialize(self):
                super().initialize()
                provider.jobs.append(self)

        self.ReinforceJob = _Job

    @staticmethod
    def is_provider_model(model: str) -> bool:
        return model.startswith("local/")


def remove_lora(engine) -> None:
    """Take every LoRA layer out of the engine's model: it generates with the original weights again."""
    peft_model = getattr(engine, "peft_model", None)
    if peft_model is not None:
        with engine.lock:
            engine.model = peft_model.unload()
            engine.peft_model = None
            engine.weights_changed()
