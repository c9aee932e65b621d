"""GRPO on CPU for the embedded model: a DSPy Provider whose ReinforceJob trains LoRA adapters (06_grpo_training).

Arbor needs NVIDIA GPUs. ``LocalGRPOProvider`` gives ``dspy.teleprompt.grpo.GRPO`` (or Arbor's
``ArborGRPO`` compile loop) the same job interface Arbor does -- ``initialize``, ``get_status``,
``step``, ``save_checkpoint``, ``terminate`` -- but trains the in-process SmolLM2 weights. The LoRA
layers are injected into the very model the engine generates with, so the next rollout already
uses the updated weights; the engine's lock keeps generation and training apart.
"""

import json
import logging
import math
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from dspy.clients.provider import Provider, ReinforceJob
from dspy.clients.utils_finetune import TrainDataFormat

from helpers import atomic, local_lm
from helpers.errors import TutorialError

log = logging.getLogger(__name__)

DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]}


@dataclass
class StepLog:
    """One training step, as 06 plots it."""

    step: int
    groups: int
    trained_groups: int  # groups whose rewards differ; equal rewards give no gradient
    mean_reward: float
    format_failures: float  # share of completions rewarded at or below the format-failure score
    loss: float
    grad_norm: float
    seconds: float  # training (the weight update) only
    rollout_seconds: float = 0.0  # since the previous step ended: GRPO's rollouts and data preparation
    dev_recall: float | None = None
    checkpoint: str | None = None


@contextmanager
def quiet_peft():
    """peft 0.21 reads a transformers property deprecated in v5 when it wraps a model; nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def group_advantages(rewards, scale_rewards: bool) -> list[float]:
    """GRPO's group-relative advantages: reward minus the group mean, optionally divided by the group std."""
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if not scale_rewards:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / max(1, len(rewards) - 1))
    return [c / (std + 1e-4) for c in centred]


