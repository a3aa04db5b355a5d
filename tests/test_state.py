"""MOPOState init/update: the schedule bookkeeping, the robust path, compile-once, and boundary errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mopo_jax as mj


def _problem(seed=0, num_prompts=4, num_candidates=5):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(2, num_prompts, num_candidates)) * 2
    rewards[1] = -rewards[0] + 0.3 * rng.normal(size=rewards[1].shape)
    pref = 1 / (1 + np.exp(-(rewards[..., :, None] - rewards[..., None, :])))
    ref = rng.dirichlet(np.ones(num_candidates) * 2, size=num_prompts)
    return pref, ref


def test_ratchet_and_lagged_reference_follow_the_period():
    """Thresholds move only at multiples of t0, to beta times the estimate recorded one period earlier, and the
    reference always equals the policy from exactly t0 steps before the refresh."""
    pref, ref = _problem()
    w = mj.win_rates(pref, ref)
    period, beta = 3, 0.9
    transformation = mj.mopo(mj.MOPOConfig(tau=0.08, multiplier_lr=0.2, eps=0.0, ratchet_beta=beta, refresh_every=period))
    state = transformation.init(jnp.array([0.3]))
    update = jax.jit(transformation.update)
    estimates, thresholds = [], []
    reference, snapshot = jnp.array(0.0), jnp.array(0.0)  # the "policy" is the step counter itself
    references = []
    for step in range(1, 13):
        state = update(state, w).state
        estimates.append(float(state.secondary_estimates[0]))
        thresholds.append(float(state.thresholds[0]))
        refresh = mj.reference_refresh_due(state, period)
        reference, snapshot = mj.lagged_reference_update(refresh, reference, snapshot, jnp.array(float(step)))
        references.append(float(reference))
    # First refresh (step 3): the lagged values were the initial thresholds, so b = max(0, beta * 0.3).
    np.testing.assert_allclose(thresholds[:2], [0.3, 0.3], atol=1e-7)
    np.testing.assert_allclose(thresholds[2], beta * 0.3, rtol=1e-6)
    # Step 6: b = beta * G recorded at step 3, unchanged until step 9.
    np.testing.assert_allclose(thresholds[5:8], [beta * estimates[2]] * 3, rtol=1e-6)
    np.testing.assert_allclose(thresholds[8], beta * estimates[5], rtol=1e-6)
    # Reference lags by one period: at step 6 it is the policy of step 3, at step 9 that of step 6.
    assert references[:5] == [0.0] * 5
    assert references[5:8] == [3.0] * 3 and references[8:11] == [6.0] * 3 and references[11] == 9.0


def test_robust_update_uses_the_exact_bound_at_every_step():
    """With eps > 0 each step's G is the exact robust bound (chi at its maximiser, found here by a dense grid over
    chi rather than the library's bisection), and chi records that maximiser."""
    pref, ref = _problem(seed=1)
    w = mj.win_rates(pref, ref)
    eps = 0.15
    transformation = mj.mopo(mj.MOPOConfig(tau=0.08, multiplier_lr=0.0, eps=eps, refresh_every=None))
    state = transformation.init(jnp.array([0.5]), initial_multipliers=jnp.array([0.7]))
    state = jax.jit(transformation.update)(state, w, jnp.log(ref)).state
    # Independent reference: Z = 1/2 + rho (w - 1/2) under q = p(x) pi_ref(y|x), the bound maximised on a grid.
    w = np.asarray(w, np.float64)
    g = (w[0] + 0.7 * w[1]) / 0.08
    pi = ref * np.exp(g - g.max(-1, keepdims=True))
    pi /= pi.sum(-1, keepdims=True)
    z = (0.5 + pi / ref * (w[1] - 0.5)).ravel()
    q = (ref / ref.shape[0]).ravel()
    grid = np.exp(np.linspace(np.log(1e-4), np.log(1e4), 200001))
    bounds = -grid * np.log((q[None] * np.exp(-(z[None] - z.min()) / grid[:, None])).sum(1)) + z.min() - grid * eps
    best = int(np.argmax(bounds))
    np.testing.assert_allclose(float(state.secondary_estimates[0]), bounds[best], atol=1e-5)
    np.testing.assert_allclose(float(state.chi[0]), grid[best], rtol=1e-2)
    assert bounds[best] < float((pi * w[1]).sum(-1).mean())


