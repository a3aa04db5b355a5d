"""Bradley-Terry preference models on frozen features: the labelers (label on-policy candidates) and the judges
(evaluation only, trained on a disjoint split so no policy is judged by the model it was trained against).

A model scores a response by ``r(x, y) = w . standardise(phi(x, y)) + c`` and predicts
``P(y > y' | x) = sigmoid(r(x, y) - r(x, y'))``; ``phi`` is a frozen feature map (mean-pooled hidden states of a
pretrained LM over the response tokens, see :func:`response_features`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mopo_jax.models import ModelConfig, forward
from mopo_jax.parallel import sharding


class BradleyTerryModel(NamedTuple):
    weights: jax.Array  # [D]
    feature_mean: jax.Array  # [D]
    feature_scale: jax.Array  # [D]


def rewards(model: BradleyTerryModel, features) -> jax.Array:
    """``r = w . (phi - mean) / scale`` for features ``[..., D]``."""
    standardised = (jnp.asarray(features, jnp.float32) - model.feature_mean) / model.feature_scale
    return standardised @ model.weights


def preference_probability(model: BradleyTerryModel, first, second) -> jax.Array:
    """``P(first > second) = sigmoid(r(first) - r(second))``."""
    return jax.nn.sigmoid(rewards(model, first) - rewards(model, second))


def _correctness(margin) -> np.ndarray:
    margin = np.asarray(margin)
    return (margin > 0) + 0.5 * (margin == 0)


def pair_correctness(model: BradleyTerryModel, chosen, rejected) -> np.ndarray:
    """Per pair: 1 if the chosen response gets the higher reward, 1/2 on a tie, else 0 (``[M]``)."""
    return _correctness(rewards(model, chosen) - rewards(model, rejected))


def accuracy(model: BradleyTerryModel, chosen, rejected) -> float:
    """Fraction of pairs whose chosen response gets the higher reward (ties count half)."""
    return float(np.mean(pair_correctness(model, chosen, rejected)))


def bradley_terry_loss(weights, standardised_chosen, standardised_rejected, l2: float, row_weights=None):
    """Mean ``-log sigmoid(w . (phi_c - phi_r))`` plus ``l2 |w|^2`` (a ridge keeps separable data finite).

    ``row_weights`` (``[M]``, default ones) weight the pairs in the mean (zero drops a pair: cross-validation folds
    keep one compiled shape).
    """
    margin = (standardised_chosen - standardised_rejected) @ weights
    row_weights = jnp.ones_like(margin) if row_weights is None else row_weights
    nll = -jnp.sum(row_weights * jax.nn.log_sigmoid(margin)) / jnp.maximum(jnp.sum(row_weights), 1.0)
    return nll + l2 * jnp.sum(jnp.square(weights))


@partial(jax.jit, static_argnames=("steps",))
def _fit(chosen, rejected, row_weights, l2, steps: int) -> BradleyTerryModel:
    """L-BFGS on the ridge Bradley-Terry loss of the pairs with ``row_weights > 0``, standardised with their own
    (weighted) feature mean and scale."""
    both_weights = jnp.concatenate([row_weights, row_weights])[:, None]
    both = jnp.concatenate([chosen, rejected])
    total = jnp.maximum(jnp.sum(both_weights), 1.0)
    mean = jnp.sum(both_weights * both, axis=0) / total
    scale = jnp.sqrt(jnp.sum(both_weights * jnp.square(both - mean), axis=0) / total) + 1e-6
    standardised_chosen, standardised_rejected = (chosen - mean) / scale, (rejected - mean) / scale
    loss = lambda w: bradley_terry_loss(w, standardised_chosen, standardised_rejected, l2, row_weights)  # noqa: E731
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        weights, state = carry
        value, grad = value_and_grad(weights, state=state)
        updates, state = solver.update(grad, state, weights, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(weights, updates), state), None

    initial = jnp.zeros(chosen.shape[1], jnp.float32)
    (weights, _), _ = jax.lax.scan(step, (initial, solver.init(initial)), None, length=steps)
    return BradleyTerryModel(weights=weights, feature_mean=mean, feature_scale=scale)


def _check_pairs(chosen, rejected):
    chosen = jnp.asarray(chosen, jnp.float32)
    rejected = jnp.asarray(rejected, jnp.float32)
    if chosen.shape != rejected.shape or chosen.ndim != 2 or chosen.shape[0] == 0:
        raise ValueError(f"chosen and rejected features must be equal non-empty [M, D] arrays, got {chosen.shape} "
                         f"and {rejected.shape}")
    return chosen, rejected


def fit_bradley_terry(chosen, rejected, l2: float = 1e-3, steps: int = 200) -> BradleyTerryModel:
    """Maximum-likelihood Bradley-Terry weights on ``[M, D]`` chosen/rejected features (L-BFGS, full batch).

    The problem is strictly convex (ridge), so L-BFGS converges to the unique optimum.
    """
    chosen, rejected = _check_pairs(chosen, rejected)
    return _fit(chosen, rejected, jnp.ones(chosen.shape[0], jnp.float32), jnp.float32(l2), steps)


class RidgeSelection(NamedTuple):
    """K-fold cross-validation of the ridge strength (:func:`select_ridge`)."""

    l2: float  # the selected strength
    grid: tuple[float, ...]
    heldout_log_likelihood: tuple[float, ...]  # mean log sigmoid(margin) on the held-out folds, per grid value
    heldout_accuracy: tuple[float, ...]


def select_ridge(chosen, rejected, grid, folds: int = 5, seed: int = 0, steps: int = 200) -> RidgeSelection:
    """Chooses ``l2`` for :func:`fit_bradley_terry` by ``folds``-fold cross-validation on the training pairs alone.

    Each fold's model is fitted (and standardised) on the other folds; the score is the mean held-out Bradley-Terry
    log-likelihood, which rewards calibrated probabilities (what labels on-policy pairs), with the held-out accuracy
    reported beside it. Ties go to the stronger ridge.

    Args:
      chosen, rejected: ``[M, D]`` features of the preferred and the other response (``M >= folds``).
      grid: candidate ``l2`` values.
      folds: number of folds (pairs assigned by a seeded permutation).
      seed: permutation seed.
      steps: L-BFGS steps per fit.

    Returns:
      :class:`RidgeSelection`.
    """
    chosen, rejected = _check_pairs(chosen, rejected)
    grid = tuple(float(v) for v in grid)
    if not grid or min(grid) < 0:
        raise ValueError(f"grid must hold nonnegative l2 values, got {grid}")
    count = chosen.shape[0]
    if not 2 <= folds <= count:
        raise ValueError(f"folds must be in [2, {count}] (the number of pairs), got {folds}")
    fold_of = np.random.default_rng(seed).permutation(count) % folds
    log_likelihood = np.zeros((len(grid), folds))
    accuracy_ = np.zeros((len(grid), folds))
    for f in range(folds):
        held = fold_of == f
        for g, l2 in enumerate(grid):
            fitted = _fit(chosen, rejected, jnp.asarray(~held, jnp.float32), jnp.float32(l2), steps)
            margin = np.asarray(rewards(fitted, chosen[held]) - rewards(fitted, rejected[held]), np.float64)
            log_likelihood[g, f] = np.mean(-np.logaddexp(0.0, -margin))
            accuracy_[g, f] = np.mean(_correctness(margin))
    mean_ll = log_likelihood.mean(axis=1)
    best = max(range(len(grid)), key=lambda g: (round(mean_ll[g], 12), grid[g]))
    return RidgeSelection(grid[best], grid, tuple(float(v) for v in mean_ll),
                          tuple(float(v) for v in accuracy_.mean(axis=1)))


@partial(jax.jit, static_argnames=("config",))
def _pooled_features(config: ModelConfig, params, tokens, attention, completion):
    hidden = forward(config, params, tokens, mask=attention, return_hidden=True).astype(jnp.float32)
    weights = (jnp.asarray(completion, bool) & jnp.asarray(attention, bool)).astype(jnp.float32)
    total = jnp.sum(weights, axis=1, keepdims=True)
    return jnp.sum(hidden * weights[..., None], axis=1) / jnp.maximum(total, 1.0)


def response_features(
    config: ModelConfig,
    params,
    tokens,
    attention_mask,
    completion_mask,
    layer: int | None = None,
    batch_size: int = 32,
    mesh=None,
) -> np.ndarray:
    """Mean over response tokens of the (final-normed) hidden states after ``layer`` blocks (default: all).

    Args:
      config, params: a pretrained decoder (kept frozen).
      tokens, attention_mask, completion_mask: ``[B, T]`` prompt + response rows.
      layer: use the first ``layer`` blocks (earlier layers are cheaper and often as informative).
      batch_size: rows per forward pass.
      mesh: split each batch over the mesh's batch axes (``params`` placed on it,
        :func:`mopo_jax.parallel.sharding.put_params`; every process passes the same rows and gets every row back).

    Returns:
      ``[B, D]`` float32 features; rows without response tokens get zeros.
    """
    if layer is not None:
        if not 1 <= layer <= config.n_layers:
            raise ValueError(f"layer must be in [1, {config.n_layers}], got {layer}")
        config = config.replace(n_layers=layer)
        params = {**params, "layers": jax.tree.map(lambda a: a[:layer], params["layers"])}

    tokens, attention_mask, completion_mask = (np.asarray(a) for a in (tokens, attention_mask, completion_mask))
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        chunk = [a[rows] for a in (tokens, attention_mask, completion_mask)]
        short = batch_size - chunk[0].shape[0]
        if short:  # pad the last chunk to the compiled shape
            chunk = [np.concatenate([a, np.zeros((short,) + a.shape[1:], a.dtype)]) for a in chunk]
        out.append(sharding.to_host(_pooled_features(config, params, *sharding.put_batch(chunk, mesh)))
                   [: batch_size - short])
    return np.concatenate(out) if out else np.zeros((0, config.d_model), np.float32)
