"""The MOPO mathematics against independent references (NumPy formulas, SciPy solvers, autodiff of the Lagrangian)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import mopo_jax as mj
from mopo_jax.synthetic.exact import win_rates_numpy


def _bt_problem(seed=0, num_objectives=2, num_prompts=3, num_candidates=5):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(num_objectives, num_prompts, num_candidates)) * 2
    pref = 1 / (1 + np.exp(-(rewards[..., :, None] - rewards[..., None, :])))
    ref = rng.dirichlet(np.ones(num_candidates) * 2, size=num_prompts)
    return pref, ref


def test_win_rates_match_numpy_reference_with_missing_labels():
    pref, ref = _bt_problem(seed=1)
    rng = np.random.default_rng(2)
    hide = rng.random(pref.shape) < 0.4
    hide = (hide | np.swapaxes(hide, -1, -2)) & ~np.eye(pref.shape[-1], dtype=bool)
    pref = np.where(hide, np.nan, pref)
    for include_self in (True, False):
        got = mj.win_rates(pref, ref, include_self=include_self)
        want = win_rates_numpy(pref, ref, include_self=include_self)
        chex.assert_trees_all_close(np.asarray(got), want, atol=1e-6)


def test_win_rates_explicit_small_case():
    # One prompt, two candidates, y0 beats y1 with probability 0.8; mu = (0.25, 0.75).
    pref = np.array([[[[0.5, 0.8], [0.2, 0.5]]]])
    mu = np.array([[0.25, 0.75]])
    got = np.asarray(mj.win_rates(pref, mu, include_self=True))[0, 0]
    np.testing.assert_allclose(got, [0.25 * 0.5 + 0.75 * 0.8, 0.25 * 0.2 + 0.75 * 0.5], atol=1e-7)
    got = np.asarray(mj.win_rates(pref, mu, include_self=False))[0, 0]
    np.testing.assert_allclose(got, [0.8, 0.2], atol=1e-7)


def test_closed_form_is_stationary_point_of_lagrangian():
    """At pi_lambda the gradient of E_pi[w_0 + lambda.w] - tau KL(pi||pi_ref) over softmax logits vanishes."""
    pref, ref = _bt_problem(num_objectives=3)
    w = mj.win_rates(pref, ref)
    multipliers = jnp.array([0.7, 1.3])
    tau = 0.08

    def lagrangian(logits):
        log_pi = jax.nn.log_softmax(logits, axis=-1)
        pi = jnp.exp(log_pi)
        reward = jnp.einsum("k,kxn->xn", jnp.array([1.0, *multipliers]), w)
        return jnp.mean(jnp.sum(pi * reward, -1) - tau * jnp.sum(pi * (log_pi - jnp.log(ref)), -1))

    log_weights = mj.closed_form_log_weights(w, multipliers, tau, jnp.log(ref))
    gradient = jax.grad(lagrangian)(log_weights)
    chex.assert_trees_all_close(gradient, jnp.zeros_like(gradient), atol=2e-6)
    # And it is a maximum: random perturbations only lower the Lagrangian.
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert lagrangian(log_weights + 0.1 * rng.normal(size=log_weights.shape)) < lagrangian(log_weights)


def test_dual_gradient_is_constraint_residual():
    pref, ref = _bt_problem(num_objectives=3, seed=3)
    w = mj.win_rates(pref, ref)
    thresholds = jnp.array([0.55, 0.6])
    multipliers = jnp.array([0.4, 0.9])
    gradient = jax.grad(mj.dual_objective)(multipliers, w, jnp.log(ref), 0.08, thresholds)
    log_pi = mj.closed_form_log_weights(w, multipliers, 0.08, jnp.log(ref))
    residual = mj.secondary_values(log_pi, w) - thresholds
    chex.assert_trees_all_close(gradient, residual, atol=1e-5)


def _direct_worst_case(samples, base, eps):
    """min_Q E_Q[Z] s.t. KL(Q||q) <= eps, Q on the simplex (SLSQP on softmax logits)."""
    def kl(logits):
        q = np.exp(logits - logits.max())
        q /= q.sum()
        return q, float(np.sum(q * (np.log(q) - np.log(base))))

    best = np.inf
    for start in (np.log(base), np.log(base) - samples):
        result = optimize.minimize(
            lambda l: float(kl(l)[0] @ samples),
            start,
            constraints=[{"type": "ineq", "fun": lambda l: eps - kl(l)[1]}],
            method="SLSQP",
            options={"ftol": 1e-12, "maxiter": 500},
        )
        if kl(result.x)[1] <= eps + 1e-6:
            best = min(best, result.fun)
    return best


@pytest.mark.parametrize("eps", [0.02, 0.15, 0.5])
def test_robust_bound_equals_direct_constrained_minimisation(eps):
    rng = np.random.default_rng(4)
    samples = rng.uniform(0, 2, size=7)
    base = rng.dirichlet(np.ones(7))
    chi = mj.optimal_robust_chi(samples[None], jnp.log(base), eps)
    bound = mj.robust_lower_bound(samples[None], jnp.log(base), chi, eps).value[0]
    direct = _direct_worst_case(samples, base, eps)
    np.testing.assert_allclose(float(bound), direct, atol=2e-4)
    assert float(bound) < float(samples @ base)


def test_robust_bound_is_mean_at_zero_radius():
    rng = np.random.default_rng(5)
    samples = rng.uniform(0, 2, size=(2, 9))
    base = rng.dirichlet(np.ones(9))
    chi = mj.optimal_robust_chi(samples, jnp.log(base), 0.0, chi_max=1e4)
    bound = mj.robust_lower_bound(samples, jnp.log(base), chi, 0.0).value
    np.testing.assert_allclose(np.asarray(bound), samples @ base, atol=2e-4)


def test_robust_chi_gradient_matches_autodiff():
    rng = np.random.default_rng(6)
    samples = jnp.asarray(rng.uniform(0, 2, size=(2, 6)), jnp.float32)
    log_base = jnp.log(jnp.asarray(rng.dirichlet(np.ones(6)), jnp.float32))
    chi = jnp.array([0.3, 2.0])
    autodiff = jax.grad(lambda c: jnp.sum(mj.robust_lower_bound(samples, log_base, c, 0.1).value))(chi)
    chex.assert_trees_all_close(mj.robust_lower_bound(samples, log_base, chi, 0.1).chi_gradient, autodiff, atol=1e-4)


def test_multipliers_rise_under_violation_and_decay_under_slack():
    pref, ref = _bt_problem(seed=7)
    w = mj.win_rates(pref, ref)
    log_ref = jnp.log(ref)
    transformation = mj.mopo(mj.MOPOConfig(tau=0.08, multiplier_lr=0.5, refresh_every=None))
    unconstrained = float(mj.secondary_values(mj.closed_form_log_weights(w, jnp.zeros(1), 0.08, log_ref), w)[0])
    maximum = float(np.mean(np.max(np.asarray(w[1]), axis=-1)))
    update = jax.jit(transformation.update)

    violated = transformation.init(jnp.array([0.5 * (unconstrained + maximum)]))
    history = []
    for _ in range(30):
        violated = update(violated, w, log_ref).state
        history.append(float(violated.multipliers[0]))
    assert history[0] > 0 and all(b >= a for a, b in zip(history[:10], history[1:11]))

    slack = transformation.init(jnp.array([max(0.0, unconstrained - 0.1)]), initial_multipliers=jnp.array([2.0]))
    for _ in range(200):
        slack = update(slack, w, log_ref).state
    assert float(slack.multipliers[0]) == 0.0


def test_masks_give_zero_weight_and_leave_valid_candidates_unchanged():
    pref, ref = _bt_problem(seed=8, num_candidates=4)
    # Pad each prompt with two extra candidates holding garbage preferences.
    padded_pref = np.full(pref.shape[:2] + (6, 6), 0.5)
    padded_pref[..., :4, :4] = pref
    padded_pref[..., 4:, :4] = 1.0
    padded_pref[..., :4, 4:] = 0.0
    padded_ref = np.concatenate([ref * 0.5, np.full(ref.shape[:1] + (2,), 0.25)], axis=-1)
    mask = np.zeros((ref.shape[0], 6), bool)
    mask[:, :4] = True
    renormalised_ref = padded_ref[:, :4] / padded_ref[:, :4].sum(-1, keepdims=True)

    w_padded = mj.win_rates(padded_pref, padded_ref, candidate_mask=mask)
    w_plain = mj.win_rates(pref, renormalised_ref)
    chex.assert_trees_all_close(w_padded[..., :4], w_plain, atol=1e-6)

    log_padded = mj.closed_form_log_weights(w_padded, jnp.array([0.8]), 0.08, jnp.log(padded_ref), mask)
    log_plain = mj.closed_form_log_weights(w_plain, jnp.array([0.8]), 0.08, jnp.log(renormalised_ref))
    assert np.all(np.exp(np.asarray(log_padded))[:, 4:] == 0.0)
    chex.assert_trees_all_close(log_padded[:, :4], log_plain, atol=1e-5)

    # Padded policy log-probs may be -inf or NaN: neither loss nor gradient may see them.
    policy = jnp.where(mask, jnp.log(padded_ref), jnp.nan)
    terms = mj.weighted_bc_loss(policy, log_padded, mask)
    grad = jax.grad(lambda p: mj.weighted_bc_loss(p, log_padded, mask).mean())(jnp.where(mask, policy, 0.0))
    assert np.isfinite(float(terms.mean())) and np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[:, 4:] == 0.0)

    # A prompt with no valid candidate at all yields zeros, never NaN.
    empty = mask.copy()
    empty[0] = False
    log_empty = mj.closed_form_log_weights(w_padded, jnp.array([0.8]), 0.08, jnp.log(padded_ref), empty)
    assert np.all(np.isfinite(np.asarray(log_empty)))
    assert np.all(np.exp(np.asarray(log_empty))[0] == 0.0)
    values = mj.objective_values(log_empty, w_padded, candidate_mask=empty)
    assert np.all(np.isfinite(np.asarray(values)))


def test_log_barrier_penalty_gradient_is_effective_multiplier():
    estimates = jnp.array([0.7, 0.65])
    thresholds = jnp.array([0.6, 0.5])
    gradient = jax.grad(lambda g: mj.log_barrier_penalty(g, thresholds, 0.01))(estimates)
    chex.assert_trees_all_close(-gradient, 0.01 / (estimates - thresholds), atol=1e-6)
    assert float(mj.log_barrier_penalty(jnp.array([0.5, 0.65]), thresholds, 0.01)) == np.inf


def test_ratchet_never_loosens_below_floor():
    new = mj.ratchet_thresholds(jnp.array([0.6, 0.6]), jnp.array([0.8, 0.3]), 0.9, floor=jnp.array([0.6, 0.6]))
    chex.assert_trees_all_close(new, jnp.array([0.72, 0.6]), atol=1e-7)
