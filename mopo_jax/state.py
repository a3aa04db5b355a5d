"""``MOPOState`` and the ``init``/``update`` pair that runs MOPO's dual side, in the style of an optax transformation.

One ``update`` call is one MOPO iteration on a batch of prompts:

1. closed-form log-weights ``log rho~`` for the current multipliers (Eq. 3);
2. the secondary estimates ``G_k``: the plain mean under ``pi_lambda`` (``eps = 0``) or the robust bound (Eq. 5),
   pooled over the last ``estimate_window`` steps;
3. projected steps on ``lambda`` and ``chi`` (Eq. 4, 5), or the log-barrier multipliers of MOPO-LB;
4. every ``t0`` steps, the threshold ratchet (Eq. 6) and a signal that the lagged reference is due.

The caller then takes the policy step with :func:`mopo_jax.weighted_bc_loss` on the returned log-weights (or with
:func:`mopo_jax.mopo_pairwise_loss` and the state's multipliers) and, when :func:`reference_refresh_due` says so,
swaps in the lagged reference with :func:`lagged_reference_update`. The state is a small replicated pytree; everything
is jittable. The training objectives of :mod:`mopo_jax.policy_objectives` wrap exactly this.

Update order (docs/algorithm.md, section 5): the policy step of iteration ``t`` uses ``lambda_t``; the multiplier step
uses ``G`` measured at ``lambda_t`` (the closed form) or at the policy before its step (pairwise data), and the robust
bound and its ``chi`` step are both evaluated at ``chi_t``: a simultaneous (Jacobi) update of ``lambda`` and ``chi``.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mopo_jax import objectives, validation

Array = jax.Array


class MOPOState(NamedTuple):
    """Dual state of MOPO: ``[K-1]`` vectors, the ``[W, K-1]`` window of recent estimates, and a step count."""

    multipliers: Array  # [K-1] lambda >= 0
    chi: Array  # [K-1] robust dual variables > 0 (unused when eps = 0)
    thresholds: Array  # [K-1] current b (ratcheted)
    threshold_floor: Array  # [K-1] lowest value the ratchet may set (the user's b, or 0)
    lagged_values: Array  # [K-1] G recorded at the last refresh, used by the next ratchet
    secondary_estimates: Array  # [K-1] G the last multiplier step used (pooled over the window)
    estimate_totals: Array  # [W, K-1] estimate x weight of each of the last W steps (a ring buffer)
    estimate_counts: Array  # [W, K-1] the weight (rows, prompts) behind each of those estimates
    step: Array  # int32 number of updates so far


def _is_number(value, integral: bool = False) -> bool:
    """A real number (not a bool, not a string), or an array/tracer: sweeps ``vmap`` over config values."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        return True
    return isinstance(value, numbers.Integral if integral else numbers.Real)


