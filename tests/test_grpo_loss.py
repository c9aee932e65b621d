"""Model-free tests of GRPO's advantages, log-probs, clipped loss and optimizer step (synthetic tensors)."""

import math

import pytest
import torch

from helpers.backend import grpo_loss

E = math.exp


def test_group_advantages_exact():
    assert grpo_loss.group_advantages([1.0, 0.0, 0.0, 1.0], False) == pytest.approx([0.5, -0.5, -0.5, 0.5])
    std = math.sqrt(4 * 0.25 / 3)  # sample std (n - 1)
    expected = [c / (std + 1e-4) for c in (0.5, -0.5, -0.5, 0.5)]
    assert grpo_loss.group_advantages([1.0, 0.0, 0.0, 1.0], True) == pytest.approx(expected)
    assert grpo_loss.group_advantages([0.3, 0.3, 0.3], True) == pytest.approx([0.0, 0.0, 0.0])  # a tie teaches nothing
    assert grpo_loss.group_advantages([0.7], True) == [0.0]


def test_batch_advantages_are_per_group():
    # Two claims with different means: one batch-wide mean (1.6) would call every rollout of group 2 good.
    groups = [[1.0, 0.0], [3.0, 2.0, 4.0]]
    assert grpo_loss.batch_advantages(groups, False) == [pytest.approx([0.5, -0.5]), pytest.approx([0.0, -1.0, 1.0])]
    s1 = math.sqrt(0.5) + 1e-4
    s2 = 1.0 + 1e-4
    assert grpo_loss.batch_advantages(groups, True) == [pytest.approx([0.5 / s1, -0.5 / s1]),
                                                        pytest.approx([0.0, -1.0 / s2, 1.0 / s2])]


def test_token_logprobs_use_the_sampling_temperature():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]])  # [B=1, T=2, V=3]
    ids = torch.tensor([[2, 1]])
    out = grpo_loss.token_logprobs(logits, ids, temperature=0.5)  # logits / 0.5 = [0, 2, 4] and [6, 0, 0]
    assert out.shape == (1, 2) and out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([4 - math.log(1 + E(2) + E(4)), 0 - math.log(E(6) + 2)], rel=1e-6)
    at_one = grpo_loss.token_logprobs(logits, ids, temperature=1.0)
    assert at_one[0].tolist() == pytest.approx([2 - math.log(1 + E(1) + E(2)), 0 - math.log(E(3) + 2)], rel=1e-6)
    # bf16 logits are read in float32
    half = grpo_loss.token_logprobs(logits.to(torch.bfloat16), ids, temperature=0.5)
    assert half.dtype == torch.float32 and half[0].tolist() == pytest.approx(out[0].tolist(), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -0.7])
def test_token_logprobs_reject_a_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        grpo_loss.token_logprobs(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), temperature)


def _ratio_case():
    """Row 0 has A = +1, row 1 has A = -1; log-ratios 0.5 (past 1 + eps), 0.1 (inside), -0.5 (past 1 - eps)."""
    old = torch.zeros(2, 3)
    logps = torch.tensor([[0.5, 0.1, -0.5], [-0.5, 0.5, 0.1]], requires_grad=True)
    return logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 3)


