"""Paired statistics: expected win rates, bootstrap intervals and verdicts against closed forms and plain loops."""

import math

import numpy as np
import pytest

from mopo_jax.evaluation.paired import (
    Interval,
    bootstrap_interval,
    constraint_verdict,
    dominance_verdict,
    expected_win_rates,
    paired_difference_interval,
    paired_win_fractions,
)


def test_expected_win_rates_match_a_double_loop():
    rng = np.random.default_rng(0)
    policy, reference = rng.normal(size=(5, 3)), rng.normal(size=(5, 4))
    loop = [np.mean([1.0 / (1.0 + math.exp(-(p - q))) for p in policy[i] for q in reference[i]]) for i in range(5)]
    np.testing.assert_allclose(expected_win_rates(policy, reference), loop, rtol=1e-12)


def test_a_policy_equal_to_its_reference_scores_one_half_at_every_prompt():
    rewards = np.random.default_rng(1).normal(scale=30.0, size=(7, 4))
    np.testing.assert_allclose(expected_win_rates(rewards, rewards), 0.5, atol=1e-15)
    np.testing.assert_array_equal(paired_win_fractions(rewards, rewards), 0.5)


def test_paired_win_fractions_count_sample_j_against_sample_j():
    policy = np.array([[3.0, 1.0], [0.0, 2.0]])
    reference = np.array([[1.0, 1.0], [5.0, 0.0]])
    # prompt 0: win, tie; prompt 1: loss, win (sample 1 of the policy is never compared with sample 0 of the other)
    np.testing.assert_array_equal(paired_win_fractions(policy, reference), [0.75, 0.5])


def test_per_prompt_arguments_are_checked():
    with pytest.raises(ValueError, match="same prompts"):
        expected_win_rates(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        expected_win_rates(np.array([[np.nan]]), np.zeros((1, 1)))
    with pytest.raises(ValueError, match="equal"):
        paired_win_fractions(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(np.zeros(5), level=1.0)
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference_interval(np.zeros(5), np.zeros(6))
    with pytest.raises(ValueError, match=r"\[seeds, prompts\]"):
        bootstrap_interval(np.zeros((2, 2, 2)))


def test_interval_width_matches_the_normal_theory_standard_error():
    values = np.random.default_rng(2).normal(size=400)
    interval = bootstrap_interval(values, draws=8000)
    normal_half_width = 1.959964 * values.std(ddof=1) / math.sqrt(values.size)
    assert interval.estimate == pytest.approx(values.mean())
    assert (interval.high - interval.low) / 2 == pytest.approx(normal_half_width, rel=0.06)
    assert interval.low < values.mean() < interval.high


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    covered = []
    for repetition in range(300):
        sample = (rng.random(120) < 0.3).astype(float)
        interval = bootstrap_interval(sample, draws=1000, seed=repetition)
        covered.append(interval.low <= 0.3 <= interval.high)
    # binomial spread of 300 repetitions at 0.95: 0.0126; the percentile bootstrap runs slightly short of nominal
    assert 0.91 <= np.mean(covered) <= 0.98


def test_seed_resampling_with_constant_seeds_gives_the_closed_form_interval():
    # Two seeds whose values do not vary over prompts: the resampled mean is 0.4, 0.5 or 0.6 with probabilities
    # 1/4, 1/2, 1/4, so the central 95% spans [0.4, 0.6].
    values = np.stack([np.full(50, 0.4), np.full(50, 0.6)])
    interval = bootstrap_interval(values, draws=4000)
    assert interval == pytest.approx(Interval(0.5, 0.4, 0.6))
    single = bootstrap_interval(np.full(50, 0.4))
    assert single == pytest.approx(Interval(0.4, 0.4, 0.4))


def test_paired_difference_is_the_bootstrap_of_the_per_prompt_differences():
    rng = np.random.default_rng(4)
    shared = rng.normal(size=200)  # prompt difficulty both methods see
    a, b = shared + 0.1 + 0.05 * rng.normal(size=200), shared + 0.05 * rng.normal(size=200)
    paired = paired_difference_interval(a, b, seed=7)
    assert paired == pytest.approx(bootstrap_interval(a - b, seed=7))
    assert 0.0 < paired.low < 0.1 < paired.high
    # Unpaired, the shared prompt noise would dominate: the interval of a alone is ten times wider.
    alone = bootstrap_interval(a, seed=7)
    assert alone.high - alone.low > 10 * (paired.high - paired.low)
    shifted = paired_difference_interval(b + 0.25, b)
    assert shifted == pytest.approx(Interval(0.25, 0.25, 0.25))


def test_verdicts_come_from_the_interval():
    assert constraint_verdict(Interval(0.6, 0.55, 0.65), 0.55) == "met"
    assert constraint_verdict(Interval(0.5, 0.45, 0.549), 0.55) == "not met"
    assert constraint_verdict(Interval(0.56, 0.52, 0.6), 0.55) == "undecided"
    assert constraint_verdict(Interval(0.5, 0.45, 0.55), 0.55) == "undecided"
    up, down, across = Interval(0.1, 0.02, 0.2), Interval(-0.1, -0.2, -0.01), Interval(0.05, -0.01, 0.1)
    assert dominance_verdict(up, up) == "dominates"
    assert dominance_verdict(down, down) == "dominated"
    assert dominance_verdict(up, across) == "undecided"
    assert dominance_verdict(up, down) == "undecided"
    with pytest.raises(ValueError):
        dominance_verdict()


def test_calibration_uses_the_combined_standard_error():
    """The dual's reading against the evaluation: the difference lies within z sqrt(se_dual^2 + se_eval^2), with
    se_eval = interval half-width / z (scipy's normal quantile); over independent normal draws of two unbiased
    estimates the verdict 'within' holds about 95% of the time."""
    from scipy.stats import norm

    from mopo_jax.evaluation.paired import calibration

    z = norm.ppf(0.975)
    got = calibration(0.55, 0.01, 0.52, [0.50, 0.54])
    half = z * np.sqrt(0.01**2 + (0.04 / (2 * z)) ** 2)
    assert got["difference"] == pytest.approx(0.03) and got["combined_half_width"] == pytest.approx(half)
    assert got["within"] is False and calibration(0.545, 0.01, 0.52, [0.50, 0.54])["within"] is True
    rng = np.random.default_rng(0)
    draws = [calibration(0.5 + 0.02 * a, 0.02, 0.5 + 0.01 * b, [0.5 + 0.01 * b - 0.01 * z, 0.5 + 0.01 * b + 0.01 * z])
             for a, b in rng.normal(size=(4000, 2))]
    assert np.mean([d["within"] for d in draws]) == pytest.approx(0.95, abs=0.012)
