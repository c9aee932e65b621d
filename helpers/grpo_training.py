"""Running GRPO on ResearchHop and keeping its results (06_grpo_training).

``train`` builds the compiler a preset names (dspy's ``GRPO``, or Arbor's ``ArborGRPO`` in the full
profile), runs it, and returns the trained program with the backend job, whose per-step log is the
training curve. ``save_trained`` / ``load_trained`` write and read back the program and its adapter.
"""

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from helpers import atomic, local_lm, metrics
from helpers.dspy_compat import loggers_quieted, stragglers_not_resubmitted
from helpers.errors import TutorialError
from helpers.grpo_presets import GRPOPreset, train_kwargs_for
from helpers.profiles import Profile


def make_compiler(preset: GRPOPreset, metric, adapter, train_kwargs, **overrides):
    """``GRPO(...)`` or ``ArborGRPO(...)`` with the preset's settings; ``overrides`` win (e.g. num_train_steps)."""
    kwargs = {**preset.compile_kwargs, **overrides}
    if preset.optimizer == "ArborGRPO":
        try:
            from arbor import ArborGRPO
        except ImportError:
            raise TutorialError("ArborGRPO needs `pip install arbor-ai` on a machine with NVIDIA GPUs") from None
        return ArborGRPO(metric=metric, train_kwargs=train_kwargs, **kwargs)
    from dspy.teleprompt.grpo import GRPO

    return GRPO(metric=metric, adapter=adapter, train_kwargs=train_kwargs, **kwargs)


def training_reward(preset: GRPOPreset, search):
    """The metric GRPO rewards rollouts with: the seeds' ``recall``, or ``ranked_recall`` where the preset says so."""
    if preset.reward == "ranked_recall":
        return metrics.ranked_recall(search)
    if preset.reward != "recall":
        raise TutorialError(f"preset {preset.name!r} names an unknown reward {preset.reward!r}: use recall or ranked_recall")
    return metrics.recall


def checkpoint_dir(profile: Profile) -> Path:
    return profile.cache_dir / "checkpoints"


def train(program, trainset, lm, adapter, metric, preset: GRPOPreset, profile: Profile, on_step=None,
          initial_score=None, **overrides):
    """Compile ``program`` (its predictors use ``lm``) with GRPO; returns ``(trained_program, job)``.

    ``on_step(record)`` may return a score (06: dev recall on a subset); ``initial_score`` is the untrained
    model's score on the same scale, so the untrained adapter can win "best checkpoint" too.
    """
    extra = {"on_step": on_step, "initial_score": initial_score} if on_step else {}
    examples = {**preset.compile_kwargs, **overrides}["num_dspy_examples_per_grpo_step"]
    extra["groups_per_step"] = examples * len(program.predictors())  # one group per example and predictor
    train_kwargs = train_kwargs_for(preset, checkpoint_dir(profile), **extra)
    program.set_lm(lm)
    compiler = make_compiler(preset, metric, adapter, train_kwargs, **overrides)
    with _quiet_grpo_logs(), stragglers_not_resubmitted():
        trained = compiler.compile(student=program, trainset=trainset, valset=None)
    jobs = getattr(lm.provider, "jobs", [])
    return trained, (jobs[-1] if jobs else None)


def _quiet_grpo_logs():
    """GRPO warns once per unparsed rollout and per low-diversity group; the step log counts those instead."""
    return loggers_quieted(logging.ERROR, "dspy.teleprompt.grpo", "dspy.teleprompt.bootstrap_trace",
                           "dspy.teleprompt.bootstrap_finetune", "dspy.utils.parallelizer", "dspy.evaluate.evaluate",
                           root_filter=_drop_parse_failure_warnings)  # bootstrap_trace logs on the root logger


def _drop_parse_failure_warnings(record: logging.LogRecord) -> bool:
    return "Failed to parse output for example" not in record.getMessage()


def dev_recall_after_each_step(search, examples, lm, threads: int, every: int = 1):
    """An ``on_step`` callback: recall (%) of a fresh ResearchHop on ``examples`` with ``lm``, every ``every`` steps."""
    from helpers.evaluation import run_eval
    from helpers.research_hop import ResearchHop

    def measure(record):
        if record.step % every:
            return None
        program = ResearchHop(num_docs=4, num_hops=2, search=search)
        program.set_lm(lm)
        return run_eval(program, examples, threads=threads).score

    return measure


def curve(job) -> pd.DataFrame:
    """The job's per-step log as a table (reward, format failures, loss, dev recall when measured)."""
    return pd.DataFrame([vars(s) for s in job.history]).set_index("step")


def save_trained(profile: Profile, program, job, name: str = "researchhop_grpo") -> Path:
    """Save ``program.save(...)`` JSON and the best checkpoint's adapter side by side in ``<cache>/trained/<name>``."""
    target = profile.cache_dir / "trained" / name
    best = job.best_checkpoint or job.last_checkpoint
    if best is None:
        raise TutorialError("the GRPO job saved no checkpoint: nothing to save")
    with atomic.atomic_dir(target) as tmp:
        program.save(str(tmp / "program.json"))
        shutil.copytree(job.checkpoints[best]["path"], tmp / "adapter")
        (tmp / "trained.json").write_text(json.dumps({"checkpoint": best, "job": job.job_id}))
    return target


def load_trained(profile: Profile, fresh_program, name: str = "researchhop_grpo", adapter_name: str = "reloaded"):
    """Load the saved adapter into the live engine (as ``adapter_name``) and the saved program into ``fresh_program``."""
    folder = profile.cache_dir / "trained" / name
    if not (folder / "program.json").exists():
        raise TutorialError(f"no trained program in {folder}: run 06_grpo_training first")
    engine = local_lm.live_engine(local_lm.MODEL_NAME)
    if engine is None:
        raise TutorialError("load_trained needs the embedded LM: build it with lm_setup.make_lm(profile) first")
    activate_adapter(engine, folder / "adapter", adapter_name)
    # the saved LM names our engine class (helpers.local_lm.BatchingEngine); DSPy asks before importing it
    fresh_program.load(str(folder / "program.json"), allow_pickle=False, allow_unsafe_lm_state=True)
    return fresh_program


def activate_adapter(engine, path: Path, adapter_name: str) -> None:
    """Load a saved LoRA adapter from disk and make it the one the engine generates with."""
    from peft import PeftModel

    from helpers.grpo_backend import _adapter_folder, quiet_peft

    folder = str(_adapter_folder(path))
    with engine.lock, quiet_peft():
        peft_model = getattr(engine, "peft_model", None)
        if peft_model is None:  # a fresh kernel: wrap the original weights with the saved adapter
            engine.peft_model = PeftModel.from_pretrained(engine.model, folder, adapter_name=adapter_name)
        else:
            if adapter_name in peft_model.peft_config:
                peft_model.delete_adapter(adapter_name)
            peft_model.load_adapter(folder, adapter_name=adapter_name)
            peft_model.set_adapter(adapter_name)
        engine.peft_model.eval()
