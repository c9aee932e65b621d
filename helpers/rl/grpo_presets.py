"""GRPO configurations: the seeds' GPU set-ups and the CPU preset of the mini profile (06_grpo_training).

``compile_kwargs`` go to ``GRPO(...)`` / ``ArborGRPO(...)``, ``train_kwargs`` to the training backend. 06 writes
the mini preset's ``compile_kwargs`` out as its ``GRPO(...)`` call (tests/test_project.py keeps the two equal) and
shows all three side by side; the full profile and the benchmarks pick a preset by name (``profile.grpo_preset``).
"""

from dataclasses import dataclass, field

import pandas as pd

from helpers.util.errors import TutorialError

SEED_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]}
# The mini preset's LoRA drops dropout: with it on, the PPO ratio at unchanged weights was 0.62-1.26, not 1.
MINI_LORA = {**SEED_LORA, "lora_dropout": 0.0}


@dataclass(frozen=True)
class GRPOPreset:
    name: str
    description: str
    optimizer: str  # "GRPO" (dspy.teleprompt.grpo) or "ArborGRPO" (arbor)
    compile_kwargs: dict
    train_kwargs: dict
    rollout_temperature: float
    needs_gpus: bool
    reward: str = "recall"  # GRPO's training metric: the seeds' "recall" or "ranked_recall" (helpers.program.metrics)
    notes: dict = field(default_factory=dict)


PRESETS = {
    # DSPy's "Online RL for Multi-Hop Research" tutorial: 6 GPUs. Its first versions called the group
    # size `num_samples_per_input`; dspy 3.x names it `num_rollouts_per_grpo_step`.
    "seed_6gpu": GRPOPreset(
        name="seed_6gpu",
        description="the seed tutorial's dspy GRPO run on 6 GPUs (Qwen via Arbor)",
        optimizer="GRPO",
        compile_kwargs=dict(num_dspy_examples_per_grpo_step=6, num_rollouts_per_grpo_step=4, exclude_demos=True,
                            multitask=True, num_train_steps=100, num_threads=16, use_train_as_val=False,
                            num_steps_for_val=10, report_train_scores=False),
        train_kwargs={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 8, "temperature": 1.0,
                      "beta": 0.04, "learning_rate": 1e-5, "gradient_checkpointing": True,
                      "gradient_checkpointing_kwargs": {"use_reentrant": False}, "bf16": True,
                      "lr_scheduler_type": "constant_with_warmup", "max_prompt_length": None,
                      "max_completion_length": None, "scale_rewards": True, "max_grad_norm": 0.5, "lora": True,
                      "num_inference_gpus": 1, "num_training_gpus": 1},
        rollout_temperature=0.7,
        needs_gpus=True,
        notes={"num_rollouts_per_grpo_step": "was num_samples_per_input",
               "num_inference_gpus": "was gpu_config=MultiGPUConfig(num_inference_gpus=1, ...)"},
    ),
    # Arbor's README / the seed's ArborGRPO version: 4 GPUs (3 training + 1 inference), 24 rollouts per step.
    "seed_arbor_4gpu": GRPOPreset(
        name="seed_arbor_4gpu",
        description="the seed's ArborGRPO run on 4 GPUs (3 training, 1 inference)",
        optimizer="ArborGRPO",
        compile_kwargs=dict(num_dspy_examples_per_grpo_step=6, num_rollouts_per_grpo_step=24, exclude_demos=True,
                            num_train_steps=1000, num_threads=16, use_train_as_val=False, num_steps_for_val=50,
                            checkpoint="single-best"),
        train_kwargs={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "temperature": 1.0,
                      "top_k": -1, "top_p": 1.0, "repetition_penalty": 1.0, "beta": 0.0, "learning_rate": 1e-6,
                      "gradient_checkpointing": True, "bf16": True, "lr_scheduler_type": "constant_with_warmup",
                      "loss_type": "dapo", "max_steps": 1000, "report_to": "wandb", "log_completions": True,
                      "logging_steps": 1, "max_prompt_length": None, "max_completion_length": None,
                      "scale_rewards": False, "max_grad_norm": 1.0, "lora_config": SEED_LORA,
                      "num_training_gpus": 3, "num_inference_gpus": 1, "weight_decay": 0.001},
        rollout_temperature=1.0,
        needs_gpus=True,
        notes={"gradient_accumulation_steps": "24/6 in the seed"},
    ),
    # Tuned for 2 CPU cores and a 135M model: few, short GRPO steps, each split into several clipped
    # optimizer steps, and a reward that also credits gold pages ranked just below the cut. 4 steps of 3 claims x 4
    # rollouts (the seed's group size) keep 06, and with it `make test`, within its time on 2 cores;
    # benchmarks/grpo_mini.py --steps / --long / --claims-per-step measure larger runs.
    "mini": GRPOPreset(
        name="mini",
        description="CPU preset: SmolLM2-135M with LoRA, 4 short steps on 2 cores (06 writes it out as its GRPO(...) call)",
        optimizer="GRPO",
        compile_kwargs=dict(num_dspy_examples_per_grpo_step=3, num_rollouts_per_grpo_step=4, exclude_demos=True,
                            multitask=True, num_train_steps=4, num_threads=16, use_train_as_val=False,
                            num_steps_for_val=10, report_train_scores=False, failure_score=0.0,
                            format_failure_score=-0.1),
        train_kwargs={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
                      "epsilon": 0.2, "beta": 0.0, "loss_type": "dapo", "scale_rewards": True, "max_grad_norm": 1.0,
                      "bf16": True, "weight_decay": 0.0, "max_completion_length": 160, "lora_config": MINI_LORA,
                      "format_failure_score": -0.1},
        rollout_temperature=0.7,
        needs_gpus=False,
        reward="ranked_recall",
    ),
}


def get_preset(name: str) -> GRPOPreset:
    if name not in PRESETS:
        raise TutorialError(f"unknown GRPO preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def train_kwargs_for(preset: GRPOPreset, checkpoint_dir, **overrides) -> dict:
    """The preset's train_kwargs plus what the local backend needs: where to write checkpoints, groups per step."""
    kwargs = {**preset.train_kwargs, **overrides}
    kwargs["checkpoint_dir"] = str(checkpoint_dir)
    kwargs.setdefault("groups_per_step", preset.compile_kwargs["num_dspy_examples_per_grpo_step"] * 2)  # 2 predictors
    kwargs.setdefault("format_failure_score", preset.compile_kwargs.get("format_failure_score", -1.0))
    return kwargs


def comparison(active: str, *others: str) -> pd.DataFrame:
    """A table of the active preset beside others: one row per setting, blank where a preset lacks it (06)."""
    names = [active, *others]
    presets = [get_preset(n) for n in names]
    keys = []
    for p in presets:
        for k in [*p.compile_kwargs, *p.train_kwargs]:
            if k not in keys and k != "lora_config":
                keys.append(k)
    rows = {}
    for p in presets:
        merged = {**p.compile_kwargs, **p.train_kwargs, "training reward": p.reward,
                  "rollout temperature": p.rollout_temperature, "needs GPUs": p.needs_gpus}
        rows[p.name] = {k: ("" if merged.get(k) is None and k not in merged else str(merged.get(k)))
                        for k in ["training reward", "rollout temperature", "needs GPUs", *keys]}
    return pd.DataFrame(rows)