def test_no_data_keeps_chi_and_every_multiplier():
    """An objective with no labelled pair in the batch keeps its chi (robust) and its multiplier, under the
    multiplier step and under MOPO-LB's log barrier; the objective with data moves."""
    probs = np.array([[0.7, 0.2, np.nan], [0.4, 0.9, np.nan], [0.6, 0.3, np.nan]], np.float32)
    labels = ~np.isnan(probs)
    log_ratios = jnp.array([[0.3, -0.2], [-0.5, 0.1], [0.2, 0.4]])
    for config in (mj.MOPOConfig(eps=0.15, multiplier_lr=0.5),
                   mj.MOPOConfig(constraint="log_barrier", multiplier_lr=0.5)):
        transformation = mj.mopo(config)
        state = transformation.init(jnp.array([0.6, 0.6]), initial_multipliers=jnp.array([0.3, 0.01]))
        state = state._replace(chi=jnp.array([0.2, 0.2]))

        @jax.jit
        def step(state):
            estimate = transformation.estimate_from_pairs(state, log_ratios, jnp.where(labels, probs, 0.5), labels)
            return transformation.update_from_estimates(state, estimate)

        for _ in range(2):
            state = step(state)
        np.testing.assert_array_equal(np.asarray(state.multipliers[1]), np.float32(0.01), err_msg=str(config))
        np.testing.assert_array_equal(np.asarray(state.chi[1]), np.float32(0.2), err_msg=str(config))
        assert float(state.multipliers[0]) != 0.3, config
        # The objective that never had data has no estimate (NaN), not a made-up 0 or b; the other has a number.
        assert np.isnan(float(state.secondary_estimates[1])) and np.isfinite(float(state.secondary_estimates[0]))
        # Eagerly too (outside jit the multiplier step checks its input is finite): no data moves nothing.
        eager = transformation.update_from_estimates(state, mj.SecondaryEstimate.from_values(
            jnp.array([0.7, 0.5]), jnp.array([1.0, 0.0])))
        np.testing.assert_array_equal(np.asarray(eager.multipliers[1]), np.float32(0.01), err_msg=str(config))
        assert np.isnan(float(eager.secondary_estimates[1]))


def test_ratchet_records_the_plain_estimate():
    """With eps > 0 the ratchet sets b from the plain estimate recorded at the refresh, not from the robust bound
    the multiplier step used."""
    pref, ref = _problem(seed=4)
    w = mj.win_rates(pref, ref)
    transformation = mj.mopo(mj.MOPOConfig(tau=0.08, multiplier_lr=0.0, eps=0.3, ratchet_beta=1.0,
                                           refresh_every=1))
    state = transformation.init(jnp.array([0.1]), initial_multipliers=jnp.array([0.5]))
    state = transformation.update(state, w, jnp.log(ref)).state  # refresh 1 records G
    state = transformation.update(state, w, jnp.log(ref)).state  # refresh 2 sets b from it
    log_pi = np.asarray(mj.closed_form_log_weights(w, jnp.array([0.5]), 0.08, jnp.log(ref)), np.float64)
    plain = float((np.exp(log_pi) * np.asarray(w[1], np.float64)).sum(-1).mean())
    np.testing.assert_allclose(float(state.thresholds[0]), plain, rtol=1e-5)
    assert float(state.secondary_estimates[0]) < plain - 1e-3


