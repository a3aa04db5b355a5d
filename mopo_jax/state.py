"""``MOPOState`` and the ``init``/``update`` pair that runs MOPO's dual side, in the style of an optax transformation.

One ``update`` call is one MOPO iteration on a batch of prompts:

1. closed-form log-weights ``log rho~`` for the current multipliers (Eq. 3);
2. the secondary estimates ``G_k``: the plain mean under ``pi_lambda`` (``eps = 0``) or the robust bound (Eq. 5) at
   its optimal ``chi``, pooled over the last ``estimate_window`` steps;
3. the projected step on ``lambda`` (Eq. 4), or the log-barrier multipliers of MOPO-LB;
4. every ``t0`` steps, the threshold ratchet (Eq. 6) and a signal that the lagged reference is due.

The caller then takes the policy step with :func:`mopo_jax.weighted_bc_loss` on the returned log-weights (or with
:func:`mopo_jax.mopo_pairwise_loss` and the state's multipliers) and, when :func:`reference_refresh_due` says so,
swaps in the lagged reference with :func:`lagged_reference_update`. The state is a small replicated pytree; everything
is jittable. The training objectives of :mod:`mopo_jax.policy_objectives` wrap exactly this.

Update order (docs/algorithm.md, section 5): the policy step of iteration ``t`` uses ``lambda_t``; the multiplier step
uses ``G`` measured at ``lambda_t`` (the closed form), at the policy before its step (pairwise data), or on the
policy's own samples (:meth:`SecondaryEstimate.from_values`).
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
    chi: Array  # [K-1] the robust bound's optimal chi at the last step with data (unused when eps = 0)
    thresholds: Array  # [K-1] current b (ratcheted)
    threshold_floor: Array  # [K-1] lowest value the ratchet may set (the user's b, or 0)
    lagged_values: Array  # [K-1] plain G recorded at the last refresh, used by the next ratchet
    secondary_estimates: Array  # [K-1] G the last multiplier step with data used (pooled); NaN before any data
    window_values: Array  # [W, K-1] G of each of the last W steps (a ring buffer)
    window_plain_values: Array  # [W, K-1] the plain estimate of each of those steps
    window_log_weights: Array  # [W, K-1] log of the data weight behind each (NO_DATA where there was none)
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
    """Hyper-parameters of the MOPO iteration. The defaults solve the problem the user states (Eq. 2 at the given
    thresholds against a fixed reference, with the plain estimate): the robust bound (``eps``, paper 0.15) and the
    lagged reference with its threshold ratchet (``refresh_every``, paper 500) are opt-in, because each changes the
    constraint the multipliers enforce (docs/algorithm.md, section 5).

    Attributes:
      tau: KL temperature of Eq. 2 (paper: 0.08).
      multiplier_lr: step size of the projected dual step on lambda.
      eps: KL radius of the robust bound of Eq. 5 (paper: 0.15); 0 (default) uses the plain importance-weighted
        mean. The bound is taken at its optimal ``chi`` for each batch (:func:`mopo_jax.optimal_robust_chi`).
      ratchet_beta: threshold ratchet factor of Eq. 6, ``b <- ratchet_beta * G_lagged`` (paper: 0.9995). Not DPO's
        KL strength (that is :class:`mopo_jax.DPO`'s ``beta``).
      refresh_every: t0, steps between reference/threshold refreshes (paper: 500); ``None`` (default) never
        refreshes.
      ratchet_floor_at_initial: keep the user's thresholds as a floor of the ratchet. False (the paper's rule)
        lets ``b = ratchet_beta G_lagged`` drift below them; True only ever tightens the constraints.
      constraint: ``"multipliers"`` (MOPO) or ``"log_barrier"`` (MOPO-LB).
      barrier_sigma: sigma of MOPO-LB.
      chi_min: lower end of the search for the robust bound's optimal chi.
      estimate_window: the multiplier step uses the estimate pooled over the last ``W`` steps (1: this step's
        alone, the paper's per-batch estimate): each step's value weighted by the data behind it, which for a
        self-normalised estimate is its denominator, so the pooled value is the ratio of the pooled numerator and
        denominator, not a mean of small-batch ratios. A window cuts the variance of a small batch's estimate about
        ``W``-fold; it measures policies up to ``W - 1`` steps old (on average ``(W - 1)/2``), a lag the dual step
        sees as delay (docs/algorithm.md, section 5).
    """

    tau: float = 0.08
    multiplier_lr: float = 0.5
    eps: float = 0.0
    ratchet_beta: float = 0.9995
    refresh_every: int | None = None
    ratchet_floor_at_initial: bool = False
    constraint: str = "multipliers"
    barrier_sigma: float = 1e-3
    chi_min: float = 1e-4
    estimate_window: int = 1

    def __post_init__(self):
        for name in ("tau", "multiplier_lr", "eps", "ratchet_beta", "barrier_sigma", "chi_min"):
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
        validation.check_unit_interval("MOPOConfig.ratchet_beta", self.ratchet_beta)
        validation.check_positive("MOPOConfig.barrier_sigma", self.barrier_sigma)
        validation.check_positive("MOPOConfig.chi_min", self.chi_min)
        if isinstance(self.refresh_every, numbers.Integral) and self.refresh_every < 1:
            raise ValueError(f"MOPOConfig.refresh_every must be >= 1 or None, got {self.refresh_every}")


#: ``log`` weight of a step without data for an objective (finite, so that ``0 * NO_DATA`` stays 0).
NO_DATA = objectives.MASKED_LOG_WEIGHT


class SecondaryEstimate(NamedTuple):
    """What the multiplier step consumes, per secondary objective ``[K-1]``:

    * ``values``: ``G_k``, the plain estimate or (``eps > 0``) the robust bound of Eq. 5 at its optimal ``chi``;
    * ``plain_values``: the plain estimate of the same data (``values`` itself when ``eps = 0``); the ratchet records
      it;
    * ``log_weights``: ``log`` of the weight of the data behind the value, which pools steps in the estimate window:
      the number (or weight) of prompts for a plain mean, the self-normalisation denominator for an
      importance-sampling ratio; :data:`NO_DATA` for an objective without data (its multiplier and ``chi`` keep
      their values);
    * ``chi``: the optimal ``chi`` of the robust bound, or None without it.

    :meth:`from_values` builds one from values measured elsewhere (for instance from the policy's own samples).
    """

    values: Array
    plain_values: Array
    log_weights: Array
    chi: Array | None = None

    @classmethod
    def from_values(cls, values, counts=None) -> "SecondaryEstimate":
        """A plain estimate ``values [K-1]`` from ``counts [K-1]`` prompts (default 1; 0 means no data)."""
        values = jnp.asarray(values, jnp.float32)
        counts = jnp.ones_like(values) if counts is None else jnp.asarray(counts, jnp.float32)
        return cls(values, values, log_data_weights(counts))

    @property
    def has_data(self) -> Array:
        return self.log_weights > NO_DATA / 2


def log_data_weights(weights) -> Array:
    """``log weights``, :data:`NO_DATA` where a weight is 0 (no data)."""
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), NO_DATA)


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
    label_mask=None, valid_mask=None, weights=None) -> SecondaryEstimate``: ``G`` of a distribution over a
    candidate pool given by its log-weights (the trained policy's, :func:`mopo_jax.policy_pool_log_weights`, or a
    closed form's), or of a policy from pairwise data (:func:`mopo_jax.pairwise_value_samples`); the robust bound
    of Eq. 5 at its optimal ``chi`` when ``eps > 0``, the plain estimate otherwise. Pairs the policy was trained
    on over-read its value once it has fitted them (docs/algorithm.md, section 4): take the estimate on pairs it has
    not trained on, or measure the policy's own samples (:meth:`SecondaryEstimate.from_values`).

    ``update_from_estimates(state, estimate: SecondaryEstimate) -> MOPOState``: the multiplier step (Eq. 4, or
    MOPO-LB's) from the estimate pooled over the window, and the ratchet bookkeeping. A secondary objective with no
    data in the window keeps its multiplier, and one with no data this step keeps its ``chi``.

    The first refresh ratchets from the thresholds the user gave (``lagged_values`` starts at ``b``); later ones
    from the plain estimate recorded at the previous refresh.
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
            chi=jnp.ones_like(thresholds),
            thresholds=thresholds,
            # Distinct buffers per field, so a jitted step may donate the whole state.
            threshold_floor=jnp.copy(thresholds) if config.ratchet_floor_at_initial else jnp.zeros_like(thresholds),
            lagged_values=jnp.copy(thresholds),
            secondary_estimates=jnp.full_like(thresholds, jnp.nan),  # no estimate before the first data
            window_values=jnp.zeros(window, jnp.float32),
            window_plain_values=jnp.zeros(window, jnp.float32),
            window_log_weights=jnp.full(window, NO_DATA, jnp.float32),
            step=jnp.zeros((), jnp.int32),
        )

    def update_from_estimates(state: MOPOState, estimate: SecondaryEstimate) -> MOPOState:
        """The dual half of an iteration from a :class:`SecondaryEstimate` (e.g. from pairwise data)."""
        if not isinstance(estimate, SecondaryEstimate):
            raise ValueError(f"update_from_estimates takes a SecondaryEstimate (SecondaryEstimate.from_values(G, "
                             f"counts) for values measured elsewhere), got {type(estimate).__name__}")
        num_secondary = state.thresholds.shape[0]
        for name in ("values", "plain_values", "log_weights"):
            validation.check_array_shape(f"estimate.{name}", getattr(estimate, name), (num_secondary,), {})
        slot = state.step % config.estimate_window
        has_data = estimate.has_data
        values = state.window_values.at[slot].set(jnp.where(has_data, estimate.values, 0.0))
        plain = state.window_plain_values.at[slot].set(jnp.where(has_data, estimate.plain_values, 0.0))
        log_weights = state.window_log_weights.at[slot].set(jnp.where(has_data, estimate.log_weights, NO_DATA))
        pooled_has_data = jnp.any(log_weights > NO_DATA / 2, axis=0)
        # Pooled over the window with each step's data weight: the ratio of pooled numerators and denominators.
        share = jax.nn.softmax(jnp.where(log_weights > NO_DATA / 2, log_weights, -jnp.inf), axis=0)
        share = jnp.where(pooled_has_data[None], share, 0.0)
        # Without data the multiplier does not move (below) and the state keeps the last estimate it had.
        estimates = jnp.where(pooled_has_data, jnp.sum(share * values, axis=0), state.secondary_estimates)
        plain_estimates = jnp.where(pooled_has_data, jnp.sum(share * plain, axis=0), state.lagged_values)
        stepped_on = jnp.where(pooled_has_data, estimates, state.thresholds)  # finite; discarded below without data
        if config.constraint == "multipliers":
            multipliers = objectives.update_multipliers(
                state.multipliers, stepped_on, state.thresholds, config.multiplier_lr)
        else:
            multipliers = objectives.update_barrier_multipliers(
                state.multipliers, stepped_on, state.thresholds, config.barrier_sigma, config.multiplier_lr)
        # No data in the window: the multiplier keeps its value (MOPO-LB's barrier term would move it otherwise).
        multipliers = jnp.where(pooled_has_data, multipliers, state.multipliers)
        chi = state.chi if estimate.chi is None else jnp.where(has_data, estimate.chi, state.chi)

        stepped = state._replace(step=state.step + 1)
        refresh = reference_refresh_due(stepped, config.refresh_every)
        ratcheted = objectives.ratchet_thresholds(
            state.thresholds, state.lagged_values, config.ratchet_beta, state.threshold_floor
        )
        return stepped._replace(
            multipliers=multipliers,
            chi=chi,
            thresholds=jnp.where(refresh, ratcheted, state.thresholds),
            lagged_values=jnp.where(refresh, plain_estimates, state.lagged_values),
            secondary_estimates=estimates,
            window_values=values,
            window_plain_values=plain,
            window_log_weights=log_weights,
        )

    def _robust_or_plain(samples, log_base, plain_values, log_weights) -> SecondaryEstimate:
        if config.eps > 0:
            chi = objectives.optimal_robust_chi(samples, log_base, config.eps, config.chi_min)
            bound = objectives.robust_lower_bound(samples, log_base, chi, config.eps)
            return SecondaryEstimate(bound.value, plain_values, log_weights, chi)
        return SecondaryEstimate(plain_values, plain_values, log_weights)

    def estimate_from_candidates(state, log_weights, win_rates, base_log_probs, candidate_mask=None,
                                 prompt_weights=None) -> SecondaryEstimate:
        del state  # the estimate depends on the pool's weights only; kept for a uniform signature
        win_rates = jnp.asarray(win_rates, jnp.float32)
        plain = objectives.secondary_values(log_weights, win_rates, prompt_weights, candidate_mask)
        samples, log_q = (None, None)
        if config.eps > 0:
            samples, log_q = objectives.importance_weighted_secondaries(
                log_weights, win_rates, base_log_probs, prompt_weights, candidate_mask
            )
        mask = jnp.ones(jnp.shape(log_weights), bool) if candidate_mask is None else jnp.asarray(candidate_mask, bool)
        prompts = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32)
        return _robust_or_plain(samples, log_q, plain, log_data_weights(jnp.full(plain.shape, prompts)))

    def estimate_from_pairs(state, policy_log_ratios, preference_probs, label_mask=None, valid_mask=None,
                            weights=None) -> SecondaryEstimate:
        del state
        pairs = objectives.pairwise_value_samples(policy_log_ratios, preference_probs, label_mask, valid_mask,
                                                  weights)
        return _robust_or_plain(pairs.samples[1:], pairs.log_base[1:], pairs.mean()[1:],
                                pairs.log_normalisers[1:])

    def update(state: MOPOState, win_rates, ref_log_probs=None, candidate_mask=None, prompt_weights=None):
        validation.check_unit_interval("win_rates", win_rates)
        # K = 1 + the state's constraints: a mismatch is named here, not left to a dot_general inside jit.
        sizes = validation.check_array_shape("win_rates", win_rates, ("K", "X", "N"),
                                             {"K": jnp.shape(state.multipliers)[0] + 1})
        for name, value, expected in (("ref_log_probs", ref_log_probs, ("X", "N")),
                                      ("candidate_mask", candidate_mask, ("X", "N")),
                                      ("prompt_weights", prompt_weights, ("X",))):
            if value is not None:
                validation.check_array_shape(name, value, expected, sizes)
        win_rates = jnp.asarray(win_rates, jnp.float32)
        if ref_log_probs is None:
            base = objectives.masked_log_normalize(jnp.zeros(win_rates.shape[1:], jnp.float32), candidate_mask)
        else:
            base = jnp.asarray(ref_log_probs, jnp.float32)
        log_weights = objectives.closed_form_log_weights(
            win_rates, state.multipliers, config.tau, base, candidate_mask
        )
        estimate = estimate_from_candidates(state, log_weights, win_rates, base, candidate_mask, prompt_weights)
        return MOPOUpdate(log_weights=log_weights, state=update_from_estimates(state, estimate))

    return MOPOTransformation(init=init, update=update, update_from_estimates=update_from_estimates,
                              estimate_from_candidates=estimate_from_candidates,
                              estimate_from_pairs=estimate_from_pairs)
