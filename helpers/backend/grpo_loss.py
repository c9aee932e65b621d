"""GRPO's math as plain functions on torch tensors: no model, no dspy (06's trainer calls these).

- ``group_advantages``: how much better each rollout of one claim did than its siblings (reward minus the
  group mean, optionally divided by the group's standard deviation).
- ``batch_advantages``: the same for every group of a batch, each against its own mean: a claim that is easy
  for every rollout must not look "good" next to a hard claim.
- ``token_logprobs``: log-probability of each sampled token under softmax(logits / temperature), the very
  distribution the rollout sampled from, so the ratio to the rollout's log-probs is 1 at unchanged weights.
- ``policy_loss``: PPO's clipped objective per token, -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A):
  once a token's probability has moved more than ``epsilon`` in the advantage's direction, it stops pulling.
  "dapo" averages over all completion tokens of the batch, "grpo" over each completion, then over completions.
  An optional k3 KL penalty (``beta``) keeps the policy near a reference, as in TRL.
- ``clipped_step``: rescale the gradient to at most ``max_grad_norm``, skip the step if it is inf/nan.
"""

import math

import torch

LOSS_TYPES = ("dapo", "grpo")


def group_advantages(rewards: list[float], scale_rewards: bool) -> list[float]:
    """Reward minus the group mean; divided by the group's sample std (n - 1) + 1e-4 when ``scale_rewards``."""
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if not scale_rewards:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / max(1, len(rewards) - 1))
    return [c / (std + 1e-4) for c in centred]


def batch_advantages(groups: list[list[float]], scale_rewards: bool) -> list[list[float]]:
    """``group_advantages`` of each group (the rollouts of one claim) on its own, never one batch-wide mean."""
    return [group_advantages(rewards, scale_rewards) for rewards in groups]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) at ``ids``: logits [..., V] and ids [...] give log-probs [...] (float32)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (the rollout's sampling temperature), got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                epsilon: float, loss_type: str = "dapo", beta: float = 0.0, ref_logps: torch.Tensor | None = None,
                denominator: float | None = None) -> torch.Tensor:
    """Scalar PPO-clipped GRPO loss of completions [B, T] with one advantage per row [B].

    ``mask`` is 1 on tokens to train (sampled completion tokens), 0 elsewhere. ``denominator`` replaces the
    batch's own count (masked tokens for "dapo", rows for "grpo") when one optimizer step spans several
    micro-batches, so each micro-batch's loss adds up to the step's mean.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).reshape(-1, 1)
    ratio = torch.exp(logps - old_logps.detach())
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps (the reference model's log-probs of the same tokens)")
        diff = ref_logps.detach() - logps
        per_token = per_token + beta * (torch.exp(diff) - diff - 1)
    if loss_type == "grpo":
        per_row = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_row.sum() / (denominator if denominator is not None else max(1, per_row.numel()))
    return (per_token * mask).sum() / (denominator if denominator is not None else mask.sum().clamp(min=1))


def clipped_step(optimizer: torch.optim.Optimizer, params, max_grad_norm: float) -> float:
    """Clip the gradient norm of ``params`` to ``max_grad_norm``, step only if it is finite, zero the grads.

    Returns the norm before clipping (inf/nan when the step was skipped).
    """
    params = list(params)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if torch.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    return float(norm)
