"""Decoder-only transformer models (Llama family, GPT-2) as pure functions over a
params pytree, plus pretrained loading (GGUF / HF safetensors), tokenizers and
KV-cache generation.

Importing this package does not import torch, transformers, tokenizers, gguf or
safetensors; those are imported lazily by the loaders.
"""

from .config import ModelConfig, PRESETS, config_from_hf, get_preset
from .generation import (GenerateOutput, chat_prompt_ids, continuation_log_probs, generate, generate_cli, left_pad,
                         sample_tokens)
from .tokenizer import CHATML_TEMPLATE, load_tokenizer
from .transformer import (
    count_params,
    decode_step,
    forward,
    init_cache,
    init_params,
    param_logical_axes,
    param_shapes,
    prefill,
    repeat_cache,
    residual_stream,
    split_layers,
    join_layers,
    token_log_probs,
    unembed,
)
from .weights import GGUF_MODELS, load_pretrained, resolve_model

__all__ = [
    "ModelConfig", "PRESETS", "get_preset", "config_from_hf",
    "init_params", "forward", "unembed", "token_log_probs", "param_logical_axes",
    "param_shapes", "count_params", "init_cache", "prefill", "repeat_cache", "decode_step", "residual_stream", "split_layers", "join_layers",
    "load_pretrained", "resolve_model", "GGUF_MODELS", "load_tokenizer", "CHATML_TEMPLATE",
    "generate", "continuation_log_probs", "sample_tokens", "generate_cli", "GenerateOutput", "left_pad", "chat_prompt_ids", "Transformer",
]


def __getattr__(name):
    # The NNX module imports flax; load it only when asked for.
    if name == "Transformer":
        from .nnx_model import Transformer

        return Transformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
