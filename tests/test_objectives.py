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
    transformation = mj.mopo(mj.MOPOConfig(tau=0.08, multiplier_lr=0.5, eps=0.0, refresh_every=None))
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


# ---------------------------------------------------------------------------------------------------------------
# Estimates from samples and from pairs.


def test_sampled_win_rates_are_leave_one_out_means():
    """For candidates sampled from mu the unbiased win rate of y_i is mean_{j != i} P(y_i > y_j); the enumerated
    formula's self-tie would shrink every rate towards 1/2 by (N-1)/N."""
    pref, _ = _bt_problem(seed=9, num_candidates=4)
    pref = pref.copy()
    pref[0, 1, 0, 2] = pref[0, 1, 2, 0] = np.nan  # one unlabelled comparison
    got = np.asarray(mj.sampled_win_rates(pref))
    K, X, N, _ = pref.shape
    for k in range(K):
        for x in range(X):
            for i in range(N):
                others = [pref[k, x, i, j] for j in range(N) if j != i and not np.isnan(pref[k, x, i, j])]
                np.testing.assert_allclose(got[k, x, i], np.mean(others), atol=1e-6)
    with_tie = np.asarray(mj.win_rates(pref[:, :, :, :], np.ones((X, N)), include_self=True))
    np.testing.assert_allclose(with_tie[0, 0] - 0.5, (N - 1) / N * (got[0, 0] - 0.5), atol=1e-6)


def _numpy_pool_value(pref, labelled, log_ratio, pool):
    """NumPy float64: one prompt's pool estimate ``sum_i pi~_i w_i`` over the candidate indices ``pool`` (``pi~``
    the softmax of ``log pi/pi_ref`` over the pool, ``w_i`` the labelled leave-one-out mean, 1/2 without labels),
    for every objective ``[K]``."""
    if len(pool) == 0:
        return np.zeros(pref.shape[0])
    weights = np.exp(log_ratio[pool] - log_ratio[pool].max())
    weights /= weights.sum()
    values = []
    for k in range(pref.shape[0]):
        rates = []
        for i in pool:
            others = [pref[k, i, j] for j in pool if j != i and labelled[k, i, j]]
            rates.append(np.mean(others) if others else 0.5)
        values.append(float(np.dot(weights, rates)))
    return np.array(values)


def _numpy_jackknife(pref, labelled, log_ratio, valid, prompt_weights):
    """NumPy float64: ``n G_x - (n-1) mean_j G_x^(-j)`` per prompt, averaged with ``prompt_weights`` over the prompts
    with a pool; the secondaries ``[K-1]``."""
    total, weight = 0.0, 0.0
    for x in range(valid.shape[0]):
        pool = list(np.flatnonzero(valid[x]))
        if not pool:
            continue
        n = len(pool)
        full = _numpy_pool_value(pref[:, x], labelled[:, x], log_ratio[x], pool)
        dropped = np.mean([_numpy_pool_value(pref[:, x], labelled[:, x], log_ratio[x], [i for i in pool if i != j])
                           for j in pool], axis=0)
        total = total + prompt_weights[x] * (n * full - (n - 1) * dropped)
        weight += prompt_weights[x]
    return (total / weight)[1:]


def test_jackknife_pool_values_match_numpy_on_ragged_pools_with_missing_labels():
    """The delete-one jackknife of the policy's pool estimate against a NumPy loop: pools of 5, 3, 2 and 1 valid
    candidates and an empty one, unlabelled comparisons (one candidate with none left), row weights, and a
    ``-inf`` log-probability on a padded candidate (no NaN reaches the value)."""
    rng = np.random.default_rng(21)
    K, X, N = 2, 5, 5
    pref = rng.uniform(size=(K, X, N, N))
    pref = np.triu(pref, 1) + np.tril(1 - np.swapaxes(np.triu(pref, 1), -1, -2), -1)
    labelled = rng.uniform(size=(K, X, N, N)) > 0.25
    labelled = labelled & np.swapaxes(labelled, -1, -2)
    labelled[1, 1, 0, :] = labelled[1, 1, :, 0] = False  # candidate 0 of prompt 1: no harmlessness label at all
    pref = np.where(labelled, pref, np.nan)
    valid = np.zeros((X, N), bool)
    for x, n in enumerate((5, 3, 2, 1, 0)):
        valid[x, rng.permutation(N)[:n]] = True
    log_ratio = rng.normal(scale=1.5, size=(X, N))
    log_ratio[2, np.flatnonzero(~valid[2])[0]] = -np.inf
    prompt_weights = rng.uniform(0.5, 2.0, size=X)
    log_weights = mj.policy_pool_log_weights(jnp.asarray(log_ratio, jnp.float32), jnp.zeros((X, N)),
                                             mj.masked_log_normalize(jnp.zeros((X, N)), valid), valid)
    got = jax.jit(mj.jackknife_pool_secondary_values)(log_weights, jnp.asarray(pref, jnp.float32),
                                                      jnp.asarray(labelled), jnp.asarray(valid),
                                                      jnp.asarray(prompt_weights, jnp.float32))
    want = _numpy_jackknife(pref, labelled, log_ratio, valid, prompt_weights)
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    plain = sum(prompt_weights[x] * _numpy_pool_value(pref[:, x], labelled[:, x], log_ratio[x],
                                                      list(np.flatnonzero(valid[x])))
                for x in range(X) if valid[x].any()) / prompt_weights[valid.any(-1)].sum()
    assert abs(want[0] - plain[1]) > 1e-3  # the correction is not a no-op on this batch


