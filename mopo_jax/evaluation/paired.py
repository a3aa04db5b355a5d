"""Paired, low-variance statistics of evaluated policies: expected win rates from several samples per prompt,
percentile-bootstrap intervals over prompts (and seeds), and the verdicts drawn from them.

Every policy of a comparison is evaluated on the same prompts against the same reference samples, so two policies'
per-prompt values are paired: the bootstrap resamples the *prompts* once per draw for both, and the prompt-level noise
they share cancels in the difference. With several seeds a method's values are a ``[seeds, prompts]`` array; each draw
also resamples that method's seeds (independently per method: seeds are not paired between methods).

A verdict is only drawn from an interval:

* constraint: ``"met"`` when the interval's lower bound is ``>= b``, ``"not met"`` when its upper bound is ``< b``,
  ``"undecided"`` when ``b`` lies inside it;
* dominance: A ``"dominates"`` B when the intervals of both paired differences ``A - B`` lie above 0, is
  ``"dominated"`` when both lie below 0, else ``"undecided"``.

Pure NumPy; the draws come from ``numpy.random.default_rng(seed)``, so every number is reproducible.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

LEVEL = 0.95
DRAWS = 4000


class Interval(NamedTuple):
    """A point estimate and its two-sided ``level`` percentile-bootstrap interval."""

    estimate: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.estimate, self.low, self.high]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh is odd, so sigmoid(d) + sigmoid(-d) = 1 holds to rounding: a policy equal to its reference scores 1/2.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _per_prompt_samples(name: str, values) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[1] < 1:
        raise ValueError(f"{name} must be [prompts, samples] with at least one sample, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} holds non-finite values")
    return values


def expected_win_rates(policy_rewards, reference_rewards) -> np.ndarray:
    """Per prompt ``x``: ``w(x) = 1/(S S') sum_{j, j'} sigmoid(r(x, y_j) - r(x, y'_{j'}))``, ``[N]`` float64.

    The U-statistic of the expected win rate ``E_{y ~ pi, y' ~ ref} sigmoid(r(x, y) - r(x, y'))`` from ``S`` policy
    samples ``policy_rewards [N, S]`` and ``S'`` reference samples ``reference_rewards [N, S']`` of the same prompts
    (Bradley-Terry rewards of a preference model). With common random numbers a policy equal to its reference draws
    the same samples and scores exactly 1/2 at every prompt.
    """
    policy = _per_prompt_samples("policy_rewards", policy_rewards)
    reference = _per_prompt_samples("reference_rewards", reference_rewards)
    if policy.shape[0] != reference.shape[0]:
        raise ValueError(f"policy_rewards and reference_rewards must cover the same prompts, got {policy.shape[0]} "
                         f"and {reference.shape[0]}")
    return _sigmoid(policy[:, :, None] - reference[:, None, :]).mean(axis=(1, 2))


def paired_win_fractions(policy_rewards, reference_rewards) -> np.ndarray:
    """Per prompt: ``1/S sum_j (1[r(y_j) > r(y'_j)] + 1/2 1[r(y_j) = r(y'_j)])``, the judged (hard) win rate of the
    policy's sample ``j`` over the reference's sample ``j`` drawn with the same random numbers; ``[N]`` float64."""
    policy = _per_prompt_samples("policy_rewards", policy_rewards)
    reference = _per_prompt_samples("reference_rewards", reference_rewards)
    if policy.shape != reference.shape:
        raise ValueError(f"paired samples need equal [prompts, samples] shapes, got {policy.shape} and "
                         f"{reference.shape}")
    return ((policy > reference) + 0.5 * (policy == reference)).mean(axis=1)


def _as_seed_grid(name: str, values) -> np.ndarray:
    """``[seeds, prompts]`` (a single run's ``[prompts]`` is one seed)."""
    grid = np.asarray(values, np.float64)
    if grid.ndim == 1:
        grid = grid[None]
    if grid.ndim != 2 or grid.shape[0] < 1 or grid.shape[1] < 1:
        raise ValueError(f"{name} must be [prompts] or [seeds, prompts] with at least one of each, got shape "
                         f"{np.shape(values)}")
    if not np.isfinite(grid).all():
        raise ValueError(f"{name} holds non-finite values")
    return grid


def _check_level(level: float, draws: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if int(draws) != draws or draws < 100:
        raise ValueError(f"draws must be an integer >= 100, got {draws}")


def _resampled_means(grid: np.ndarray, prompt_draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mean of ``grid [S, N]`` over resampled prompts ``prompt_draws [D, N]`` and seeds drawn from ``rng``: ``[D]``."""
    per_seed = grid[:, prompt_draws].mean(axis=-1).T  # [D, S]
    seeds = grid.shape[0]
    if seeds == 1:
        return per_seed[:, 0]
    seed_draws = rng.integers(0, seeds, size=(prompt_draws.shape[0], seeds))
    return np.take_along_axis(per_seed, seed_draws, axis=1).mean(axis=1)


def _percentiles(estimate: float, draws: np.ndarray, level: float) -> Interval:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return Interval(float(estimate), float(low), float(high))


def bootstrap_interval(values, *, level: float = LEVEL, draws: int = DRAWS, seed: int = 0) -> Interval:
    """The mean of per-prompt ``values`` (``[N]``, or ``[seeds, N]``) with its percentile-bootstrap interval.

    Each of ``draws`` resamples draws ``N`` prompts with replacement and, with several seeds, as many seeds with
    replacement; the interval holds the central ``level`` of the resampled means.
    """
    _check_level(level, draws)
    grid = _as_seed_grid("values", values)
    rng = np.random.default_rng(seed)
    prompt_draws = rng.integers(0, grid.shape[1], size=(int(draws), grid.shape[1]))
    return _percentiles(grid.mean(), _resampled_means(grid, prompt_draws, rng), level)


def paired_difference_interval(a, b, *, level: float = LEVEL, draws: int = DRAWS, seed: int = 0) -> Interval:
    """``mean(a) - mean(b)`` of two methods' per-prompt values on the same prompts, with its paired
    percentile-bootstrap interval: each draw resamples the prompts once for both (``a [Sa, N]`` and ``b [Sb, N]``,
    or ``[N]``), and each method's seeds independently."""
    _check_level(level, draws)
    grid_a, grid_b = _as_seed_grid("a", a), _as_seed_grid("b", b)
    if grid_a.shape[1] != grid_b.shape[1]:
        raise ValueError(f"paired values need the same prompts, got {grid_a.shape[1]} and {grid_b.shape[1]}")
    rng = np.random.default_rng(seed)
    prompt_draws = rng.integers(0, grid_a.shape[1], size=(int(draws), grid_a.shape[1]))
    differences = _resampled_means(grid_a, prompt_draws, rng) - _resampled_means(grid_b, prompt_draws, rng)
    return _percentiles(grid_a.mean() - grid_b.mean(), differences, level)


def constraint_verdict(interval: Interval, threshold: float) -> str:
    """``"met"`` (lower bound ``>= threshold``), ``"not met"`` (upper bound ``< threshold``) or ``"undecided"``
    (the threshold lies inside the interval)."""
    if interval.low >= threshold:
        return "met"
    if interval.high < threshold:
        return "not met"
    return "undecided"


def dominance_verdict(*differences: Interval) -> str:
    """From the paired differences ``A - B`` of every objective: ``"dominates"`` when every interval lies above 0,
    ``"dominated"`` when every interval lies below 0, else ``"undecided"``."""
    if not differences:
        raise ValueError("dominance_verdict needs at least one paired difference")
    if all(d.low > 0 for d in differences):
        return "dominates"
    if all(d.high < 0 for d in differences):
        return "dominated"
    return "undecided"


def calibration(estimate: float, stderr: float, judged: float, judged_interval) -> dict:
    """How a training-time estimate of a win rate (MOPO's dual reading, with its standard error) compares with the
    evaluated value (with its percentile-bootstrap interval at :data:`LEVEL`): the difference and whether it lies
    within their combined interval, ``z sqrt(se_1^2 + se_2^2)`` with the evaluation's standard error read off its
    interval as ``half-width / z`` (``z`` the normal quantile of the level). The two come from independent prompts
    and samples, so their errors add in quadrature."""
    z = NormalDist().inv_cdf(0.5 + LEVEL / 2)
    judged_stderr = (float(judged_interval[1]) - float(judged_interval[0])) / (2 * z)
    half_width = z * math.sqrt(float(stderr) ** 2 + judged_stderr ** 2)
    difference = float(estimate) - float(judged)
    return {"estimate": float(estimate), "estimate_stderr": float(stderr), "judged": float(judged),
            "judged_interval": [float(v) for v in judged_interval], "difference": difference,
            "combined_half_width": half_width, "within": bool(abs(difference) <= half_width)}
