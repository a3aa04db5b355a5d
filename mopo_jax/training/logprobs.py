"""Completion-only sequence log-probabilities of a causal LM, in float32.

Chosen, rejected and candidate responses go through the model in one forward pass: callers flatten them onto the
batch axis (``[B, S, T] -> [B*S, T]``) and reshape the result back.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mopo_jax.models import ModelConfig, forward, token_log_probs


class SequenceLogProbs(NamedTuple):
    log_probs: jax.Array  # [B] sum of log p(token) over completion tokens (0 for dropped rows)
    valid: jax.Array  # [B] bool: the row has at least one completion token
    num_tokens: jax.Array  # [B] int32 completion tokens counted


def sequence_log_probs(
    config: ModelConfig,
    params,
    tokens: jax.Array,
    completion_mask: jax.Array,
    attention_mask: jax.Array | None = None,
    vocab_chunk: int | None = None,
    inputs_hidden: jax.Array | None = None,
    activation_sharding=None,
    completion_start: int = 0,
) -> SequenceLogProbs:
    """``log pi(y | x) = sum_t m_t log pi(token_t | tokens_<t)`` over completion tokens ``m_t = 1``.

    The log-softmax is taken in float32 whatever the compute dtype (the unembedding accumulates in float32); with
    ``vocab_chunk`` the normaliser is accumulated over vocabulary slices so ``[B, T, V]`` logits never exist at once.
    A row with an empty completion mask is marked invalid and contributes exactly 0 (never NaN).

    Args:
      config: model config.
      params: model parameters.
      tokens: int ``[B, T]`` prompt + completion (padding anywhere the masks say).
      completion_mask: ``[B, T]``, 1 on the completion tokens whose probability is scored.
      attention_mask: optional ``[B, T]``, 1 on real tokens (defaults to all ones).
      vocab_chunk: optional vocabulary chunk size (must divide the vocabulary).
      inputs_hidden: optional ``[B, T, D]`` cached residual stream of frozen lower layers, when ``params`` holds
        only the upper layers (:func:`mopo_jax.models.split_layers`).
      activation_sharding: optional sharding of the ``[B, T, D]`` residual stream (see
        :func:`mopo_jax.models.forward`).
      completion_start: first column that can hold a completion token (static). Positions before it are never
        scored, so the unembedding and log-softmax run on ``T - completion_start`` positions only; with a prompt
        region of fixed width (left-padded prompts, as :func:`mopo_jax.data.format_and_tokenize` lays them out)
        this halves the vocabulary work without changing the result.

    Returns:
      :class:`SequenceLogProbs`.
    """
    hidden = forward(config, params, tokens, mask=attention_mask, return_hidden=True, inputs_hidden=inputs_hidden,
                     activation_sharding=activation_sharding)
    # Position t predicts token t+1: score targets tokens[:, s:] with hidden[:, s-1:-1].
    start = max(int(completion_start), 1)
    per_token = token_log_probs(config, params, hidden[:, start - 1:-1], tokens[:, start:], vocab_chunk=vocab_chunk)
    scored = jnp.asarray(completion_mask[:, start:], bool)
    if attention_mask is not None:
        scored = scored & jnp.asarray(attention_mask[:, start:], bool)
    totals = jnp.sum(jnp.where(scored, per_token, 0.0), axis=-1)
    counts = jnp.sum(scored, axis=-1).astype(jnp.int32)
    return SequenceLogProbs(log_probs=totals, valid=counts > 0, num_tokens=counts)
