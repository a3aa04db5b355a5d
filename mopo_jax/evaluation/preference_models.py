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


def accuracy(model: BradleyTerryModel, chosen, rejected) -> float:
    """Fraction of pairs whose chosen response gets the higher reward (ties count half)."""
    margin = np.asarray(rewards(model, chosen) - rewards(model, rejected))
    return float(np.mean((margin > 0) + 0.5 * (margin == 0)))


def bradley_terry_loss(weights, standardised_chosen, standardised_rejected, l2: float):
    """Mean ``-log sigmoid(w . (phi_c - phi_r))`` plus ``l2 |w|^2`` (a ridge keeps separable data finite)."""
    margin = (standardised_chosen - standardised_rejected) @ weights
    return -jnp.mean(jax.nn.log_sigmoid(margin)) + l2 * jnp.sum(jnp.square(weights))


def fit_bradley_terry(chosen, rejected, l2: float = 1e-3, steps: int = 200) -> BradleyTerryModel:
    """Maximum-likelihood Bradley-Terry weights on ``[M, D]`` chosen/rejected features (L-BFGS, full batch).

    The problem is strictly convex (ridge), so L-BFGS converges to the unique optimum.
    """
    chosen = jnp.asarray(chosen, jnp.float32)
    rejected = jnp.asarray(rejected, jnp.float32)
    if chosen.shape != rejected.shape or chosen.ndim != 2 or chosen.shape[0] == 0:
        raise ValueError(f"chosen and rejected features must be equal non-empty [M, D] arrays, got {chosen.shape} "
                         f"and {rejected.shape}")
    both = jnp.concatenate([chosen, rejected])
    mean = jnp.mean(both, axis=0)
    scale = jnp.std(both, axis=0) + 1e-6
    standardised_chosen, standardised_rejected = (chosen - mean) / scale, (rejected - mean) / scale
    loss = lambda w: bradley_terry_loss(w, standardised_chosen, standardised_rejected, l2)  # noqa: E731
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def run(weights):
        def step(carry, _):
            weights, state = carry
            value, grad = value_and_grad(weights, state=state)
            updates, state = solver.update(grad, state, weights, value=value, grad=grad, value_fn=loss)
            return (optax.apply_updates(weights, updates), state), None

        (weights, _), _ = jax.lax.scan(step, (weights, solver.init(weights)), None, length=steps)
        return weights

    weights = run(jnp.zeros(chosen.shape[1], jnp.float32))
    return BradleyTerryModel(weights=weights, feature_mean=mean, feature_scale=scale)


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
) -> np.ndarray:
    """Mean over response tokens of the (final-normed) hidden states after ``layer`` blocks (default: all).

    Args:
      config, params: a pretrained decoder (kept frozen).
      tokens, attention_mask, completion_mask: ``[B, T]`` prompt + response rows.
      layer: use the first ``layer`` blocks (earlier layers are cheaper and often as informative).
      batch_size: rows per forward pass.

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
        out.append(np.asarray(_pooled_features(config, params, *chunk))[: batch_size - short])
    return np.concatenate(out) if out else np.zeros((0, config.d_model), np.float32)
