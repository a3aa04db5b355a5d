"""Functional decoder-only transformer (Llama family and GPT-2 style).

Everything here is a pure function of ``(config, params, ...)`` where ``params``
is a nested dict of arrays, so it composes with ``jax.jit``, ``jax.grad``,
sharding annotations and ``jax.eval_shape``. Per-layer parameters are stacked
on a leading ``"layers"`` axis and the blocks are applied with
``jax.lax.scan`` (a single compiled block regardless of depth).

Parameter layout (``L`` layers, ``D`` model width, ``V`` vocabulary, ``F`` MLP
width, ``Hq = n_heads * head_dim``, ``Hkv = n_kv_heads * head_dim``)::

    embed        [V, D]
    pos_embed    [max_seq_len, D]          (positional == "learned")
    layers:
      attn_norm  {"scale": [L, D], "bias": [L, D] (layer norm only)}
      wq [L, D, Hq]   wk [L, D, Hkv]   wv [L, D, Hkv]   wo [L, Hq, D]
      bq [L, Hq]  bk [L, Hkv]  bv [L, Hkv]                (qkv_bias)
      bo [L, D]                                           (out_bias)
      mlp_norm   {"scale": [L, D], "bias": ...}
      w_gate [L, D, F] (swiglu)   w_up [L, D, F]   w_down [L, F, D]
      b_gate [L, F] (swiglu)  b_up [L, F]  b_down [L, D]  (mlp_bias)
    final_norm   {"scale": [D], "bias": [D] (layer norm only)}
    lm_head      [D, V]                    (tie_embeddings == False)

Weights are stored as ``[in, out]`` (``y = x @ w``). Rotary embeddings use the
Hugging Face "rotate half" convention, so Q/K weights are directly comparable
with ``transformers`` checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from .config import ModelConfig

Params = dict
_NEG_INF = -1e30  # finite, so fully-masked rows give a uniform softmax instead of NaN


# ---------------------------------------------------------------------------
# Parameter specification (single source of truth for shapes, axes and init)
# ---------------------------------------------------------------------------

def _param_specs(cfg: ModelConfig) -> dict:
    """Nested dict of ``(shape, logical_axes, init)`` leaves; init in
    {"normal", "normal_out", "pos", "ones", "zeros"}."""
    L, D, V, F = cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.mlp_dim
    Hq, Hkv = cfg.q_dim, cfg.kv_dim

    def norm(stacked: bool):
        pre_s, pre_a = ((L,), ("layers",)) if stacked else ((), ())
        n = {"scale": (pre_s + (D,), pre_a + ("norm",), "ones")}
        if cfg.norm == "layer":
            n["bias"] = (pre_s + (D,), pre_a + ("norm",), "zeros")
        return n

    layers: dict[str, Any] = {
        "attn_norm": norm(True),
        "wq": ((L, D, Hq), ("layers", "embed", "heads"), "normal"),
        "wk": ((L, D, Hkv), ("layers", "embed", "kv_heads"), "normal"),
        "wv": ((L, D, Hkv), ("layers", "embed", "kv_heads"), "normal"),
        "wo": ((L, Hq, D), ("layers", "heads", "embed"), "normal_out"),
        "mlp_norm": norm(True),
        "w_up": ((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_down": ((L, F, D), ("layers", "mlp", "embed"), "normal_out"),
    }
    if cfg.activation == "swiglu":
        layers["w_gate"] = ((L, D, F), ("layers", "embed", "mlp"), "normal")
    if cfg.qkv_bias:
        layers["bq"] = ((L, Hq), ("layers", "heads"), "zeros")
        layers["bk"] = ((L, Hkv), ("layers", "kv_heads"), "zeros")
        layers["bv"] = ((L, Hkv), ("layers", "kv_heads"), "zeros")
    if cfg.out_bias:
        layers["bo"] = ((L, D), ("layers", "embed"), "zeros")
    if cfg.mlp_bias:
        layers["b_up"] = ((L, F), ("layers", "mlp"), "zeros")
        layers["b_down"] = ((L, D), ("layers", "embed"), "zeros")
        if cfg.activation == "swiglu":
            layers["b_gate"] = ((L, F), ("layers", "mlp"), "zeros")

    specs: dict[str, Any] = {"embed": ((V, D), ("vocab", "embed"), "normal")}
    if cfg.positional == "learned":
        specs["pos_embed"] = ((cfg.max_seq_len, D), ("position", "embed"), "pos")
    specs["layers"] = layers
    specs["final_norm"] = norm(False)
    if not cfg.tie_embeddings:
        specs["lm_head"] = ((D, V), ("embed", "vocab"), "normal")
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[2], str)


def _map_specs(fn, specs, path=()):
    if _is_spec(specs):
        return fn(path, *specs)
    return {k: _map_specs(fn, v, path + (k,)) for k, v in specs.items()}


def param_logical_axes(config: ModelConfig) -> dict:
    """Pytree with the same structure as ``init_params(config, rng)`` whose leaves
    are tuples of logical axis names, one per array dimension.

    Names used: ``"layers"``, ``"vocab"``, ``"embed"``, ``"heads"`` (flattened
    query heads*head_dim), ``"kv_heads"`` (flattened kv heads*head_dim), ``"mlp"``,
    ``"norm"`` (norm scales/biases, usually replicated), ``"position"``.
    """
    return _map_specs(lambda path, shape, axes, init: axes, _param_specs(config))


def param_shapes(config: ModelConfig) -> dict:
    """Pytree of ``jax.ShapeDtypeStruct`` for the parameters (no allocation)."""
    dt = config.weight_dtype
    return _map_specs(lambda p, shape, axes, init: jax.ShapeDtypeStruct(shape, dt),
                      _param_specs(config))


def count_params(params_or_shapes) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params_or_shapes))


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Randomly initialise parameters (normal(init_std) weights, output
    projections scaled by ``1/sqrt(2*n_layers)``, unit norm scales, zero biases).
    Pure function of ``rng``: wrap in ``jax.jit(..., out_shardings=...)`` to
    initialise directly into a sharded layout."""
    dt = config.weight_dtype
    std = config.init_std

    def make(path, shape, axes, init):
        key = jax.random.fold_in(rng, _stable_hash("/".join(path)))
        if init == "ones":
            return jnp.ones(shape, dt)
        if init == "zeros":
            return jnp.zeros(shape, dt)
        s = {"normal": std, "normal_out": std / math.sqrt(2 * config.n_layers),
             "pos": 0.01}[init]
        return (s * jax.random.normal(key, shape, jnp.float32)).astype(dt)

    return _map_specs(make, _param_specs(config))


