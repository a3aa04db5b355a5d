"""Autoregressive generation with a KV cache (jitted, fixed shapes)."""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .transformer import decode_step, init_cache


class GenerateOutput(NamedTuple):
    """Result of :func:`generate` (a pytree).

    tokens: int32 ``[B, max_new_tokens]``; ``pad_id`` after a row finished.
    mask: bool ``[B, max_new_tokens]``; True for generated tokens (up to and
      including the eos token).
    logprobs: float32 ``[B, max_new_tokens]``; log-probability of each generated
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


def _filter_logits(logits, top_k: int | None, top_p: float | None):
    if top_k is not None and top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        keep = cum_before < top_p  # always keeps the top token
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy", "top_k",
                                             "top_p", "eos_id", "pad_id"))
def _generate_jit(config: ModelConfig, params, prompt_tokens, prompt_mask, rng, temperature, *,
                  max_new_tokens: int, greedy: bool, top_k, top_p, eos_id, pad_id):
    B, P = prompt_tokens.shape
    N = max_new_tokens
    cache = init_cache(config, B, P + N)
    logits, cache = decode_step(config, params, prompt_tokens, cache, mask=prompt_mask)
    last = logits[:, -1, :]

    def cond(state):
        step, _, _, _, _, _, done, _ = state
        return (step < N) & ~jnp.all(done)

    def body(state):
        step, cache, last, out, out_mask, out_lp, done, rng = state
        rng, sub = jax.random.split(rng)
        if greedy:
            nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
        else:
            filt = _filter_logits(last / temperature, top_k, top_p)
            nxt = jax.random.categorical(sub, filt, axis=-1).astype(jnp.int32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(last, axis=-1), nxt[:, None], axis=-1)[:, 0]
        active = ~done
        nxt = jnp.where(active, nxt, pad_id)
        out = out.at[:, step].set(nxt)
        out_mask = out_mask.at[:, step].set(active)
        out_lp = out_lp.at[:, step].set(jnp.where(active, lp, 0.0))
        if eos_id is not None:
            done = done | (nxt == eos_id)
        logits, cache = decode_step(config, params, nxt[:, None], cache, mask=active[:, None])
        return step + 1, cache, logits[:, -1, :], out, out_mask, out_lp, done, rng

    state = (jnp.zeros((), jnp.int32), cache, last,
             jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), bool),
             jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), bool), rng)
    state = jax.lax.while_loop(cond, body, state)
    _, _, _, out, out_mask, out_lp, _, _ = state
    return GenerateOutput(out, out_mask, out_lp)


def _check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens \
            or int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


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
             eos_id: int | None = None, pad_id: int | None = None) -> GenerateOutput:
    """Generate ``max_new_tokens`` continuations of a batch of prompts.

    Args:
      prompt_tokens: int ``[B, P]``, LEFT-padded (see :func:`left_pad`).
      prompt_mask: bool ``[B, P]`` (True = real token); default all True.
      temperature: 0 -> greedy decoding; > 0 -> sampling (needs ``rng``).
      top_p / top_k: optional nucleus / top-k filtering for sampling.
      eos_id: stop a row after it emits this token (the loop exits early once
        every row has finished).
      pad_id: filler after a row finished (default ``eos_id`` or 0).

    The whole loop (prefill + ``lax.while_loop`` over decode steps with a KV
    cache of ``P + max_new_tokens`` slots) is one jitted function; it recompiles
    only when shapes or the static options change.
    """
    _check_max_new_tokens(max_new_tokens)
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
    greedy = temperature is None or float(temperature) == 0.0
    if not greedy and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    if rng is None:
        rng = jax.random.PRNGKey(0)
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    return _generate_jit(config, params, prompt_tokens, prompt_mask, rng,
                         jnp.float32(1.0 if greedy else temperature),
                         max_new_tokens=int(max_new_tokens), greedy=greedy,
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
    _check_max_new_tokens(max_new_tokens)  # before loading any weights
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
