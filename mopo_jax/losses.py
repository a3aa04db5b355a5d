"""Policy losses on (sequence or tabular) log-probabilities: MOPO weighted BC, MOPO pairwise, DPO, IPO, and the
completion log-probabilities they consume.

Every loss returns a :class:`LossTerms` ``(total, denominator)`` rather than a mean, so that gradient accumulation over
micro-batches (and over hosts) can add totals and denominators and divide once: a true mean, whatever the number of
valid rows in each micro-batch.

Conventions: ``h = [log pi(y) - log pi_ref(y)] - [log pi(y') - log pi_ref(y')]`` is the policy's log-ratio margin of a
pair ``(y, y')``; ``y`` is the "chosen" side. Rows are dropped with ``valid_mask`` (missing labels, padded rows, rows
with an empty completion) and a dropped row contributes exactly zero to the value and to the gradient, never NaN, even
when its log-probabilities are ``-inf`` or NaN: its inputs are replaced by 0 before any arithmetic (the "double where"
of :func:`_zero_dropped`), and the input checks look only at the kept rows. The same holds for a zero-weight row, a
masked candidate and a token position that scores nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mopo_jax import validation

Array = jax.Array


class LossTerms(NamedTuple):
    """A loss as a sum over rows and the number (or weight) of rows it sums."""

    total: Array
    denominator: Array

    def mean(self) -> Array:
        """``total / denominator``, and 0 when nothing was counted."""
        return self.total / jnp.maximum(self.denominator, 1e-12) * (self.denominator > 0)

    def __add__(self, other: "LossTerms") -> "LossTerms":  # type: ignore[override]
        return LossTerms(self.total + other.total, self.denominator + other.denominator)


def _check_pair_inputs(name_values, sizes=None) -> dict:
    """Every per-row argument of a pair loss is ``[B]`` with one ``B`` (checked at trace time: shapes are static)."""
    sizes = {} if sizes is None else sizes
    for name, value in name_values:
        if value is not None:
            sizes = validation.check_array_shape(name, value, ("B",), sizes)
    return sizes


def _row_weights(shape, valid_mask, weights):
    row = jnp.ones(shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if valid_mask is not None:
        row = jnp.where(jnp.asarray(valid_mask, bool), row, 0.0)
    return row


def _zero_dropped(keep: Array, *values: Array | None) -> tuple[Array | None, ...]:
    """Each value with its dropped entries set to 0, to be applied *before* any arithmetic on it.

    ``jnp.where(keep, f(x), 0)`` alone has the right value but back-propagates ``0 * f'(x)``, which is NaN where ``x``
    is ``-inf`` or NaN, into every parameter upstream of ``x``. Feeding ``f`` the finite 0 instead (the first half of
    the "double where"; the losses' own masking is the second) makes a dropped entry's value and gradient exactly 0
    and leaves kept entries untouched. ``keep`` covers the leading axes of every value (a ``[B]`` mask for ``[B]`` or
    ``[B, K]`` values, ``[B, T]`` for ``[B, T, V]``); ``None`` values pass through.
    """
    keep = jnp.asarray(keep, bool)
    return tuple(
        None if value is None
        else jnp.where(keep.reshape(keep.shape + (1,) * (jnp.ndim(value) - keep.ndim)), jnp.asarray(value), 0)
        for value in values
    )


def _reduce(per_row: Array, row_weights: Array) -> LossTerms:
    per_row = jnp.where(row_weights > 0, per_row, 0.0)
    return LossTerms(jnp.sum(per_row * row_weights), jnp.sum(row_weights))


def log_ratio_margin(
    policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array
) -> Array:
    """``h(y, y') = log pi(y)/pi_ref(y) - log pi(y')/pi_ref(y')`` in float32; every argument ``[B]``."""
    _check_pair_inputs((("policy_chosen", policy_chosen), ("policy_rejected", policy_rejected),
                        ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)))
    for name, value in (
        ("policy_chosen", policy_chosen),
        ("policy_rejected", policy_rejected),
        ("ref_chosen", ref_chosen),
        ("ref_rejected", ref_rejected),
    ):
        validation.check_finite(name, value)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return (f32(policy_chosen) - f32(ref_chosen)) - (f32(policy_rejected) - f32(ref_rejected))


def weighted_bc_loss(
    policy_log_probs: Array,
    log_weights: Array,
    candidate_mask: Array | None = None,
    prompt_weights: Array | None = None,
) -> LossTerms:
    """MOPO policy step, weighted behaviour cloning (Eq. 7): ``-E_x sum_y rho~(y|x) log pi_psi(y|x)``.

    ``rho~`` are the self-normalised closed-form weights (``exp`` of :func:`mopo_jax.closed_form_log_weights`); they are
    held constant (stop-gradient), so the minimiser over an unrestricted policy is ``pi_lambda`` itself.

    Args:
      policy_log_probs: ``[X, N]`` log-probabilities of the candidates under the trained policy (sequence log-probs
        for a language model, a log-softmax over candidates for a tabular policy).
      log_weights: ``[X, N]`` closed-form log-weights, normalised per prompt.
      candidate_mask: optional boolean ``[X, N]``; padded candidates contribute nothing, in value or gradient, even
        where their log-probability or log-weight is ``-inf`` or NaN (so are the candidates of a prompt of weight 0).
      prompt_weights: optional ``[X]`` weights of the prompts (default 1 each).

    Returns:
      :class:`LossTerms` with the sum over prompts and the summed prompt weight as denominator.
    """
    sizes = validation.check_array_shape("policy_log_probs", policy_log_probs, ("X", "N"), {})
    sizes = validation.check_array_shape("log_weights", log_weights, ("X", "N"), sizes)
    if candidate_mask is not None:
        validation.check_array_shape("candidate_mask", candidate_mask, ("X", "N"), sizes)
    if prompt_weights is not None:
        validation.check_array_shape("prompt_weights", prompt_weights, ("X",), sizes)
    mask = jnp.ones(jnp.shape(log_weights), bool) if candidate_mask is None else jnp.asarray(candidate_mask, bool)
    row = _row_weights(mask.shape[:1], jnp.any(mask, axis=-1), prompt_weights)
    keep = mask & (row > 0)[:, None]
    policy_log_probs, log_weights = _zero_dropped(keep, policy_log_probs, log_weights)
    validation.check_finite("log_weights (kept candidates)", log_weights)
    weights = jax.lax.stop_gradient(jnp.exp(jnp.asarray(log_weights, jnp.float32)))
    per_candidate = jnp.where(keep, weights * jnp.asarray(policy_log_probs, jnp.float32), 0.0)
    return _reduce(-jnp.sum(per_candidate, axis=-1), row)


def pairwise_win_rate_margins(preference_probs: Array, label_mask: Array | None = None) -> Array:
    """The win-rate margin target of a labelled pair (Eq. 1, 8): ``P_k(y > y') - 1/2``; 0 where unlabelled.

    This is ``w_k(y) - w_k(y')`` with ``mu`` uniform over the pair, and it is the right regression target whatever
    the comparison policy: fitting ``h = f(y) - f(y')`` to a target ``T(y, y')`` over pairs drawn from ``mu x mu``
    gives ``f(y) = E_{y'~mu}[T(y, y')] + c``, so ``T = (P - 1/2)/tau`` yields ``f = w/tau + c``, the closed form of
    Eq. 3. (The margin ``2P - 1`` of the pair's win rates without the self-comparison would yield ``2w/tau``: the
    closed form at temperature ``tau/2``.) docs/algorithm.md, section 4, has the derivation.

    Args:
      preference_probs: ``[B, K]`` ``P_k(y > y')`` (1.0 for a hard "chosen beats rejected" label).
      label_mask: optional boolean ``[B, K]``; defaults to ``~isnan(preference_probs)``.

    Returns:
      ``[B, K]`` margins.
    """
    sizes = validation.check_array_shape("preference_probs", preference_probs, ("B", "K"), {})
    if label_mask is not None:
        validation.check_array_shape("label_mask", label_mask, ("B", "K"), sizes)
    validation.check_unit_interval("preference_probs", preference_probs, allow_nan=True)
    if label_mask is not None and validation.is_concrete((preference_probs, label_mask)):
        validation.check_finite("preference_probs (labeled entries)", jnp.where(label_mask, preference_probs, 0.5))
    preference_probs = jnp.asarray(preference_probs, jnp.float32)
    if label_mask is None:
        label_mask = ~jnp.isnan(preference_probs)
    return jnp.where(jnp.asarray(label_mask, bool), preference_probs - 0.5, 0.0)


def pairwise_label_rates(
    label_mask: Array, valid_mask: Array | None = None, weights: Array | None = None
) -> Array:
    """``pi_k``: the (weighted) fraction of a batch's pairs that carry objective ``k``'s label.

    Counted over the valid rows with at least one label, the rows :func:`mopo_pairwise_loss` keeps. Under gradient
    accumulation compute it once on the whole batch and pass it to every micro-batch's loss.

    Args:
      label_mask: boolean ``[B, K]``.
      valid_mask: optional boolean ``[B]``.
      weights: optional ``[B]`` row weights.

    Returns:
      ``[K]`` rates in ``[0, 1]`` (0 for every objective when no row is kept).
    """
    sizes = validation.check_array_shape("label_mask", label_mask, ("B", "K"), {})
    _check_pair_inputs((("valid_mask", valid_mask), ("weights", weights)), sizes)
    labels = jnp.asarray(label_mask, bool)
    row = _row_weights(labels.shape[:1], valid_mask, weights)
    row = jnp.where(jnp.any(labels, axis=-1), row, 0.0)
    total = jnp.sum(row)
    return jnp.sum(jnp.where(labels, row[:, None], 0.0), axis=0) / jnp.where(total > 0, total, 1.0)


def mopo_pairwise_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    win_rate_margins: Array,
    multipliers: Array,
    tau: float | Array,
    valid_mask: Array | None = None,
    weights: Array | None = None,
    label_mask: Array | None = None,
    label_rates: Array | None = None,
) -> LossTerms:
    """MOPO pairwise estimator (Eq. 8) in win-rate units: ``(tau h - [m_0 + lambda . m_{1:}])^2 / 2``, i.e.
    ``tau^2/2 (h - [m_0 + lambda . m_{1:}] / tau)^2``, with missing labels left out.

    The factor ``tau^2/2`` leaves the minimiser unchanged and puts the gradient, ``tau (tau h - t) dh``, on the scale
    of DPO's ``beta (sigmoid(beta h) - P) dh``: without it the gradient norm is ``2/tau^2`` times larger (hundreds at
    ``tau = 0.1``), so global-norm clipping shrinks every MOPO step and MOPO trains at another effective step size
    than the baselines it is compared with.

    Regresses the policy's log-ratio margin ``h`` onto the margin of the closed form (Eq. 3), whose log-ratio is
    ``(w_0 + lambda . w)/tau`` up to a per-prompt constant that cancels within a pair. A pair that lacks objective
    ``k``'s label does not know ``m_k``: it is left out of that objective's term and the term is renormalised over
    the pairs that carry the label (as Eq. 1 renormalises over labelled comparisons). The population loss
    ``E[(h - sum_k c_k m_k / tau)^2]`` has the cross terms ``E[h m_k]``; each is estimated on the rows labelled for
    ``k``, which is the same as regressing on the inverse-propensity target::

        t_b = sum_k c_k r_bk m_bk / pi_k,   c = (1, lambda),  r_bk = 1 if row b carries label k,

    with ``pi_k`` the label rate of ``k`` among the kept rows (:func:`pairwise_label_rates`): the gradient is that of
    ``tau^2/2 mean_b h_b^2 - tau sum_k c_k mean_{b labelled k}(h_b m_bk)``. When every row carries every label
    ``pi = 1`` and this is the plain squared error. With ``K = 1`` (or ``lambda = 0`` and every row labelled for
    objective 0) and hard labels (``m = 1/2``) it is IPO, ``(h - 1/(2 tau))^2``, times ``tau^2/2``. Rows without any
    label carry no preference and are dropped.

    Args:
      policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``[B]`` sequence log-probabilities.
      win_rate_margins: ``[B, K]`` ``w_k(y) - w_k(y')`` (:func:`pairwise_win_rate_margins`).
      multipliers: ``[K-1]`` multipliers of the secondary objectives.
      tau: KL temperature ``> 0``.
      valid_mask: optional boolean ``[B]``; False drops the row.
      weights: optional ``[B]`` row weights.
      label_mask: optional boolean ``[B, K]``; None means every row carries every label.
      label_rates: optional ``[K]`` ``pi_k`` (default: computed on this batch; pass the whole batch's under
        gradient accumulation so that the micro-batches add up to the batch's loss).

    Returns:
      :class:`LossTerms` over the kept rows.
    """
    sizes = _check_pair_inputs((("policy_chosen", policy_chosen), ("policy_rejected", policy_rejected),
                                ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected),
                                ("valid_mask", valid_mask), ("weights", weights)))
    sizes = validation.check_array_shape("win_rate_margins", win_rate_margins, ("B", "K"), sizes)
    if validation.is_concrete(win_rate_margins):  # margins w - w' = P - 1/2 lie in [-1/2, 1/2]; raw P does not
        margins = np.asarray(win_rate_margins, np.float64)
        if (np.abs(margins[~np.isnan(margins)]) > 0.5 + 1e-6).any():
            raise ValueError(f"win_rate_margins must be win-rate margins in [-1/2, 1/2] (P - 1/2 for a pair, "
                             f"mj.pairwise_win_rate_margins), got a value of {np.nanmax(np.abs(margins)):.6g}")
    validation.check_array_shape("multipliers", multipliers, (sizes["K"] - 1,), sizes)
    if label_mask is not None:
        validation.check_array_shape("label_mask", label_mask, ("B", "K"), sizes)
    if label_rates is not None:
        validation.check_array_shape("label_rates", label_rates, ("K",), sizes)
    validation.check_positive("tau", tau)
    validation.check_nonnegative("multipliers", multipliers)
    labels = jnp.ones(jnp.shape(win_rate_margins), bool) if label_mask is None else jnp.asarray(label_mask, bool)
    keep = jnp.any(labels, axis=-1) if valid_mask is None else jnp.asarray(valid_mask, bool) & jnp.any(labels, axis=-1)
    row = _row_weights(keep.shape, keep, weights)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, win_rate_margins = _zero_dropped(
        row > 0, policy_chosen, policy_rejected, ref_chosen, ref_rejected, win_rate_margins)
    validation.check_finite("win_rate_margins (kept rows)", win_rate_margins)
    margin = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    margins = jnp.asarray(win_rate_margins, jnp.float32)
    if label_rates is None:
        label_rates = pairwise_label_rates(labels, valid_mask, weights)
    rates = jnp.asarray(label_rates, jnp.float32)
    coefficients = jnp.concatenate([jnp.ones((1,), jnp.float32), jnp.asarray(multipliers, jnp.float32)])
    scale = jnp.where(rates > 0, coefficients / jnp.where(rates > 0, rates, 1.0), 0.0)
    target = jnp.where(labels, margins, 0.0) @ scale  # t_b, in win-rate units
    per_row = 0.5 * jnp.square(tau * margin - jax.lax.stop_gradient(target))
    return _reduce(per_row, row)


