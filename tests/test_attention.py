"""Attention kernels (ModelConfig.attention): the XLA path of jax.nn.dot_product_attention, and "auto" on CPU, equal
the reference einsum/softmax path for logits, parameter gradients and cached decoding, with GQA, MQA and MHA, left
padding and fully-masked (padding) query rows; wrong values and cuDNN off a GPU are clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopo_jax import models as M
from mopo_jax.models import transformer as T

KINDS = {
    "gqa": lambda **kw: M.get_preset("tiny", init_std=0.15, **kw),  # 4 query heads over 2 kv heads
    "mha-gpt2": lambda **kw: M.get_preset("tiny-gpt2", init_std=0.15, **kw),
}
B, LEN, PAD = 3, 10, 4


def _batch(cfg):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, LEN), 0, cfg.vocab_size)
    # Row 1 left-padded by PAD slots; row 2 unpadded but its last 3 slots padding (right padding).
    mask = jnp.ones((B, LEN), bool).at[1, :PAD].set(False).at[2, -3:].set(False)
    return tokens, mask


def _loss(cfg, params, tokens, mask):
    """Masked next-token loss (as the training losses: padding weighted by 0) and the logits."""
    logits = M.forward(cfg, params, tokens, mask=mask)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
    return -(picked * weight).sum() / weight.sum(), logits


_loss_and_grad = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)


@pytest.fixture(scope="module", params=sorted(KINDS))
def outputs(request):
    """Logits, loss, gradients and decoded logits of one model under the reference and the XLA implementation
    ("auto" is the XLA path on CPU: test_auto_is_the_xla_path_off_a_gpu)."""
    results = {}
    for impl in ("reference", "xla"):
        cfg = KINDS[request.param](attention=impl)
        params = M.init_params(cfg, jax.random.PRNGKey(0))
        tokens, mask = _batch(cfg)
        (loss, logits), grads = _loss_and_grad(cfg, params, tokens, mask)
        # Decode: a left-padded prompt prefill of 6 slots, then one token per step with the cache.
        step = jax.jit(M.decode_step, static_argnums=0)
        cache = M.init_cache(cfg, B, LEN + 2)
        out, cache = step(cfg, params, tokens[:, :6], cache, mask[:, :6])
        decoded = [out]
        for t in range(6, LEN):
            out, cache = step(cfg, params, tokens[:, t:t + 1], cache, mask[:, t:t + 1])
            decoded.append(out)
        results[impl] = dict(logits=logits, loss=loss, grads=grads, decoded=jnp.concatenate(decoded, axis=1),
                             mask=np.asarray(mask))
    return results


def test_forward_logits_equal_the_reference(outputs):
    ref, got = outputs["reference"], outputs["xla"]
    # Every row, padding queries included: both paths give a fully-masked row a uniform average, never NaN.
    assert np.isfinite(np.asarray(got["logits"])).all()
    np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-5, rtol=1e-5)


def test_parameter_gradients_equal_the_reference(outputs):
    ref, got = outputs["reference"], outputs["xla"]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref["grads"])
    flat_got = jax.tree.leaves(got["grads"])
    for (path, a), b in zip(flat_ref, flat_got):
        assert np.isfinite(np.asarray(b)).all(), jax.tree_util.keystr(path)
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_cached_decoding_equals_the_reference_and_the_forward_pass(outputs):
    ref, got = outputs["reference"], outputs["xla"]
    assert np.isfinite(np.asarray(got["decoded"])).all()
    np.testing.assert_allclose(got["decoded"], ref["decoded"], atol=1e-5, rtol=1e-5)
    valid = got["mask"]
    np.testing.assert_allclose(np.asarray(got["decoded"])[valid], np.asarray(got["logits"])[valid],
                               atol=1e-4, rtol=1e-4)


def test_bfloat16_xla_path_matches_the_reference():
    tokens, mask = _batch(KINDS["gqa"]())
    logits = {}
    for impl in ("reference", "xla"):
        cfg = KINDS["gqa"](attention=impl, dtype="bfloat16")
        params = M.init_params(cfg, jax.random.PRNGKey(0))
        logits[impl] = jax.jit(M.forward, static_argnums=0)(cfg, params, tokens, mask=mask)
    assert logits["xla"].dtype == jnp.float32 and np.isfinite(np.asarray(logits["xla"])).all()
    np.testing.assert_allclose(logits["xla"], logits["reference"], atol=2e-2, rtol=2e-2)


def test_fully_masked_query_rows_are_finite_with_finite_gradients():
    # A [B, T, T] mask that hides every key from two query rows (and from every query of batch row 1).
    cfg = KINDS["gqa"]()
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    tokens, _ = _batch(cfg)
    mask3 = jnp.ones((B, LEN, LEN), bool).at[0, 2:4, :].set(False).at[1].set(False)
    outs = {}
    for impl in ("reference", "xla"):
        c = cfg.replace(attention=impl)

        def loss(p):
            logits = M.forward(c, p, tokens, mask=mask3)
            return (logits * 0.0).sum() + logits[0, 5].sum(), logits  # NaN * 0 would still be NaN

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        assert np.isfinite(np.asarray(logits)).all(), impl
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads)), impl
        outs[impl] = logits
    np.testing.assert_allclose(outs["xla"], outs["reference"], atol=1e-5, rtol=1e-5)


def test_dot_product_attention_gives_a_fully_masked_row_a_uniform_average():
    # What the boolean-mask path of jax.nn.dot_product_attention does (and the model relies on): a finite large
    # negative score, so the row's softmax is uniform over the keys; no NaN, also in the gradient.
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 3, 2, 8)) for i in range(3))
    mask = jnp.ones((1, 1, 3, 3), bool).at[0, 0, 1, :].set(False)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(out[0, 1], v[0].mean(axis=0), atol=1e-6)
    grads = jax.jit(jax.grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask).sum(),
                             argnums=(0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_invalid_attention_value_names_the_field():
    with pytest.raises(ValueError, match=r"ModelConfig.attention='flash'.*expected one of"):
        M.get_preset("tiny", attention="flash")


def test_cudnn_off_a_gpu_is_a_clear_error():
    cfg = M.get_preset("tiny", attention="cudnn", dtype="bfloat16")
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"ModelConfig.attention='cudnn'.*NVIDIA GPU.*'cpu'"):
        M.forward(cfg, params, jnp.zeros((1, 4), jnp.int32))


def test_auto_is_the_xla_path_off_a_gpu():
    cfg = KINDS["gqa"](attention="auto")
    assert T.attention_implementation(cfg, 8, 8) == "xla"
    assert T.attention_implementation(cfg.replace(dtype="bfloat16"), 8, 8) == "xla"
    assert T.attention_implementation(cfg.replace(attention="reference"), 8, 8) == "reference"
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    tokens, mask = _batch(cfg)
    np.testing.assert_array_equal(M.forward(cfg, params, tokens, mask=mask),
                                  M.forward(cfg.replace(attention="xla"), params, tokens, mask=mask))


def test_auto_and_cudnn_selection_on_a_gpu(monkeypatch):
    # The selection logic with a simulated H100 (compute capability 9.0) and an old GPU; no kernel runs here.
    monkeypatch.setattr(T, "_gpu_compute_capability", lambda: (9, 0))
    half = M.get_preset("tiny", attention="auto", dtype="bfloat16")
    assert T.attention_implementation(half, 256, 256) == "cudnn"
    assert T.attention_implementation(half.replace(dtype="float16"), 8, 8) == "cudnn"
    assert T.attention_implementation(half, 1, 16) == "xla"  # single-token decode step: odd query length
    assert T.attention_implementation(half.replace(dtype="float32"), 8, 8) == "xla"
    assert T.attention_implementation(half.replace(head_dim=12, n_heads=4, d_model=48), 8, 8) == "xla"
    assert T.attention_implementation(half.replace(attention="cudnn"), 1, 16) == "cudnn"  # jax decides lengths
    with pytest.raises(ValueError, match=r"ModelConfig.attention='cudnn'.*ModelConfig.dtype='float32'"):
        T.attention_implementation(half.replace(attention="cudnn", dtype="float32"), 8, 8)
    monkeypatch.setattr(T, "_gpu_compute_capability", lambda: (7, 5))
    assert T.attention_implementation(half, 8, 8) == "xla"
    with pytest.raises(ValueError, match=r"ModelConfig.attention='cudnn'.*compute capability >= 8.0"):
        T.attention_implementation(half.replace(attention="cudnn"), 8, 8)
