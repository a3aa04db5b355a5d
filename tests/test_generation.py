"""The sampler against independent NumPy references.

- ``sample_tokens``: the kept set of top-k / top-p against a sort-based NumPy nucleus (ties included), single draws
  against a float64 NumPy inverse CDF fed the same uniforms, and the law of many draws against the probabilities.
- ``generate``: token for token equal to a loop without a KV cache (a full forward pass over the growing sequence,
  NumPy sampling from its logits with the documented key schedule ``uniform(fold_in(rng, step), (B,))``), and one
  prefill shared by ``num_samples`` samples equal to generating from repeated prompts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopo_jax import models as M
from mopo_jax.models.generation import _keep_mask


def _numpy_keep(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Top-k, then the smallest set of most likely tokens whose mass reaches top_p (ties kept together)."""
    logits = np.asarray(logits, np.float64)
    keep = np.ones(logits.shape, bool)
    for row in range(logits.shape[0]):
        x = logits[row]
        if top_k:
            keep[row] &= x >= np.sort(x)[::-1][top_k - 1]
        if top_p is not None and top_p < 1.0:
            z = np.where(keep[row], x, -np.inf)
            p = np.exp(z - z.max())
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            mass_before = np.cumsum(p[order]) - p[order]
            threshold = p[order][mass_before < top_p].min()
            keep[row] &= p >= threshold
    return keep


def _numpy_draw(logits: np.ndarray, uniform: np.ndarray, temperature: float, top_k, top_p) -> np.ndarray:
    scaled = np.asarray(logits, np.float64) / temperature
    keep = _numpy_keep(scaled, top_k, top_p)
    weights = np.where(keep, np.exp(scaled - scaled.max(axis=-1, keepdims=True)), 0.0)
    cdf = np.cumsum(weights, axis=-1)
    return np.array([np.searchsorted(cdf[r], uniform[r] * cdf[r, -1], side="right") for r in range(len(cdf))])


def _logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal((rows, vocab))).astype(np.float32)


@pytest.mark.parametrize("top_k,top_p", [(None, 0.9), (None, 0.5), (40, None), (40, 0.8), (None, 0.999)])
def test_keep_mask_is_the_numpy_nucleus(top_k, top_p):
    logits = _logits(16, 700, seed=1)
    logits[3, :5] = logits[3].max()  # a five-way tie at the top must be kept or dropped together
    logits[4] = np.round(logits[4])  # many ties everywhere
    got = np.asarray(_keep_mask(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(got, _numpy_keep(logits, top_k, top_p))
    assert got[3, :5].all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, None, 0.9), (1.3, 50, 0.95)])
def test_single_draws_equal_a_numpy_inverse_cdf(temperature, top_k, top_p):
    # 700 tokens: three blocks of the two-level CDF, the last one padded.
    logits = _logits(64, 700, seed=2)
    key = jax.random.PRNGKey(7)
    got = np.asarray(M.sample_tokens(key, jnp.asarray(logits), temperature, top_k, top_p))
    uniform = np.asarray(jax.random.uniform(key, (64,), jnp.float32), np.float64)
    np.testing.assert_array_equal(got, _numpy_draw(logits, uniform, temperature, top_k, top_p))


def test_draws_follow_the_filtered_distribution():
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0] + [-30.0] * 300], np.float32)  # spans two blocks
    draws = 40_000
    sample = jax.jit(jax.vmap(lambda k: M.sample_tokens(k, jnp.asarray(logits), 1.0, None, 0.9)[0]))
    tokens = np.asarray(sample(jax.random.split(jax.random.PRNGKey(3), draws)))
    p = np.exp(logits[0].astype(np.float64) - logits[0].max())
    p /= p.sum()
    kept = _numpy_keep(logits, None, 0.9)[0]
    assert kept.sum() == 4  # 0.9 of the mass needs the four most likely tokens
    expected = np.where(kept, p, 0.0) / p[kept].sum()
    counts = np.bincount(tokens, minlength=logits.shape[1])
    assert counts[~kept].sum() == 0
    sigma = np.sqrt(draws * expected * (1 - expected))
    assert np.all(np.abs(counts - draws * expected) <= 5 * sigma + 1), (counts[:6], draws * expected[:6])


