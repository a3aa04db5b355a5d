"""MOPO and the baselines on tabular problems, with a parametric softmax policy (a logits table trained with optax).

A tabular problem enumerates each prompt's candidates, so every expectation can be exact: the policy is
``softmax(logits[x])``, and the training data are either each prompt's whole candidate pool, the population of
ordered pairs ``(y_i, y_j)`` drawn from ``mu x mu`` with soft labels ``P_k(y_i > y_j)``, or a finite dataset of pairs
sampled from it. Every method is an objective of :mod:`mopo_jax.policy_objectives` (the same objects the
language-model step trains with) and trains the same logits table with the same optimiser for the same number of
steps (:func:`run_objective`); runs are ``vmap``-ed over thresholds or weights and ``lax.scan``-ed over steps, so each
(method, problem shape) compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mopo_jax import objectives
from mopo_jax.policy_objectives import MOPOCandidates, Objective, ResponseLogProbs
from mopo_jax.state import MOPOConfig, lagged_reference_update

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


# ---------------------------------------------------------------------------------------------------------------
# The problem as training data: a candidate pool per prompt, or pairs. Each is a batch in the layout the objectives
# of mopo_jax.policy_objectives read (the language-model step reads the same fields), plus, for pairs, the flat
# [X*N] indices of each pair's two responses in the logits table.


class TabularData(NamedTuple):
    batch: dict  # objective fields, "response_valid", and the fields the objective's optional inputs name
    pair_index: Array | None  # [B, 2] flat indices into the [X, N] table; None for candidate pools


def candidate_data(problem: TabularProblem) -> TabularData:
    """Every prompt's enumerated pool: ``candidate_preferences [X, K, N, N]`` with the comparison policy ``mu`` and
    the prompt distribution (for :class:`~mopo_jax.policy_objectives.MOPOCandidates` with ``"enumerated"``)."""
    return TabularData(
        batch={
            "candidate_preferences": jnp.moveaxis(problem.preferences, 0, 1),
            "candidate_label_mask": jnp.moveaxis(problem.label_mask, 0, 1),
            "comparison_probs": problem.comparison_probs,
            "prompt_weights": problem.prompt_weights,
            "response_valid": problem.candidate_mask,
        },
        pair_index=None,
    )


def pair_data(problem: TabularProblem, include_ties: bool = False) -> TabularData:
    """The population of ordered pairs: every ``(y_i, y_j)``, ``i != j``, of every prompt with its soft labels
    ``P_k(y_i > y_j)`` and weight ``p(x) mu(y_i) mu(y_j)`` (the expectation over pairs drawn from ``mu x mu``).

    ``include_ties`` adds the pairs ``(y_i, y_i)`` (weight ``p(x) mu(y_i)^2``, a tie): ``mu x mu`` draws them too, and
    the pairwise value estimate is exact over a finite pool only with them (they add nothing to ``V - 1/2`` but
    their share of the importance normaliser). ``sampling_log_probs`` is ``log mu`` of each response.
    """
    num_prompts, num_candidates = problem.ref_log_probs.shape
    index = jnp.arange(num_prompts * num_candidates).reshape(num_prompts, num_candidates)
    first = jnp.broadcast_to(index[:, :, None], (num_prompts, num_candidates, num_candidates)).reshape(-1)
    second = jnp.broadcast_to(index[:, None, :], (num_prompts, num_candidates, num_candidates)).reshape(-1)
    mu = jnp.where(problem.candidate_mask, problem.comparison_probs, 0.0)
    prompt = problem.prompt_weights / jnp.sum(problem.prompt_weights)
    kept = jnp.ones((num_candidates, num_candidates), bool) if include_ties else ~jnp.eye(num_candidates, dtype=bool)
    weights = (prompt[:, None, None] * mu[:, :, None] * mu[:, None, :] * kept).reshape(-1)
    flat = lambda a: jnp.moveaxis(a, 0, -1).reshape(-1, a.shape[0])  # noqa: E731  [K, X, N, N] -> [X*N*N, K]
    pair_index = jnp.stack([first, second], axis=-1)
    log_mu = jnp.log(jnp.where(mu > 0, mu, 1.0)).reshape(-1)
    return TabularData(
        batch={
            "preference_probs": flat(problem.preferences),
            "label_mask": flat(problem.label_mask) & (weights > 0)[:, None],
            "pair_weights": weights,
            "sampling_log_probs": log_mu[pair_index],
            "response_valid": jnp.ones((weights.shape[0], 2), bool),
        },
        pair_index=pair_index,
    )


def sampled_pair_data(problem: TabularProblem, num_pairs: int, key: Array) -> TabularData:
    """A preference *dataset*: ``num_pairs`` pairs drawn as ``x ~ p``, ``y, y' ~ mu(.|x)`` independently, each with
    one hard label per objective drawn from ``P_k(y > y')`` (the way a human labels a pair), where the problem
    labels the pair; a response drawn twice is a tie (``P = 1/2``).

    Stored per distinct ordered pair of the pool: ``pair_weights`` is how often it was drawn and
    ``preference_probs`` the fraction of its draws won, per objective. Training on this is training on the
    ``num_pairs`` draws (the pairwise losses and the plain value estimate are linear in the labels, so the sum over
    a pair's draws is its count times the mean), in a shape that depends only on ``(X, N, K)``. (The robust bound
    of Eq. 5 is not linear in the samples; with ``eps > 0`` this aggregation would pool identical pairs' draws.)
    """
    prompt_key, first_key, second_key, label_key = jax.random.split(key, 4)
    num_objectives, num_prompts, num_candidates = problem.win_rates.shape
    prompts = jax.random.choice(prompt_key, num_prompts, (num_pairs,),
                                p=problem.prompt_weights / jnp.sum(problem.prompt_weights))
    mu = jnp.where(problem.candidate_mask, problem.comparison_probs, 0.0)
    logits = jnp.where(mu > 0, jnp.log(jnp.where(mu > 0, mu, 1.0)), -jnp.inf)[prompts]
    first = jax.random.categorical(first_key, logits)
    second = jax.random.categorical(second_key, logits)
    wins = jax.random.uniform(label_key, (num_pairs, num_objectives)) < problem.preferences[:, prompts, first, second].T
    cell = (prompts * num_candidates + first) * num_candidates + second
    cells = num_prompts * num_candidates**2
    counts = jnp.zeros((cells,), jnp.float32).at[cell].add(1.0)
    won = jnp.zeros((cells, num_objectives), jnp.float32).at[cell].add(wins.astype(jnp.float32))
    population = pair_data(problem, include_ties=True)
    tie = population.pair_index[:, 0] == population.pair_index[:, 1]
    fraction = jnp.where(tie[:, None], 0.5, won / jnp.maximum(counts, 1.0)[:, None])
    labels = jnp.moveaxis(problem.label_mask, 0, -1).reshape(cells, num_objectives) & (counts > 0)[:, None]
    return population._replace(batch={**population.batch, "preference_probs": fraction, "label_mask": labels,
                                      "pair_weights": counts})


def _optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(
        settings.learning_rate, settings.steps, alpha=settings.final_learning_rate / settings.learning_rate
    )
    return optax.adam(schedule)


class Trajectory(NamedTuple):
    values: Array  # [steps, K] V_k of the trained policy after each step
    kl: Array  # [steps]
    multipliers: Array  # [steps, K-1] (zeros for objectives without multipliers)
    thresholds: Array  # [steps, K-1]


class RunResult(NamedTuple):
    logits: Array  # [X, N] final policy logits
    values: Array  # [K]
    kl: Array  # []
    multipliers: Array  # [K-1]
    trajectory: Trajectory


def run_objective(problem: TabularProblem, objective: Objective, data: TabularData,
                  settings: TrainSettings) -> RunResult:
    """Trains the logits table on ``objective`` (any of :mod:`mopo_jax.policy_objectives`, the same objects the
    language-model step runs) over ``data``, full-batch, for ``settings.steps`` Adam steps.

    Each step is the objective's ``prepare`` / ``loss`` / ``update``; the policy's log-probabilities are the table's
    log-softmax over each prompt's candidates (gathered per pair for pair data), the reference's those of the
    reference table, which the objective's lagged-reference schedule (if any) replaces by the policy of ``t0`` steps
    earlier. ``lax.scan`` over steps: one compile per (objective configuration, data shape).
    """
    optimizer = _optimizer(settings)
    initial_logits = problem.ref_log_probs
    num_secondary = problem.win_rates.shape[0] - 1

    def log_probs_of(logits, ref_logits):
        policy, reference, initial = (policy_log_probs(table, problem) for table in (logits, ref_logits,
                                                                                     initial_logits))
        if data.pair_index is not None:
            policy, reference, initial = (a.reshape(-1)[data.pair_index] for a in (policy, reference, initial))
        return ResponseLogProbs(policy=policy, reference=reference if objective.needs_reference else None,
                                initial_reference=initial if objective.reads_initial_reference else None)

    def step(carry, _):
        logits, opt_state, objective_state, ref_logits, snapshot = carry
        objective_state, rows = objective.prepare(objective_state, data.batch)
        batch = {**data.batch, **rows}

        def loss_of(logits):
            terms, aux = objective.loss(objective_state, batch, log_probs_of(logits, ref_logits))
            return terms.mean(), aux

        grads, aux = jax.grad(loss_of, has_aux=True)(logits)
        objective_state = objective.update(objective_state, batch, jax.lax.stop_gradient(aux))
        updates, opt_state = optimizer.update(grads, opt_state, logits)
        logits = optax.apply_updates(logits, updates)
        if objective.lagged_reference:
            refresh = objective.reference_refresh_due(objective_state)
            ref_logits, snapshot = lagged_reference_update(refresh, ref_logits, snapshot, logits)
        metrics = objective.metrics(objective_state, batch, aux)
        empty = jnp.zeros((num_secondary,), jnp.float32)
        record = _record(logits, problem, metrics.get("multipliers", empty), metrics.get("thresholds", empty))
        return (logits, opt_state, objective_state, ref_logits, snapshot), record

    carry = (initial_logits, optimizer.init(initial_logits), objective.init(), initial_logits, initial_logits)
    (logits, _, _, _, _), trajectory = jax.lax.scan(step, carry, None, length=settings.steps)
    final = policy_metrics(logits, problem)
    return RunResult(logits, final["values"], final["kl"], trajectory.multipliers[-1], trajectory)


def _record(logits, problem, multipliers, thresholds):
    metrics = policy_metrics(logits, problem)
    return Trajectory(metrics["values"], metrics["kl"], jnp.asarray(multipliers, jnp.float32),
                      jnp.asarray(thresholds, jnp.float32))


def run_mopo(
    problem: TabularProblem,
    thresholds: Array,
    config: MOPOConfig,
    settings: TrainSettings,
    policy_step: str = "weighted_bc",
    refresh_every: Array | int | None = None,
) -> RunResult:
    """MOPO as an iterative algorithm on a tabular problem (Algorithm 1 of the paper) over the enumerated pools.

    :class:`~mopo_jax.policy_objectives.MOPOCandidates` with ``candidates="enumerated"``: each step the closed
    form against the current reference (Eq. 3), a policy step on the weighted-BC loss (Eq. 7) or the pairwise loss
    over every pair of the pool (Eq. 8), and the dual update from the closed form's values (Eq. 4-5: the exact dual
    gradient, the paper's choice, ``batch_estimate="closed_form"``). With
    ``refresh_every`` (``t0``) the reference is replaced by the policy lagged by ``t0`` steps and the thresholds
    ratchet (Eq. 6); ``None`` keeps ``pi_ref`` fixed, which is the problem the exact solver solves.

    ``refresh_every`` may be a traced integer so that a ``vmap`` covers several schedules in one compile.
    """
    objective = MOPOCandidates(mopo=dataclasses.replace(config, refresh_every=refresh_every), thresholds=thresholds,
                               policy_step=policy_step, candidates="enumerated", batch_estimate="closed_form")
    return run_objective(problem, objective, candidate_data(problem), settings)
