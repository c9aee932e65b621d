"""CPU machinery a learner may skip: the local GRPO job that dspy's GRPO drives (on-policy data, loss, LoRA)."""