def test_sampled_candidates_use_uniform_base():
    """Without ref_log_probs the closed form is the self-normalised importance weight exp(g/tau) / sum exp(g/tau)."""
    pref, ref = _problem(seed=2)
    w = mj.win_rates(pref, ref)
    transformation = mj.mopo(mj.MOPOConfig(tau=0.2, eps=0.0, refresh_every=None))
    state = transformation.init(jnp.array([0.5]), initial_multipliers=jnp.array([0.4]))
    log_weights = transformation.update(state, w).log_weights
    g = np.asarray(w[0] + 0.4 * w[1], np.float64) / 0.2
    want = np.exp(g - g.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(np.asarray(log_weights)), want, atol=1e-6)


def test_log_barrier_variant_keeps_interior():
    pref, ref = _problem(seed=3)
    w = mj.win_rates(pref, ref)
    transformation = mj.mopo(mj.MOPOConfig(tau=0.08, constraint="log_barrier", barrier_sigma=1e-3, eps=0.0,
                                           multiplier_lr=0.5, refresh_every=None))
    threshold = 0.6
    state = transformation.init(jnp.array([threshold]), initial_multipliers=jnp.array([1.0]))
    update = jax.jit(transformation.update)
    for _ in range(2000):
        state = update(state, w, jnp.log(ref)).state
    log_pi = mj.closed_form_log_weights(w, state.multipliers, 0.08, jnp.log(ref))
    slack = float(mj.secondary_values(log_pi, w)[0]) - threshold
    # Stationary point of the barrier: lambda (G - b) = sigma, with G strictly inside.
    assert slack > 0
    np.testing.assert_allclose(float(state.multipliers[0]) * slack, 1e-3, rtol=0.05)


def test_update_compiles_once_for_new_values_of_the_same_shape():
    transformation = mj.mopo(mj.MOPOConfig(eps=0.1, refresh_every=5))
    update = jax.jit(chex.assert_max_traces(transformation.update, n=1))
    state = transformation.init(jnp.array([0.5]))
    for seed in range(4):
        pref, ref = _problem(seed=seed)
        state = update(state, mj.win_rates(pref, ref), jnp.log(jnp.asarray(ref, jnp.float32))).state
    chex.assert_shape(state.multipliers, (1,))


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda p, r: mj.win_rates(p * 1.5, r), r"outside \[0, 1\]"),
        (lambda p, r: mj.win_rates(np.where(np.eye(5, dtype=bool), 0.5, np.full_like(p, 0.7)), r), r"P\[i, j\] \+ P\[j, i\]"),
        (lambda p, r: mj.win_rates(p, np.where(r > 0.3, np.nan, r)), "comparison_probs"),
        (lambda p, r: mj.win_rates(p[0], r), r"\[K, X, N, N\]"),
        (lambda p, r: mj.closed_form_log_weights(mj.win_rates(p, r), jnp.ones(1), 0.0), "tau"),
        (lambda p, r: mj.closed_form_log_weights(mj.win_rates(p, r), jnp.ones(1), -0.1), "tau"),
        (lambda p, r: mj.robust_lower_bound(jnp.ones((1, 3)), jnp.log(jnp.ones(3) / 3), jnp.ones(1), -0.1), "eps"),
        (lambda p, r: mj.update_multipliers(jnp.ones(1), jnp.ones(1), jnp.array([1.2]), 0.1), "thresholds"),
        (lambda p, r: mj.update_multipliers(jnp.ones(1), jnp.array([jnp.nan]), jnp.ones(1) * 0.5, 0.1),
         "secondary_estimates"),
        (lambda p, r: mj.MOPOConfig(tau=-1.0), "tau"),
        (lambda p, r: mj.MOPOConfig(eps=-0.5), "eps"),
        (lambda p, r: mj.MOPOConfig(tau="0.1"), "tau"),
        (lambda p, r: mj.MOPOConfig(refresh_every=2.5), "refresh_every"),
        (lambda p, r: mj.MOPOConfig(estimate_window=0), "estimate_window"),
        (lambda p, r: mj.MOPOConfig(ratchet_beta=1.5), "ratchet_beta"),
        (lambda p, r: mj.MOPOConfig(constraint="barrier"), "constraint"),
        (lambda p, r: mj.mopo(mj.MOPOConfig()).update_from_estimates(
            mj.mopo(mj.MOPOConfig()).init(jnp.array([0.5])), mj.SecondaryEstimate.from_values(jnp.array([0.5, 0.5]))),
         "estimate.values"),
        (lambda p, r: mj.mopo(mj.MOPOConfig()).update_from_estimates(
            mj.mopo(mj.MOPOConfig()).init(jnp.array([0.5])), jnp.array([0.5])), "SecondaryEstimate"),
        (lambda p, r: mj.mopo(mj.MOPOConfig()).init(jnp.array([-0.1])), "thresholds"),
        (lambda p, r: mj.mopo(mj.MOPOConfig()).init(jnp.array([0.5, 1.1])), "thresholds"),
        (lambda p, r: mj.ratchet_thresholds(jnp.array([0.5]), jnp.array([0.6]), 1.5), "ratchet_beta"),
        # Three objectives' win rates against a one-constraint state (K = 2): named, not a dot_general error.
        (lambda p, r: mj.mopo(mj.MOPOConfig()).update(mj.mopo(mj.MOPOConfig()).init(jnp.array([0.5])),
                                                       np.full((3, 4, 5), 0.5)), r"win_rates .*K = 2"),
        (lambda p, r: mj.mopo(mj.MOPOConfig()).update(mj.mopo(mj.MOPOConfig()).init(jnp.array([0.5])),
                                                       np.full((2, 4, 5), 0.5), ref_log_probs=np.zeros((4, 6))),
         "ref_log_probs"),
    ],
)
def test_boundary_value_errors(call, fragment):
    pref, ref = _problem()
    with pytest.raises(ValueError, match=fragment):
        call(pref, ref)


