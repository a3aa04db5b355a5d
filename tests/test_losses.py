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
    """K = 1 and hard labels: the margin P - 1/2 = 1/2 gives (tau^2/2) (h - 1/(2 tau))^2, IPO in win-rate units."""
    chosen, rejected, ref_chosen, ref_rejected = _random_log_probs(0)
    tau = 0.1
    margins = mj.pairwise_win_rate_margins(jnp.ones((16, 1)))
    mopo = mj.mopo_pairwise_loss(chosen, rejected, ref_chosen, ref_rejected, margins, jnp.zeros((0,)), tau)
    ipo = mj.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, tau)
    h = np.asarray((chosen - ref_chosen) - (rejected - ref_rejected), np.float64)
    numpy_ipo = np.sum((h - 1 / (2 * tau)) ** 2)
    chex.assert_trees_all_close(mopo.total, tau**2 / 2 * ipo.total, rtol=1e-6)
    np.testing.assert_allclose(float(ipo.total), numpy_ipo, rtol=1e-5)
    assert float(mopo.denominator) == 16


def test_mopo_pairwise_reduces_to_ipo_when_multipliers_vanish_and_every_row_has_the_primary_label():
    """lambda = 0 and objective 0 labelled on every row: the secondary labels (on some rows, even contradicting ones)
    drop out, leaving IPO on the primary."""
    chosen, rejected, ref_chosen, ref_rejected = _random_log_probs(1)
    rng = np.random.default_rng(2)
    labels = np.stack([np.ones(16), rng.integers(0, 2, 16), rng.integers(0, 2, 16)], axis=1).astype(np.float32)
    mask = np.stack([np.ones(16, bool), rng.random(16) < 0.5, rng.random(16) < 0.7], axis=1)
    margins = mj.pairwise_win_rate_margins(labels, mask)
    mopo = mj.mopo_pairwise_loss(chosen, rejected, ref_chosen, ref_rejected, margins, jnp.zeros(2), 0.08,
                                 label_mask=mask)
    ipo = mj.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.08)
    chex.assert_trees_all_close(mopo.total, 0.08**2 / 2 * ipo.total, rtol=1e-6)
    # With lambda > 0 the secondary labels do move the target.
    moved = mj.mopo_pairwise_loss(chosen, rejected, ref_chosen, ref_rejected, margins, jnp.ones(2), 0.08,
                                  label_mask=mask)
    assert abs(float(moved.total) / (0.08**2 / 2 * float(ipo.total)) - 1) > 1e-2