def dpo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    beta: float | Array,
    preference_probs: Array | None = None,
    valid_mask: Array | None = None,
    weights: Array | None = None,
    margin_offset: Array | None = None,
) -> LossTerms:
    """DPO (Rafailov et al. 2023): ``-[P log sigmoid(z) + (1 - P) log sigmoid(-z)]`` with ``z = beta h - offset``.

    ``P = 1`` (the default) is the usual hard-label loss ``-log sigmoid(beta h)``; a soft ``P`` gives the
    cross-entropy against a preference probability. Its minimiser satisfies ``beta h = logit(P)``: the Bradley-Terry
    reading of the preference. ``margin_offset`` ``[B]`` shifts the logit; MODPO (Zhou et al. 2023) is DPO with
    ``beta / alpha_0`` and ``offset = alpha_{1:} . (r(y) - r(y')) / alpha_0`` from secondary reward models.

    Returns:
      :class:`LossTerms`.
    """
    _check_pair_inputs((("policy_chosen", policy_chosen), ("policy_rejected", policy_rejected),
                        ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected),
                        ("preference_probs", preference_probs), ("valid_mask", valid_mask), ("weights", weights),
                        ("margin_offset", margin_offset)))
    validation.check_positive("beta", beta)
    if preference_probs is not None:
        validation.check_unit_interval("preference_probs", preference_probs, allow_nan=True)
    row = _row_weights(jnp.shape(policy_chosen), valid_mask, weights)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, margin_offset = _zero_dropped(
        row > 0, policy_chosen, policy_rejected, ref_chosen, ref_rejected, margin_offset)
    logits = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if margin_offset is not None:
        logits = logits - jnp.asarray(margin_offset, jnp.float32)
    if preference_probs is None:
        per_row = -jax.nn.log_sigmoid(logits)
    else:
        p = jnp.asarray(preference_probs, jnp.float32)
        p = jnp.where(jnp.isnan(p), 0.5, p)
        per_row = -(p * jax.nn.log_sigmoid(logits) + (1.0 - p) * jax.nn.log_sigmoid(-logits))
    return _reduce(per_row, row)


