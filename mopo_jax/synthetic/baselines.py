"""Baselines on tabular problems, trained with the same logits table, optimiser and budget as MOPO.

* DPO / IPO on the primary objective only.
* Linear scalarisation: ``sum_k alpha_k loss_k`` over a sweep of simplex weights ``alpha`` (weighted DPO, weighted IPO).
* MODPO (Zhou et al. 2023): DPO on the primary labels with the secondary objectives entering as a margin
  ``alpha_{1:} . (r(y) - r(y'))`` from Bradley-Terry rewards fitted to the secondary labels.
* Rewarded Soups (Ramé et al. 2023): the logits of the per-objective DPO optima, interpolated with ``alpha``.

Each is an objective of :mod:`mopo_jax.policy_objectives` trained by :func:`mopo_jax.synthetic.tabular.run_objective`
on the population of pairs of :func:`mopo_jax.synthetic.tabular.pair_data`: every ordered pair drawn from ``mu x mu``
with its soft label ``P_k``. ``beta`` of DPO and ``tau`` of IPO are set to MOPO's ``tau`` so every
method pays the same price per unit of KL.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mopo_jax import losses
from mopo_jax.policy_objectives import MODPO, WeightedDPO, WeightedIPO
from mopo_jax.synthetic.tabular import (
    RunResult,
    TabularProblem,
    TrainSettings,
    pair_data,
    policy_metrics,
    run_objective,
)

Array = jax.Array

SCALARISED = {"dpo": lambda tau, alpha: WeightedDPO(weights=alpha, beta=tau),
              "ipo": lambda tau, alpha: WeightedIPO(weights=alpha, tau=tau)}


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


def fit_bradley_terry(
    problem: TabularProblem, objective: int, settings: TrainSettings, ridge: float = 1e-3
) -> Array:
    """Bradley-Terry rewards ``r[x, y]`` fitted to objective ``k``'s soft labels by maximum likelihood.

    ``min_r E_pairs[-P log sigmoid(r_i - r_j) - (1-P) log sigmoid(r_j - r_i)] + ridge |r|^2``; the ridge keeps the fit
    finite when the labels are deterministic or intransitive (no Bradley-Terry model fits them).
    """
    pairs = pair_data(problem)
    first, second = pairs.pair_index[:, 0], pairs.pair_index[:, 1]

    def loss_fn(rewards):
        flat = rewards.reshape(-1)
        zeros = jnp.zeros_like(flat[first])
        terms = losses.dpo_loss(
            flat[first],
            flat[second],
            zeros,
            zeros,
            1.0,
            preference_probs=pairs.batch["preference_probs"][:, objective],
            valid_mask=pairs.batch["label_mask"][:, objective],
            weights=pairs.batch["pair_weights"],
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


def run_scalarised(kind: str, problem: TabularProblem, alphas: Array, tau: float, settings: TrainSettings) -> RunResult:
    """Weighted DPO / IPO (:class:`~mopo_jax.policy_objectives.WeightedDPO`, ``WeightedIPO``) over ``alphas [M, K]``
    on the population of pairs, ``vmap``-ed; a unit vector is DPO / IPO on that objective alone."""
    data = pair_data(problem)
    return jax.vmap(lambda alpha: run_objective(problem, SCALARISED[kind](tau, alpha), data, settings))(alphas)


def run_modpo(problem: TabularProblem, alphas: Array, tau: float, settings: TrainSettings) -> RunResult:
    """MODPO (:class:`~mopo_jax.policy_objectives.MODPO`) over ``alphas [M, K]`` (``alpha_0 > 0``), with the secondary
    Bradley-Terry fits done once and supplied as the pairs' ``reward_margins``.

    Its optimum is ``pi ∝ pi_ref exp((alpha_0 r_0 + alpha_{1:} . r_{1:}) / tau)`` with ``r_0`` the Bradley-Terry
    reading of the primary labels."""
    num_objectives = problem.win_rates.shape[0]
    rewards = jnp.stack([fit_bradley_terry(problem, k, settings) for k in range(1, num_objectives)])
    data = pair_data(problem)
    flat = rewards.reshape(rewards.shape[0], -1)
    margins = (flat[:, data.pair_index[:, 0]] - flat[:, data.pair_index[:, 1]]).T  # [pairs, K-1]
    data = data._replace(batch={**data.batch, "reward_margins": margins})
    return jax.vmap(lambda alpha: run_objective(problem, MODPO(beta=tau, weights=alpha), data, settings))(alphas)


def rewarded_soups(problem: TabularProblem, expert_logits: Array, alphas: Array) -> dict[str, Array]:
    """Rewarded Soups: ``logits_alpha = sum_k alpha_k logits_k`` of the per-objective experts ``[K, X, N]``.

    Returns the values ``[M, K]``, KL ``[M]`` and logits ``[M, X, N]`` of the interpolated policies.
    """
    logits = jnp.einsum("mk,kxn->mxn", alphas, expert_logits)
    metrics = jax.vmap(lambda l: policy_metrics(l, problem))(logits)
    return {"values": metrics["values"], "kl": metrics["kl"], "logits": logits}