def _disjoint_label_batch(seed=3, batch=12):
    """Rows that carry the primary label, the secondary one, both, or none; two rows dropped; row weights."""
    rng = np.random.default_rng(seed)
    chosen, rejected, ref_chosen, ref_rejected = (rng.normal(size=batch) * 2 - 30 for _ in range(4))
    probs = rng.uniform(size=(batch, 2))
    labels = np.zeros((batch, 2), bool)
    labels[: batch // 2, 0] = True
    labels[batch // 2:, 1] = True
    labels[1] = [True, True]
    labels[7] = [False, False]  # no label at all
    probs[~labels] = np.nan
    valid = np.ones(batch, bool)
    valid[[2, 9]] = False  # e.g. an empty completion
    weights = rng.uniform(0.5, 2.0, size=batch)
    return chosen, rejected, ref_chosen, ref_rejected, probs, labels, valid, weights


def test_pairwise_loss_leaves_missing_labels_out_and_renormalises():
    """Against NumPy: each objective's target term is weighted by 1/pi_k (pi_k its label rate among the kept rows),
    rows without any label or with an empty completion are dropped; the gradient is that of the expanded square
    tau^2/2 mean_b h^2 - tau sum_k c_k mean_{b labelled k} h_b m_bk, each cross term on its own labelled rows."""
    chosen, rejected, ref_chosen, ref_rejected, probs, labels, valid, weights = _disjoint_label_batch()
    multipliers, tau = np.array([0.7]), 0.1
    margins = mj.pairwise_win_rate_margins(probs, labels)
    terms = mj.mopo_pairwise_loss(chosen, rejected, ref_chosen, ref_rejected, margins, multipliers, tau,
                                  valid_mask=valid, weights=weights, label_mask=labels)
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    kept = valid & labels.any(1)
    u = np.where(kept, weights, 0.0)
    rates = np.array([(u * labels[:, k]).sum() / u.sum() for k in range(2)])
    m = np.where(labels, probs - 0.5, 0.0)
    target = (m[:, 0] / rates[0] + multipliers[0] * m[:, 1] / rates[1]) / tau
    np.testing.assert_allclose(float(terms.total), np.sum(u * tau**2 / 2 * (h - target) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(terms.denominator), u.sum(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mj.pairwise_label_rates(labels, valid, weights)), rates, rtol=1e-6)

    # Gradient in h against the expanded estimator (written without the inverse-propensity target).
    def library(hh):
        zeros = jnp.zeros_like(hh)
        return mj.mopo_pairwise_loss(hh, zeros, zeros, zeros, margins, multipliers, tau, valid_mask=valid,
                                     weights=weights, label_mask=labels).mean()

    got = np.asarray(jax.grad(library)(jnp.asarray(h, jnp.float32)), np.float64)
    coefficients = np.array([1.0, multipliers[0]])
    want = tau**2 * u * h / u.sum()
    for k in range(2):
        on_k = u * labels[:, k]
        want = want - tau * coefficients[k] * on_k * m[:, k] / on_k.sum()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    # The dropped rows and the unlabelled row get no gradient and no NaN.
    assert np.all(got[~kept] == 0.0) and np.all(np.isfinite(got))


def test_pairwise_margins_and_missing_labels():
    probs = jnp.array([[1.0, 0.3, jnp.nan]])
    np.testing.assert_allclose(np.asarray(mj.pairwise_win_rate_margins(probs)), [[0.5, -0.2, 0.0]], atol=1e-7)
    mask = jnp.array([[True, False, False]])
    np.testing.assert_allclose(np.asarray(mj.pairwise_win_rate_margins(jnp.nan_to_num(probs), mask)),
                               [[0.5, 0.0, 0.0]])


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
    loss = jax.vmap(
        lambda h: mj.ipo_loss(h[None], jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), tau, preference_probs=jnp.array([p])).total
    )(grid)
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
        (lambda a: mj.mopo_pairwise_loss(a[:, None], a, a, a, jnp.zeros((3, 2)), jnp.ones(1), 0.1), "policy_chosen"),
        (lambda a: mj.mopo_pairwise_loss(a, a, a, a, jnp.zeros(3), jnp.ones(1), 0.1), "win_rate_margins"),
        (lambda a: mj.mopo_pairwise_loss(a, a, a, a, jnp.zeros((3, 2)), jnp.ones(2), 0.1), "multipliers"),
        (lambda a: mj.mopo_pairwise_loss(a, a, a, a, jnp.zeros((4, 2)), jnp.ones(1), 0.1), "win_rate_margins"),
        (lambda a: mj.dpo_loss(a, a, a, a, 0.1, valid_mask=jnp.ones((3, 1), bool)), "valid_mask"),
        (lambda a: mj.weighted_bc_loss(a, a), "policy_log_probs"),
    ],
)
def test_loss_value_errors(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call(jnp.zeros(3))


def test_shape_contracts_hold_under_jit():
    """Shapes are static: a wrong rank is a ValueError naming the argument at trace time, not an XLA error."""
    a = jnp.zeros(3)
    with pytest.raises(ValueError, match="policy_chosen"):
        jax.jit(mj.mopo_pairwise_loss, static_argnums=6)(a[:, None], a, a, a, jnp.zeros((3, 2)), jnp.ones(1), 0.1)
    with pytest.raises(ValueError, match="win_rate_margins"):
        jax.jit(mj.mopo_pairwise_loss, static_argnums=6)(a, a, a, a, jnp.zeros((3, 1, 2)), jnp.ones(1), 0.1)
    with pytest.raises(ValueError, match="policy_log_ratios"):
        jax.jit(mj.pairwise_objective_values)(a, jnp.zeros((3, 2)))


def test_completion_log_probs_match_numpy_with_masks():
    """completion_mask[b, t] marks tokens[b, t], scored by logits[b, t-1]; float32 log-softmax of large logits;
    an empty mask gives 0, never NaN."""
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32) * 40 + 1e4  # large: needs the max subtraction
    tokens = rng.integers(0, 11, (3, 6)).astype(np.int32)
    mask = np.zeros((3, 6), bool)
    mask[0, 3:] = True
    mask[1, [1, 4]] = True
    got = np.asarray(mj.completion_log_probs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), tokens, mask))
    logits64 = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
    shifted = logits64 - logits64.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want = [sum(log_softmax[b, t - 1, tokens[b, t]] for t in range(1, 6) if mask[b, t]) for b in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    assert got[2] == 0.0
    grad = jax.grad(lambda l: mj.completion_log_probs(l, tokens, mask).sum())(jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[2] == 0.0)


def test_dpo_margin_offset_and_pair_weights():
    chosen, rejected, ref_chosen, ref_rejected = _random_log_probs(7, batch=6)
    h = np.asarray((chosen - ref_chosen) - (rejected - ref_rejected), np.float64)
    offset = np.linspace(-1, 1, 6)
    weights = np.array([1.0, 0.5, 0.0, 2.0, 1.0, 1.0])
    terms = mj.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.3, weights=weights, margin_offset=offset)
    per_row = np.log1p(np.exp(-(0.3 * h - offset)))
    np.testing.assert_allclose(float(terms.total), np.sum(weights * per_row), rtol=1e-5)
    np.testing.assert_allclose(float(terms.denominator), weights.sum())


