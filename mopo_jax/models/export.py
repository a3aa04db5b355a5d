"""Writing a model as a Hugging Face directory (``config.json``, safetensors weights, the tokenizer's files): the
inverse of :func:`mopo_jax.models.load_pretrained` for the Llama family and GPT-2, so that
``transformers.AutoModelForCausalLM.from_pretrained(DIR)``, ``load_pretrained(DIR)`` and ``mopo generate --model
DIR`` read it back.

Like the loaders, this module imports nothing heavy at import time; the tokenizer's files are written by the
tokenizer object itself (``save_pretrained``).
"""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple

import numpy as np

from .config import ModelConfig

#: NumPy dtype name -> safetensors dtype code (the inverse of the reader's table in :mod:`.weights`).
_SAFETENSORS_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}

#: Above this many bytes the weights are split into ``model-0000i-of-0000n.safetensors`` files with an index, as
#: Hugging Face writes them (each file is then written, and held in memory, one tensor at a time).
DEFAULT_MAX_SHARD_BYTES = 5 << 30


def config_to_hf(config: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """``config.json`` of ``config``: ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM`` for q/k/v biases without an
    output bias) or ``GPT2LMHeadModel``. A configuration neither architecture expresses is refused, naming the
    field, rather than written as a model that would compute something else."""
    special = {k: v for k, v in (("bos_token_id", config.bos_id), ("eos_token_id", config.eos_id),
                                 ("pad_token_id", config.pad_id)) if v is not None}
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
              "torch_dtype": dtype or config.param_dtype, **special}
    if config.positional == "learned":
        if (config.norm, config.activation) != ("layer", "gelu"):
            raise NotImplementedError(f"export: learned positions with norm={config.norm!r}, activation="
                                      f"{config.activation!r} is no Hugging Face architecture (GPT-2 has layer norm "
                                      "and GELU)")
        if not (config.qkv_bias and config.out_bias and config.mlp_bias) or config.n_kv_heads != config.n_heads:
            raise NotImplementedError("export: GPT-2 has biases everywhere and no grouped-query attention")
        if config.head_dim * config.n_heads != config.d_model:
            raise NotImplementedError(f"export: GPT-2 needs head_dim * n_heads = d_model, got {config.head_dim} * "
                                      f"{config.n_heads} != {config.d_model}")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": config.d_model,
                "n_layer": config.n_layers, "n_head": config.n_heads, "n_inner": config.mlp_dim,
                "n_positions": config.max_seq_len, "n_ctx": config.max_seq_len,
                "layer_norm_epsilon": config.norm_eps, "activation_function": "gelu_new", **common}
    if (config.norm, config.activation, config.positional) != ("rms", "swiglu", "rope"):
        raise NotImplementedError(f"export: norm={config.norm!r}, activation={config.activation!r}, positional="
                                  f"{config.positional!r} is neither the Llama family's (rms, swiglu, rope) nor "
                                  "GPT-2's")
    qwen2 = config.qkv_bias and not config.out_bias and not config.mlp_bias
    if not qwen2 and config.qkv_bias != config.out_bias:
        raise NotImplementedError(f"export: qkv_bias={config.qkv_bias} with out_bias={config.out_bias}: Llama's "
                                  "attention_bias covers all four projections (Qwen2's q/k/v only, no MLP bias)")
    hf = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
          "model_type": "qwen2" if qwen2 else "llama", "hidden_size": config.d_model,
          "intermediate_size": config.mlp_dim, "num_hidden_layers": config.n_layers,
          "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
          "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_len,
          "rms_norm_eps": config.norm_eps, "hidden_act": "silu", "rope_theta": config.rope_theta, **common}
    if not qwen2:
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if config.rope_scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": config.rope_scaling_factor}
    elif config.rope_scaling == "llama3":
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": config.rope_scaling_factor,
                              "low_freq_factor": config.rope_low_freq_factor,
                              "high_freq_factor": config.rope_high_freq_factor,
                              "original_max_position_embeddings": config.rope_original_max_len}
    return hf