class LocalReinforceJob(ReinforceJob):
    """Trains LoRA adapters on the live embedded model from GRPO groups of {messages, completion, reward}."""

    def __init__(self, lm, train_kwargs=None):
        super().__init__(lm, train_kwargs)
        self.engine = local_lm.live_engine(local_lm.MODEL_NAME)
        if self.engine is None:
            raise TutorialError("no embedded LM is loaded: build the LM with lm_setup.make_lm(profile) first")
        self.job_id = self.train_kwargs.get("job_id") or f"grpo-{uuid.uuid4().hex[:8]}"
        self.checkpoint_dir = self.train_kwargs.get("checkpoint_dir")
        self.history: list[StepLog] = []
        self.best_checkpoint = None
        self._batch_id = 0
        self._steps = 0

    # --- the ReinforceJob protocol ---------------------------------------------------------
    def initialize(self):
        import torch
        from peft import LoraConfig, get_peft_model

        kw = self.train_kwargs
        config = LoraConfig(task_type="CAUSAL_LM", **{**DEFAULT_LORA, **(kw.get("lora_config") or {})})
        with self.engine.lock:
            torch.manual_seed(int(kw.get("seed", 0)))  # LoRA's A matrices start random
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
        self.peft_model = peft_model
        if self.checkpoint_dir:  # the untrained adapter competes too: "best" may be no training at all
            self.save_checkpoint("step-0000", score=kw.get("initial_score"), metadata={"step": 0})
        self._last_end = time.perf_counter()

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
        if on_step is not None:  # e.g. 06 measures dev recall; unmeasured steps do not compete for "best"
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
        from pathlib import Path

        path = Path(self.checkpoint_dir) / self.job_id / checkpoint_name
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
        """Load the best-scoring checkpoint's adapter; with no scores at all, the last weights stay."""
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

    # --- training --------------------------------------------------------------------------
    def _train(self, groups) -> StepLog:
        kw = self.train_kwargs
        start = time.perf_counter()
        failure_score = float(kw.get("format_failure_score", -1))
        rewards = [float(c["reward"]) for g in groups for c in g]
        items = []
        for group in groups:
            advantages = group_advantages([float(c["reward"]) for c in group], bool(kw.get("scale_rewards", True)))
            if max(abs(a) for a in advantages) < 1e-8:
                continue
            items.extend((c["messages"], c["completion"]["content"], a) for c, a in zip(group, advantages))
        trained = sum(1 for g in groups if len({float(c["reward"]) for c in g}) > 1)
        loss_value, grad_norm = 0.0, 0.0
        if items:
            loss_value, grad_norm = self._update(items)
        return StepLog(step=self._steps, groups=len(groups), trained_groups=trained,
                       mean_reward=sum(rewards) / max(1, len(rewards)),
                       format_failures=sum(r <= failure_score for r in rewards) / max(1, len(rewards)),
                       loss=loss_value, grad_norm=grad_norm, seconds=time.perf_counter() - start)

    def _update(self, items):
        """Optimizer steps on ``items`` = (messages, completion, advantage).

        Each optimizer step takes ``per_device_train_batch_size * gradient_accumulation_steps`` items (all of
        them when ``gradient_accumulation_steps`` is unset), and the items are passed ``num_iterations`` times,
        as in TRL. When that makes more than one step per batch, later steps see completions sampled by
        older weights, so the loss becomes PPO's clipped ratio to the log-probabilities before the update
        (``epsilon``, 0.2 by default).
        """
        import torch

        kw = self.train_kwargs
        tok, model = self.engine.tokenizer, self.peft_model
        micro = int(kw.get("per_device_train_batch_size", 4))
        accumulation = kw.get("gradient_accumulation_steps")
        per_step = micro * int(accumulation) if accumulation else len(items)
        iterations = int(kw.get("num_iterations", 1))
        epsilon = float(kw.get("epsilon", 0.2))
        clipped = iterations > 1 or per_step < len(items)
        loss_type, beta = kw.get("loss_type", "dapo"), float(kw.get("beta", 0.0))
        max_len = kw.get("max_completion_length") or 256
        encoded = [_encode(tok, messages, completion, max_len) for messages, completion, _ in items]
        advantages = torch.tensor([a for _, _, a in items], dtype=torch.float32)
        bf16 = local_lm.sampling_dtype() != torch.float32 and kw.get("bf16", True)
        steps = _optimizer_steps(len(items), micro, per_step)
        losses, norm = [], torch.tensor(0.0)
        checkpointing = bool(kw.get("gradient_checkpointing", True))  # on CPU: ~1/3 the peak memory, same time
        with self.engine.lock, _checkpointing(model, checkpointing):
            old = {}
            if clipped:  # the rollout policy's log-probabilities, before any step of this batch
                model.eval()
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    for chunk in (c for step_chunks in steps for c in step_chunks):
                        old[chunk.start] = _completion_logprobs(model, tok, [encoded[i] for i in chunk])[0].float()
            model.train()
            for _ in range(iterations):
                for step_chunks in steps:
                    tokens = sum(len(encoded[i][1]) for c in step_chunks for i in c)
                    completions = sum(len(c) for c in step_chunks)
                    self.optimizer.zero_grad(set_to_none=True)
                    for chunk in step_chunks:
                        batch = [encoded[i] for i in chunk]
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                            logps, masks = _completion_logprobs(model, tok, batch)
                            if beta > 0:
                                with torch.no_grad(), model.disable_adapter():
                                    ref, _ = _completion_logprobs(model, tok, batch)
                        adv = advantages[chunk.start:chunk.stop, None]
                        logps = logps.float()
                        if clipped:
                            ratio = torch.exp(logps - old[chunk.start])
                            per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
                        else:
                            per_token = -adv * logps
                        if beta > 0:
                            diff = ref.float() - logps
                            per_token = per_token + beta * (torch.exp(diff) - diff - 1)
                        if loss_type == "grpo":  # mean over each completion, then over completions
                            loss = ((per_token * masks).sum(1) / masks.sum(1).clamp(min=1)).sum() / completions
                        else:  # "dapo": every completion token counts once
                            loss = (per_token * masks).sum() / max(1, tokens)
                        if not torch.isfinite(loss):
                            log.warning("GRPO step %d: non-finite loss skipped", self._steps)
                            self.optimizer.zero_grad(set_to_none=True)
                            model.eval()
                            return float("nan"), 0.0
                        loss.backward()
                        losses.append(loss.item())
                    norm = torch.nn.utils.clip_grad_norm_(self.params, float(kw.get("max_grad_norm", 1.0)))
                    if torch.isfinite(norm):
                        self.optimizer.step()
                    else:
                        log.warning("GRPO step %d: non-finite gradient skipped", self._steps)
                    self.optimizer.zero_grad(set_to_none=True)
            model.eval()
        return sum(losses) / max(1, iterations * len(steps)), float(norm)


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


def _encode(tokenizer, messages, completion, max_len):
    """Prompt ids (chat template + generation prompt) and completion ids (+ end of turn), truncated."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"][: max_len - 1] + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def _completion_logprobs(model, tokenizer, encoded):
    """Per-token log-probabilities of each completion under ``model`` and their mask.

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
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, width - keep:, None]).squeeze(-1)
    out = torch.zeros(len(encoded), keep)
    mask = torch.zeros(len(encoded), keep)
    for row, (_, c) in enumerate(encoded):
        out[row, : len(c)] = logps[row, keep - len(c):]
        mask[row, : len(c)] = 1
    return out, mask


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