# --- Dropped rows: exactly zero value AND gradient, whatever non-finite log-probabilities they hold ("double where").

_LOG_PROB_ARGS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")


def _poisoned_pair_batch(seed=21, batch=7):
    """Row 1 is invalid, row 3 has weight 0, row 5 carries no label (dropped by the MOPO pairwise loss only)."""
    rng = np.random.default_rng(seed)
    log_probs = [rng.normal(size=batch).astype(np.float32) * 2 - 25 for _ in range(4)]
    valid = np.ones(batch, bool)
    valid[1] = False
    weights = rng.uniform(0.5, 2.0, size=batch).astype(np.float32)
    weights[3] = 0.0
    labels = rng.random((batch, 2)) < 0.6
    labels[:, 0] |= ~labels.any(1)
    labels[5] = False
    probs = np.where(labels, rng.uniform(size=(batch, 2)), np.nan).astype(np.float32)
    soft = rng.uniform(size=batch).astype(np.float32)
    soft[4] = np.nan  # unlabelled kept row: P = 1/2
    offset = rng.normal(size=batch).astype(np.float32)
    log_probs[0][1] = -np.inf  # dropped rows hold -inf and NaN
    log_probs[3][1] = np.nan
    log_probs[2][3] = np.nan
    log_probs[1][3] = -np.inf
    return log_probs, valid, weights, labels, probs, soft, offset


def _pair_losses():
    """(name, loss(log_probs, rows), rows dropped). ``rows`` selects the per-row inputs, so that the same call on a
    slice of the batch is the reference."""
    _, valid, weights, labels, probs, soft, offset = _poisoned_pair_batch()
    margins = np.asarray(mj.pairwise_win_rate_margins(np.nan_to_num(probs), labels))
    return [
        ("mopo_pairwise", lambda lp, rows: mj.mopo_pairwise_loss(
            *lp, margins[rows], np.array([0.6], np.float32), 0.1, valid_mask=valid[rows], weights=weights[rows],
            label_mask=labels[rows]), [1, 3, 5]),
        ("dpo", lambda lp, rows: mj.dpo_loss(*lp, 0.2, preference_probs=soft[rows], valid_mask=valid[rows],
                                              weights=weights[rows], margin_offset=offset[rows]), [1, 3]),
        ("dpo_hard", lambda lp, rows: mj.dpo_loss(*lp, 0.2, valid_mask=valid[rows], weights=weights[rows]), [1, 3]),
        ("ipo", lambda lp, rows: mj.ipo_loss(*lp, 0.1, preference_probs=soft[rows], valid_mask=valid[rows],
                                              weights=weights[rows]), [1, 3]),
        ("ipo_hard", lambda lp, rows: mj.ipo_loss(*lp, 0.1, valid_mask=valid[rows], weights=weights[rows]), [1, 3]),
    ]