@dataclasses.dataclass(frozen=True)
class MOPOConfig:
    """Hyper-parameters of the MOPO iteration. ``tau``, ``eps``, ``ratchet_beta`` and ``refresh_every`` default to the
    paper's values; the rest are this library's choices.

    Attributes:
      tau: KL temperature of Eq. 2 (paper: 0.08).
      multiplier_lr: step size of the projected dual step on lambda.
      eps: KL radius of the robust bound of Eq. 5 (paper: 0.15); 0 uses the plain importance-weighted mean.
      chi_lr: step size of the projected ascent on chi.
      ratchet_beta: threshold ratchet factor of Eq. 6, ``b <- ratchet_beta * G_lagged`` (paper: 0.9995). Not DPO's
        KL strength (that is :class:`mopo_jax.DPO`'s ``beta``).
      refresh_every: t0, steps between reference/threshold refreshes (paper: 500); ``None`` never refreshes.
      ratchet_floor_at_initial: keep the user's thresholds as a floor of the ratchet. False (the paper's rule)
        lets ``b = ratchet_beta G_lagged`` drift below them; True only ever tightens the constraints.
      constraint: ``"multipliers"`` (MOPO) or ``"log_barrier"`` (MOPO-LB).
      barrier_sigma: sigma of MOPO-LB.
      initial_chi: starting value of chi.
      chi_min: lower end of chi's projection.
      estimate_window: the multiplier step uses the weighted mean of the estimates of the last ``W`` steps (1: this
        step's alone, the paper's per-batch estimate). A window cuts the variance of a small batch's estimate about
        ``W``-fold; it measures policies up to ``W - 1`` steps old (on average ``(W - 1)/2``), a lag the dual step
        sees as delay (docs/algorithm.md, section 5).
    """

    tau: float = 0.08
    multiplier_lr: float = 0.5
    eps: float = 0.15
    chi_lr: float = 0.1
    ratchet_beta: float = 0.9995
    refresh_every: int | None = 500
    ratchet_floor_at_initial: bool = False
    constraint: str = "multipliers"
    barrier_sigma: float = 1e-3
    initial_chi: float = 1.0
    chi_min: float = 1e-4
    estimate_window: int = 1

    def __post_init__(self):
        for name in ("tau", "multiplier_lr", "eps", "chi_lr", "ratchet_beta", "barrier_sigma", "initial_chi",
                     "chi_min"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"MOPOConfig.{name} must be a number, got {getattr(self, name)!r}")
        if self.refresh_every is not None and not _is_number(self.refresh_every, integral=True):
            raise ValueError(f"MOPOConfig.refresh_every must be an integer >= 1 or None, got {self.refresh_every!r}")
        if not isinstance(self.ratchet_floor_at_initial, bool):
            raise ValueError(f"MOPOConfig.ratchet_floor_at_initial must be a bool, got {self.ratchet_floor_at_initial!r}")
        if self.constraint not in ("multipliers", "log_barrier"):
            raise ValueError(f"MOPOConfig.constraint must be 'multipliers' or 'log_barrier', got {self.constraint!r}")
        if isinstance(self.estimate_window, bool) or not isinstance(self.estimate_window, numbers.Integral) or (
                self.estimate_window < 1):
            raise ValueError(f"MOPOConfig.estimate_window must be an integer >= 1, got {self.estimate_window!r}")
        validation.check_positive("MOPOConfig.tau", self.tau)
        validation.check_nonnegative("MOPOConfig.eps", self.eps)
        validation.check_nonnegative("MOPOConfig.multiplier_lr", self.multiplier_lr)
        validation.check_nonnegative("MOPOConfig.chi_lr", self.chi_lr)
        validation.check_unit_interval("MOPOConfig.ratchet_beta", self.ratchet_beta)
        validation.check_positive("MOPOConfig.barrier_sigma", self.barrier_sigma)
        validation.check_positive("MOPOConfig.initial_chi", self.initial_chi)
        validation.check_positive("MOPOConfig.chi_min", self.chi_min)
        if isinstance(self.refresh_every, numbers.Integral) and self.refresh_every < 1:
            raise ValueError(f"MOPOConfig.refresh_every must be >= 1 or None, got {self.refresh_every}")


class SecondaryEstimate(NamedTuple):
    """What the multiplier step consumes: ``G_k`` (plain or robust), the robust bound's ``chi`` derivative, and the
    weight of the data behind each value (pooled over the estimate window); beside them the plain self-normalised
    estimate of the same data, which the robust bound lies below (``values`` itself when ``eps = 0``)."""

    values: Array  # [K-1]
    chi_gradient: Array | None  # [K-1], None without the robust bound
    counts: Array  # [K-1]
    plain_values: Array  # [K-1]


class MOPOUpdate(NamedTuple):
    log_weights: Array  # [X, N] closed-form log-weights for the policy step
    state: MOPOState


class MOPOTransformation(NamedTuple):
    init: Callable[..., MOPOState]
    update: Callable[..., MOPOUpdate]
    update_from_estimates: Callable[..., MOPOState]
    estimate_from_candidates: Callable[..., SecondaryEstimate]
    estimate_from_pairs: Callable[..., SecondaryEstimate]


def reference_refresh_due(state: MOPOState, refresh_every: int | None) -> Array:
    """True when the step just taken ends a period of ``t0`` steps (the lagged reference and thresholds refresh)."""
    if refresh_every is None:
        return jnp.zeros((), bool)
    return (state.step > 0) & (state.step % refresh_every == 0)


def lagged_reference_update(refresh: Array, reference, snapshot, current):
    """Lagged reference of the MOPO schedule: at a refresh, ``pi_ref <- snapshot`` and ``snapshot <- current``.

    ``snapshot`` is the policy recorded at the previous refresh, so the reference always lags the policy by ``t0``
    steps. Works on any pytree of parameters (a logits table, a model's params).

    Returns:
      ``(new_reference, new_snapshot)``.
    """
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(refresh, a, b), new, old)  # noqa: E731
    return pick(snapshot, reference), pick(current, snapshot)