def test_jackknife_removes_most_of_the_small_pool_bias():
    """Pools of 8 draws (Algorithm 1's pool on HH-RLHF) from a known reference over 12 responses with Bradley-Terry
    preferences, a policy tilted away from it (KL 0.19): over 16000 pools the self-normalised estimate's mean misses
    the exact ``V(pi) = E_{y~pi, y'~pi_ref} P(y > y')`` (NumPy, population sums) by about 30 standard errors; the
    jackknife's mean misses by under half of that (its ``O(1/n)`` part goes; at 8 draws the higher orders are still
    about a third)."""
    rng = np.random.default_rng(5)
    M, pools, n = 12, 16000, 8
    quality = rng.normal(size=(2, M))
    pref = 1.0 / (1.0 + np.exp(-(quality[:, :, None] - quality[:, None, :])))  # [K, M, M]
    reference = rng.dirichlet(np.ones(M) * 2.0)
    policy = reference * np.exp(0.9 * quality[1])
    policy /= policy.sum()
    exact = float(policy @ (pref[1] @ reference))
    draws = rng.choice(M, size=(pools, n), p=reference)
    pool_pref = jnp.asarray(pref[:, draws[:, :, None], draws[:, None, :]], jnp.float32)  # [K, pools, n, n]
    log_ratio = np.log(policy[draws] / reference[draws])
    mask = np.ones((pools, n), bool)
    log_weights = mj.policy_pool_log_weights(jnp.asarray(log_ratio, jnp.float32), jnp.zeros((pools, n)),
                                             mj.masked_log_normalize(jnp.zeros((pools, n)), mask), mask)
    plain = jax.vmap(lambda lw, pp: mj.secondary_values(lw[None], mj.sampled_win_rates(pp[:, None]))[0],
                     in_axes=(0, 1))(log_weights, pool_pref)
    corrected = jax.vmap(lambda lw, pp: mj.jackknife_pool_secondary_values(lw[None], pp[:, None])[0],
                         in_axes=(0, 1))(log_weights, pool_pref)
    per_pool = np.stack([np.asarray(plain, np.float64), np.asarray(corrected, np.float64)], axis=-1)
    bias = per_pool.mean(0) - exact
    stderr = per_pool.std(0, ddof=1) / np.sqrt(pools)
    assert bias[0] < -10 * stderr[0], (bias, stderr)
    assert abs(bias[1]) < abs(bias[0]) / 2, (bias, stderr)


def _pair_population(pref, ref, mu):
    """Every ordered pair (ties included) of every prompt with its weight p(x) mu(y) mu(y')."""
    K, X, N, _ = pref.shape
    x, i, j = np.meshgrid(np.arange(X), np.arange(N), np.arange(N), indexing="ij")
    x, i, j = x.reshape(-1), i.reshape(-1), j.reshape(-1)
    weights = mu[x, i] * mu[x, j] / X
    return x, i, j, pref[:, x, i, j].T, weights


def test_pairwise_values_are_exact_over_the_pair_population():
    """V_k(pi) = E_{y~pi}[w_k(y)] of an arbitrary policy, from pairs drawn from q x q with rho = pi/q: the batch
    self-normalised estimate is exact over the population of pairs. (Normalising within each pair instead, the
    policy's pick sigmoid(h) inside the pair, is not: here it is off by 0.07.)"""
    pref, ref = _bt_problem(seed=10, num_prompts=3, num_candidates=5)
    rng = np.random.default_rng(11)
    policy = rng.dirichlet(np.ones(5) * 0.7, size=3)
    x, i, j, probs, weights = _pair_population(pref, ref, ref)
    log_ratios = np.stack([np.log(policy[x, i] / ref[x, i]), np.log(policy[x, j] / ref[x, j])], axis=-1)
    got = np.asarray(mj.pairwise_objective_values(log_ratios, probs, weights=weights))
    w = win_rates_numpy(pref, ref)
    exact = np.einsum("xn,kxn->k", policy, w) / 3
    np.testing.assert_allclose(got, exact, atol=2e-6)
    h = log_ratios[:, 0] - log_ratios[:, 1]
    pick = 1 / (1 + np.exp(-h))
    within_pair = (weights[:, None] * (0.5 + (pick[:, None] - 0.5) * (probs - 0.5))).sum(0) / weights.sum()
    assert np.max(np.abs(within_pair - exact)) > 0.05


