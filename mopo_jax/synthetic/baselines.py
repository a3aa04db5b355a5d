"""Baselines on tabular problems, trained with the same logits table, optimiser and budget as MOPO.

* DPO / IPO on the primary objective only.
* Linear scalarisation: ``sum_k alpha_k loss_k`` over a sweep of simplex weights ``alpha`` (weighted DPO, weighted IPO).
* MODPO (Zhou et al. 2023): DPO on the primary labels with the secondary objectives entering as a margin
  ``alpha_{1:} . (r(y) - r(y'))`` from Bradley-Terry rewards fitted to the secondary labels.
* Rewarded Soups (Ramé et al. 2023): the logits of the per-objective DPO optima, interpolated with ``alpha``.

All pair losses use the tabular preference dataset of :func:`mopo_jax.synthetic.tabular.pair_data`: every ordered pair
drawn from ``mu x mu`` with its soft label ``P_k``. ``beta`` of DPO and ``tau`` of IPO are set to MOPO's ``tau`` so every
method pays the same price per unit of KL.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mopo_jax import losses
from mopo_jax.synthetic.tabular import (
    PairData,
    RunResult,
    TabularProblem,
    TrainSettings,
    _pair_log_probs,
    pair_data,
    policy_metrics,
    run_policy_loss,
)

Array = jax.Array

PAIR_LOSSES = {"dpo": losses.dpo_loss, "ipo": losses.ipo_loss}


def simplex_weights(num_objectives: int, resolution: int) -> np.ndarray:
    """All weight vectors on the simplex with entries in ``{0, 1/r, ..., 1}`` that put weight on every objective
    except at most the vertices (the single-objective runs are separate baselines); ``[M, K]``."""
    grid = [
        np.array(c, np.float64) / resolution
        for c in itertools.product(range(resolution + 1), repeat=num_objectives)
        if sum(c) == resolution
    ]
    weights = np.stack([g for g in grid if np.count_nonzero(g) > 1])
    return weights[np.argsort(-weights[:, 0], kind="stable")]


def scalarised_pair_loss(kind: str, tau: float, problem: TabularProblem, pairs: PairData):
    """``loss(logits, alpha) = sum_k alpha_k E_pairs[loss_kind(h; P_k)]`` (linear scalarisation of DPO or IPO)."""
    pair_loss = PAIR_LOSSES[kind]

    def loss_fn(logits, alpha):
        chosen, rejected, ref_chosen, ref_rejected = _pair_log_probs(logits, problem, pairs)
        total = 0.0
        for k in range(pairs.preference_probs.shape[1]):
            terms = pair_loss(
                chosen,
                rejected,
                ref_chosen,
                ref_rejected,
                tau,
                preference_probs=pairs.preference_probs[:, k],
                valid_mask=pairs.label_mask[:, k],
                weights=pairs.weights,
            )
            total = total + alpha[k] * terms.mean()
        return total

    return loss_fn


def fit_bradley_terry(
    problem: TabularProblem, objective: int, settings: TrainSettings, ridge: float = 1e-3
) -> Array:
    """Bradley-Terry rewards ``r[x, y]`` fitted to objective ``k``'s soft labels by maximum likelihood.

    ``min_r E_pairs[-P log sigmoid(r_i - r_j) - (1-P) log sigmoid(r_j - r_i)] + ridge |r|^2``; the ridge keeps the fit
    finite when the labels are deterministic or intransitive (no Bradley-Terry model fits them).
    """
    pairs = pair_data(problem)

    def loss_fn(rewards):
        flat = rewards.reshape(-1)
        zeros = jnp.zeros_like(flat[pairs.first])
        terms = losses.dpo_loss(
            flat[pairs.first],
            flat[pairs.second],
            zeros,
            zeros,
            1.0,
            preference_probs=pairs.preference_probs[:, objective],
            valid_mask=pairs.label_mask[:, objective],
            weights=pairs.weights,
        )
        return terms.mean() + ridge * jnp.mean(jnp.square(rewards))

    optimizer = optax.adam(optax.cosine_decay_schedule(settings.learning_rate, settings.steps, alpha=0.01))

    def step(carry, _):
        rewards, state = carry
        updates, state = optimizer.update(jax.grad(loss_fn)(rewards), state, rewards)
        return (optax.apply_updates(rewards, updates), state), None

    rewards = jnp.zeros_like(problem.ref_log_probs)
    (rewards, _), _ = jax.lax.scan(step, (rewards, optimizer.init(rewards)), None, length=settings.steps)
    return jnp.where(problem.candidate_mask, rewards, 0.0)


def modpo_loss(tau: float, problem: TabularProblem, pairs: PairData, secondary_rewards: Array):
    """MODPO: ``-E[P log sigmoid(m) + (1-P) log sigmoid(-m)]`` on the primary labels with
    ``m = (tau h - alpha_{1:} . (r(y) - r(y'))) / alpha_0`` (Zhou et al. 2023, Eq. 8, in a soft-label form).

    Its optimum is ``pi ∝ pi_ref exp((alpha_0 r_0 + alpha_{1:} . r_{1:}) / tau)`` with ``r_0`` the Bradley-Terry reading
    of the primary labels. ``secondary_rewards`` is ``[K-1, X, N]``.
    """
    flat_rewards = secondary_rewards.reshape(secondary_rewards.shape[0], -1)
    reward_margin = flat_rewards[:, pairs.first] - flat_rewards[:, pairs.second]  # [K-1, pairs]

    def loss_fn(logits, alpha):
        chosen, rejected, ref_chosen, ref_rejected = _pair_log_probs(logits, problem, pairs)
        terms = losses.dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            tau / alpha[0],
            preference_probs=pairs.preference_probs[:, 0],
            valid_mask=pairs.label_mask[:, 0],
            weights=pairs.weights,
            margin_offset=(alpha[1:] @ reward_margin) / alpha[0],
        )
        return terms.mean()

    return loss_fn


def run_scalarised(kind: str, problem: TabularProblem, alphas: Array, tau: float, settings: TrainSettings) -> RunResult:
    """Weighted DPO / IPO over ``alphas [M, K]``, ``vmap``-ed."""
    loss_fn = scalarised_pair_loss(kind, tau, problem, pair_data(problem))
    return jax.vmap(lambda alpha: run_policy_loss(problem, loss_fn, alpha, settings))(alphas)


def run_modpo(problem: TabularProblem, alphas: Array, tau: float, settings: TrainSettings) -> RunResult:
    """MODPO over ``alphas [M, K]`` (``alpha_0 > 0``), with the secondary Bradley-Terry fits done once."""
    num_objectives = problem.win_rates.shape[0]
    rewards = jnp.stack([fit_bradley_terry(problem, k, settings) for k in range(1, num_objectives)])
    loss_fn = modpo_loss(tau, problem, pair_data(problem), rewards)
    return jax.vmap(lambda alpha: run_policy_loss(problem, loss_fn, alpha, settings))(alphas)


def rewarded_soups(problem: TabularProblem, expert_logits: Array, alphas: Array) -> dict[str, Array]:
    """Rewarded Soups: ``logits_alpha = sum_k alpha_k logits_k`` of the per-objective experts ``[K, X, N]``.

    Returns the values ``[M, K]``, KL ``[M]`` and logits ``[M, X, N]`` of the interpolated policies.
    """
    logits = jnp.einsum("mk,kxn->mxn", alphas, expert_logits)
    metrics = jax.vmap(lambda l: policy_metrics(l, problem))(logits)
    return {"values": metrics["values"], "kl": metrics["kl"], "logits": logits}