def _stable_hash(s: str) -> int:
    h = 0
    for ch in s.encode():
        h = (h * 131 + ch) % (2**31 - 1)
    return h


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------

def _norm(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    if cfg.norm == "rms":
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + cfg.norm_eps)
        y = y * p["scale"].astype(jnp.float32)
    else:
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(cfg.compute_dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Rotary inverse frequencies ``[head_dim // 2]`` (float32), incl. scaling."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        factor = cfg.rope_scaling_factor
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_len
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def _rope_cos_sin(cfg: ModelConfig, positions: jax.Array):
    """cos/sin of shape [B, T, 1, head_dim // 2] in float32."""
    ang = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
    return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF rotate-half rotary embedding on x [B, T, H, hd]."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _dense(x, w, b=None):
    # A plain 2-D matmul: with the batch and length folded into one row axis, the weight gradient is a single
    # [d, rows] x [rows, f] product (XLA's CPU backend ran the einsum form's backward 2-3x slower).
    y = (x.reshape(-1, x.shape[-1]) @ w.astype(x.dtype)).reshape(x.shape[:-1] + (w.shape[-1],))
    if b is not None:
        y = y + b.astype(x.dtype)
    return y


def _attention_reference(cfg: ModelConfig, q, k, v, mask, *, heads_first: bool = False):
    """The explicit einsum/softmax attention (``ModelConfig.attention="reference"``, and every KV-cache read).

    q [B,T,Hq,hd], k/v [B,S,Hkv,hd] (``heads_first``: [B,Hkv,S,hd], the KV-cache layout), mask [B,T,S] bool ->
    [B,T,Hq*hd]. Scores and softmax in float32; masked scores are a finite -1e30, so a query row with no visible key
    averages all values uniformly (never NaN).
    """
    B, T, _, hd = q.shape
    G = cfg.n_heads // cfg.n_kv_heads
    q = q.reshape(B, T, cfg.n_kv_heads, G, hd)
    kv = "bksd" if heads_first else "bskd"
    logits = jnp.einsum(f"btkgd,{kv}->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / math.sqrt(hd))
    logits = jnp.where(mask[:, None, None, :, :], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv}->btkgd", probs, v)
    return out.reshape(B, T, cfg.n_heads * hd)


def _gpu_compute_capability() -> tuple[int, int] | None:
    """``(major, minor)`` of the first device when the default backend is an NVIDIA GPU, else None."""
    if jax.default_backend() != "gpu":
        return None
    text = str(getattr(jax.devices()[0], "compute_capability", ""))
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:  # ROCm reports no CUDA compute capability: no cuDNN
        return None


def _cudnn_unsupported(cfg: ModelConfig) -> str | None:
    """Why cuDNN flash attention cannot run this model here (None when it can): backend, dtype and head width.

    Sequence-length limits depend on the call (see :func:`attention_implementation`).
    """
    capability = _gpu_compute_capability()
    if capability is None:
        return (f"cuDNN flash attention needs an NVIDIA GPU, but the JAX backend is {jax.default_backend()!r}; "
                "use attention='xla' (any backend) or 'auto' (cuDNN where it applies, XLA elsewhere)")
    if capability < (8, 0):
        return (f"cuDNN flash attention needs compute capability >= 8.0 (Ampere), this GPU has "
                f"{capability[0]}.{capability[1]}; use attention='xla'")
    if cfg.dtype not in ("bfloat16", "float16"):
        return (f"cuDNN flash attention needs a bfloat16 or float16 compute dtype, the model computes in "
                f"ModelConfig.dtype={cfg.dtype!r}; use attention='xla' or a half-precision dtype")
    max_head_dim = 256 if capability >= (9, 0) else 128
    if cfg.head_dim % 8 or cfg.head_dim > max_head_dim:
        return (f"cuDNN flash attention needs head_dim a multiple of 8 and <= {max_head_dim} on this GPU, got "
                f"{cfg.head_dim}; use attention='xla'")
    return None


def attention_implementation(cfg: ModelConfig, query_len: int, key_len: int) -> str:
    """The attention kernel a call with ``query_len`` queries over ``key_len`` keys runs: ``"reference"``, ``"xla"``
    or ``"cudnn"`` (resolves ``ModelConfig.attention="auto"``; raises for ``"cudnn"`` where cuDNN cannot run).

    ``"auto"`` is cuDNN flash attention on an NVIDIA GPU (compute capability >= 8.0) when the compute dtype is
    bfloat16/float16, the head width is supported and both lengths are even (cuDNN's limit for a masked backward
    pass; a single-token decode step therefore runs XLA), and the XLA path everywhere else. On TPU it is the XLA path,
    which materialises the ``[B, N, T, S]`` float32 scores like the reference (fine at the 512-token sequences of the
    profiles): Pallas splash attention is not wired in because no TPU was available to test it.

    The cuDNN path has not yet run on a GPU (none was available when it was written): only its selection and errors
    are tested (with a simulated GPU). Check it against ``"xla"`` on a GPU before relying on it; that is why the
    default is ``"xla"``, not ``"auto"``.
    """
    choice = cfg.attention
    if choice in ("reference", "xla"):
        return choice
    reason = _cudnn_unsupported(cfg)
    if choice == "cudnn":
        if reason is not None:
            raise ValueError(f"ModelConfig.attention='cudnn': {reason}")
        return "cudnn"
    if reason is None and query_len % 2 == 0 and key_len % 2 == 0:
        return "cudnn"
    return "xla"


def _attention(cfg: ModelConfig, q, k, v, mask, *, causal: bool = False):
    """q [B,T,Hq,hd], k/v [B,S,Hkv,hd], mask [B,T,S] bool -> [B,T,Hq*hd], by ``cfg.attention``.

    ``causal`` says that ``mask`` already contains the (top-left aligned, T == S) causal mask, so a kernel may skip
    the blocks above the diagonal. Query rows without any visible key (padding queries) never give NaN: the reference
    and XLA paths average the values uniformly; the cuDNN path lets such rows see every key the causal mask allows
    (they are padding and their output is unspecified, but it is finite, and so are the gradients through it).
    """
    B, T, _, hd = q.shape
    impl = attention_implementation(cfg, T, k.shape[1])
    if impl == "reference":
        return _attention_reference(cfg, q, k, v, mask)
    if impl == "cudnn":
        mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)
    # Layout [B, T, N, H]; grouped-query attention by K/V having fewer heads. XLA: float32 scores and softmax,
    # probabilities cast to the value dtype, as the reference; cuDNN keeps its online-softmax statistics in float32.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], is_causal=causal and impl == "cudnn",
                                       implementation=impl)
    return out.reshape(B, T, cfg.n_heads * hd)


def _block(cfg: ModelConfig, lp: dict, h, cos, sin, mask, store_kv=None, causal=False):
    """One pre-norm transformer block. Returns ``(h, kv)``.

    Without ``store_kv`` the queries attend to this call's keys/values (``cfg.attention``) and ``kv`` is the fresh
    ``(k, v)`` [B,T,Hkv,hd]. With a KV cache, ``store_kv(k, v) -> (keys, values, kv)`` writes the new keys/values into
    the cache and returns what the queries attend to (this layer's cache slots, [B,Hkv,S,hd]) and the updated cache,
    passed back as ``kv``."""
    B, T, _ = h.shape
    x = _norm(cfg, lp["attn_norm"], h)
    q = _dense(x, lp["wq"], lp.get("bq")).reshape(B, T, cfg.n_heads, cfg.head_dim)
    k = _dense(x, lp["wk"], lp.get("bk")).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
    v = _dense(x, lp["wv"], lp.get("bv")).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
    if cfg.positional == "rope":
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)
    if store_kv is not None:
        keys, values, kv = store_kv(k, v)
        attn = _attention_reference(cfg, q, keys.astype(q.dtype), values.astype(q.dtype), mask, heads_first=True)
    else:
        kv = (k, v)
        attn = _attention(cfg, q, k, v, mask, causal=causal)
    h = h + _dense(attn, lp["wo"], lp.get("bo"))

    x = _norm(cfg, lp["mlp_norm"], h)
    if cfg.activation == "swiglu":
        gate = _dense(x, lp["w_gate"], lp.get("b_gate"))
        up = _dense(x, lp["w_up"], lp.get("b_up"))
        y = jax.nn.silu(gate) * up
    else:
        y = jax.nn.gelu(_dense(x, lp["w_up"], lp.get("b_up")), approximate=True)
    h = h + _dense(y, lp["w_down"], lp.get("b_down"))
    return h, kv


