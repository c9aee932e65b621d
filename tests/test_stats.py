"""The paired bootstrap and the standard error reported beside 06's and grpo_mini's gains."""

import math

import numpy as np
import pytest

from helpers.util import stats
from helpers.util.errors import TutorialError


def test_identical_scores_give_a_zero_interval():
    scores = [0.0, 1 / 3, 2 / 3, 1.0, 1 / 3]
    assert stats.paired_bootstrap_ci(scores, list(scores)) == (0.0, 0.0, 0.0)


def test_a_constant_shift_gives_that_shift_exactly():
    before = [0.2, 0.7, 0.4, 0.0, 1 / 3]
    after = [b + 0.1 for b in before]
    assert stats.paired_bootstrap_ci(before, after) == pytest.approx((0.1, 0.1, 0.1), abs=1e-12)


def _reference(before, after, n_boot, alpha, seed):
    """One resample at a time in plain Python, then the linear-interpolation percentile by hand."""
    rng = np.random.default_rng(seed)
    diff = [a - b for a, b in zip(after, before)]
    means = sorted(sum(diff[i] for i in rng.integers(0, len(diff), size=len(diff))) / len(diff) for _ in range(n_boot))

    def percentile(q):
        pos = q * (n_boot - 1)
        lo = math.floor(pos)
        return means[lo] + (pos - lo) * (means[min(lo + 1, n_boot - 1)] - means[lo])

    return sum(diff) / len(diff), percentile(alpha / 2), percentile(1 - alpha / 2)


def test_known_case_against_a_reference_computation():
    before = [0, 0.5, 1, 0.5, 0, 1, 0.5, 0]
    after = [0.5, 0.5, 1, 1, 0, 1, 0.5, 0.5]
    got = stats.paired_bootstrap_ci(before, after)
    assert got == pytest.approx((0.1875, 0.0625, 0.375))  # resampled means are multiples of 1/16
    assert got == pytest.approx(_reference(before, after, 10000, 0.05, 0))
    rng = np.random.default_rng(7)
    before = rng.uniform(size=40).tolist()
    after = (np.array(before) + rng.normal(0.05, 0.2, size=40)).tolist()
    assert stats.paired_bootstrap_ci(before, after, n_boot=2000, alpha=0.1, seed=3) == pytest.approx(
        _reference(before, after, 2000, 0.1, 3))


def test_the_bootstrap_resamples_claims_in_pairs():
    # Claims differ a lot (0 to 0.9) but every one gains 0.05 +- 0.01: only a paired interval is narrow.
    before = [i / 10 for i in range(10)]
    after = [b + 0.05 + (0.01 if i % 2 else -0.01) for i, b in enumerate(before)]
    gain, low, high = stats.paired_bootstrap_ci(before, after)
    assert gain == pytest.approx(0.05)
    assert 0.04 <= low < gain < high <= 0.06


def test_the_interval_is_close_to_the_normal_one_on_many_claims():
    rng = np.random.default_rng(1)
    before = rng.uniform(size=300).tolist()
    after = (np.array(before) + rng.normal(0.03, 0.25, size=300)).tolist()
    gain, low, high = stats.paired_bootstrap_ci(before, after)
    mean, se = stats.mean_se([a - b for a, b in zip(after, before)])
    assert gain == pytest.approx(mean)
    assert low == pytest.approx(mean - 1.96 * se, abs=0.1 * se)
    assert high == pytest.approx(mean + 1.96 * se, abs=0.1 * se)


def test_mean_se():
    assert stats.mean_se([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3) / 2))
    mean, se = stats.mean_se([0.4])
    assert mean == 0.4 and math.isnan(se)
    with pytest.raises(TutorialError):
        stats.mean_se([])


@pytest.mark.parametrize("before, after", [([0.1, 0.2], [0.3]), ([], [])])
def test_bad_pairs_are_refused(before, after):
    with pytest.raises(TutorialError):
        stats.paired_bootstrap_ci(before, after)


def test_runs_that_disagree_widen_the_interval_even_when_each_run_is_certain():
    """Four runs, each moving every claim by the same amount (no claim variance at all), but by different amounts:
    the interval must cover how the runs differ (resampling claims alone would give zero width)."""
    diffs = [[-10.0] * 100, [0.0] * 100, [0.0] * 100, [10.0] * 100]
    mean, low, high = stats.seeds_and_claims_ci(diffs)
    assert mean == 0.0 and low <= -2.5 and high >= 2.5
    assert stats.seeds_and_claims_ci([[3.0] * 50] * 4) == (3.0, 3.0, 3.0)


def test_identical_runs_give_the_claims_interval():
    rng = np.random.default_rng(1)
    one = list(rng.choice([-25.0, 0.0, 25.0, 50.0], size=200))
    _, low, high = stats.seeds_and_claims_ci([one] * 4, n_boot=4000)
    _, p_low, p_high = stats.paired_bootstrap_ci([0.0] * 200, one, n_boot=4000)
    assert abs(low - p_low) < 1.0 and abs(high - p_high) < 1.0


@pytest.mark.parametrize("diffs", [[], [[]], [[1.0, 2.0], [1.0]]])
def test_runs_of_unequal_claims_are_refused(diffs):
    with pytest.raises(TutorialError, match="same claims"):
        stats.seeds_and_claims_ci(diffs)


def test_no_change_is_zero_not_floating_point_noise():
    """Recalls come in thirds, so a run whose claims only trade places gained exactly nothing: its gain must be 0.0,
    never 7e-16, or grpo_mini's "seeds > 0" and a verdict's "interval above zero" count a draw as a gain."""
    import random

    r = random.Random(0)
    before = [r.choice([0.0, 100 / 3, 200 / 3, 100.0]) for _ in range(100)]
    after = before[:]
    r.shuffle(after)
    assert float(np.mean(np.subtract(after, before))) != 0  # the noise this guards against
    assert stats.paired_bootstrap_ci(before, after)[0] == 0.0
    diff = [a - b for a, b in zip(after, before)]
    assert stats.seeds_and_claims_ci([diff] * 4)[0] == 0.0
    assert f"{stats.paired_bootstrap_ci(before, after[::-1])[0]:+.1f}" != "-0.0"  # no negative zero printed