def test_checks_are_skipped_under_jit_not_crashing():
    """Inside jit the data-dependent checks cannot run; the call must still trace and compute."""
    pref, ref = _problem()
    w = jax.jit(mj.win_rates)(pref, ref)
    assert w.shape == (2, 4, 5)


@pytest.mark.parametrize("spread", [0.5, 1.0, 2.0])
def test_robust_bound_of_a_tied_secondary_reads_one_half_on_both_paths(spread):
    """A secondary whose every comparison is a tie (P = 1/2, so V = 1/2 for every policy) reads exactly 1/2 under
    the robust bound whatever the spread of the importance weights, on the candidate path and on the pairwise path:
    both use the same centred sample Z = 1/2 + rho (w - 1/2)."""
    rng = np.random.default_rng(5)
    transformation = mj.mopo(mj.MOPOConfig(eps=0.15))
    state = transformation.init(jnp.array([0.5]))
    log_weights = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(6, 8)) * spread, jnp.float32), axis=-1)
    rates = jnp.stack([jnp.asarray(rng.uniform(size=(6, 8)), jnp.float32), jnp.full((6, 8), 0.5)])
    base = jnp.full((6, 8), -np.log(8.0), jnp.float32)
    candidates = transformation.estimate_from_candidates(state, log_weights, rates, base)
    pairs = transformation.estimate_from_pairs(
        state, jnp.asarray(rng.normal(size=(16, 2)) * spread, jnp.float32),
        jnp.stack([jnp.asarray(rng.uniform(size=16), jnp.float32), jnp.full(16, 0.5)], axis=1))
    # A constant sample's bound is 1/2 - chi eps at the smallest chi searched (chi_min = 1e-4): 1/2 - 1.5e-5.
    np.testing.assert_allclose(float(candidates.values[0]), 0.5 - 1e-4 * 0.15, atol=1e-6)
    np.testing.assert_allclose(float(pairs.values[0]), 0.5 - 1e-4 * 0.15, atol=1e-6)