def mopo(config: MOPOConfig = MOPOConfig()) -> MOPOTransformation:
    """Builds MOPO's ``init``/``update`` pair.

    ``init(thresholds, initial_multipliers=None) -> MOPOState``.

    ``update(state, win_rates, ref_log_probs=None, candidate_mask=None, prompt_weights=None) -> MOPOUpdate``:
    ``win_rates`` is ``[K, X, N]`` (:func:`mopo_jax.win_rates` for an enumerated pool,
    :func:`mopo_jax.sampled_win_rates` for samples); ``ref_log_probs`` ``[X, N]`` is ``log pi_ref`` over an enumerated
    candidate set, or ``None`` when the candidates were sampled from ``pi_ref`` (the base is then uniform over the
    samples). The returned log-weights use the multipliers *before* this step's dual update (the policy step of
    iteration ``t`` uses ``lambda_t``).

    ``estimate_from_candidates(state, log_weights, win_rates, base_log_probs, candidate_mask=None,
    prompt_weights=None) -> SecondaryEstimate`` and ``estimate_from_pairs(state, policy_log_ratios, preference_probs,
    label_mask=None, valid_mask=None, weights=None) -> SecondaryEstimate``: ``G`` of a closed form over a candidate
    pool, or of a policy from pairwise data (:func:`mopo_jax.pairwise_value_samples`); the robust bound of Eq. 5
    (at the state's ``chi``) when ``eps > 0``, the plain estimate otherwise.

    ``update_from_estimates(state, estimates, chi_gradient=None, counts=None) -> MOPOState``: the multiplier (and
    chi) step and the ratchet bookkeeping from secondary estimates ``G [K-1]`` (with the weight ``counts [K-1]`` of
    the data behind them, default 1, for the estimate window). A secondary objective with no data in the window
    keeps its multiplier.

    The first refresh ratchets from the thresholds the user gave (``lagged_values`` starts at ``b``); later ones
    from the estimate recorded at the previous refresh.
    """
    if not isinstance(config, MOPOConfig):
        raise ValueError(f"mopo() takes a MOPOConfig, got {type(config).__name__}")

    def init(thresholds, initial_multipliers=None) -> MOPOState:
        validation.check_array_shape("thresholds", thresholds, ("K-1",), {})
        validation.check_unit_interval("thresholds", thresholds)
        if initial_multipliers is not None:
            validation.check_array_shape("initial_multipliers", initial_multipliers, (jnp.shape(thresholds)[0],), {})
            validation.check_nonnegative("initial_multipliers", initial_multipliers)
        thresholds = jnp.asarray(thresholds, jnp.float32)
        multipliers = (
            jnp.zeros_like(thresholds) if initial_multipliers is None else jnp.asarray(initial_multipliers, jnp.float32)
        )
        window = (config.estimate_window,) + thresholds.shape
        return MOPOState(
            multipliers=multipliers,
            chi=jnp.full_like(thresholds, config.initial_chi),
            thresholds=thresholds,
            # Distinct buffers per field, so a jitted step may donate the whole state.
            threshold_floor=jnp.copy(thresholds) if config.ratchet_floor_at_initial else jnp.zeros_like(thresholds),
            lagged_values=jnp.copy(thresholds),
            secondary_estimates=jnp.zeros_like(thresholds),
            estimate_totals=jnp.zeros(window, jnp.float32),
            estimate_counts=jnp.zeros(window, jnp.float32),
            step=jnp.zeros((), jnp.int32),
        )

    def update_from_estimates(state: MOPOState, estimates, chi_gradient=None, counts=None) -> MOPOState:
        """The dual half of an iteration from given secondary estimates ``G`` (e.g. from pairwise data)."""
        num_secondary = state.thresholds.shape[0]
        validation.check_array_shape("estimates", estimates, (num_secondary,), {})
        if chi_gradient is not None:
            validation.check_array_shape("chi_gradient", chi_gradient, (num_secondary,), {})
        if counts is not None:
            validation.check_array_shape("counts", counts, (num_secondary,), {})
        estimates = jnp.asarray(estimates, jnp.float32)
        counts = jnp.ones_like(estimates) if counts is None else jnp.asarray(counts, jnp.float32)
        slot = state.step % config.estimate_window
        totals = state.estimate_totals.at[slot].set(jnp.where(counts > 0, estimates * counts, 0.0))
        weights = state.estimate_counts.at[slot].set(counts)
        pooled_count = jnp.sum(weights, axis=0)
        pooled = jnp.sum(totals, axis=0) / jnp.where(pooled_count > 0, pooled_count, 1.0)
        # No data for an objective anywhere in the window: G = b, so its multiplier does not move.
        estimates = jnp.where(pooled_count > 0, pooled, state.thresholds)
        if config.constraint == "multipliers":
            multipliers, chi = objectives.update_multipliers(
                state.multipliers,
                state.chi,
                estimates,
                state.thresholds,
                config.multiplier_lr,
                chi_gradient,
                config.chi_lr,
                config.chi_min,
            )
        else:
            multipliers = objectives.update_barrier_multipliers(
                state.multipliers, estimates, state.thresholds, config.barrier_sigma, config.multiplier_lr
            )
            chi = state.chi
            if chi_gradient is not None:
                chi = jnp.maximum(config.chi_min, chi + config.chi_lr * chi_gradient)

        stepped = state._replace(step=state.step + 1)
        refresh = reference_refresh_due(stepped, config.refresh_every)
        ratcheted = objectives.ratchet_thresholds(
            state.thresholds, state.lagged_values, config.ratchet_beta, state.threshold_floor
        )
        return stepped._replace(
            multipliers=multipliers,
            chi=chi,
            thresholds=jnp.where(refresh, ratcheted, state.thresholds),
            lagged_values=jnp.where(refresh, estimates, state.lagged_values),
            secondary_estimates=estimates,
            estimate_totals=totals,
            estimate_counts=weights,
        )

    def _robust_or_plain(state, samples, log_base, plain_values, counts) -> SecondaryEstimate:
        if config.eps > 0:
            bound = objectives.robust_lower_bound(samples, log_base, state.chi, config.eps)
            return SecondaryEstimate(bound.value, bound.chi_gradient, counts, plain_values)
        return SecondaryEstimate(plain_values, None, counts, plain_values)

    def estimate_from_candidates(state, log_weights, win_rates, base_log_probs, candidate_mask=None,
                                 prompt_weights=None) -> SecondaryEstimate:
        win_rates = jnp.asarray(win_rates, jnp.float32)
        plain = objectives.secondary_values(log_weights, win_rates, prompt_weights, candidate_mask)
        samples, log_q = (None, None)
        if config.eps > 0:
            samples, log_q = objectives.importance_weighted_secondaries(
                log_weights, win_rates, base_log_probs, prompt_weights, candidate_mask
            )
        mask = jnp.ones(jnp.shape(log_weights), bool) if candidate_mask is None else jnp.asarray(candidate_mask, bool)
        prompts = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32)
        return _robust_or_plain(state, samples, log_q, plain, jnp.full(state.thresholds.shape, prompts))

    def estimate_from_pairs(state, policy_log_ratios, preference_probs, label_mask=None, valid_mask=None,
                            weights=None) -> SecondaryEstimate:
        pairs = objectives.pairwise_value_samples(policy_log_ratios, preference_probs, label_mask, valid_mask,
                                                  weights)
        return _robust_or_plain(state, pairs.samples[1:], pairs.log_base[1:], pairs.mean()[1:], pairs.counts[1:])

    def update(state: MOPOState, win_rates, ref_log_probs=None, candidate_mask=None, prompt_weights=None):
        validation.check_unit_interval("win_rates", win_rates)
        win_rates = jnp.asarray(win_rates, jnp.float32)
        if ref_log_probs is None:
            base = objectives.masked_log_normalize(jnp.zeros(win_rates.shape[1:], jnp.float32), candidate_mask)
        else:
            base = jnp.asarray(ref_log_probs, jnp.float32)
        log_weights = objectives.closed_form_log_weights(
            win_rates, state.multipliers, config.tau, base, candidate_mask
        )
        estimate = estimate_from_candidates(state, log_weights, win_rates, base, candidate_mask, prompt_weights)
        new_state = update_from_estimates(state, estimate.values, estimate.chi_gradient, estimate.counts)
        return MOPOUpdate(log_weights=log_weights, state=new_state)

    return MOPOTransformation(init=init, update=update, update_from_estimates=update_from_estimates,
                              estimate_from_candidates=estimate_from_candidates,
                              estimate_from_pairs=estimate_from_pairs)
