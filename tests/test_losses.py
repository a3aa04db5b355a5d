"""Losses against NumPy formulas, the IPO reductions, accumulation, and NaN safety."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mopo_jax as mj


def _random_log_probs(seed, batch=16):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=batch) * 3 - 20, jnp.float32) for _ in range(4)]


def test_mopo_pairwise_reduces_to_ipo_for_one_objective():
    """K = 1, mu uniform over the pair with self-comparison, hard labels: exactly (h - 1/(2 tau))^2."""
    chosen, rejected, ref_chosen, ref_rejected = _random_log_probs(0)
    tau = 0.1
    margins = mj.pairwise_win_rate_margins(jnp.ones((16, 1)), include_self=True)
    mopo = mj.mopo_pairwise_loss(chosen, rejected, ref_chosen, ref_rejected, margins, jnp.zeros((0,)), tau)
    ipo = mj.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, tau)
    h = np.asarray((chosen - ref_chosen) - (rejected - ref_rejected), np.float64)
    numpy_ipo = np.sum((h - 1 / (2 * tau)) ** 2)
    chex.assert_trees_all_close(mopo.total, ipo.total, rtol=1e-6)
    np.testing.assert_allclose(float(ipo.total), numpy_ipo, rtol=1e-5)
    assert float(mopo.denominator) == 16


def test_mopo_pairwise_reduces_to_ipo_when_multipliers_vanish():
    """lambda = 0: the secondary labels (even contradicting ones) drop out, leaving IPO on the primary."""
    chosen, rejected, ref_chosen, ref_rejected = _random_log_probs(1)
    rng = np.random.default_rng(2)
    labels = np.stack([np.ones(16), rng.integers(0, 2, 16), rng.integers(0, 2, 16)], axis=1).astype(np.float32)
    margins = mj.pairwise_win_rate_margins(labels, include_self=True)
    mopo = mj.mopo_pairwise_loss(chosen, rejected, ref_chosen, ref_rejected, margins, jnp.zeros(2), 0.08)
    ipo = mj.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.08)
    chex.assert_trees_all_close(mopo.total, ipo.total, rtol=1e-6)
    # With lambda > 0 the secondary labels do move the target.
    moved = mj.mopo_pairwise_loss(chosen, rejected, ref_chosen, ref_rejected, margins, jnp.ones(2), 0.08)
    assert abs(float(moved.total) - float(ipo.total)) > 1.0


def test_pairwise_margins_with_and_without_self_comparison_and_missing_labels():
    probs = jnp.array([[1.0, 0.3, jnp.nan]])
    np.testing.assert_allclose(np.asarray(mj.pairwise_win_rate_margins(probs, include_self=True)), [[0.5, -0.2, 0.0]])
    np.testing.assert_allclose(np.asarray(mj.pairwise_win_rate_margins(probs, include_self=False)), [[1.0, -0.4, 0.0]])


def test_dpo_matches_numpy_and_soft_label_form():
    chosen, rejected, ref_chosen, ref_rejected = _random_log_probs(3)
    h = np.asarray((chosen - ref_chosen) - (rejected - ref_rejected), np.float64)
    beta = 0.2
    hard = mj.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    np.testing.assert_allclose(float(hard.total), np.sum(np.log1p(np.exp(-beta * h))), rtol=1e-5)
    p = np.linspace(0, 1, 16)
    soft = mj.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, preference_probs=p)
    want = np.sum(p * np.log1p(np.exp(-beta * h)) + (1 - p) * np.log1p(np.exp(beta * h)))
    np.testing.assert_allclose(float(soft.total), want, rtol=1e-5)


def test_soft_ipo_minimiser():
    p = 0.8
    tau = 0.1
    grid = jnp.linspace(-10, 10, 20001)
    zeros = jnp.zeros_like(grid)
    loss = jax.vmap(
        lambda h: mj.ipo_loss(h[None], jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), tau, preference_probs=jnp.array([p])).total
    )(grid)
    assert zeros.shape == grid.shape
    np.testing.assert_allclose(float(grid[jnp.argmin(loss)]), (2 * p - 1) / (2 * tau), atol=2e-3)


def test_loss_terms_accumulate_to_the_true_mean():
    """Summing totals and denominators over micro-batches with different numbers of valid rows gives the full mean."""
    chosen, rejected, ref_chosen, ref_rejected = _random_log_probs(4, batch=12)
    valid = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1], bool)
    full = mj.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1, valid_mask=valid)
    parts = [
        mj.dpo_loss(chosen[s], rejected[s], ref_chosen[s], ref_rejected[s], 0.1, valid_mask=valid[s])
        for s in (slice(0, 3), slice(3, 10), slice(10, 12))
    ]
    accumulated = parts[0] + parts[1] + parts[2]
    chex.assert_trees_all_close(accumulated.mean(), full.mean(), rtol=1e-6)
    h = np.asarray((chosen - ref_chosen) - (rejected - ref_rejected))[valid]
    np.testing.assert_allclose(float(full.mean()), np.mean(np.log1p(np.exp(-0.1 * h))), rtol=1e-5)


def test_invalid_rows_never_produce_nan():
    chosen, rejected, ref_chosen, ref_rejected = _random_log_probs(5, batch=4)
    valid = jnp.array([True, False, True, False])
    for loss in (
        lambda c: mj.dpo_loss(c, rejected, ref_chosen, ref_rejected, 0.1, valid_mask=valid),
        lambda c: mj.ipo_loss(c, rejected, ref_chosen, ref_rejected, 0.1, valid_mask=valid),
        lambda c: mj.mopo_pairwise_loss(c, rejected, ref_chosen, ref_rejected, jnp.ones((4, 2)) * 0.5, jnp.ones(1),
                                        0.1, valid_mask=valid),
    ):
        value, grad = jax.value_and_grad(lambda c: loss(c).mean())(chosen)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
        assert np.all(np.asarray(grad)[~np.asarray(valid)] == 0.0)
    empty = mj.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1, valid_mask=jnp.zeros(4, bool))
    assert float(empty.mean()) == 0.0 and float(empty.denominator) == 0.0


def test_weighted_bc_minimiser_is_the_closed_form():
    """Gradient descent on weighted BC over free logits recovers the target distribution."""
    rng = np.random.default_rng(6)
    target = jnp.log(jnp.asarray(rng.dirichlet(np.ones(5), size=3), jnp.float32))
    logits = jnp.zeros((3, 5))
    grad_fn = jax.jit(jax.grad(lambda l: mj.weighted_bc_loss(jax.nn.log_softmax(l), target).mean()))
    for _ in range(3000):
        logits = logits - 3.0 * grad_fn(logits)
    chex.assert_trees_all_close(jax.nn.log_softmax(logits), target, atol=1e-3)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda a: mj.ipo_loss(a, a, a, a, 0.0), "tau"),
        (lambda a: mj.ipo_loss(a, a, a, a, -1.0), "tau"),
        (lambda a: mj.dpo_loss(a, a, a, a, 0.1, preference_probs=jnp.full(3, 1.5)), "preference_probs"),
        (lambda a: mj.dpo_loss(a.at[1].set(jnp.nan), a, a, a, 0.1), "policy_chosen"),
        (lambda a: mj.mopo_pairwise_loss(a, a, a, a, jnp.zeros((3, 2)), jnp.array([-1.0]), 0.1), "multipliers"),
        (lambda a: mj.pairwise_win_rate_margins(jnp.array([[1.2, 0.5]])), "preference_probs"),
    ],
)
def test_loss_value_errors(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call(jnp.zeros(3))


def test_pairwise_objective_values_limits():
    labels = jnp.array([[1.0, 0.0], [1.0, jnp.nan], [0.0, 1.0]])
    at_reference = mj.pairwise_objective_values(jnp.zeros(3), labels)
    np.testing.assert_allclose(np.asarray(at_reference), [0.5, 0.5], atol=1e-7)
    # A policy that always picks the first response: its win rate against the pair is w(y) = 1/4 + P/2.
    always_first = mj.pairwise_objective_values(jnp.full(3, 50.0), labels)
    np.testing.assert_allclose(np.asarray(always_first), [(0.75 + 0.75 + 0.25) / 3, (0.25 + 0.75) / 2], atol=1e-6)


def test_user_loop_example_meets_its_constraint():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "optax_pairwise_loop.py"
    spec = importlib.util.spec_from_file_location("optax_pairwise_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values, multipliers = module.main(steps=400, threshold=0.58, verbose=False)
    assert float(values[1]) >= 0.58 - 1e-3 and float(multipliers[0]) > 0


def test_dpo_margin_offset_and_pair_weights():
    chosen, rejected, ref_chosen, ref_rejected = _random_log_probs(7, batch=6)
    h = np.asarray((chosen - ref_chosen) - (rejected - ref_rejected), np.float64)
    offset = np.linspace(-1, 1, 6)
    weights = np.array([1.0, 0.5, 0.0, 2.0, 1.0, 1.0])
    terms = mj.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.3, weights=weights, margin_offset=offset)
    per_row = np.log1p(np.exp(-(0.3 * h - offset)))
    np.testing.assert_allclose(float(terms.total), np.sum(weights * per_row), rtol=1e-5)
    np.testing.assert_allclose(float(terms.denominator), weights.sum())
