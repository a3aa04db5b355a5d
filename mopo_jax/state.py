"""``MOPOState`` and the ``init``/``update`` pair that runs MOPO's dual side, in the style of an optax transformation.

One ``update`` call is one MOPO iteration on a batch of prompts:

1. closed-form log-weights ``log rho~`` for the current multipliers (Eq. 3);
2. the secondary estimates ``G_k``: the plain mean under ``pi_lambda`` (``eps = 0``) or the robust bound (Eq. 5);
3. projected steps on ``lambda`` and ``chi`` (Eq. 4, 5), or the log-barrier multipliers of MOPO-LB;
4. every ``t0`` steps, the threshold ratchet (Eq. 6) and a signal that the lagged reference is due.

The caller then takes the policy step with :func:`mopo_jax.weighted_bc_loss` on the returned log-weights (or with
:func:`mopo_jax.mopo_pairwise_loss` and the state's multipliers) and, when :func:`reference_refresh_due` says so,
swaps in the lagged reference with :func:`lagged_reference_update`. The state is a small replicated pytree; everything
is jittable.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mopo_jax import objectives, validation

Array = jax.Array


class MOPOState(NamedTuple):
    """Dual state of MOPO; every field but ``step`` has shape ``[K-1]``."""

    multipliers: Array  # lambda >= 0
    chi: Array  # robust dual variables > 0 (unused when eps = 0)
    thresholds: Array  # current b (ratcheted)
    threshold_floor: Array  # lowest value the ratchet may set (the user's b, or 0)
    lagged_values: Array  # G recorded at the last refresh, used by the next ratchet
    secondary_estimates: Array  # G of the last update (for logging)
    step: Array  # int32 number of updates so far


class MOPOConfig(NamedTuple):
    """Hyper-parameters of the MOPO iteration (paper defaults where the paper gives one).

    Attributes:
      tau: KL temperature of Eq. 2 (paper: 0.08).
      multiplier_lr: step size of the projected dual step on lambda.
      eps: KL radius of the robust bound (paper: 0.15); 0 uses the plain importance-weighted mean.
      chi_lr: step size of the projected ascent on chi.
      beta: threshold ratchet factor (paper: 0.9995).
      refresh_every: t0, steps between reference/threshold refreshes (paper: 500); ``None`` never refreshes.
      ratchet_floor_at_initial: keep the user's thresholds as a floor of the ratchet. False (the paper's rule)
        lets ``b = beta G_lagged`` drift below them; True only ever tightens the constraints.
      constraint: ``"multipliers"`` (MOPO) or ``"log_barrier"`` (MOPO-LB).
      barrier_sigma: sigma of MOPO-LB.
      initial_chi: starting value of chi.
      chi_min: lower end of chi's projection.
    """

    tau: float = 0.08
    multiplier_lr: float = 0.5
    eps: float = 0.0
    chi_lr: float = 0.1
    beta: float = 0.9995
    refresh_every: int | None = 500
    ratchet_floor_at_initial: bool = False
    constraint: str = "multipliers"
    barrier_sigma: float = 1e-3
    initial_chi: float = 1.0
    chi_min: float = 1e-4


class MOPOUpdate(NamedTuple):
    log_weights: Array  # [X, N] closed-form log-weights for the policy step
    state: MOPOState


class MOPOTransformation(NamedTuple):
    init: Callable[..., MOPOState]
    update: Callable[..., MOPOUpdate]
    update_from_estimates: Callable[..., MOPOState]


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
    ``win_rates`` is ``[K, X, N]``; ``ref_log_probs`` ``[X, N]`` is ``log pi_ref`` over an enumerated candidate set,
    or ``None`` when the candidates were sampled from ``pi_ref`` (the base is then uniform over the samples). The
    returned log-weights use the multipliers *before* this step's dual update, as in Algorithm 1 of the paper.

    ``update_from_estimates(state, estimates, chi_gradient=None) -> MOPOState``: the multiplier (and chi) step and
    the ratchet bookkeeping from secondary estimates ``G [K-1]`` computed elsewhere, e.g. with
    :func:`mopo_jax.pairwise_objective_values` from a policy's margins on pairwise data.
    """
    if config.constraint not in ("multipliers", "log_barrier"):
        raise ValueError(f"MOPOConfig.constraint must be 'multipliers' or 'log_barrier', got {config.constraint!r}")
    validation.check_positive("MOPOConfig.tau", config.tau)
    validation.check_nonnegative("MOPOConfig.eps", config.eps)
    validation.check_nonnegative("MOPOConfig.multiplier_lr", config.multiplier_lr)
    validation.check_nonnegative("MOPOConfig.chi_lr", config.chi_lr)
    validation.check_unit_interval("MOPOConfig.beta", config.beta)
    if isinstance(config.refresh_every, int) and config.refresh_every < 1:
        raise ValueError(f"MOPOConfig.refresh_every must be >= 1 or None, got {config.refresh_every}")

    def init(thresholds, initial_multipliers=None) -> MOPOState:
        validation.check_unit_interval("thresholds", thresholds)
        if initial_multipliers is not None:
            validation.check_nonnegative("initial_multipliers", initial_multipliers)
        thresholds = jnp.asarray(thresholds, jnp.float32)
        multipliers = (
            jnp.zeros_like(thresholds) if initial_multipliers is None else jnp.asarray(initial_multipliers, jnp.float32)
        )
        return MOPOState(
            multipliers=multipliers,
            chi=jnp.full_like(thresholds, config.initial_chi),
            thresholds=thresholds,
            # Distinct buffers per field, so a jitted step may donate the whole state.
            threshold_floor=jnp.copy(thresholds) if config.ratchet_floor_at_initial else jnp.zeros_like(thresholds),
            lagged_values=jnp.copy(thresholds),
            secondary_estimates=jnp.zeros_like(thresholds),
            step=jnp.zeros((), jnp.int32),
        )

    def update_from_estimates(state: MOPOState, estimates, chi_gradient=None) -> MOPOState:
        """The dual half of an iteration from given secondary estimates ``G`` (e.g. from pairwise data)."""
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
            state.thresholds, state.lagged_values, config.beta, state.threshold_floor
        )
        new_state = stepped._replace(
            multipliers=multipliers,
            chi=chi,
            thresholds=jnp.where(refresh, ratcheted, state.thresholds),
            lagged_values=jnp.where(refresh, estimates, state.lagged_values),
            secondary_estimates=estimates,
        )
        return new_state

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
        chi_gradient = None
        if config.eps > 0:
            samples, log_q = objectives.importance_weighted_secondaries(
                log_weights, win_rates, base, prompt_weights, candidate_mask
            )
            bound = objectives.robust_lower_bound(samples, log_q, state.chi, config.eps)
            estimates, chi_gradient = bound.value, bound.chi_gradient
        else:
            estimates = objectives.secondary_values(log_weights, win_rates, prompt_weights, candidate_mask)

        return MOPOUpdate(log_weights=log_weights, state=update_from_estimates(state, estimates, chi_gradient))

    return MOPOTransformation(init=init, update=update, update_from_estimates=update_from_estimates)
