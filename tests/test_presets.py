"""The smollm2-1.7b and llama-3.1-8b presets: their published config.json values, parameter counts checked against an
independent closed-form count, their Hub repositories, and a clear error (naming the preset and how to supply local
files) when the Hub cannot be reached. Nothing is downloaded: the Hub client is replaced in every test."""

from __future__ import annotations

import json

import pytest

from mopo_jax import models as M
from mopo_jax.models.config import HUB_REPOS

huggingface_hub = pytest.importorskip("huggingface_hub")

# The architecture fields of the published config.json files (HuggingFaceTB/SmolLM2-1.7B-Instruct,
# meta-llama/Llama-3.1-8B-Instruct).
PUBLISHED = {
    "smollm2-1.7b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": 49152,
        "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
        "intermediate_size": 8192, "rms_norm_eps": 1e-5, "rope_theta": 130000, "rope_scaling": None,
        "max_position_embeddings": 8192, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": 128256,
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": 131072, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    },
}


def _closed_form_params(hf: dict) -> int:
    """Llama parameter count from the config.json fields: per layer q/o (d x d), k/v (d x kv), gate/up/down
    (d x f) and two RMS norms; the embedding, a separate lm_head unless tied, and the final norm."""
    d, f, layers, vocab = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"], hf["vocab_size"]
    kv = d // hf["num_attention_heads"] * hf["num_key_value_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    heads = 1 if hf["tie_word_embeddings"] else 2
    return layers * per_layer + heads * vocab * d + d


@pytest.mark.parametrize("name,approx", [("smollm2-1.7b", 1.71e9), ("llama-3.1-8b", 8.03e9)])
def test_parameter_count(name, approx):
    cfg = M.get_preset(name)
    n = M.count_params(M.param_shapes(cfg))
    assert n == _closed_form_params(PUBLISHED[name]) == cfg.num_params()
    assert abs(n - approx) < 0.005e9, n


def test_published_values():
    cfg = M.get_preset("smollm2-1.7b")
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim) == (
        49152, 2048, 24, 32, 32, 64, 8192)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len, cfg.tie_embeddings) == (
        1e-5, 130000.0, None, 8192, True)
    # The tokenizer of smollm2-135m: same vocabulary and special ids.
    small = M.get_preset("smollm2-135m")
    assert (cfg.vocab_size, cfg.bos_id, cfg.eos_id, cfg.pad_id) == (small.vocab_size, small.bos_id, small.eos_id,
                                                                      small.pad_id)
    cfg = M.get_preset("llama-3.1-8b")
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim) == (
        128256, 4096, 32, 32, 8, 128, 14336)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.max_seq_len, cfg.tie_embeddings) == (1e-5, 500000.0, 131072, False)
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
            cfg.rope_original_max_len) == ("llama3", 8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_equals_the_published_config_json(name):
    assert M.config_from_hf(PUBLISHED[name]) == M.get_preset(name)


def test_presets_name_their_hub_repositories():
    assert HUB_REPOS == {"smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
                         "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct"}


@pytest.mark.parametrize("name", ["smollm2-1.7b", "SmolLM2-1.7B-Instruct", "llama-3.1-8b"])
def test_offline_load_names_the_preset_and_how_to_supply_local_files(name, monkeypatch):
    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError(f"offline: cannot reach the Hub for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    key = "llama-3.1-8b" if "llama" in name else "smollm2-1.7b"
    with pytest.raises(OSError) as info:
        M.load_pretrained(name)
    message = str(info.value)
    assert f"preset {key!r}" in message and HUB_REPOS[key] in message
    assert "LocalEntryNotFoundError" in message and "load_pretrained('DIR')" in message
    assert f"hf download {HUB_REPOS[key]} --local-dir DIR" in message
    assert ("gated" in message) == (key == "llama-3.1-8b")


def test_online_load_downloads_the_preset_repository(monkeypatch, tmp_path):
    # A stand-in snapshot with the published config.json and no weights: load_pretrained asked the Hub for the
    # preset's repository and read its config; the missing safetensors are the (clear) next error.
    asked = []

    def snapshot(repo_id, **kwargs):
        asked.append(repo_id)
        (tmp_path / "config.json").write_text(json.dumps(PUBLISHED["smollm2-1.7b"]))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        M.load_pretrained("smollm2-1.7b")
    assert asked == ["HuggingFaceTB/SmolLM2-1.7B-Instruct"]
