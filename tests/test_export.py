"""`save_pretrained` / `mopo export` against transformers: a model read into mopo-jax and written back is the same
model to transformers (every tensor, the logits), whatever the architecture, the dtype or the sharding of the files;
a configuration no Hugging Face architecture expresses is refused by name."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lm_assets import HF_KINDS, hf_reference_model

from mopo_jax import models as M
from mopo_jax.models.export import config_to_hf, save_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("kind", HF_KINDS)
def test_a_model_written_back_is_the_same_model_to_transformers(kind, tmp_path):
    original = hf_reference_model(kind)
    original.save_pretrained(tmp_path / "original")
    config, params = M.load_pretrained(str(tmp_path / "original"), dtype="float32")
    written = save_pretrained(config, params, str(tmp_path / "exported"))
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["config.json", "model.safetensors"]

    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(exported) is type(original)
    theirs, ours = original.state_dict(), exported.state_dict()
    for name, tensor in theirs.items():
        if name.endswith(("attn.bias", "attn.masked_bias")):  # GPT-2's causal-mask buffers, not weights
            continue
        np.testing.assert_array_equal(ours[name].numpy(), tensor.numpy(), err_msg=f"{kind}: {name}")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 20))
    np.testing.assert_array_equal(_logits(exported, tokens), _logits(original, tokens))
    # And mopo-jax reads its own export back to the same parameters.
    again_config, again = M.load_pretrained(str(tmp_path / "exported"), dtype="float32")
    assert again_config.replace(bos_id=None, eos_id=None, pad_id=None) == config.replace(
        bos_id=None, eos_id=None, pad_id=None)
    read_back = dict(jax.tree_util.tree_flatten_with_path(again)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        np.testing.assert_array_equal(np.asarray(read_back[path]), np.asarray(leaf), err_msg=str(path))


def test_sharded_and_bfloat16_exports(tmp_path):
    original = hf_reference_model("llama-gqa-untied")
    original.save_pretrained(tmp_path / "original")
    config, params = M.load_pretrained(str(tmp_path / "original"), dtype="float32")
    written = save_pretrained(config, params, str(tmp_path / "sharded"), max_shard_bytes=40_000)
    shards = [p for p in written if p.endswith(".safetensors")]
    assert len(shards) > 2 and any(p.endswith("model.safetensors.index.json") for p in written)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original.state_dict())
    sharded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 16))
    np.testing.assert_array_equal(_logits(sharded, tokens), _logits(original, tokens))

    save_pretrained(config, params, str(tmp_path / "bf16"), dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    for name, tensor in original.state_dict().items():
        stored = half.state_dict()[name]
        assert stored.dtype == torch.bfloat16
        torch.testing.assert_close(stored, tensor.to(torch.bfloat16), rtol=0, atol=0)


def test_configurations_without_a_hugging_face_architecture_are_refused():
    base = M.get_preset("tiny") if "tiny" in M.PRESETS else next(iter(M.PRESETS.values()))
    llama = base.replace(norm="rms", activation="swiglu", positional="rope")
    with pytest.raises(NotImplementedError, match="attention_bias"):
        config_to_hf(llama.replace(qkv_bias=True, out_bias=False, mlp_bias=True))
    with pytest.raises(NotImplementedError, match="norm='layer'"):
        config_to_hf(llama.replace(norm="layer"))
    with pytest.raises(ValueError, match="export dtype"):
        save_pretrained(llama, {}, "/nonexistent", dtype="int8")
