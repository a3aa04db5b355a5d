"""MOPO and the baselines on tabular problems, with a parametric softmax policy (a logits table trained with optax).

A tabular problem enumerates each prompt's candidates, so every expectation is exact: the policy is
``softmax(logits[x])``, the preference data are all ordered pairs ``(y_i, y_j)`` drawn from ``mu x mu`` with soft labels
``P_k(y_i > y_j)``, and the closed form is computed against the enumerated ``pi_ref``. Every method trains the same
logits table with the same optimiser for the same number of steps; runs are ``vmap``-ed over thresholds or weights and
``lax.scan``-ed over steps, so each (method, problem shape) compiles once.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mopo_jax import losses, objectives
from mopo_jax.state import MOPOConfig, lagged_reference_update, mopo, reference_refresh_due

Array = jax.Array


class TabularProblem(NamedTuple):
    """Device-side view of a tabular preference problem."""

    preferences: Array  # [K, X, N, N] P_k(y_i > y_j), 0.5 where unlabeled
    label_mask: Array  # [K, X, N, N] bool
    win_rates: Array  # [K, X, N] against mu
    ref_log_probs: Array  # [X, N]
    comparison_probs: Array  # [X, N] mu, also the pair-sampling distribution of the preference data
    prompt_weights: Array  # [X]
    candidate_mask: Array  # [X, N]


class TrainSettings(NamedTuple):
    """Optimisation budget shared by every method."""

    steps: int = 3000
    learning_rate: float = 0.1
    final_learning_rate: float = 1e-3
    multiplier_lr: float = 0.5


def make_problem(pref, ref, mu=None, prompt_weights=None, include_self: bool = True) -> TabularProblem:
    """Builds a :class:`TabularProblem` from NumPy arrays (``pref`` with NaN for unlabeled pairs)."""
    pref = np.asarray(pref, np.float64)
    ref = np.asarray(ref, np.float64)
    candidate_mask = ref > 0
    mu = ref if mu is None else np.asarray(mu, np.float64)
    num_prompts = ref.shape[0]
    prompt_weights = (
        np.full((num_prompts,), 1.0 / num_prompts) if prompt_weights is None else np.asarray(prompt_weights)
    )
    label_mask = ~np.isnan(pref)
    rates = objectives.win_rates(pref, mu, label_mask, candidate_mask, include_self)
    ref_log = np.where(candidate_mask, np.log(np.where(candidate_mask, ref, 1.0)), objectives.MASKED_LOG_WEIGHT)
    return TabularProblem(
        preferences=jnp.asarray(np.where(label_mask, pref, 0.5), jnp.float32),
        label_mask=jnp.asarray(label_mask),
        win_rates=rates,
        ref_log_probs=jnp.asarray(ref_log, jnp.float32),
        comparison_probs=jnp.asarray(mu, jnp.float32),
        prompt_weights=jnp.asarray(prompt_weights, jnp.float32),
        candidate_mask=jnp.asarray(candidate_mask),
    )


def policy_log_probs(logits: Array, problem: TabularProblem) -> Array:
    return objectives.masked_log_normalize(logits, problem.candidate_mask)


def policy_metrics(logits: Array, problem: TabularProblem) -> dict[str, Array]:
    """Values ``V_k`` of every objective and the KL to the reference of the policy ``softmax(logits)``."""
    log_policy = policy_log_probs(logits, problem)
    return {
        "values": objectives.objective_values(
            log_policy, problem.win_rates, problem.prompt_weights, problem.candidate_mask
        ),
        "kl": objectives.kl_divergence(
            log_policy, problem.ref_log_probs, problem.prompt_weights, problem.candidate_mask
        ),
    }


class PairData(NamedTuple):
    """All ordered candidate pairs of every prompt, flattened: the tabular "preference dataset"."""

    first: Array  # [X*N*N] flat index of y_i in the [X, N] table
    second: Array  # [X*N*N] flat index of y_j
    weights: Array  # [X*N*N] p(x) mu(y_i) mu(y_j), zero on the diagonal and padding
    preference_probs: Array  # [X*N*N, K] P_k(y_i > y_j)
    label_mask: Array  # [X*N*N, K]
    win_rate_margins: Array  # [X*N*N, K] w_k(y_i) - w_k(y_j) of the candidates' win rates


def pair_data(problem: TabularProblem) -> PairData:
    num_prompts, num_candidates = problem.ref_log_probs.shape
    index = jnp.arange(num_prompts * num_candidates).reshape(num_prompts, num_candidates)
    first = jnp.broadcast_to(index[:, :, None], (num_prompts, num_candidates, num_candidates)).reshape(-1)
    second = jnp.broadcast_to(index[:, None, :], (num_prompts, num_candidates, num_candidates)).reshape(-1)
    mu = jnp.where(problem.candidate_mask, problem.comparison_probs, 0.0)
    prompt = problem.prompt_weights / jnp.sum(problem.prompt_weights)
    off_diagonal = ~jnp.eye(num_candidates, dtype=bool)
    weights = prompt[:, None, None] * mu[:, :, None] * mu[:, None, :] * off_diagonal
    flat = lambda a: jnp.moveaxis(a, 0, -1).reshape(-1, a.shape[0])  # noqa: E731  [K, X, N, N] -> [X*N*N, K]
    # Tabular win rates already average over each candidate's labeled comparisons, so every pair has a margin.
    margins = problem.win_rates[:, :, :, None] - problem.win_rates[:, :, None, :]
    return PairData(
        first=first,
        second=second,
        weights=weights.reshape(-1),
        preference_probs=flat(problem.preferences),
        label_mask=flat(problem.label_mask),
        win_rate_margins=flat(margins),
    )


def _pair_log_probs(logits, problem, pairs):
    """Policy and reference log-probs of both sides of every pair."""
    log_policy = policy_log_probs(logits, problem).reshape(-1)
    log_ref = problem.ref_log_probs.reshape(-1)
    return log_policy[pairs.first], log_policy[pairs.second], log_ref[pairs.first], log_ref[pairs.second]


def _optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(
        settings.learning_rate, settings.steps, alpha=settings.final_learning_rate / settings.learning_rate
    )
    return optax.adam(schedule)


class Trajectory(NamedTuple):
    values: Array  # [steps, K] V_k of the trained policy after each step
    kl: Array  # [steps]
    multipliers: Array  # [steps, K-1] (empty for baselines)
    thresholds: Array  # [steps, K-1]


class RunResult(NamedTuple):
    logits: Array  # [X, N] final policy logits
    values: Array  # [K]
    kl: Array  # []
    multipliers: Array  # [K-1]
    trajectory: Trajectory


def _record(logits, problem, multipliers, thresholds):
    metrics = policy_metrics(logits, problem)
    return Trajectory(metrics["values"], metrics["kl"], multipliers, thresholds)


def run_mopo(
    problem: TabularProblem,
    thresholds: Array,
    config: MOPOConfig,
    settings: TrainSettings,
    policy_step: str = "weighted_bc",
    refresh_every: Array | int | None = None,
) -> RunResult:
    """MOPO as an iterative algorithm on a tabular problem (Algorithm 1 of the paper).

    Each step: a dual update from the closed form against the current reference (Eq. 3-5), then one optax step of
    the policy on either the weighted-BC loss (Eq. 7) or the pairwise loss (Eq. 8) with the multipliers of that
    closed form. With ``refresh_every`` (``t0``) the reference is replaced by the policy lagged by ``t0`` steps and the
    thresholds ratchet (Eq. 6); ``None`` keeps ``pi_ref`` fixed, which is the problem the exact solver solves.

    ``refresh_every`` may be a traced integer so that a ``vmap`` covers several schedules in one compile.

    Args:
      problem: the tabular problem.
      thresholds: ``[K-1]`` constraint thresholds ``b``.
      config: MOPO hyper-parameters (``config.refresh_every`` is overridden by ``refresh_every``).
      settings: optimisation budget.
      policy_step: ``"weighted_bc"`` or ``"pairwise"``.
      refresh_every: ``t0`` or ``None``.

    Returns:
      :class:`RunResult` with the final policy and the per-step trajectory.
    """
    if policy_step not in ("weighted_bc", "pairwise"):
        raise ValueError(f"policy_step must be 'weighted_bc' or 'pairwise', got {policy_step!r}")
    transformation = mopo(config._replace(refresh_every=refresh_every))
    optimizer = _optimizer(settings)
    pairs = pair_data(problem)
    initial_logits = problem.ref_log_probs

    def policy_loss(logits, log_weights, multipliers, ref_log_probs):
        if policy_step == "weighted_bc":
            return losses.weighted_bc_loss(
                policy_log_probs(logits, problem), log_weights, problem.candidate_mask, problem.prompt_weights
            ).mean()
        # The pairwise estimator regresses onto the closed-form margin relative to the *current* reference.
        log_policy = policy_log_probs(logits, problem).reshape(-1)
        log_ref = ref_log_probs.reshape(-1)
        return losses.mopo_pairwise_loss(
            log_policy[pairs.first],
            log_policy[pairs.second],
            log_ref[pairs.first],
            log_ref[pairs.second],
            pairs.win_rate_margins,
            multipliers,
            config.tau,
            weights=pairs.weights,
        ).mean()

    def step(carry, _):
        logits, opt_state, mopo_state, ref_logits, snapshot = carry
        ref_log_probs = policy_log_probs(ref_logits, problem)
        update = transformation.update(
            mopo_state, problem.win_rates, ref_log_probs, problem.candidate_mask, problem.prompt_weights
        )
        grads = jax.grad(policy_loss)(logits, update.log_weights, mopo_state.multipliers, ref_log_probs)
        updates, opt_state = optimizer.update(grads, opt_state, logits)
        logits = optax.apply_updates(logits, updates)
        refresh = reference_refresh_due(update.state, refresh_every)
        ref_logits, snapshot = lagged_reference_update(refresh, ref_logits, snapshot, logits)
        record = _record(logits, problem, update.state.multipliers, update.state.thresholds)
        return (logits, opt_state, update.state, ref_logits, snapshot), record

    carry = (
        initial_logits,
        optimizer.init(initial_logits),
        transformation.init(thresholds),
        initial_logits,
        initial_logits,
    )
    (logits, _, mopo_state, _, _), trajectory = jax.lax.scan(step, carry, None, length=settings.steps)
    final = policy_metrics(logits, problem)
    return RunResult(logits, final["values"], final["kl"], mopo_state.multipliers, trajectory)


def run_policy_loss(
    problem: TabularProblem,
    loss_fn: Callable[[Array, Array], Array],
    loss_params: Array,
    settings: TrainSettings,
) -> RunResult:
    """Trains the logits table on ``loss_fn(logits, loss_params)`` (a baseline) with the shared budget."""
    optimizer = _optimizer(settings)
    initial_logits = problem.ref_log_probs
    num_secondary = problem.win_rates.shape[0] - 1

    def step(carry, _):
        logits, opt_state = carry
        grads = jax.grad(loss_fn)(logits, loss_params)
        updates, opt_state = optimizer.update(grads, opt_state, logits)
        logits = optax.apply_updates(logits, updates)
        empty = jnp.zeros((num_secondary,), jnp.float32)
        return (logits, opt_state), _record(logits, problem, empty, empty)

    (logits, _), trajectory = jax.lax.scan(
        step, (initial_logits, optimizer.init(initial_logits)), None, length=settings.steps
    )
    final = policy_metrics(logits, problem)
    return RunResult(logits, final["values"], final["kl"], jnp.zeros((num_secondary,)), trajectory)