def ipo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    tau: float | Array,
    preference_probs: Array | None = None,
    valid_mask: Array | None = None,
    weights: Array | None = None,
    lengths: Array | None = None,
) -> LossTerms:
    """IPO (Azar et al. 2023, Eq. 17): ``(h - 1/(2 tau))^2`` for a hard label.

    With a soft label ``P`` the loss is the expectation over which side wins,
    ``P (h - 1/(2 tau))^2 + (1 - P)(h + 1/(2 tau))^2``, minimised at ``h = (2P - 1)/(2 tau)``.

    ``lengths`` ``[B, 2]`` (the chosen and rejected responses' token counts) divides every sequence log-probability
    by its response's length first, so ``h`` is a margin of per-token means: TRL's IPO (``loss_type="ipo"``
    averages log-probabilities over the completion), whose ``beta`` is this ``tau``. Without it the log-probabilities
    are sums, as the paper's and every other loss here.

    Returns:
      :class:`LossTerms`.
    """
    sizes = _check_pair_inputs((("policy_chosen", policy_chosen), ("policy_rejected", policy_rejected),
                                ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected),
                                ("preference_probs", preference_probs), ("valid_mask", valid_mask),
                                ("weights", weights)))
    validation.check_positive("tau", tau)
    if preference_probs is not None:
        validation.check_unit_interval("preference_probs", preference_probs, allow_nan=True)
    row = _row_weights(jnp.shape(policy_chosen), valid_mask, weights)
    if lengths is not None:
        validation.check_array_shape("lengths", lengths, ("B", 2), sizes)
        if validation.is_concrete(lengths) and validation.is_concrete(row) and \
                (np.asarray(lengths)[np.asarray(row) > 0] <= 0).any():
            raise ValueError("lengths: every kept row's responses need at least one token (a length of 0 divides "
                             "by zero); drop the row with valid_mask")
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = _zero_dropped(
        row > 0, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if lengths is not None:
        count = jnp.maximum(jnp.asarray(lengths, jnp.float32), 1.0)
        policy_chosen, ref_chosen = policy_chosen / count[:, 0], ref_chosen / count[:, 0]
        policy_rejected, ref_rejected = policy_rejected / count[:, 1], ref_rejected / count[:, 1]
    margin = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    half = 0.5 / tau
    if preference_probs is None:
        per_row = jnp.square(margin - half)
    else:
        p = jnp.asarray(preference_probs, jnp.float32)
        p = jnp.where(jnp.isnan(p), 0.5, p)
        per_row = p * jnp.square(margin - half) + (1.0 - p) * jnp.square(margin + half)
    return _reduce(per_row, row)


def completion_log_probs(logits: Array, tokens: Array, completion_mask: Array) -> Array:
    """Sequence log-probabilities of the completion tokens, for users who run their own model.

    ``log pi(y | x) = sum_t m_t log softmax(logits[t-1])[tokens[t]]``: ``completion_mask[b, t]`` marks
    ``tokens[b, t]`` as a completion token, which ``logits[b, t-1]`` scores (position 0 has no predecessor and is
    never scored). The log-softmax is taken in float32 with the maximum subtracted, whatever the logits' dtype; a row
    whose mask is empty gets exactly 0 (never NaN), so masked rows can be dropped with a ``valid_mask``. The logits
    of a position that scores no token (every position of such a row) are replaced by 0 before the log-softmax, so a
    ``-inf`` or NaN there reaches neither the value nor the gradient.

    Args:
      logits: ``[B, T, V]`` next-token logits of a causal LM.
      tokens: int ``[B, T]`` prompt and completion.
      completion_mask: ``[B, T]`` (bool or 0/1).

    Returns:
      ``[B]`` float32 log-probabilities.
    """
    sizes = validation.check_array_shape("logits", logits, ("B", "T", "V"), {})
    validation.check_array_shape("tokens", tokens, ("B", "T"), sizes)
    validation.check_array_shape("completion_mask", completion_mask, ("B", "T"), sizes)
    scored = jnp.asarray(completion_mask, bool)[:, 1:]
    (scoring_logits,) = _zero_dropped(scored, jnp.asarray(logits)[:, :-1])
    log_probs = jax.nn.log_softmax(jnp.asarray(scoring_logits, jnp.float32), axis=-1)
    targets = jnp.take_along_axis(log_probs, jnp.asarray(tokens, jnp.int32)[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(scored, targets, 0.0), axis=-1)