@pytest.mark.parametrize("name, loss, dropped", _pair_losses(), ids=[case[0] for case in _pair_losses()])
def test_pair_loss_dropped_rows_with_nonfinite_log_probs_get_zero_gradient(name, loss, dropped):
    """-inf and NaN log-probabilities in rows dropped by valid_mask, a zero weight or a missing label: finite value,
    exactly zero gradient on the dropped rows, and on the kept rows the value and gradient of the same call with the
    dropped rows sliced out; eagerly (no error for the dropped rows) and under jit."""
    log_probs, *_ = _poisoned_pair_batch()
    batch = log_probs[0].shape[0]
    everything = np.arange(batch)
    kept = np.setdiff1d(everything, dropped)
    assert not all(np.isfinite(lp[dropped]).all() for lp in log_probs)  # the batch is poisoned where it is dropped

    def mean(*lp, rows=everything):
        return loss(lp, rows).mean()

    want_terms = loss([lp[kept] for lp in log_probs], kept)
    want_value, want_grads = jax.value_and_grad(lambda *lp: mean(*lp, rows=kept), argnums=(0, 1, 2, 3))(
        *[jnp.asarray(lp[kept]) for lp in log_probs])
    for grad_fn in (jax.value_and_grad(mean, argnums=(0, 1, 2, 3)),
                    jax.jit(jax.value_and_grad(mean, argnums=(0, 1, 2, 3)))):
        value, grads = grad_fn(*[jnp.asarray(lp) for lp in log_probs])
        np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6, atol=1e-6)
        for arg, grad, want in zip(_LOG_PROB_ARGS, grads, want_grads):
            grad = np.asarray(grad)
            assert np.all(np.isfinite(grad)), (arg, grad)
            assert np.all(grad[dropped] == 0.0), (arg, grad)
            np.testing.assert_allclose(grad[kept], np.asarray(want), rtol=1e-6, atol=1e-6, err_msg=arg)
    got_terms = loss([jnp.asarray(lp) for lp in log_probs], everything)  # concrete: must not raise
    np.testing.assert_allclose(float(got_terms.total), float(want_terms.total), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(got_terms.denominator), float(want_terms.denominator), rtol=1e-6)

    # A non-finite log-probability in a KEPT row is still a ValueError naming the argument (concrete inputs).
    for position, arg in enumerate(_LOG_PROB_ARGS):
        bad = [lp.copy() for lp in log_probs]
        bad[position][kept[0]] = -np.inf if position % 2 else np.nan
        with pytest.raises(ValueError, match=arg):
            loss(bad, everything)


def _poisoned_bc_batch(seed=22):
    """4 prompts x 5 candidates: masked candidates, prompt 2 without any valid candidate, prompt 3 of weight 0."""
    rng = np.random.default_rng(seed)
    mask = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]], bool)
    log_probs = np.log(rng.dirichlet(np.ones(5), size=4)).astype(np.float32)
    raw = np.where(mask, rng.normal(size=(4, 5)), -np.inf)
    log_normaliser = np.log(np.maximum(np.sum(np.exp(raw), -1, keepdims=True), 1e-30))
    log_weights = np.where(mask, raw - log_normaliser, -1e30)
    log_weights = log_weights.astype(np.float32)
    prompt_weights = np.array([1.0, 2.0, 1.0, 0.0], np.float32)
    log_probs[0, 2], log_probs[0, 4] = -np.inf, np.nan  # masked candidates
    log_probs[2, 1], log_probs[2, 3] = np.nan, -np.inf  # prompt with no valid candidate
    log_probs[3, 0], log_probs[3, 2] = -np.inf, np.nan  # prompt of weight 0
    log_weights[0, 4], log_weights[2, 0] = -np.inf, np.nan  # log 0 at a masked candidate
    return log_probs, log_weights, mask, prompt_weights


