"""GRPO on CPU for the embedded model: a DSPy Provider whose ReinforceJob trains LoRA adapters (06_grpo_training).

Arbor needs NVIDIA GPUs. ``LocalGRPOProvider`` gives ``dspy.teleprompt.grpo.GRPO`` the same job interface
Arbor does -- ``initialize``, ``get_status``, ``step``, ``save_checkpoint``, ``terminate`` -- but trains the
in-process SmolLM2 weights: the job keeps GRPO's bookkeeping (steps, checkpoints, the best one, the data check) and
its ``helpers.backend.lora_policy.LoraPolicy`` holds the weights (LoRA layers injected into the very model the engine
generates with, so the next rollout already uses the updated weights).

What is trained is not dspy's re-formatted text but the engine's own records of what it sampled
(``helpers.backend.grpo_data.OnPolicyData``); the loss is ``helpers.backend.grpo_loss``. The path, in order:
the engine's records (``engine.recorder``, filled by ``BatchingEngine._finished``) → ``OnPolicyData.rows`` →
``LoraPolicy.update`` (log-probs at the rollout temperature, PPO ratio to the rollout's log-probs) →
``grpo_loss.policy_loss`` → ``grpo_loss.clipped_step``.

Arbor's ``ArborGRPO`` compile loop cannot drive this job: it writes ``repetition_penalty`` and
``top_k=-1`` onto the LM, which dspy 3.4.1's custom-engine path refuses (``grpo_training.make_compiler``
says so before any work).
"""

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from dspy.clients.provider import Provider, ReinforceJob
from dspy.clients.utils_finetune import TrainDataFormat

from helpers.backend.grpo_data import DataCheck, OnPolicyData
from helpers.backend.lora_policy import LoraPolicy
from helpers.engine import local_lm
from helpers.util.paths import display_path
from helpers.util import atomic
from helpers.util.errors import TutorialError

log = logging.getLogger(__name__)


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
    held_back_recall: float | None = None
    checkpoint: str | None = None
    fresh_groups: int = 0  # groups built from this step's rollouts (repeats and leftovers are not trained)
    matched_share: float = 1.0  # items whose every field is found among the engine's sampled rows
    sampled_share: float = 1.0  # trained tokens that are sampled tokens (the data-path check: must be 1.0)
    hidden_found: float | None = None  # share of claims with a rollout that found a gold page the claim does not name


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
        self.policy = None  # a LoraPolicy, from initialize()
        self._batch_id = 0
        self._steps = 0

    # --- the ReinforceJob protocol ---------------------------------------------------------
    def initialize(self):
        kw = self.train_kwargs
        self.policy = LoraPolicy(self.engine, self.job_id, kw.get("lora_config"), int(kw.get("seed", 0)),
                                 float(kw.get("learning_rate", 1e-5)), float(kw.get("weight_decay", 0.0)))
        if self.checkpoint_dir:  # one folder per job (its id is new each run); killed saves of earlier jobs leave nothing
            for folder in [Path(self.checkpoint_dir), *Path(self.checkpoint_dir).glob("grpo-*")]:
                atomic.clean_folder(folder)
            print(f"GRPO job {self.job_id}: checkpoints in {display_path(self.job_folder)}", flush=True)
            self.save_checkpoint("step-0000", score=kw.get("initial_score"), metadata={"step": 0})
        self.data.start()
        self._last_end = time.perf_counter()

    @property
    def job_folder(self):
        return Path(self.checkpoint_dir) / self.job_id

    def get_status(self):
        """Arbor's status. ``pending_batch_ids``: twice the groups a step yields when every rollout reaches every
        predictor. dspy fills them from a queue it refills with shuffled copies of the step's groups; when a step
        yields fewer (a rollout that ends before the query call), the copies left queued would open the next steps,
        and with exactly ``groups_per_step`` pending only some of each later step's own groups would be handed over.
        With twice as many every group of every step arrives at least once; repeats and leftovers match no records
        of the step and are not trained (``DataCheck.stale_groups``)."""
        return {"job_id": self.job_id, "status": "running", "current_model": self.lm.model,
                "checkpoints": {k: v["path"] for k, v in self.checkpoints.items()},
                "last_checkpoint": self.last_checkpoint,
                "pending_batch_ids": list(range(self._batch_id, self._batch_id + 2 * int(self.train_kwargs.get("groups_per_step", 1))))}

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
        if on_step is not None:  # e.g. grpo_mini.py --select: recall on held-back claims; unmeasured steps do not compete
            measured = on_step(record)
            score = record.held_back_recall = None if measured is None else float(measured)
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
        with atomic.atomic_dir(path) as tmp:
            self.policy.save(tmp)
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
            self.policy.load(self.checkpoints[self.best_checkpoint]["path"])
        self.policy.model.eval()

    def cancel(self):
        self.terminate()

    def status(self):
        return self.get_status()

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
            loss_value, grad_norm = self.policy.update(trainable, kw, self._steps)
            self.data.count_sampled(self.policy.consumed, check)
        return StepLog(step=self._steps, groups=len(groups), trained_groups=check.groups_with_variance,
                       mean_reward=sum(rewards) / max(1, len(rewards)),
                       format_failures=sum(r <= failure_score for r in rewards) / max(1, len(rewards)),
                       loss=loss_value, grad_norm=grad_norm, seconds=time.perf_counter() - start,
                       fresh_groups=check.fresh_groups, matched_share=check.matched_share,
                       sampled_share=check.sampled_share)


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
