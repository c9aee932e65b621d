"""Uncertainty of a score and of a before/after gain on the same claims (06 and benchmarks/grpo_mini.py)."""

import math

import numpy as np

from helpers.util.errors import TutorialError


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample sd / sqrt(n)); the standard error is nan for a single value."""
    if len(values) == 0:
        raise TutorialError("mean_se needs at least one value")
    x = np.asarray(values, dtype=float)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def paired_bootstrap_ci(before: list[float], after: list[float], n_boot: int = 10000, alpha: float = 0.05,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``after - before`` and its (1 - alpha) percentile-bootstrap interval, resampling claims.

    ``before[i]`` and ``after[i]`` are scores of the same claim, so the claims (not the two lists apart)
    are drawn with replacement: ``n_boot`` resamples from numpy's ``default_rng(seed)``.
    Returns ``(mean difference, low, high)`` in the units given.
    """
    if len(before) != len(after):
        raise TutorialError(f"paired scores need one before and one after per claim: got {len(before)} and {len(after)}")
    if len(before) == 0:
        raise TutorialError("paired_bootstrap_ci needs at least one claim")
    if not 0 < alpha < 1 or n_boot < 1:
        raise TutorialError(f"need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return _exact(diff.mean()), _exact(low), _exact(high)


def seeds_and_claims_ci(diffs: list[list[float]], n_boot: int = 10000, alpha: float = 0.05,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean gain over training runs and claims, with a (1 - alpha) bootstrap interval that resamples both.

    ``diffs[s][i]``: after - before on claim ``i`` in the run with sampling seed ``s`` (every run on the same claims).
    Each resample draws the runs with replacement and, independently, the claims, and averages the drawn runs on the
    drawn claims, so the interval covers how much a run varies (which a paired bootstrap over one run's claims
    cannot) and how much the claims do, with a claim's difficulty shared by every run. Returns ``(mean, low, high)``.
    """
    try:
        d = np.asarray(diffs, dtype=float)
    except ValueError:
        d = np.empty(0)  # runs of different lengths
    if d.ndim != 2 or d.size == 0:
        raise TutorialError("need one list of per-claim gains per run, every run on the same claims (none empty)")
    if not 0 < alpha < 1 or n_boot < 1:
        raise TutorialError(f"need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    runs, claims = d.shape
    means = np.empty(n_boot)
    for b in range(n_boot):
        means[b] = d[np.ix_(rng.integers(0, runs, runs), rng.integers(0, claims, claims))].mean()
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return _exact(d.mean()), _exact(low), _exact(high)


def _exact(value) -> float:
    """``value`` without floating-point noise: recalls come in thirds and quarters, so a run whose claims only trade
    places sums to 7e-16, not 0, and would count as a gain (``> 0``). Rounded to 1e-9 points; never -0.0."""
    return round(float(value), 9) + 0.0