class HFTensor(NamedTuple):
    """One tensor of the exported checkpoint: its shape and dtype, and ``read()`` for its host array (called when
    its bytes are written, so a writer holds one tensor at a time)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]


def hf_tensors(config: ModelConfig, params) -> dict[str, HFTensor]:
    """The parameters under their Hugging Face names and layouts: ``[out, in]`` projections for the Llama family,
    GPT-2's ``[in, out]`` Conv1D weights with q/k/v fused into ``c_attn``; one tensor per layer."""
    layers = params["layers"]

    def one(leaf, transpose=False, layer=None):
        shape = tuple(leaf.shape[1:] if layer is not None else leaf.shape)

        def read():
            array = np.asarray(leaf if layer is None else leaf[layer])
            return np.ascontiguousarray(array.T if transpose else array)
        return HFTensor(shape[::-1] if transpose else shape, np.dtype(leaf.dtype), read)

    out: dict[str, HFTensor] = {}
    if config.positional == "learned":
        def fused(names, layer, axis):
            parts = [layers[n] for n in names]
            shape = list(parts[0].shape[1:])
            shape[axis] = sum(p.shape[1 + axis] for p in parts)
            return HFTensor(tuple(shape), np.dtype(parts[0].dtype),
                            lambda: np.concatenate([np.asarray(p[layer]) for p in parts], axis))

        out["transformer.wte.weight"] = one(params["embed"])
        out["transformer.wpe.weight"] = one(params["pos_embed"])
        for i in range(config.n_layers):
            pre = f"transformer.h.{i}."
            out[pre + "ln_1.weight"] = one(layers["attn_norm"]["scale"], layer=i)
            out[pre + "ln_1.bias"] = one(layers["attn_norm"]["bias"], layer=i)
            out[pre + "attn.c_attn.weight"] = fused(("wq", "wk", "wv"), i, axis=1)
            out[pre + "attn.c_attn.bias"] = fused(("bq", "bk", "bv"), i, axis=0)
            out[pre + "attn.c_proj.weight"] = one(layers["wo"], layer=i)
            out[pre + "attn.c_proj.bias"] = one(layers["bo"], layer=i)
            out[pre + "ln_2.weight"] = one(layers["mlp_norm"]["scale"], layer=i)
            out[pre + "ln_2.bias"] = one(layers["mlp_norm"]["bias"], layer=i)
            out[pre + "mlp.c_fc.weight"] = one(layers["w_up"], layer=i)
            out[pre + "mlp.c_fc.bias"] = one(layers["b_up"], layer=i)
            out[pre + "mlp.c_proj.weight"] = one(layers["w_down"], layer=i)
            out[pre + "mlp.c_proj.bias"] = one(layers["b_down"], layer=i)
        out["transformer.ln_f.weight"] = one(params["final_norm"]["scale"])
        out["transformer.ln_f.bias"] = one(params["final_norm"]["bias"])
    else:
        projections = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                       "o": "self_attn.o_proj", "_gate": "mlp.gate_proj", "_up": "mlp.up_proj",
                       "_down": "mlp.down_proj"}
        out["model.embed_tokens.weight"] = one(params["embed"])
        for i in range(config.n_layers):
            pre = f"model.layers.{i}."
            out[pre + "input_layernorm.weight"] = one(layers["attn_norm"]["scale"], layer=i)
            for ours, theirs in projections.items():
                out[pre + theirs + ".weight"] = one(layers["w" + ours], transpose=True, layer=i)
                if "b" + ours in layers:
                    out[pre + theirs + ".bias"] = one(layers["b" + ours], layer=i)
            out[pre + "post_attention_layernorm.weight"] = one(layers["mlp_norm"]["scale"], layer=i)
        out["model.norm.weight"] = one(params["final_norm"]["scale"])
    if not config.tie_embeddings:
        out["lm_head.weight"] = one(params["lm_head"], transpose=True)
    return out


def _safetensors_header(entries: list[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
    """The JSON header of a safetensors file holding ``entries`` in order, padded to 8 bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_CODES[dtype.name], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def save_pretrained(config: ModelConfig, params, directory: str, tokenizer=None, dtype: str | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Writes ``params`` as a Hugging Face model directory and returns the files written.

    Args:
      config, params: the model (host arrays, arrays of this process's devices, or :class:`LazyTensor` leaves).
      directory: a local path or a URL (``gs://``); each file is written to a temporary name and renamed.
      tokenizer: a tokenizer with ``save_pretrained`` (:func:`mopo_jax.models.load_tokenizer`), or None.
      dtype: ``float32``, ``bfloat16`` or ``float16`` (default: each parameter's own dtype).
      max_shard_bytes: weights beyond this size are split into several files with
        ``model.safetensors.index.json``.
    """
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)

    from mopo_jax import storage

    if dtype is not None and dtype not in _SAFETENSORS_CODES:
        raise ValueError(f"export dtype must be one of {sorted(_SAFETENSORS_CODES)}, got {dtype!r}")
    hf_config = config_to_hf(config, dtype)
    tensors = hf_tensors(config, params)
    entries = [(name, np.dtype(dtype) if dtype else t.dtype, t.shape) for name, t in tensors.items()]
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = int(np.prod(entry[2], dtype=np.int64)) * entry[1].itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    root = storage.path(directory)
    written = []
    for file_name, shard in zip(names, shards):
        def write(handle, shard=shard):
            handle.write(len(header := _safetensors_header(shard)).to_bytes(8, "little"))
            handle.write(header)
            for name, stored, _ in shard:
                handle.write(np.ascontiguousarray(tensors[name].read().astype(stored, copy=False)).tobytes())
        storage.save_streamed(root / file_name, write)
        written.append(str(root / file_name))
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, shard in zip(names, shards) for name, _, _ in shard}
        total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, d, s in entries)
        storage.save_json(root / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(str(root / "model.safetensors.index.json"))
    storage.save_json(root / "config.json", hf_config)
    written.append(str(root / "config.json"))
    if tokenizer is not None:
        if not storage.is_local(directory):
            raise ValueError(f"{directory}: tokenizer files are written to a local directory only (copy them after)")
        written.extend(tokenizer.save_pretrained(str(root)))
    return written