def _cacheless_generate(cfg, params, prompts, steps, rng, temperature, top_k, top_p):
    """Reference sampler: for every step a full forward pass over [prompt + generated] (right-padded to one width,
    one compile), the last real position's logits, a NumPy draw with the uniform of ``fold_in(rng, step)``."""
    forward = jax.jit(M.forward, static_argnums=0)
    width = max(map(len, prompts)) + steps
    sequences = [list(p) for p in prompts]
    logprobs = [[] for _ in prompts]
    for step in range(steps):
        uniform = np.asarray(jax.random.uniform(jax.random.fold_in(rng, step), (len(prompts),), jnp.float32),
                             np.float64)
        padded = np.zeros((len(prompts), width), np.int32)
        for row, seq in enumerate(sequences):
            padded[row, :len(seq)] = seq
        logits = np.asarray(forward(cfg, params, jnp.asarray(padded)))
        last = np.stack([logits[row, len(seq) - 1] for row, seq in enumerate(sequences)])
        tokens = _numpy_draw(last, uniform, temperature, top_k, top_p)
        for row, token in enumerate(tokens):
            x = last[row].astype(np.float64)
            logprobs[row].append(x[token] - (x.max() + np.log(np.exp(x - x.max()).sum())))
            sequences[row].append(int(token))
    return [seq[len(p):] for seq, p in zip(sequences, prompts)], np.array(logprobs)


def _tiny():
    cfg = M.get_preset("tiny", init_std=0.3)
    return cfg, M.init_params(cfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.8, None, 0.9), (1.0, 20, 0.95)])
def test_generate_equals_a_cacheless_loop(temperature, top_k, top_p):
    cfg, params = _tiny()
    prompts = [[5, 17, 99, 3, 42, 7], [7, 8], [1, 2, 3, 200], [9]]
    tokens, mask = M.left_pad(prompts, pad_id=0)
    rng, steps = jax.random.PRNGKey(11), 7
    out = M.generate(cfg, params, tokens, steps, prompt_mask=mask, temperature=temperature, top_k=top_k,
                     top_p=top_p, rng=rng)
    expected, logprobs = _cacheless_generate(cfg, params, prompts, steps, rng, temperature, top_k, top_p)
    assert np.asarray(out.tokens).tolist() == expected
    assert bool(out.mask.all())
    np.testing.assert_allclose(np.asarray(out.logprobs), logprobs, atol=2e-4)


def test_shared_prefill_equals_repeated_prompts():
    cfg, params = _tiny()
    prompts = [[5, 17, 99, 3, 42, 7], [7, 8], [1, 2, 3, 200]]
    tokens, mask = M.left_pad(prompts, pad_id=0)
    samples, rng = 4, jax.random.PRNGKey(5)
    kwargs = dict(temperature=1.0, top_p=0.95, rng=rng, eos_id=3, pad_id=0)
    shared = M.generate(cfg, params, tokens, 9, prompt_mask=mask, num_samples=samples, **kwargs)
    repeated = M.generate(cfg, params, np.repeat(tokens, samples, axis=0), 9,
                          prompt_mask=np.repeat(mask, samples, axis=0), **kwargs)
    assert shared.tokens.shape == (len(prompts) * samples, 9)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
    np.testing.assert_array_equal(np.asarray(shared.mask), np.asarray(repeated.mask))
    np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(repeated.logprobs), atol=1e-5)
    # the samples of one prompt differ from each other (they are not copies of one draw)
    assert len({tuple(row) for row in np.asarray(shared.tokens[:samples]).tolist()}) > 1


def test_prefill_cache_equals_decode_step_cache():
    cfg, params = _tiny()
    tokens, mask = M.left_pad([[5, 17, 99, 3, 42, 7], [7, 8]], pad_id=0)
    hidden, cache = jax.jit(M.prefill, static_argnums=(0, 4))(cfg, params, tokens, mask, 10)
    logits, stepped = M.decode_step(cfg, params, jnp.asarray(tokens), M.init_cache(cfg, 2, 10), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(M.unembed(cfg, params, hidden)), np.asarray(logits[:, -1]), atol=1e-4)
    real = np.asarray(stepped["mask"])  # padding slots hold unused keys/values
    for name in ("k", "v"):
        np.testing.assert_allclose(np.moveaxis(np.asarray(cache[name]), 3, 2)[:, real],
                                   np.moveaxis(np.asarray(stepped[name]), 3, 2)[:, real], atol=1e-5)
    for name in ("mask", "pos", "index"):
        np.testing.assert_array_equal(np.asarray(cache[name]), np.asarray(stepped[name]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_samples=0), "num_samples"), (dict(top_p=0.0, temperature=1.0), "top_p"),
    (dict(top_k=-1, temperature=1.0), "top_k"),
])
def test_bad_sampling_arguments_are_named(kwargs, match):
    cfg, params = _tiny()
    with pytest.raises(ValueError, match=match):
        M.generate(cfg, params, np.ones((1, 3), np.int32), 2, rng=jax.random.PRNGKey(0), **kwargs)