def _remat(cfg: ModelConfig, fn):
    if cfg.remat == "none":
        return fn
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def _embed(cfg: ModelConfig, params: Params, tokens, positions):
    h = jnp.take(params["embed"], tokens, axis=0).astype(cfg.compute_dtype)
    if cfg.positional == "learned":
        h = h + jnp.take(params["pos_embed"], positions, axis=0, mode="clip").astype(cfg.compute_dtype)
    return h


def _positions_from_mask(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


# ---------------------------------------------------------------------------
# Public functional API
# ---------------------------------------------------------------------------

def unembed(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """Project final (already normalised) hidden states ``[..., D]`` to float32
    logits ``[..., V]``."""
    h = hidden.astype(config.compute_dtype)
    rows = h.reshape(-1, h.shape[-1])
    if config.tie_embeddings:
        w = params["embed"].astype(h.dtype)
        logits = jnp.einsum("nd,vd->nv", rows, w, preferred_element_type=jnp.float32)
    else:
        w = params["lm_head"].astype(h.dtype)
        logits = jnp.dot(rows, w, preferred_element_type=jnp.float32)
    return logits.reshape(h.shape[:-1] + (w.shape[0] if config.tie_embeddings else w.shape[1],))


def forward(config: ModelConfig, params: Params, tokens: jax.Array,
            positions: jax.Array | None = None, mask: jax.Array | None = None,
            *, return_hidden: bool = False, inputs_hidden: jax.Array | None = None,
            activation_sharding=None) -> jax.Array:
    """Causal LM forward pass.

    Args:
      config: model config (static; hashable).
      params: parameter pytree (see module docstring).
      tokens: int ``[B, T]``.
      positions: int ``[B, T]`` position ids. Default: ``arange(T)``, or, if a
        ``[B, T]`` mask is given, ``cumsum(mask) - 1`` (correct for left padding).
      mask: optional. ``[B, T]`` (1/True = real token, 0 = padding; keys that are
        padding are never attended to) or ``[B, T, T]`` boolean attention mask
        (query, key), combined with the causal mask (e.g. for packed sequences).
      inputs_hidden: optional ``[B, T, D]`` residual-stream input that replaces the token (and position)
        embedding, e.g. cached activations of lower layers when ``params`` holds only the top layers (see
        :func:`split_layers`). ``tokens`` then only sets the shape.
      activation_sharding: optional sharding of the ``[B, T, D]`` residual stream (e.g. the batch over the
        data-parallel mesh axes), applied to every block's input. Without it XLA may shard the activations like the
        FSDP-sharded weights (along ``D``) and keep the whole batch on every device.
      return_hidden: if True return the final-norm hidden states ``[B, T, D]``
        (compute dtype) instead of logits; project with :func:`unembed`.

    Returns:
      float32 logits ``[B, T, V]`` (or hidden states, see above). Outputs at
      padding positions are unspecified.
    """
    h = residual_stream(config, params, tokens, positions, mask, inputs_hidden=inputs_hidden,
                        activation_sharding=activation_sharding)
    h = _norm(config, params["final_norm"], h)
    if return_hidden:
        return h
    return unembed(config, params, h)


def residual_stream(config: ModelConfig, params: Params, tokens: jax.Array,
                    positions: jax.Array | None = None, mask: jax.Array | None = None,
                    *, inputs_hidden: jax.Array | None = None, activation_sharding=None) -> jax.Array:
    """The residual stream after every block of ``params``, before the final norm (arguments as :func:`forward`).

    Run on the lower part of :func:`split_layers`, this is the ``inputs_hidden`` of the upper part.
    """
    h, _ = _blocks(config, params, tokens, positions, mask, inputs_hidden=inputs_hidden,
                   activation_sharding=activation_sharding)
    return h


def _blocks(cfg: ModelConfig, params: Params, tokens, positions, mask, *, inputs_hidden=None,
            activation_sharding=None, keep_kv: bool = False):
    """Embedding and every block (causal self-attention): ``(h, kv)``, the residual stream and, with ``keep_kv``,
    every layer's keys and values ``[L, B, T, Hkv, hd]`` (else None)."""
    B, T = tokens.shape
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    if mask is None:
        attn_mask = jnp.broadcast_to(causal, (B, T, T))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    elif mask.ndim == 2:
        mask = mask.astype(bool)
        attn_mask = causal & mask[:, None, :]
        if positions is None:
            positions = _positions_from_mask(mask)
    elif mask.ndim == 3:
        attn_mask = causal & mask.astype(bool)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    else:
        raise ValueError(f"mask must be [B, T] or [B, T, T], got shape {mask.shape}")
    positions = jnp.asarray(positions, jnp.int32)

    h = _embed(cfg, params, tokens, positions) if inputs_hidden is None else inputs_hidden.astype(cfg.compute_dtype)
    cos, sin = _rope_cos_sin(cfg, positions) if cfg.positional == "rope" else (None, None)

    def constrain(h):
        return h if activation_sharding is None else jax.lax.with_sharding_constraint(h, activation_sharding)

    def layer(h, lp):
        h, kv = _block(cfg, lp, constrain(h), cos, sin, attn_mask, causal=True)
        return h, (kv if keep_kv else None)

    return jax.lax.scan(_remat(cfg, layer), constrain(h), params["layers"], unroll=cfg.scan_unroll)


def split_layers(config: ModelConfig, params: Params, num_lower: int):
    """Splits a model into its first ``num_lower`` blocks and the rest.

    Returns ``(lower_config, lower_params, upper_config, upper_params)``. Running the lower part with
    ``forward(..., return_hidden=True)`` would apply the final norm, so use :func:`residual_stream` for its output;
    the upper part takes that as ``inputs_hidden`` and keeps the embedding (for the unembedding) and final norm.
    """
    if not 0 < num_lower < config.n_layers:
        raise ValueError(f"num_lower must be in [1, {config.n_layers - 1}], got {num_lower}")
    lower_config = config.replace(n_layers=num_lower)
    upper_config = config.replace(n_layers=config.n_layers - num_lower)
    lower = {**params, "layers": jax.tree.map(lambda a: a[:num_lower], params["layers"])}
    upper = {**params, "layers": jax.tree.map(lambda a: a[num_lower:], params["layers"])}
    return lower_config, lower, upper_config, upper


def join_layers(lower_params: Params, upper_params: Params) -> Params:
    """Inverse of :func:`split_layers`: stacks the blocks again (the other weights are taken from the upper part)."""
    layers = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), lower_params["layers"], upper_params["layers"])
    return {**upper_params, "layers": layers}


