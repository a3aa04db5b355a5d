"""Autoregressive generation with a KV cache (jitted, fixed shapes)."""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .transformer import decode_step, prefill, repeat_cache, token_log_probs, unembed


class GenerateOutput(NamedTuple):
    """Result of :func:`generate` (a pytree).

    tokens: int32 ``[B * num_samples, max_new_tokens]``; ``pad_id`` after a row finished.
    mask: bool ``[B * num_samples, max_new_tokens]``; True for generated tokens (up to and
      including the eos token).
    logprobs: float32 ``[B * num_samples, max_new_tokens]``; log-probability of each generated
      token under the model (temperature 1, no top-k/top-p filtering); 0 where
      ``mask`` is False.
    """
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None,
             multiple_of: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``[B, T]`` (int32 tokens, bool mask).

    ``T`` is ``length`` or the longest sequence, rounded up to ``multiple_of``
    (useful to limit recompilation)."""
    T = max(len(s) for s in sequences) if length is None else length
    T = -(-T // multiple_of) * multiple_of
    toks = np.full((len(sequences), T), pad_id, np.int32)
    mask = np.zeros((len(sequences), T), bool)
    for i, s in enumerate(sequences):
        if len(s) > T:
            raise ValueError(f"sequence {i} has length {len(s)} > {T}")
        if len(s):
            toks[i, T - len(s):] = np.asarray(s, np.int32)
            mask[i, T - len(s):] = True
    return toks, mask


#: Which random numbers a key draws: part of the key of every cache of sampled responses, so that samples of an older
#: sampler (Gumbel-max, before 2026-11-29) are never paired with this one's (evaluation uses common random numbers).
SAMPLER_VERSION = "inverse-cdf-1"

_CDF_BLOCK = 256  # vocabulary block of the two-level inverse CDF


def _keep_mask(logits, top_k: int | None, top_p: float | None):
    """Tokens that survive top-k, then top-p (nucleus) filtering of ``logits [B, V]``: bool ``[B, V]``.

    Top-k keeps every token whose logit is at least the k-th largest. Top-p keeps token ``i`` iff the probability mass
    of the strictly more likely tokens is below ``top_p``, ``sum_{j: p_j > p_i} p_j < top_p`` (the smallest set of
    most likely tokens whose mass reaches ``top_p``, ties kept together). Its threshold ``min{p_i : kept}`` is found
    by bisection on the bit patterns of the (non-negative, so order-preserving) float32 probabilities: 31 masked sums
    over the vocabulary instead of a sort of it.
    """
    keep = jnp.ones(logits.shape, bool)
    if top_k is not None and top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        keep = logits >= kth
    if top_p is not None and top_p < 1.0:
        probs = jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)

        def mass_above(threshold_bits):
            threshold = jax.lax.bitcast_convert_type(threshold_bits, jnp.float32)[:, None]
            return jnp.sum(jnp.where(probs > threshold, probs, 0.0), axis=-1)

        def bisect(_, bounds):
            low, high = bounds  # mass_above(low) >= top_p > mass_above(high)
            middle = low + (high - low) // 2
            below = mass_above(middle) < top_p
            return jnp.where(below, low, middle), jnp.where(below, middle, high)

        high = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32)
        low = jnp.zeros_like(high)
        _, high = jax.lax.fori_loop(0, 31, bisect, (low, high))
        keep &= probs >= jax.lax.bitcast_convert_type(high, jnp.float32)[:, None]
    return keep


def _invert_cdf(weights, uniform):
    """Index ``i`` with ``C_{i-1} <= u W < C_i`` for the cumulative weights ``C`` of each row of ``weights [B, V]``
    (non-negative, each row with positive total ``W``) and ``uniform [B]`` in [0, 1): a draw from ``weights / W``.

    Two levels (block sums, then one block's cumulative sum) keep it at two passes over the vocabulary; a zero-weight
    token is never returned."""
    B, V = weights.shape
    blocks = -(-V // _CDF_BLOCK)
    weights = jnp.pad(weights, ((0, 0), (0, blocks * _CDF_BLOCK - V))).reshape(B, blocks, _CDF_BLOCK)
    block_mass = jnp.sum(weights, axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = uniform * block_cdf[:, -1]
    last_block = jnp.max(jnp.where(block_mass > 0, jnp.arange(blocks), 0), axis=-1)
    block = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), last_block)
    inner = jnp.take_along_axis(weights, block[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(block_cdf - block_mass, block[:, None], axis=1)
    inner_cdf = before + jnp.cumsum(inner, axis=-1)
    last_token = jnp.max(jnp.where(inner > 0, jnp.arange(_CDF_BLOCK), 0), axis=-1)
    token = jnp.minimum(jnp.sum(inner_cdf <= target[:, None], axis=-1), last_token)
    return (block * _CDF_BLOCK + token).astype(jnp.int32)


def sample_tokens(rng: jax.Array, logits: jax.Array, temperature=1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """One token per row of ``logits [B, V]`` from ``softmax(logits / temperature)`` restricted to the top-k, then
    top-p tokens (see :func:`_keep_mask`), renormalised: int32 ``[B]``.

    Inverse-CDF sampling with one uniform per row (``jax.random.uniform(rng, (B,))``): unlike Gumbel-max it draws B
    numbers per step instead of B x V, the cost that dominated a decode step of a 49k-token vocabulary on CPU.
    """
    scaled = logits.astype(jnp.float32) / temperature
    keep = _keep_mask(scaled, top_k, top_p)
    weights = jnp.where(keep, jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0)
    return _invert_cdf(weights, jax.random.uniform(rng, (logits.shape[0],), jnp.float32))


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "num_samples", "greedy", "top_k",
                                             "top_p", "eos_id", "pad_id"))
def _generate_jit(config: ModelConfig, params, prompt_tokens, prompt_mask, rng, temperature, *,
                  max_new_tokens: int, num_samples: int, greedy: bool, top_k, top_p, eos_id, pad_id):
    B, P = prompt_tokens.shape
    N = max_new_tokens
    hidden, cache = prefill(config, params, prompt_tokens, prompt_mask, P + N)
    last = unembed(config, params, hidden)
    if num_samples > 1:  # one prefill per prompt, its cache copied to the prompt's samples
        cache = repeat_cache(cache, num_samples)
        last = jnp.repeat(last, num_samples, axis=0)
        B *= num_samples

    def emit(step, last, out, out_mask, out_lp, done):
        """Samples token ``step`` of every row from ``last`` (its logits) and records it."""
        if greedy:
            nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
        else:
            nxt = sample_tokens(jax.random.fold_in(rng, step), last, temperature, top_k, top_p)
        lp = jnp.take_along_axis(last, nxt[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(last, axis=-1)
        active = ~done
        nxt = jnp.where(active, nxt, pad_id)
        out = out.at[:, step].set(nxt)
        out_mask = out_mask.at[:, step].set(active)
        out_lp = out_lp.at[:, step].set(jnp.where(active, lp, 0.0))
        if eos_id is not None:
            done = done | (nxt == eos_id)
        return nxt, active, out, out_mask, out_lp, done

    def cond(state):
        step, _, _, _, _, _, done = state
        return (step < N - 1) & ~jnp.all(done)

    def body(state):
        step, cache, last, out, out_mask, out_lp, done = state
        nxt, active, out, out_mask, out_lp, done = emit(step, last, out, out_mask, out_lp, done)
        logits, cache = decode_step(config, params, nxt[:, None], cache, mask=active[:, None])
        return step + 1, cache, logits[:, -1, :], out, out_mask, out_lp, done

    state = (jnp.zeros((), jnp.int32), cache, last,
             jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), bool),
             jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), bool))
    step, _, last, out, out_mask, out_lp, done = jax.lax.while_loop(cond, body, state)
    # The last token needs no decode step (nothing reads its logits); after an early exit every row is done and
    # this records padding where padding already is.
    _, _, out, out_mask, out_lp, _ = emit(step, last, out, out_mask, out_lp, done)
    return GenerateOutput(out, out_mask, out_lp)


@functools.partial(jax.jit, static_argnames=("config", "num_samples", "vocab_chunk"))
def _continuation_log_probs_jit(config: ModelConfig, params, prompt_tokens, prompt_mask, response_tokens,
                                response_mask, *, num_samples: int, vocab_chunk):
    B, P = prompt_tokens.shape
    R = response_tokens.shape[1]
    hidden, cache = prefill(config, params, prompt_tokens, prompt_mask, P + R)
    # An empty prompt leaves nothing to condition the first response token on: it is not scored (as in
    # mopo_jax.evaluation.policy_eval.response_rows).
    has_context = jnp.any(prompt_mask, axis=-1)
    if num_samples > 1:
        cache = repeat_cache(cache, num_samples)
        hidden = jnp.repeat(hidden, num_samples, axis=0)
        has_context = jnp.repeat(has_context, num_samples, axis=0)
    predictors = hidden[:, None]  # column t predicts response token t
    if R > 1:  # the last response token predicts nothing that is scored: only the first R - 1 run through the blocks
        extended, _ = decode_step(config, params, response_tokens[:, :-1], cache, mask=response_mask[:, :-1],
                                  return_hidden=True)
        predictors = jnp.concatenate([predictors, extended], axis=1)
    per_token = token_log_probs(config, params, predictors, response_tokens, vocab_chunk=vocab_chunk)
    scored = response_mask.at[:, 0].set(response_mask[:, 0] & has_context)
    return jnp.sum(jnp.where(scored, per_token, 0.0), axis=-1)


def continuation_log_probs(config: ModelConfig, params, prompt_tokens, prompt_mask, response_tokens, response_mask,
                           *, num_samples: int = 1, vocab_chunk: int | None = None) -> jax.Array:
    """``log pi(y | x) = sum_t m_t log pi(y_t | x, y_<t)`` of responses to left-padded prompts, float32 ``[B * S]``.

    The scoring counterpart of :func:`generate`, with the same row layout: response row ``r`` answers prompt
    ``r // num_samples`` and its mask ``m`` is a prefix (True up to and including eos). Each prompt is prefilled once
    (:func:`prefill`) and its cache shared by its ``S = num_samples`` responses, which then run as one
    ``R - 1``-token :func:`decode_step`; so a prompt's columns go through the blocks once, not once per response
    (the full-sequence forward of :func:`mopo_jax.training.sequence_log_probs` over ``[prompt; response]`` rows
    gives the same values). The log-softmax is float32 (:func:`token_log_probs`, over vocabulary chunks with
    ``vocab_chunk``); a row with an empty mask scores exactly 0.
    """
    check_count("num_samples", num_samples)
    prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_mask, bool)
    response_tokens, response_mask = jnp.asarray(response_tokens, jnp.int32), jnp.asarray(response_mask, bool)
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"prompt_tokens / prompt_mask must be equal [B, P] arrays, got {prompt_tokens.shape} and "
                         f"{prompt_mask.shape}")
    expected = (prompt_tokens.shape[0] * int(num_samples),)
    if response_tokens.ndim != 2 or response_tokens.shape[:1] != expected or response_mask.shape != response_tokens.shape:
        raise ValueError(f"response_tokens / response_mask must be equal [B * num_samples, R] arrays with "
                         f"B * num_samples = {expected[0]}, got {response_tokens.shape} and {response_mask.shape}")
    longest = int(np.asarray(prompt_mask).sum(axis=1).max()) if prompt_tokens.shape[0] else 0
    _check_context(config, longest, response_tokens.shape[1])
    return _continuation_log_probs_jit(config, params, prompt_tokens, prompt_mask, response_tokens, response_mask,
                                       num_samples=int(num_samples), vocab_chunk=vocab_chunk)


def check_count(name: str, value) -> None:
    """``value`` must be an integer >= 1 (``max_new_tokens``, ``num_samples``); else a ValueError naming ``name``."""
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_context(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    limit = int(config.max_seq_len)
    if prompt_len + int(max_new_tokens) > limit:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {int(max_new_tokens)} = "
            f"{prompt_len + int(max_new_tokens)} exceeds the model's context "
            f"(max_seq_len {limit}); shorten the prompt or lower max_new_tokens")


def generate(config: ModelConfig, params, prompt_tokens, max_new_tokens: int, *,
             prompt_mask=None, temperature: float = 0.0, top_p: float | None = None,
             top_k: int | None = None, rng: jax.Array | None = None,
             eos_id: int | None = None, pad_id: int | None = None, num_samples: int = 1) -> GenerateOutput:
    """Generate ``max_new_tokens`` continuations of a batch of prompts (``num_samples`` per prompt).

    Args:
      prompt_tokens: int ``[B, P]``, LEFT-padded (see :func:`left_pad`).
      prompt_mask: bool ``[B, P]`` (True = real token); default all True.
      temperature: 0 -> greedy decoding; > 0 -> sampling (needs ``rng``).
      top_p / top_k: optional nucleus / top-k filtering for sampling.
      eos_id: stop a row after it emits this token (the loop exits early once
        every row has finished).
      pad_id: filler after a row finished (default ``eos_id`` or 0).
      num_samples: continuations per prompt; output row ``r`` continues prompt
        ``r // num_samples`` (the order of ``np.repeat``). The prompt's prefill
        and KV cache are computed once and shared by its samples.

    The whole loop is one jitted function; it recompiles only when shapes or
    the static options change. The prefill (:func:`prefill`) unembeds only the
    last prompt column; each decode step writes one slot of the KV cache (a
    loop carry, updated in place), samples with :func:`sample_tokens` using the
    key ``fold_in(rng, step)`` and records the token's log-probability, all
    in the same step.
    """
    check_count("max_new_tokens", max_new_tokens)
    check_count("num_samples", num_samples)
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be [B, P], got shape {prompt_tokens.shape}")
    if prompt_mask is None:
        prompt_mask = jnp.ones(prompt_tokens.shape, bool)
    prompt_mask = jnp.asarray(prompt_mask, bool)
    if prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompt_tokens shape "
                         f"{prompt_tokens.shape}")
    # The longest real (unpadded) prompt plus the new tokens must fit the model's context.
    longest = int(np.asarray(prompt_mask).sum(axis=1).max()) if prompt_tokens.shape[0] else 0
    _check_context(config, longest, max_new_tokens)
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k!r}")
    greedy = temperature is None or float(temperature) == 0.0
    if not greedy and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    if rng is None:
        rng = jax.random.PRNGKey(0)
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    return _generate_jit(config, params, prompt_tokens, prompt_mask, rng,
                         jnp.float32(1.0 if greedy else temperature),
                         max_new_tokens=int(max_new_tokens), num_samples=int(num_samples), greedy=greedy,
                         top_k=None if top_k is None else int(top_k),
                         top_p=None if top_p is None else float(top_p),
                         eos_id=None if eos_id is None else int(eos_id), pad_id=int(pad_id))


# ---------------------------------------------------------------------------
# CLI helper
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _load_for_cli(model: str, dtype: str):
    from .tokenizer import load_tokenizer
    from .weights import load_pretrained

    config, params = load_pretrained(model, dtype=dtype)
    return config, params, load_tokenizer(model)


def chat_prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a single-turn chat (chat template + generation prompt)."""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate_cli(model: str, prompt: str, max_new_tokens: int = 64, *, system: str | None = None,
                 dtype: str = "float32") -> str:
    """Chat-template ``prompt``, generate greedily with ``model`` (name, path or
    hub id accepted by :func:`load_pretrained`) and return the decoded reply."""
    check_count("max_new_tokens", max_new_tokens)  # before loading any weights
    config, params, tok = _load_for_cli(model, dtype)
    ids = chat_prompt_ids(tok, prompt, system)
    _check_context(config, len(ids), max_new_tokens)
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if eos is None:
        eos = tok.eos_token_id if tok.eos_token_id is not None else config.eos_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    toks, mask = left_pad([ids], pad_id=pad, multiple_of=64)
    out = generate(config, params, toks, max_new_tokens, prompt_mask=mask, eos_id=eos, pad_id=pad)
    gen = np.asarray(out.tokens[0])[np.asarray(out.mask[0])]
    return tok.decode(gen.tolist(), skip_special_tokens=True).strip()