def test_weighted_bc_masked_candidates_with_nonfinite_log_probs_get_zero_gradient():
    """-inf / NaN at masked candidates, in a prompt without valid candidates and in a prompt of weight 0: exactly zero
    gradient there, and on the kept candidates the value and gradient of the loss on each kept prompt's valid
    candidates sliced out on their own; eagerly (no error for the dropped entries) and under jit."""
    log_probs, log_weights, mask, prompt_weights = _poisoned_bc_batch()
    kept_entries = mask & (prompt_weights > 0)[:, None]
    kept_prompts = [x for x in range(4) if kept_entries[x].any()]

    def total(lp, lw):
        return mj.weighted_bc_loss(lp, lw, mask, prompt_weights).total

    want_total, want_denominator, want_grad = 0.0, 0.0, np.zeros_like(log_probs)
    for x in kept_prompts:  # reference: each kept prompt's valid candidates on their own, no mask at all
        columns = np.flatnonzero(mask[x])
        ref = lambda lp, x=x, columns=columns: mj.weighted_bc_loss(  # noqa: E731
            lp, log_weights[x:x + 1, columns], prompt_weights=prompt_weights[x:x + 1])
        sliced = jnp.asarray(log_probs[x:x + 1, columns])
        terms = ref(sliced)
        want_total += float(terms.total)
        want_denominator += float(terms.denominator)
        want_grad[x, columns] = np.asarray(jax.grad(lambda lp: ref(lp).total)(sliced))[0]
    for grad_fn in (jax.jit(jax.value_and_grad(total)), jax.value_and_grad(total)):  # traced log_weights, then concrete
        value, grad = grad_fn(jnp.asarray(log_probs), log_weights)
        grad = np.asarray(grad)
        np.testing.assert_allclose(float(value), want_total, rtol=1e-6)
        assert np.all(np.isfinite(grad)), grad
        assert np.all(grad[~kept_entries] == 0.0), grad
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)
    terms = mj.weighted_bc_loss(jnp.asarray(log_probs), log_weights, mask, prompt_weights)  # concrete: no error
    np.testing.assert_allclose(float(terms.total), want_total, rtol=1e-6)
    np.testing.assert_allclose(float(terms.denominator), want_denominator, rtol=1e-6)

    # Non-finite values at a KEPT candidate are still a ValueError naming the argument (concrete inputs).
    with pytest.raises(ValueError, match="log_weights"):
        mj.weighted_bc_loss(log_probs, np.where(np.arange(5) == 1, np.nan, log_weights), mask, prompt_weights)


