"""The mathematics of MOPO as pure, jittable functions.

Notation (docs/algorithm.md has the derivations):

* ``K`` objectives, objective 0 primary and ``1..K-1`` secondary; ``X`` prompts; ``N`` candidates per prompt.
* ``P_k(y > y' | x)`` pairwise preference probabilities, ``w_k(y) = E_{y'~mu}[P_k(y > y')]`` win rates (Eq. 1).
* Constrained problem (Eq. 2)::

      max_pi  E_pi[w_0] - tau KL(pi || pi_ref)   s.t.  E_pi[w_k] >= b_k,  k = 1..K-1.

* Closed form for multipliers ``lambda >= 0`` (Eq. 3)::

      pi_lambda(y|x) = pi_ref(y|x) exp((w_0(y) + sum_k lambda_k w_k(y)) / tau) / Z_lambda(x).

* Dual (Eq. 4): ``D(lambda) = tau E_x log Z_lambda(x) - lambda . b``, gradient ``E_{pi_lambda}[w] - b``.
* Robust (KL-DRO) lower bound on a secondary value estimated from finite data (Eq. 5)::

      LB_k = sup_{chi > 0}  -chi log E_{pi_ref}[exp(-rho w_k / chi)] - chi eps,   rho = pi_lambda / pi_ref.

* Threshold ratchet (Eq. 6): every ``t0`` steps ``b <- max(b_floor, ratchet_beta G_lagged)``.

Every function works on arrays whose leading axes are ``[K, X, N]`` (win rates) or ``[X, N]`` (log-probabilities over a
prompt's candidate pool), takes an optional ``candidate_mask [X, N]`` for ragged pools, and never produces NaN for padded
entries. Input validation lives in :mod:`mopo_jax.validation` and is applied at the Python boundary, not here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mopo_jax import validation

Array = jax.Array

# Log-weights of padded candidates. Finite (not -inf) so that 0 * log-weight stays 0 and gradients stay finite.
MASKED_LOG_WEIGHT = -1e30


def _mask_or_ones(mask, shape):
    return jnp.ones(shape, dtype=bool) if mask is None else jnp.asarray(mask, dtype=bool)


def _normalised_prompt_weights(prompt_weights, num_prompts, candidate_mask=None):
    """Prompt distribution p(x); prompts without any valid candidate get zero weight."""
    if prompt_weights is None:
        weights = jnp.ones((num_prompts,), jnp.float32)
    else:
        weights = jnp.asarray(prompt_weights, jnp.float32)
    if candidate_mask is not None:
        weights = jnp.where(jnp.any(candidate_mask, axis=-1), weights, 0.0)
    total = jnp.sum(weights)
    return weights / jnp.where(total > 0, total, 1.0)


def masked_log_normalize(logits: Array, candidate_mask: Array | None = None) -> Array:
    """Log-softmax over the candidate axis with masking and max subtraction.

    Args:
      logits: ``[..., N]`` unnormalised log-probabilities.
      candidate_mask: optional boolean ``[..., N]``; False marks padded candidates.

    Returns:
      ``[..., N]`` float32 log-probabilities; padded entries hold ``MASKED_LOG_WEIGHT`` and a row with no valid
      candidate is all ``MASKED_LOG_WEIGHT`` (never NaN).
    """
    logits = jnp.asarray(logits, jnp.float32)
    mask = _mask_or_ones(candidate_mask, logits.shape)
    masked = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    # Max subtraction keeps exp() in range; the where() keeps padded entries out of the sum and out of the gradient.
    shifted = jnp.where(mask, logits - jax.lax.stop_gradient(row_max), 0.0)
    sum_exp = jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=-1, keepdims=True)
    log_norm = jnp.log(jnp.where(sum_exp > 0, sum_exp, 1.0))
    return jnp.where(mask, shifted - log_norm, MASKED_LOG_WEIGHT)


def win_rates(
    preferences: Array,
    comparison_probs: Array,
    label_mask: Array | None = None,
    candidate_mask: Array | None = None,
    include_self: bool = True,
) -> Array:
    """Win rates of an *enumerated* candidate pool against a comparison policy (Eq. 1):
    ``w_k(y) = E_{y'~mu}[P_k(y > y')]``.

    ``mu`` puts mass ``mu(y)`` on ``y`` itself, so the exact expectation counts that comparison as a tie
    (``include_self=True``, the default for this enumerated case). For candidates *sampled* from ``mu`` use
    :func:`sampled_win_rates` (the leave-one-out mean). Unlabeled pairs are dropped and the expectation is renormalised over the labeled comparisons; a candidate with no
    labeled comparison gets the neutral value 0.5.

    Args:
      preferences: ``[K, X, N, N]`` with ``preferences[k, x, i, j] = P_k(y_i > y_j | x)``. Values at unlabeled entries
        are ignored (they may be NaN).
      comparison_probs: ``[X, N]`` comparison policy ``mu`` (typically ``pi_ref``).
      label_mask: optional boolean ``[K, X, N, N]``, True where the pair is labeled. Defaults to ``~isnan(preferences)``.
      candidate_mask: optional boolean ``[X, N]``; padded candidates are neither compared against nor given weight.
      include_self: whether ``y' = y`` counts as a comparison (a tie, ``P = 1/2``).

    Returns:
      ``[K, X, N]`` float32 win rates in ``[0, 1]``.
    """
    validation.check_preferences("preferences", preferences, label_mask)
    validation.check_shape("comparison_probs", comparison_probs, tuple(jnp.shape(preferences)[1:3]), "[X, N]")
    # mu need not be normalised: the expectation is renormalised over the labeled comparisons anyway.
    validation.check_nonnegative("comparison_probs", comparison_probs)
    preferences = jnp.asarray(preferences, jnp.float32)
    num_candidates = preferences.shape[-1]
    if label_mask is None:
        label_mask = ~jnp.isnan(preferences)
    label_mask = jnp.asarray(label_mask, bool)
    eye = jnp.eye(num_candidates, dtype=bool)
    # The diagonal is a tie by definition, whatever the tensor holds there.
    preferences = jnp.where(eye, 0.5, preferences)
    label_mask = jnp.where(eye, include_self, label_mask)
    if candidate_mask is not None:
        candidate_mask = jnp.asarray(candidate_mask, bool)
        label_mask = label_mask & candidate_mask[None, :, None, :] & candidate_mask[None, :, :, None]
    mu = jnp.asarray(comparison_probs, jnp.float32)[None, :, None, :]
    weights = jnp.where(label_mask, mu, 0.0)
    numerator = jnp.sum(weights * jnp.where(label_mask, preferences, 0.0), axis=-1)
    denominator = jnp.sum(weights, axis=-1)
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.5)


def sampled_win_rates(
    preferences: Array,
    label_mask: Array | None = None,
    candidate_mask: Array | None = None,
) -> Array:
    """Win rates of candidates *sampled* from the comparison policy (Eq. 1 estimated by a leave-one-out mean).

    With ``y_1..y_N`` drawn independently from ``mu``, ``w_k(y_i) = E_{y'~mu}[P_k(y_i > y')]`` is estimated without
    bias by ``mean_{j != i} P_k(y_i > y_j)``: every other sample is an independent draw of ``y'``. Counting
    ``y_i`` against itself (a tie) as :func:`win_rates` does for enumerated candidates would shrink every win rate
    towards 1/2 by a factor ``(N-1)/N`` (25% at ``N = 4``), i.e. raise the closed form's temperature to
    ``tau N/(N-1)``. Unlabeled comparisons drop out and the mean is renormalised over the labeled ones; a candidate
    with no labeled comparison gets 1/2.

    Args:
      preferences: ``[K, X, N, N]`` ``P_k(y_i > y_j | x)`` among the samples of each prompt (NaN where unlabeled).
      label_mask: optional boolean ``[K, X, N, N]`` (default ``~isnan(preferences)``).
      candidate_mask: optional boolean ``[X, N]``; padded samples are neither compared against nor given weight.

    Returns:
      ``[K, X, N]`` float32 win rates.
    """
    num_prompts, num_candidates = jnp.shape(preferences)[1:3]
    uniform = jnp.ones((num_prompts, num_candidates), jnp.float32)
    return win_rates(preferences, uniform, label_mask, candidate_mask, include_self=False)


def combined_win_rate(win_rates_k: Array, multipliers: Array) -> Array:
    """The tilt ``w_0 + sum_k lambda_k w_k`` of Eq. 3.

    Args:
      win_rates_k: ``[K, ...]`` win rates (objective 0 first).
      multipliers: ``[K-1]`` Lagrange multipliers of the secondary objectives.

    Returns:
      ``[...]`` the combined win rate.
    """
    win_rates_k = jnp.asarray(win_rates_k, jnp.float32)
    multipliers = jnp.asarray(multipliers, jnp.float32)
    coefficients = jnp.concatenate([jnp.ones((1,), jnp.float32), multipliers])
    return jnp.tensordot(coefficients, win_rates_k, axes=1)


def closed_form_log_weights(
    win_rates_k: Array,
    multipliers: Array,
    tau: float | Array,
    ref_log_probs: Array | None = None,
    candidate_mask: Array | None = None,
) -> Array:
    """Log of the closed-form optimal policy for fixed multipliers (Eq. 3), per prompt.

    ``log pi_lambda(y|x) = log pi_ref(y|x) + (w_0(y) + lambda . w(y)) / tau - log Z_lambda(x)``, normalised over each
    prompt's candidates in log space with max subtraction.

    When the candidates were *sampled* from ``pi_ref`` (the language-model case) leave ``ref_log_probs`` as ``None``:
    the base is then uniform over the samples and the result is the log of the self-normalised importance weights
    ``rho~ = (pi_lambda / pi_ref) / sum(pi_lambda / pi_ref)``. When the candidate set is enumerated (the tabular case),
    pass ``log pi_ref`` to get ``log pi_lambda`` itself.

    Args:
      win_rates_k: ``[K, X, N]`` win rates.
      multipliers: ``[K-1]`` multipliers ``lambda >= 0``.
      tau: KL temperature ``> 0``.
      ref_log_probs: optional ``[X, N]`` log-probabilities of the base distribution.
      candidate_mask: optional boolean ``[X, N]``.

    Returns:
      ``[X, N]`` log-weights, ``MASKED_LOG_WEIGHT`` at padded candidates.
    """
    validation.check_positive("tau", tau)
    validation.check_unit_interval("win_rates", win_rates_k)
    validation.check_nonnegative("multipliers", multipliers)
    logits = combined_win_rate(win_rates_k, multipliers) / tau
    if ref_log_probs is not None:
        logits = logits + jnp.asarray(ref_log_probs, jnp.float32)
    return masked_log_normalize(logits, candidate_mask)


def objective_values(
    log_policy: Array,
    win_rates_k: Array,
    prompt_weights: Array | None = None,
    candidate_mask: Array | None = None,
) -> Array:
    """Expected win rates ``V_k(pi) = E_x E_{y~pi}[w_k(y)]`` of every objective (the quantities of Eq. 2).

    Args:
      log_policy: ``[X, N]`` log-probabilities of the policy over each prompt's candidates.
      win_rates_k: ``[K, X, N]`` win rates.
      prompt_weights: optional ``[X]`` prompt distribution (uniform when omitted).
      candidate_mask: optional boolean ``[X, N]``.

    Returns:
      ``[K]`` values.
    """
    mask = _mask_or_ones(candidate_mask, log_policy.shape)
    probs = jnp.where(mask, jnp.exp(jnp.asarray(log_policy, jnp.float32)), 0.0)
    per_prompt = jnp.sum(probs[None] * jnp.where(mask[None], win_rates_k, 0.0), axis=-1)
    weights = _normalised_prompt_weights(prompt_weights, log_policy.shape[0], candidate_mask)
    return per_prompt @ weights


def policy_pool_log_weights(
    policy_log_probs: Array,
    reference_log_probs: Array,
    base_log_probs: Array,
    candidate_mask: Array,
) -> Array:
    """The policy's self-normalised weights over a candidate pool drawn from (or enumerating) the base ``q``:
    ``log pi~(y_i) = log q(y_i) + log pi(y_i)/pi_ref(y_i)``, log-normalised per prompt over the valid candidates.

    With sampled candidates ``q`` is uniform over the pool and these are the importance weights that make
    ``sum_i pi~(y_i) w_k(y_i)`` the estimate of ``V_k(pi) = E_{y~pi} w_k(y)`` (Eq. 2) from reference draws; with the
    enumerated support ``q = pi_ref`` and they are ``pi`` itself. Masked candidates get no weight and no NaN, whatever
    their log-probabilities."""
    mask = jnp.asarray(candidate_mask, bool)
    log_ratio = jnp.where(mask, jnp.asarray(policy_log_probs, jnp.float32) - jnp.asarray(reference_log_probs,
                                                                                        jnp.float32), 0.0)
    return masked_log_normalize(jnp.where(mask, base_log_probs, 0.0) + log_ratio, mask)


def secondary_values(
    log_policy: Array,
    win_rates_k: Array,
    prompt_weights: Array | None = None,
    candidate_mask: Array | None = None,
) -> Array:
    """Constraint values ``G_k = E_x E_{y~pi}[w_k(y)]`` for the secondary objectives ``k = 1..K-1`` (Eq. 2).

    Args and shapes as :func:`objective_values`. Returns ``[K-1]``.
    """
    return objective_values(log_policy, win_rates_k, prompt_weights, candidate_mask)[1:]


def jackknife_pool_secondary_values(
    log_policy_weights: Array,
    preferences: Array,
    label_mask: Array | None = None,
    candidate_mask: Array | None = None,
    prompt_weights: Array | None = None,
) -> Array:
    """The policy's secondary values over pools *sampled* from the reference (Eq. 2 through
    :func:`policy_pool_log_weights` and :func:`sampled_win_rates`), corrected by the delete-one jackknife.

    The pool estimate ``G_x = sum_i pi~_i w_i`` is a ratio (self-normalised importance weights) of leave-one-out
    means, biased at order ``1/n`` towards the pool's plain mean when the policy has moved its mass to responses few
    draws hold. Per prompt with ``n`` valid candidates, ``n G_x - (n - 1) mean_j G_x^(-j)`` with ``G_x^(-j)`` the
    estimate recomputed over the pool without candidate ``j`` (its weights renormalised, every win rate re-averaged
    without it) removes that order. On HH-RLHF pools of 8 at KL 0.55-0.65 it read the 32-draw value
    (docs/results/hh-cpu-small-onpolicyfixed0-closedloop/pool_size_probe.md). A prompt with one candidate keeps its
    plain value.

    Args:
      log_policy_weights: ``[X, N]`` the policy's self-normalised log-weights over each pool
        (:func:`policy_pool_log_weights` with a uniform base).
      preferences: ``[K, X, N, N]`` ``P_k(y_i > y_j | x)`` (NaN where unlabeled), as :func:`sampled_win_rates`.
      label_mask: optional boolean ``[K, X, N, N]``.
      candidate_mask: optional boolean ``[X, N]``.
      prompt_weights: optional ``[X]`` prompt distribution.

    Returns:
      ``[K-1]`` corrected values of the secondary objectives.
    """
    log_policy_weights = jnp.asarray(log_policy_weights, jnp.float32)
    num_prompts, num_candidates = log_policy_weights.shape
    mask = _mask_or_ones(candidate_mask, log_policy_weights.shape)
    if label_mask is None:
        label_mask = ~jnp.isnan(preferences)

    def per_prompt(pool_mask):
        rates = sampled_win_rates(preferences, label_mask, pool_mask)
        weights = jnp.where(pool_mask, jnp.exp(masked_log_normalize(log_policy_weights, pool_mask)), 0.0)
        return jnp.sum(weights[None] * jnp.where(pool_mask[None], rates, 0.0), axis=-1)  # [K, X]

    full = per_prompt(mask)
    without = jax.vmap(lambda j: per_prompt(mask & (jnp.arange(num_candidates) != j)))(jnp.arange(num_candidates))
    count = jnp.sum(mask, axis=-1).astype(jnp.float32)  # [X]
    mean_without = jnp.sum(jnp.where(mask.T[:, None, :], without, 0.0), axis=0) / jnp.maximum(count, 1.0)
    corrected = count * full - (count - 1.0) * mean_without
    return (corrected @ _normalised_prompt_weights(prompt_weights, num_prompts, mask))[1:]


def kl_divergence(
    log_policy: Array,
    ref_log_probs: Array,
    prompt_weights: Array | None = None,
    candidate_mask: Array | None = None,
) -> Array:
    """``E_x KL(pi(.|x) || pi_ref(.|x))`` over the candidate pool, the regulariser of Eq. 2."""
    mask = _mask_or_ones(candidate_mask, log_policy.shape)
    log_policy = jnp.asarray(log_policy, jnp.float32)
    per_candidate = jnp.exp(log_policy) * (log_policy - jnp.asarray(ref_log_probs, jnp.float32))
    per_prompt = jnp.sum(jnp.where(mask, per_candidate, 0.0), axis=-1)
    return per_prompt @ _normalised_prompt_weights(prompt_weights, log_policy.shape[0], candidate_mask)


def dual_objective(
    multipliers: Array,
    win_rates_k: Array,
    ref_log_probs: Array,
    tau: float | Array,
    thresholds: Array,
    prompt_weights: Array | None = None,
    candidate_mask: Array | None = None,
) -> Array:
    """Lagrange dual ``D(lambda) = tau E_x log Z_lambda(x) - lambda . b`` (Eq. 4).

    ``Z_lambda(x) = sum_y pi_ref(y|x) exp((w_0 + lambda . w)/tau)``. ``D`` is convex in ``lambda`` and its gradient is
    ``E_{pi_lambda}[w_{1:}] - b``; minimising it over ``lambda >= 0`` solves Eq. 2.

    Returns:
      Scalar dual value.
    """
    mask = _mask_or_ones(candidate_mask, jnp.shape(ref_log_probs))
    logits = combined_win_rate(win_rates_k, multipliers) / tau + jnp.asarray(ref_log_probs, jnp.float32)
    logits = jnp.where(mask, logits, -jnp.inf)
    log_partition = jax.nn.logsumexp(logits, axis=-1)
    log_partition = jnp.where(jnp.any(mask, axis=-1), log_partition, 0.0)
    weights = _normalised_prompt_weights(prompt_weights, mask.shape[0], candidate_mask)
    return tau * (log_partition @ weights) - jnp.dot(multipliers, thresholds)


class PairwiseValueSamples(NamedTuple):
    """Per-pair samples of the objective values and their weights (see :func:`pairwise_value_samples`)."""

    samples: Array  # [K, B] Z_kb; sum_b exp(log_base[k, b]) samples[k, b] is objective k's value estimate
    log_base: Array  # [K, B] log q_kb: the labelled rows' normalised row weights, MASKED_LOG_WEIGHT elsewhere
    counts: Array  # [K] summed row weight of the rows labelled for k (their number without row weights)
    log_normalisers: Array  # [K] log sum_b u_b (rho_b + rho'_b)/2, the self-normalisation's denominator
    # (MASKED_LOG_WEIGHT without a labelled row): estimates of several batches pool in proportion to it

    def mean(self) -> Array:
        """``[K]`` value estimates: the ``q``-weighted means of the samples (1/2 with no labelled pair)."""
        values = jnp.sum(jnp.exp(self.log_base) * self.samples, axis=1)
        return jnp.where(self.counts > 0, values, 0.5)


def pairwise_value_samples(
    policy_log_ratios: Array,
    preference_probs: Array,
    label_mask: Array | None = None,
    valid_mask: Array | None = None,
    weights: Array | None = None,
) -> PairwiseValueSamples:
    """Objective values ``V_k(pi) = E_x E_{y~pi}[w_k(y)]`` (Eq. 2) estimated from pairwise data, as samples.

    For a pair ``(y, y')`` drawn from ``q x q`` (``q`` the distribution the responses were sampled from, which also
    serves as the comparison policy ``mu`` of Eq. 1) and ``rho = pi/q``,
    ``V_k(pi) - 1/2 = E[rho(y) (P_k(y > y') - 1/2)] = E[(rho(y) - rho(y')) (P_k(y > y') - 1/2)] / 2`` (the second
    form swaps the pair's roles). Normalising by the same rows' estimate of ``E_q[rho] = 1`` gives the
    self-normalised importance-sampling estimate over the batch::

        V_k = 1/2 + sum_b u_b (rho_b - rho'_b)(P_bk - 1/2) / sum_b u_b (rho_b + rho'_b)

    over the valid rows ``b`` labelled for ``k`` (row weights ``u``). It is 1/2 at ``pi = q``, always in
    ``[0, 1]``, and consistent as the batch grows; the bias of self-normalisation is ``O(1/B)``. (Normalising within
    each pair instead, i.e. the policy's pick ``sigmoid(h)`` inside the pair, shrinks ``V - 1/2`` several-fold:
    docs/algorithm.md, section 4.) Here it is written as a ``q``-weighted mean of per-pair samples
    ``Z_bk = 1/2 + (rho_b - rho'_b)(P_bk - 1/2) / (2 rho_bar_k)``, ``rho_bar_k`` the mean of ``(rho + rho')/2``, so
    that the robust bound of Eq. 5 (:func:`robust_lower_bound`) applies to the same samples.

    The ratios are taken in log space with the largest subtracted. ``policy_log_ratios`` must be ``log pi/q``:
    with ``log pi/pi_ref`` (the language-model step) this assumes both responses of a pair are draws from the
    reference, which offline preference data collected from other policies are not.

    Args:
      policy_log_ratios: ``[B, 2]`` ``log pi(y)/q(y)`` and ``log pi(y')/q(y')``.
      preference_probs: ``[B, K]`` ``P_k(y > y')``.
      label_mask: optional boolean ``[B, K]``; defaults to ``~isnan(preference_probs)``.
      valid_mask: optional boolean ``[B]``; False drops the row (e.g. an empty completion).
      weights: optional ``[B]`` nonnegative row weights.

    Returns:
      :class:`PairwiseValueSamples` with ``[K, B]`` samples and log-weights and ``[K]`` counts.
    """
    sizes = validation.check_array_shape("policy_log_ratios", policy_log_ratios, ("B", 2), {})
    sizes = validation.check_array_shape("preference_probs", preference_probs, ("B", "K"), sizes)
    # Probabilities P, not the loss's margins P - 1/2 (which are negative for half the pairs): NaN where unlabelled.
    validation.check_unit_interval("preference_probs", preference_probs, allow_nan=True)
    if label_mask is not None:
        validation.check_array_shape("label_mask", label_mask, ("B", "K"), sizes)
    if valid_mask is not None:
        validation.check_array_shape("valid_mask", valid_mask, ("B",), sizes)
    if weights is not None:
        validation.check_array_shape("weights", weights, ("B",), sizes)
    probs = jnp.asarray(preference_probs, jnp.float32)
    labels = ~jnp.isnan(probs) if label_mask is None else jnp.asarray(label_mask, bool)
    row_weight = jnp.ones(probs.shape[:1], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if valid_mask is not None:
        row_weight = jnp.where(jnp.asarray(valid_mask, bool), row_weight, 0.0)
    labelled = (labels & (row_weight[:, None] > 0)).T  # [K, B]
    log_ratios = jnp.asarray(policy_log_ratios, jnp.float32)
    # Per objective, shift by the largest log-ratio among its labelled rows: every ratio is then in (0, 1], the
    # largest is exactly 1, and the ratio of sums below is unchanged.
    candidates = jnp.where(labelled[:, :, None], log_ratios[None], -jnp.inf)  # [K, B, 2]
    shift = jnp.max(candidates, axis=(1, 2), keepdims=True)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    ratios = jnp.where(labelled[:, :, None], jnp.exp(jnp.where(labelled[:, :, None], log_ratios[None] - shift, 0.0)),
                       0.0)
    counts = jnp.sum(jnp.where(labelled, row_weight[None], 0.0), axis=1)  # [K]
    safe_counts = jnp.where(counts > 0, counts, 1.0)
    q = jnp.where(labelled, row_weight[None], 0.0) / safe_counts[:, None]  # [K, B]
    mean_ratio = jnp.sum(q * 0.5 * (ratios[..., 0] + ratios[..., 1]), axis=1)  # [K] rho_bar (times a constant)
    safe_mean = jnp.where(mean_ratio > 0, mean_ratio, 1.0)
    centred_p = jnp.where(labelled, jnp.where(labels.T, probs.T, 0.5) - 0.5, 0.0)
    samples = 0.5 + (ratios[..., 0] - ratios[..., 1]) * centred_p / (2.0 * safe_mean[:, None])
    log_base = jnp.where(labelled, jnp.log(jnp.where(q > 0, q, 1.0)), MASKED_LOG_WEIGHT)
    has_data = (counts > 0) & (mean_ratio > 0)
    log_normalisers = jnp.where(has_data, shift[:, 0, 0] + jnp.log(jnp.where(has_data, safe_counts * safe_mean, 1.0)),
                                MASKED_LOG_WEIGHT)
    return PairwiseValueSamples(samples=jnp.where(labelled, samples, 0.5), log_base=log_base, counts=counts,
                                log_normalisers=log_normalisers)


def pairwise_objective_values(
    policy_log_ratios: Array,
    preference_probs: Array,
    label_mask: Array | None = None,
    valid_mask: Array | None = None,
    weights: Array | None = None,
) -> Array:
    """Objective values ``V_k(pi)`` from pairwise data: the weighted mean of :func:`pairwise_value_samples`
    (self-normalised importance sampling over the batch; see there for the estimator and its assumption).

    Returns:
      ``[K]`` values; an objective with no labelled valid pair gets 1/2.
    """
    return pairwise_value_samples(policy_log_ratios, preference_probs, label_mask, valid_mask, weights).mean()


class RobustBound(NamedTuple):
    """Value and chi-derivative of the robust objective of Eq. 5 at a given ``chi``."""

    value: Array  # [K-1] -chi log E[exp(-Z/chi)] - chi eps
    chi_gradient: Array  # [K-1] d value / d chi


def robust_lower_bound(
    samples: Array,
    log_base_probs: Array,
    chi: Array,
    eps: float | Array,
) -> RobustBound:
    """KL-robust lower bound on ``E_q[Z]`` at a fixed dual variable ``chi`` (Eq. 5).

    ``LB(chi) = -chi log E_q[exp(-Z / chi)] - chi eps``. Its supremum over ``chi > 0`` equals
    ``inf {E_Q[Z] : KL(Q || q) <= eps}``, the worst-case mean over distributions within ``eps`` of the empirical one.
    For MOPO, ``q(x, y) = p(x) pi_ref(y|x)`` and ``Z = 1/2 + rho (w_k - 1/2)`` with ``rho = pi_lambda / pi_ref`` (see
    :func:`importance_weighted_secondaries`; the pairwise path's sample is the same, :func:`pairwise_value_samples`),
    so ``E_q[Z] = E_{pi_lambda}[w_k]``. ``LB`` is concave in ``chi`` and its
    derivative is ``-log E_q[e^{-Z/chi}] - E_{q_chi}[Z] / chi - eps`` with ``q_chi ∝ q e^{-Z/chi}``; both are computed in
    log space with max subtraction.

    Args:
      samples: ``[K-1, M]`` values ``Z`` (flattened over prompts and candidates, or pairs).
      log_base_probs: ``[M]`` log-probabilities of ``q`` (``MASKED_LOG_WEIGHT`` for padding), or ``[K-1, M]`` when
        each objective has its own (pairs labelled for some objectives only); each row must sum to one.
      chi: ``[K-1]`` positive dual variables.
      eps: KL radius ``>= 0``.

    Returns:
      :class:`RobustBound` with ``[K-1]`` values and derivatives.
    """
    validation.check_nonnegative("eps", eps)
    validation.check_positive("chi", chi)
    validation.check_finite("samples", samples)
    samples = jnp.asarray(samples, jnp.float32)
    log_base_probs = jnp.broadcast_to(jnp.asarray(log_base_probs, jnp.float32), samples.shape)
    base = jnp.exp(log_base_probs)
    # Centre on the plain mean c: LB = c - chi log E_q[exp(-(Z - c)/chi)] - chi eps. For large chi the log term is
    # O(1/chi^2) and chi times its float32 rounding would swamp the answer, so it is taken as log1p(E_q[expm1(u)]).
    mean = jnp.sum(base * samples, axis=-1, keepdims=True)
    chi = jnp.asarray(chi, jnp.float32)[:, None]
    exponent = -(samples - mean) / chi
    small = jnp.max(jnp.where(base > 0, jnp.abs(exponent), 0.0), axis=-1) < 0.5
    log_mean_small = jnp.log1p(jnp.sum(base * jnp.expm1(jnp.clip(exponent, -0.5, 0.5)), axis=-1))
    log_terms = log_base_probs + exponent
    log_mean = jnp.where(small, log_mean_small, jax.nn.logsumexp(log_terms, axis=-1))
    tilted = jax.nn.softmax(log_terms, axis=-1)
    tilted_centred_mean = jnp.sum(tilted * (samples - mean), axis=-1)
    chi = chi[:, 0]
    value = mean[:, 0] - chi * log_mean - chi * eps
    chi_gradient = -log_mean - tilted_centred_mean / chi - eps
    return RobustBound(value=value, chi_gradient=chi_gradient)


def optimal_robust_chi(
    samples: Array,
    log_base_probs: Array,
    eps: float | Array,
    chi_min: float = 1e-4,
    chi_max: float = 1e4,
    iterations: int = 80,
) -> Array:
    """Maximiser of the concave ``LB(chi)`` of Eq. 5 by bisection on ``log chi`` (derivative is decreasing).

    MOPO's estimate takes the bound at this ``chi`` for every batch: the bound at any other ``chi`` is lower (a
    looser constraint read as a violated one), and a ``chi`` stepped by gradient ascent lags the optimum, which
    moves with every batch. Returns ``[K-1]`` values clipped to ``[chi_min, chi_max]``.
    """
    num = jnp.shape(samples)[0]
    lower = jnp.full((num,), jnp.log(chi_min), jnp.float32)
    upper = jnp.full((num,), jnp.log(chi_max), jnp.float32)

    def bisect(_, bounds):
        lower, upper = bounds
        middle = 0.5 * (lower + upper)
        slope = robust_lower_bound(samples, log_base_probs, jnp.exp(middle), eps).chi_gradient
        return jnp.where(slope > 0, middle, lower), jnp.where(slope > 0, upper, middle)

    lower, upper = jax.lax.fori_loop(0, iterations, bisect, (lower, upper))
    return jnp.exp(0.5 * (lower + upper))


def importance_weighted_secondaries(
    log_policy: Array,
    win_rates_k: Array,
    ref_log_probs: Array,
    prompt_weights: Array | None = None,
    candidate_mask: Array | None = None,
) -> tuple[Array, Array]:
    """The samples ``Z = 1/2 + rho (w_k - 1/2)`` and base log-probabilities ``log q`` that feed
    :func:`robust_lower_bound`.

    ``rho = pi / pi_ref`` per candidate and ``q(x, y) = p(x) pi_ref(y|x)``, flattened over prompts and candidates.
    Since ``E_q[rho] = 1``, ``E_q[Z] = E_pi[w_k]``; centring the win rate at 1/2 makes ``Z`` the same sample as the
    pairwise path's (:func:`pairwise_value_samples`), so ``eps`` means the same on both, and a secondary that
    every comparison ties (``w = 1/2``) reads exactly 1/2 whatever the spread of ``rho`` (docs/algorithm.md,
    section 3).

    Returns:
      ``(samples [K-1, X*N], log_base_probs [X*N])``.
    """
    mask = _mask_or_ones(candidate_mask, log_policy.shape)
    ref_log_probs = jnp.asarray(ref_log_probs, jnp.float32)
    log_ratio = jnp.where(mask, jnp.asarray(log_policy, jnp.float32) - ref_log_probs, 0.0)
    centred = jnp.where(mask[None], jnp.asarray(win_rates_k[1:], jnp.float32) - 0.5, 0.0)
    samples = 0.5 + jnp.exp(log_ratio)[None] * centred
    prompt_weights = _normalised_prompt_weights(prompt_weights, mask.shape[0], candidate_mask)
    log_prompt = jnp.log(jnp.where(prompt_weights > 0, prompt_weights, 1.0))
    log_base = jnp.where(mask & (prompt_weights[:, None] > 0), ref_log_probs + log_prompt[:, None], MASKED_LOG_WEIGHT)
    return samples.reshape(samples.shape[0], -1), log_base.reshape(-1)


def update_multipliers(
    multipliers: Array,
    secondary_estimates: Array,
    thresholds: Array,
    multiplier_lr: float | Array,
) -> Array:
    """Projected dual step on ``lambda`` (Eq. 4): ``lambda <- max(0, lambda - eta (G - b))``.

    ``G`` is the (plain or robust) estimate of ``E_{pi_lambda}[w_k]``: a violated constraint (``G < b``) raises its
    multiplier, a slack one lowers it towards zero. (The robust bound's ``chi`` is not stepped: it is set to its
    optimum for each estimate, :func:`optimal_robust_chi`.)

    Args:
      multipliers: ``[K-1]`` current ``lambda``.
      secondary_estimates: ``[K-1]`` ``G_k``.
      thresholds: ``[K-1]`` ``b_k``.
      multiplier_lr: step size ``eta``.

    Returns:
      ``[K-1]`` new multipliers.
    """
    validation.check_unit_interval("thresholds", thresholds)
    validation.check_finite("secondary_estimates", secondary_estimates)
    validation.check_nonnegative("multipliers", multipliers)
    validation.check_nonnegative("multiplier_lr", multiplier_lr)
    return jnp.maximum(0.0, multipliers - multiplier_lr * (secondary_estimates - thresholds))


def ratchet_thresholds(
    thresholds: Array,
    lagged_values: Array,
    ratchet_beta: float | Array,
    floor: Array | None = None,
) -> Array:
    """Threshold ratchet of the MOPO schedule (Eq. 6): ``b <- clip(max(floor, ratchet_beta G_lagged), 0, 1)``.

    ``G_lagged`` are the secondary values achieved ``t0`` steps earlier; ``ratchet_beta < 1`` leaves a margin so that
    the new constraint stays strictly feasible while the secondaries may lose at most that factor per period. The
    paper's rule has no floor (pass ``floor=0``); ``floor = b_user`` only ever tightens the user's constraints.
    When ``floor`` is None the current ``thresholds`` serve as the floor.

    Returns:
      ``[K-1]`` new thresholds.
    """
    validation.check_unit_interval("thresholds", thresholds)
    validation.check_unit_interval("ratchet_beta", ratchet_beta)
    validation.check_finite("lagged_values", lagged_values)
    floor = thresholds if floor is None else floor
    return jnp.clip(jnp.maximum(floor, ratchet_beta * lagged_values), 0.0, 1.0)


def log_barrier_penalty(secondary_estimates: Array, thresholds: Array, sigma: float | Array) -> Array:
    """MOPO-LB: ``-sigma sum_k log(G_k - b_k)`` replaces the hard constraints (the log-barrier variant).

    Returns ``+inf`` outside the interior (``G_k <= b_k``). Its gradient with respect to ``G_k`` is
    ``-sigma / (G_k - b_k)``: the barrier acts as a multiplier ``lambda_k = sigma / (G_k - b_k)``.
    """
    slack = secondary_estimates - thresholds
    return jnp.where(jnp.all(slack > 0), -sigma * jnp.sum(jnp.log(jnp.where(slack > 0, slack, 1.0))), jnp.inf)


def update_barrier_multipliers(
    multipliers: Array,
    secondary_estimates: Array,
    thresholds: Array,
    sigma: float | Array,
    multiplier_lr: float | Array,
) -> Array:
    """MOPO-LB multiplier step: projected gradient descent on ``D(lambda) - sigma sum_k log lambda_k``.

    The primal barrier ``E[w_0] - tau KL + sigma sum_k log(G_k - b_k)`` has this dual; its stationary point is
    ``lambda_k (G_k(lambda) - b_k) = sigma``, i.e. the barrier's effective multipliers, reached with the same step
    as Eq. 4 plus ``sigma / lambda``. Since ``G_k - b_k <= 1`` the solution has ``lambda_k >= sigma``, so projecting
    onto ``[sigma, inf)`` never cuts it off and keeps ``sigma / lambda <= 1`` (a stable step).

    Returns:
      ``[K-1]`` new multipliers.
    """
    validation.check_positive("sigma", sigma)
    floor = jnp.asarray(sigma, jnp.float32)
    current = jnp.maximum(multipliers, floor)
    gradient = secondary_estimates - thresholds - sigma / current
    return jnp.maximum(floor, current - multiplier_lr * gradient)