def test_policy_loss_clips_the_ratio():
    logps, old, adv, mask = _ratio_case()
    loss = grpo_loss.policy_loss(logps, old, adv, mask, epsilon=0.2, loss_type="dapo")
    # row 0 (A=+1): -min(r, clip(r)) = -1.2 (clipped), -e^0.1, -e^-0.5 (below the band: unclipped side is smaller)
    # row 1 (A=-1): -min(-r, -clip(r)) = 0.8 (clipped), e^0.5 (above the band: unclipped), e^0.1
    expected = (-1.2 - E(0.1) - E(-0.5) + 0.8 + E(0.5) + E(0.1)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dlogp of -A*r is -A*r; a clipped token contributes exactly nothing
    expected_grad = [[0.0, -E(0.1) / 6, -E(-0.5) / 6], [0.0, E(0.5) / 6, E(0.1) / 6]]
    assert logps.grad[0].tolist() == pytest.approx(expected_grad[0], rel=1e-6, abs=0)
    assert logps.grad[1].tolist() == pytest.approx(expected_grad[1], rel=1e-6, abs=0)
    assert logps.grad[0, 0].item() == 0.0 and logps.grad[1, 0].item() == 0.0


def test_policy_loss_at_ratio_one_is_reinforce_and_old_logps_get_no_gradient():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    old = logps.detach().clone().requires_grad_(True)
    loss = grpo_loss.policy_loss(logps, old, torch.tensor([0.5, -2.0]), torch.ones(2, 2), epsilon=0.2)
    loss.backward()
    assert loss.item() == pytest.approx((-0.5 * 2 + 2.0 * 2) / 4)
    assert logps.grad.tolist() == [pytest.approx([-0.125, -0.125]), pytest.approx([0.5, 0.5])]
    assert old.grad is None


def test_policy_loss_dapo_and_grpo_normalise_differently():
    # Row 0 has one trained token, row 1 three; the masked tokens' log-probs must not matter at all.
    logps = torch.tensor([[0.0, 9.0, -9.0], [0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, 1.0])
    dapo = grpo_loss.policy_loss(logps, logps.detach(), adv, mask, epsilon=0.2, loss_type="dapo")
    grpo = grpo_loss.policy_loss(logps, logps.detach(), adv, mask, epsilon=0.2, loss_type="grpo")
    assert dapo.item() == pytest.approx((-2 - 3) / 4)  # every token once
    assert grpo.item() == pytest.approx((-2 + -1) / 2)  # each completion's mean, then the mean of completions
    (dapo + grpo).backward()
    assert logps.grad[0, 1].item() == 0.0 and logps.grad[0, 2].item() == 0.0
    # one optimizer step over several micro-batches: divide by the step's count instead
    assert grpo_loss.policy_loss(logps, logps.detach(), adv, mask, 0.2, "dapo", denominator=8).item() == pytest.approx(-5 / 8)
    assert grpo_loss.policy_loss(logps, logps.detach(), adv, mask, 0.2, "grpo", denominator=4).item() == pytest.approx(-3 / 4)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss.policy_loss(logps, logps.detach(), adv, mask, 0.2, "sum")


def test_policy_loss_k3_kl_term():
    logps = torch.zeros(1, 2, requires_grad=True)
    ref = torch.full((1, 2), math.log(2.0))
    loss = grpo_loss.policy_loss(logps, logps.detach(), torch.tensor([0.0]), torch.ones(1, 2), 0.2,
                                 beta=0.5, ref_logps=ref)
    assert loss.item() == pytest.approx(0.5 * (2 - math.log(2) - 1))  # beta * (e^d - d - 1), d = ref - logp
    loss.backward()
    assert logps.grad.tolist() == [pytest.approx([0.5 * (1 - 2) / 2] * 2)]  # d/dlogp = beta * (1 - e^d) / N
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss.policy_loss(logps, logps.detach(), torch.tensor([0.0]), torch.ones(1, 2), 0.2, beta=0.5)


def _sgd(grad):
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor(grad)
    return p, torch.optim.SGD([p], lr=1.0)


def test_clipped_step_clips_the_gradient_norm():
    p, opt = _sgd([300.0, 400.0])
    norm = grpo_loss.clipped_step(opt, [p], max_grad_norm=1.0)
    assert norm == pytest.approx(500.0)  # the norm before clipping
    assert p.detach().tolist() == pytest.approx([-0.6, -0.8])  # moved by exactly max_grad_norm
    assert p.grad is None
    small, opt = _sgd([0.3, 0.4])
    assert grpo_loss.clipped_step(opt, [small], max_grad_norm=1.0) == pytest.approx(0.5)
    assert small.detach().tolist() == pytest.approx([-0.3, -0.4])  # under the limit: untouched


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_clipped_step_skips_a_non_finite_gradient(bad):
    p, opt = _sgd([bad, 1.0])
    norm = grpo_loss.clipped_step(opt, [p], max_grad_norm=1.0)
    assert not math.isfinite(norm)
    assert p.detach().tolist() == [0.0, 0.0]
    assert p.grad is None