def test_completion_log_probs_unscored_nonfinite_logits_get_zero_gradient():
    """NaN / -inf logits at positions that score no completion token (and in a row whose completion mask is empty)
    do not reach the value or the gradient: exactly zero gradient there, and on the scored positions the value and
    gradient of log_softmax over those positions' logits sliced out on their own; eagerly and under jit."""
    rng = np.random.default_rng(23)
    batch, length, vocab = 3, 6, 7
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 3
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), bool)
    mask[0, 3:] = True  # scored by logits[0, 2:5]
    mask[1, [1, 4]] = True  # scored by logits[1, 0] and logits[1, 3]
    mask[1, 0] = True  # position 0 is never scored
    logits[0, 0, 2] = np.nan
    logits[0, 1, :] = -np.inf  # a position whose whole vocabulary is masked out
    logits[0, 5, 0] = np.nan  # the last position scores nothing
    logits[1, 1, :] = np.nan
    logits[1, 2, 4] = -np.inf
    logits[2, 0, :] = -np.inf  # empty completion mask
    logits[2, 3, 1] = np.nan
    scored = [(b, t) for b in range(batch) for t in range(1, length) if mask[b, t]]
    used = np.zeros((batch, length), bool)
    for b, t in scored:
        used[b, t - 1] = True
    coefficients = jnp.asarray([1.0, -0.7, 2.0])  # distinct per row, to see each row's gradient

    def weighted(l):
        return jnp.sum(coefficients * mj.completion_log_probs(l, tokens, mask))

    def reference(rows):  # rows: [n, V], the scoring positions' logits sliced out
        log_probs = jax.nn.log_softmax(rows, axis=-1)[jnp.arange(len(scored)), [tokens[b, t] for b, t in scored]]
        return log_probs, jnp.sum(coefficients[jnp.asarray([b for b, _ in scored])] * log_probs)

    rows = jnp.asarray(np.stack([logits[b, t - 1] for b, t in scored]))
    per_token = np.asarray(reference(rows)[0])
    want_values = [sum(per_token[i] for i, (b, _) in enumerate(scored) if b == row) for row in range(batch)]
    want_total, want_rows = jax.value_and_grad(lambda r: reference(r)[1])(rows)
    want_grad = np.zeros_like(logits)
    for i, (b, t) in enumerate(scored):
        want_grad[b, t - 1] = np.asarray(want_rows[i])

    for fn in (mj.completion_log_probs, jax.jit(mj.completion_log_probs)):
        values = np.asarray(fn(jnp.asarray(logits), tokens, mask))
        np.testing.assert_allclose(values, want_values, rtol=1e-6, atol=1e-6)
        assert values[2] == 0.0
    for grad_fn in (jax.value_and_grad(weighted), jax.jit(jax.value_and_grad(weighted))):
        value, grad = grad_fn(jnp.asarray(logits))
        grad = np.asarray(grad)
        np.testing.assert_allclose(float(value), float(want_total), rtol=1e-6, atol=1e-6)
        assert np.all(np.isfinite(grad)), grad
        assert np.all(grad[~used] == 0.0)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)


def test_the_conventions_of_trl_and_tunix_written_out():
    """docs/coming_from_trl.md, checked: TRL's and Tunix's DPO with label smoothing eps is `dpo_loss` with the soft
    label P = 1 - eps (`-(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)`); TRL's IPO averages each
    response's log-probabilities over its tokens, which is `ipo_loss(..., lengths=...)` with tau = TRL's beta. The
    peers' formulas are written here in NumPy from their definitions."""
    rng = np.random.default_rng(7)
    B = 6
    pc, pr, rc, rr = (rng.normal(-40.0, 8.0, B) for _ in range(4))
    lengths = rng.integers(3, 40, (B, 2))
    beta, eps = 0.2, 0.1
    z = (pc - pr) - (rc - rr)
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    smoothed = np.mean(-(1 - eps) * log_sigmoid(beta * z) - eps * log_sigmoid(-beta * z))
    ours = mj.dpo_loss(pc, pr, rc, rr, beta, preference_probs=np.full(B, 1 - eps, np.float32))
    np.testing.assert_allclose(float(ours.mean()), smoothed, rtol=1e-5)
    per_token = (pc / lengths[:, 0] - pr / lengths[:, 1]) - (rc / lengths[:, 0] - rr / lengths[:, 1])
    trl_ipo = np.mean((per_token - 1.0 / (2.0 * beta)) ** 2)
    ours = mj.ipo_loss(pc, pr, rc, rr, beta, lengths=lengths)
    np.testing.assert_allclose(float(ours.mean()), trl_ipo, rtol=1e-5)
    summed = np.mean((z - 1.0 / (2.0 * beta)) ** 2)  # without lengths: the paper's sums
    np.testing.assert_allclose(float(mj.ipo_loss(pc, pr, rc, rr, beta).mean()), summed, rtol=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        mj.ipo_loss(pc, pr, rc, rr, beta, lengths=np.zeros((B, 2)))
    with pytest.raises(ValueError, match="lengths"):
        mj.ipo_loss(pc, pr, rc, rr, beta, lengths=np.ones((B, 3)))