def token_log_probs(config: ModelConfig, params: Params, hidden: jax.Array,
                    targets: jax.Array, vocab_chunk: int | None = None) -> jax.Array:
    """log p(targets) ``[B, T]`` (float32) from final hidden states ``[B, T, D]``.

    With ``vocab_chunk`` the log-normaliser is accumulated over vocabulary chunks
    (``lax.scan`` over slices of the unembedding), so ``[B, T, V]`` logits are
    never materialised at once. ``vocab_chunk`` must divide ``vocab_size``.
    """
    V = config.vocab_size
    h = hidden.astype(config.compute_dtype)
    w = params["embed"] if config.tie_embeddings else params["lm_head"].T  # [V, D]
    w_t = jnp.take(w, targets, axis=0).astype(h.dtype)  # [B, T, D]
    target_logit = jnp.einsum("...d,...d->...", h, w_t, preferred_element_type=jnp.float32)
    if vocab_chunk is None or vocab_chunk >= V:
        lse = jax.nn.logsumexp(unembed(config, params, hidden), axis=-1)
        return target_logit - lse
    if V % vocab_chunk:
        raise ValueError(f"vocab_chunk={vocab_chunk} must divide vocab_size={V}")
    wc = w.reshape(V // vocab_chunk, vocab_chunk, -1)

    def step(carry, w_chunk):
        m, s = carry
        logits = jnp.einsum("...d,vd->...v", h, w_chunk.astype(h.dtype),
                            preferred_element_type=jnp.float32)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
        return (m_new, s), None

    init = (jnp.full(h.shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(h.shape[:-1], jnp.float32))
    (m, s), _ = jax.lax.scan(jax.checkpoint(step), init, wc)
    return target_logit - (m + jnp.log(s))


# ---------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------

def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache for ``max_len`` token slots.

    Fields: ``k``/``v`` ``[L, B, n_kv_heads, max_len, head_dim]`` (heads before slots: a decode step's attention reads
    each layer's cache as it is, without a transposed copy), ``mask`` ``[B, max_len]`` (slot holds a real token),
    ``pos`` ``[B]`` (next position id per row), ``index`` (scalar, next slot to write; shared by the batch).
    """
    dt = jnp.dtype(dtype) if dtype is not None else config.compute_dtype
    shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
    return {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "mask": jnp.zeros((batch_size, max_len), bool),
        "pos": jnp.zeros((batch_size,), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def prefill(config: ModelConfig, params: Params, tokens: jax.Array, mask: jax.Array, max_len: int,
            dtype=None) -> tuple[jax.Array, dict]:
    """Run a LEFT-padded prompt batch ``tokens [B, P]`` (``mask`` True = real token) and start a KV cache of
    ``max_len >= P`` slots from it.

    The prompt attends only to itself (causal and padding mask, ``config.attention``), so it costs what a forward
    pass costs; its keys/values fill slots ``[0, P)``. Returns ``(hidden [B, D], cache)``: the final-norm hidden
    state of the last column only (the only position whose logits generation needs: :func:`unembed` it), and the
    cache, equal to what :func:`decode_step` leaves after the same prompt.
    """
    cfg = config
    B, P = tokens.shape
    if max_len < P:
        raise ValueError(f"max_len {max_len} < prompt length {P}")
    mask = mask.astype(bool)
    h, (k, v) = _blocks(cfg, params, tokens, None, mask, keep_kv=True)
    h = _norm(cfg, params["final_norm"], h[:, -1])
    dt = jnp.dtype(dtype) if dtype is not None else cfg.compute_dtype
    slots = ((0, 0), (0, 0), (0, 0), (0, max_len - P), (0, 0))
    cache = {
        "k": jnp.pad(jnp.swapaxes(k, 2, 3).astype(dt), slots),
        "v": jnp.pad(jnp.swapaxes(v, 2, 3).astype(dt), slots),
        "mask": jnp.pad(mask, ((0, 0), (0, max_len - P))),
        "pos": jnp.sum(mask, axis=-1, dtype=jnp.int32),
        "index": jnp.asarray(P, jnp.int32),
    }
    return h, cache


def repeat_cache(cache: dict, repeats: int) -> dict:
    """Every row of ``cache`` ``repeats`` times in a row (row ``r`` of the result is row ``r // repeats``): one
    prompt's prefill shared by its ``repeats`` samples."""
    batch_axis = {"k": 1, "v": 1, "mask": 0, "pos": 0}
    return {name: (jnp.repeat(value, repeats, axis=batch_axis[name]) if name in batch_axis else value)
            for name, value in cache.items()}


def decode_step(config: ModelConfig, params: Params, tokens: jax.Array, cache: dict,
                mask: jax.Array | None = None, positions: jax.Array | None = None,
                *, return_hidden: bool = False):
    """Run ``tokens [B, T]`` (T >= 1: a single decode step, or a whole continuation
    scored at once) through the model, attending to everything already in ``cache``.

    Tokens are written to slots ``[index, index + T)``. ``mask [B, T]`` marks real
    tokens (0 = padding, e.g. left padding of a prompt); padding slots are never
    attended to and do not advance the row's position. ``positions`` default to
    ``cache["pos"] + cumsum(mask) - 1``. The cache is updated in place when the
    caller donates it (or carries it through a loop, as :func:`generate` does).

    Returns ``(logits [B, T, V] float32 (or hidden), new_cache)``.
    """
    cfg = config
    B, T = tokens.shape
    S = cache["k"].shape[3]
    index = cache["index"]
    if mask is None:
        mask = jnp.ones((B, T), bool)
    mask = mask.astype(bool)
    if positions is None:
        positions = cache["pos"][:, None] + jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
        positions = jnp.maximum(positions, 0)
    positions = jnp.asarray(positions, jnp.int32)

    kv_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
    slot = jnp.arange(S)[None, None, :]
    qslot = index + jnp.arange(T)[None, :, None]
    attn_mask = kv_mask[:, None, :] & (slot <= qslot)

    h = _embed(cfg, params, tokens, positions)
    cos, sin = _rope_cos_sin(cfg, positions) if cfg.positional == "rope" else (None, None)

    def layer(carry, lp):
        h, cache_k, cache_v, i = carry

        def store_kv(k, v):
            # The whole cache is the loop carry and only the new slots are written, in place: returning each
            # layer's slice as a scan output would copy the full cache on every decode step.
            at = (i, 0, 0, index, 0)
            cache_k_new = jax.lax.dynamic_update_slice(cache_k, jnp.swapaxes(k, 1, 2)[None].astype(cache_k.dtype), at)
            cache_v_new = jax.lax.dynamic_update_slice(cache_v, jnp.swapaxes(v, 1, 2)[None].astype(cache_v.dtype), at)
            return cache_k_new[i], cache_v_new[i], (cache_k_new, cache_v_new)

        h, (cache_k, cache_v) = _block(cfg, lp, h, cos, sin, attn_mask, store_kv)
        return (h, cache_k, cache_v, i + 1), None

    (h, new_k, new_v, _), _ = jax.lax.scan(layer, (h, cache["k"], cache["v"], jnp.zeros((), jnp.int32)),
                                           params["layers"])
    h = _norm(cfg, params["final_norm"], h)
    new_cache = {
        "k": new_k,
        "v": new_v,
        "mask": kv_mask,
        "pos": cache["pos"] + jnp.sum(mask, axis=-1, dtype=jnp.int32),
        "index": index + T,
    }
    out = h if return_hidden else unembed(cfg, params, h)
    return out, new_cache
