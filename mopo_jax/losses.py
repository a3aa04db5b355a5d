"""Policy losses on (sequence or tabular) log-probabilities: MOPO weighted BC, MOPO pairwise, DPO, IPO.

Every loss returns a :class:`LossTerms` ``(total, denominator)`` rather than a mean, so that gradient accumulation over
micro-batches (and over hosts) can add totals and denominators and divide once: a true mean, whatever the number of
valid rows in each micro-batch.

Conventions: ``h = [log pi(y) - log pi_ref(y)] - [log pi(y') - log pi_ref(y')]`` is the policy's log-ratio margin of a
pair ``(y, y')``; ``y`` is the "chosen" side. Rows are dropped with ``valid_mask`` (missing labels, padded rows, rows
with an empty completion) and a dropped row contributes exactly zero, never NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

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


def _row_weights(shape, valid_mask, weights):
    row = jnp.ones(shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if valid_mask is not None:
        row = jnp.where(jnp.asarray(valid_mask, bool), row, 0.0)
    return row


def _reduce(per_row: Array, row_weights: Array) -> LossTerms:
    per_row = jnp.where(row_weights > 0, per_row, 0.0)
    return LossTerms(jnp.sum(per_row * row_weights), jnp.sum(row_weights))


def log_ratio_margin(
    policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array
) -> Array:
    """``h(y, y') = log pi(y)/pi_ref(y) - log pi(y')/pi_ref(y')`` in float32."""
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
      candidate_mask: optional boolean ``[X, N]``; padded candidates contribute nothing.
      prompt_weights: optional ``[X]`` weights of the prompts (default 1 each).

    Returns:
      :class:`LossTerms` with the sum over prompts and the summed prompt weight as denominator.
    """
    validation.check_finite("log_weights", log_weights)
    weights = jax.lax.stop_gradient(jnp.exp(jnp.asarray(log_weights, jnp.float32)))
    mask = jnp.ones(weights.shape, bool) if candidate_mask is None else jnp.asarray(candidate_mask, bool)
    per_candidate = jnp.where(mask, weights * jnp.asarray(policy_log_probs, jnp.float32), 0.0)
    per_prompt = -jnp.sum(per_candidate, axis=-1)
    return _reduce(per_prompt, _row_weights(per_prompt.shape, jnp.any(mask, axis=-1), prompt_weights))


def pairwise_win_rate_margins(
    preference_probs: Array, label_mask: Array | None = None, include_self: bool = True
) -> Array:
    """Win-rate differences ``w_k(y) - w_k(y')`` of a single labeled pair, with ``mu`` uniform over the pair (Eq. 1).

    With self-comparison, ``w(y) = (1/2 + P)/2`` and ``w(y') = (1/2 + 1 - P)/2``, so the difference is ``P - 1/2``;
    without it, ``w(y) = P`` and ``w(y') = 1 - P``, so it is ``2P - 1``. Unlabeled objectives get margin 0.

    Args:
      preference_probs: ``[B, K]`` ``P_k(y > y')`` (1.0 for a hard "chosen beats rejected" label).
      label_mask: optional boolean ``[B, K]``; defaults to ``~isnan(preference_probs)``.
      include_self: whether ``mu`` puts mass on the response itself.

    Returns:
      ``[B, K]`` margins.
    """
    validation.check_unit_interval("preference_probs", preference_probs, allow_nan=True)
    if label_mask is not None and validation.is_concrete((preference_probs, label_mask)):
        validation.check_finite("preference_probs (labeled entries)", jnp.where(label_mask, preference_probs, 0.5))
    preference_probs = jnp.asarray(preference_probs, jnp.float32)
    if label_mask is None:
        label_mask = ~jnp.isnan(preference_probs)
    margin = preference_probs - 0.5 if include_self else 2.0 * preference_probs - 1.0
    return jnp.where(jnp.asarray(label_mask, bool), margin, 0.0)


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
) -> LossTerms:
    """MOPO pairwise estimator: ``(h - [(w_0(y)-w_0(y')) + lambda . (w(y)-w(y'))] / tau)^2`` (Eq. 8).

    Regresses the policy's log-ratio margin onto the margin of the closed form (Eq. 3), whose log-ratio is
    ``(w_0 + lambda . w)/tau`` up to a per-prompt constant that cancels within a pair. With ``K = 1`` and margins from
    :func:`pairwise_win_rate_margins` (``include_self=True``) on hard labels the target is ``1/(2 tau)``: exactly IPO.

    Args:
      policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``[B]`` sequence log-probabilities.
      win_rate_margins: ``[B, K]`` ``w_k(y) - w_k(y')`` (0 where objective k is unlabeled).
      multipliers: ``[K-1]`` multipliers of the secondary objectives.
      tau: KL temperature ``> 0``.
      valid_mask: optional boolean ``[B]``; False drops the row.
      weights: optional ``[B]`` row weights.

    Returns:
      :class:`LossTerms`.
    """
    validation.check_positive("tau", tau)
    validation.check_nonnegative("multipliers", multipliers)
    validation.check_finite("win_rate_margins", win_rate_margins)
    margin = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    coefficients = jnp.concatenate([jnp.ones((1,), jnp.float32), jnp.asarray(multipliers, jnp.float32)])
    target = jnp.asarray(win_rate_margins, jnp.float32) @ coefficients / tau
    per_row = jnp.square(margin - jax.lax.stop_gradient(target))
    return _reduce(per_row, _row_weights(margin.shape, valid_mask, weights))


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
    validation.check_positive("beta", beta)
    if preference_probs is not None:
        validation.check_unit_interval("preference_probs", preference_probs, allow_nan=True)
    logits = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if margin_offset is not None:
        logits = logits - jnp.asarray(margin_offset, jnp.float32)
    if preference_probs is None:
        per_row = -jax.nn.log_sigmoid(logits)
    else:
        p = jnp.asarray(preference_probs, jnp.float32)
        p = jnp.where(jnp.isnan(p), 0.5, p)
        per_row = -(p * jax.nn.log_sigmoid(logits) + (1.0 - p) * jax.nn.log_sigmoid(-logits))
    return _reduce(per_row, _row_weights(logits.shape, valid_mask, weights))


def ipo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    tau: float | Array,
    preference_probs: Array | None = None,
    valid_mask: Array | None = None,
    weights: Array | None = None,
) -> LossTerms:
    """IPO (Azar et al. 2023): ``(h - 1/(2 tau))^2`` for a hard label.

    With a soft label ``P`` the loss is the expectation over which side wins,
    ``P (h - 1/(2 tau))^2 + (1 - P)(h + 1/(2 tau))^2``, minimised at ``h = (2P - 1)/(2 tau)``.

    Returns:
      :class:`LossTerms`.
    """
    validation.check_positive("tau", tau)
    if preference_probs is not None:
        validation.check_unit_interval("preference_probs", preference_probs, allow_nan=True)
    margin = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    half = 0.5 / tau
    if preference_probs is None:
        per_row = jnp.square(margin - half)
    else:
        p = jnp.asarray(preference_probs, jnp.float32)
        p = jnp.where(jnp.isnan(p), 0.5, p)
        per_row = p * jnp.square(margin - half) + (1.0 - p) * jnp.square(margin + half)
    return _reduce(per_row, _row_weights(margin.shape, valid_mask, weights))
