"""Bradley-Terry preference models against an independent SciPy fit."""

import numpy as np
import pytest
from scipy import optimize

from mopo_jax.evaluation.preference_models import (
    accuracy,
    fit_bradley_terry,
    preference_probability,
    rewards,
    select_ridge,
)


def _data(seed=0, pairs=400, dim=6):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=dim)
    a, b = rng.normal(size=(2, pairs, dim)) * rng.uniform(0.5, 2.0, size=dim)
    p = 1 / (1 + np.exp(-(a - b) @ truth))
    first_wins = rng.random(pairs) < p
    chosen = np.where(first_wins[:, None], a, b)
    rejected = np.where(first_wins[:, None], b, a)
    return chosen, rejected, truth


def test_fit_matches_scipy_on_the_same_objective():
    chosen, rejected, _ = _data()
    model = fit_bradley_terry(chosen, rejected, l2=1e-2, steps=300)
    both = np.concatenate([chosen, rejected])
    mean, scale = both.mean(0), both.std(0) + 1e-6
    diff = (chosen - rejected) / scale

    def objective(w):
        m = diff @ w
        return np.mean(np.logaddexp(0, -m)) + 1e-2 * w @ w

    reference = optimize.minimize(objective, np.zeros(diff.shape[1]), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(np.asarray(model.weights), reference, atol=2e-4)
    del mean


def test_held_out_accuracy_and_probabilities():
    chosen, rejected, truth = _data(seed=1, pairs=2000)
    model = fit_bradley_terry(chosen[:1500], rejected[:1500])
    held_out = accuracy(model, chosen[1500:], rejected[1500:])
    # The Bayes accuracy of the generating model on the same pairs bounds what any fit can reach.
    bayes = np.mean((chosen[1500:] - rejected[1500:]) @ truth > 0)
    assert bayes - 0.05 <= held_out <= bayes + 0.05 and held_out > 0.6
    p = np.asarray(preference_probability(model, chosen[:5], rejected[:5]))
    q = np.asarray(preference_probability(model, rejected[:5], chosen[:5]))
    np.testing.assert_allclose(p + q, 1.0, atol=1e-6)
    assert rewards(model, chosen[:3]).shape == (3,)


def test_ridge_selection_scores_each_fold_like_a_fit_on_the_other_folds():
    chosen, rejected, _ = _data(seed=2, pairs=120, dim=5)
    grid = (1e-3, 1.0)
    selection = select_ridge(chosen, rejected, grid, folds=3, seed=4, steps=300)
    fold_of = np.random.default_rng(4).permutation(120) % 3
    for g, l2 in enumerate(grid):
        scores = []
        for f in range(3):
            train, held = fold_of != f, fold_of == f
            model = fit_bradley_terry(chosen[train], rejected[train], l2=l2, steps=300)
            margin = np.asarray(rewards(model, chosen[held]) - rewards(model, rejected[held]), np.float64)
            scores.append(np.mean(-np.logaddexp(0, -margin)))
        assert selection.heldout_log_likelihood[g] == pytest.approx(np.mean(scores), abs=1e-4)
    assert selection.l2 == grid[int(np.argmax(selection.heldout_log_likelihood))]


def test_ridge_selection_prefers_a_strong_ridge_on_noise_and_a_weak_one_on_signal():
    rng = np.random.default_rng(5)
    noise = rng.normal(size=(2, 80, 40))
    assert select_ridge(noise[0], noise[1], (1e-4, 1e-2, 10.0)).l2 == 10.0
    chosen, rejected, _ = _data(seed=6, pairs=1500, dim=4)
    assert select_ridge(chosen, rejected, (1e-4, 10.0)).l2 == 1e-4
    with pytest.raises(ValueError, match="folds"):
        select_ridge(chosen[:3], rejected[:3], (1.0,), folds=5)
