"""Bradley-Terry preference models against an independent SciPy fit."""

import numpy as np
from scipy import optimize

from mopo_jax.evaluation.preference_models import accuracy, fit_bradley_terry, preference_probability, rewards


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