def test_pairwise_values_drop_invalid_rows_and_unlabelled_objectives():
    """Against NumPy on a ragged batch: rows with an empty completion and objectives without a label are left out
    of each objective's estimate, whatever their log-ratios hold (here: large values that would dominate)."""
    rng = np.random.default_rng(12)
    log_ratios = rng.normal(size=(8, 2))
    probs = rng.uniform(size=(8, 2))
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [1, 0], [0, 1], [0, 0]], bool)
    valid = np.array([1, 1, 1, 0, 1, 0, 1, 1], bool)
    log_ratios[~valid] = 30.0
    weights = rng.uniform(0.5, 2, size=8)
    got = np.asarray(mj.pairwise_objective_values(log_ratios, np.where(labels, probs, np.nan), labels, valid,
                                                  weights))
    rho = np.exp(log_ratios)
    for k in range(2):
        rows = labels[:, k] & valid
        num = np.sum(weights[rows] * (rho[rows, 0] - rho[rows, 1]) * (probs[rows, k] - 0.5))
        den = np.sum(weights[rows] * (rho[rows, 0] + rho[rows, 1]))
        np.testing.assert_allclose(got[k], 0.5 + num / den, rtol=1e-5)
    none = mj.pairwise_objective_values(log_ratios, probs, np.zeros((8, 2), bool))
    np.testing.assert_array_equal(np.asarray(none), [0.5, 0.5])


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_pairwise_robust_bound_is_the_worst_case_over_reweighted_pairs(eps):
    """With eps > 0 the pairwise dual estimate is the KL-robust bound of Eq. 5 over the labelled pairs: the smallest
    mean of the per-pair samples over distributions within eps of the empirical one (SLSQP), each objective on its
    own labelled rows."""
    rng = np.random.default_rng(13)
    log_ratios = rng.normal(size=(9, 2)) * 0.8
    probs = rng.uniform(size=(9, 3))
    labels = rng.random((9, 3)) < 0.7
    labels[:, 1] = True
    config = mj.MOPOConfig(eps=eps, refresh_every=None)
    transformation = mj.mopo(config)
    samples = mj.pairwise_value_samples(log_ratios, probs, labels)
    state = transformation.init(jnp.array([0.5, 0.5]))
    estimate = transformation.estimate_from_pairs(state, log_ratios, probs, labels)
    for k in (1, 2):
        rows = labels[:, k]
        z = np.asarray(samples.samples[k])[rows]
        direct = _direct_worst_case(z, np.full(rows.sum(), 1.0 / rows.sum()), eps)
        np.testing.assert_allclose(float(estimate.values[k - 1]), direct, atol=3e-4)
        assert float(estimate.values[k - 1]) < z.mean()
    # Each objective's data weight is its self-normalisation denominator sum_b (rho_b + rho'_b)/2.
    ratios = np.exp(np.asarray(log_ratios, np.float64))
    np.testing.assert_allclose(np.exp(np.asarray(estimate.log_weights, np.float64)),
                               [(ratios[labels[:, k]].sum(1) / 2).sum() for k in (1, 2)], rtol=1e-5)


def test_estimate_window_pools_the_last_steps():
    """estimate_window = W: the multiplier step uses sum(G_t n_t) / sum(n_t) over the last W steps (n_t the data
    behind each); an objective with no data in the window keeps its multiplier."""
    config = mj.MOPOConfig(tau=0.1, multiplier_lr=0.5, eps=0.0, refresh_every=None, estimate_window=3)
    transformation = mj.mopo(config)
    state = transformation.init(jnp.array([0.6, 0.4]))
    estimates = [[0.5, 0.3], [0.7, 0.35], [0.4, 0.5], [0.9, 0.45]]
    counts = [[4.0, 0.0], [2.0, 0.0], [1.0, 3.0], [5.0, 1.0]]
    multipliers, last = np.zeros(2), np.full(2, np.nan)  # no estimate before the first data
    for t, (g, n) in enumerate(zip(estimates, counts)):
        state = transformation.update_from_estimates(state, mj.SecondaryEstimate.from_values(jnp.array(g),
                                                                                             jnp.array(n)))
        window = slice(max(0, t - 2), t + 1)
        g_w, n_w = np.array(estimates[window]), np.array(counts[window])
        total = n_w.sum(0)
        pooled = (g_w * n_w).sum(0) / np.where(total > 0, total, 1)
        # Without data in the window: the multiplier stays, the state keeps the last estimate it had.
        last = np.where(total > 0, pooled, last)
        np.testing.assert_allclose(np.asarray(state.secondary_estimates), last, rtol=1e-6)
        multipliers = np.where(total > 0, np.maximum(0, multipliers - 0.5 * (pooled - np.array([0.6, 0.4]))),
                               multipliers)
        np.testing.assert_allclose(np.asarray(state.multipliers), multipliers, rtol=1e-6, atol=1e-7)