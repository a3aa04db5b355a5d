"""``mopo bench generate``: our sampler against transformers' ``generate`` on the same model, prompts and settings.

Workload (defaults: the sampling of the HH experiment at its size): a Llama-family preset (SmolLM2-135M) with random
weights in float32, ``prompts`` random prompts of ``prompt_len`` tokens, ``new_tokens`` sampled tokens each
(temperature, top-p as given; no end-of-sequence stop on either side, so both produce every token). JAX:
:func:`mopo_jax.models.generate`. PyTorch: ``LlamaForCausalLM.generate(do_sample=True, top_k=0, min_new_tokens =
max_new_tokens)`` with the same configuration. The two run in turn (:mod:`mopo_jax.bench.timing`), after one untimed
round each (compilation, allocator warm-up).

FLOP accounting: the prefill runs every prompt token through the blocks (``2 N_blocks + 4 L T H`` per token, ``T``
its position) and unembeds the last prompt position only; each new token costs ``2 N + 4 L T H``, unembedding
included (``N`` as in :mod:`mopo_jax.bench.step`). The compute-bound limit is these FLOPs at the matmul peak
measured in the same run; "fraction of the limit" is the limit's time over the measured time.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import jax
import numpy as np

from mopo_jax.bench.peak import measure_matmul_peak
from mopo_jax.bench.step import matmul_params
from mopo_jax.bench.timing import interleaved_seconds, ratio_summary
from mopo_jax.models import ModelConfig, generate, get_preset, init_params


def generation_flops(config: ModelConfig, prompts: int, prompt_len: int, new_tokens: int) -> float:
    """Model FLOPs of sampling ``new_tokens`` after ``prompt_len``-token prompts (module docstring)."""
    unembedding = config.d_model * config.vocab_size
    blocks = matmul_params(config) - unembedding
    attention = 4 * config.n_layers * config.n_heads * config.head_dim  # per token and attended position
    prefill = sum(2 * blocks + attention * (t + 1) for t in range(prompt_len)) + 2 * unembedding
    decode = sum(2 * (blocks + unembedding) + attention * (prompt_len + t + 1) for t in range(new_tokens - 1))
    return float(prompts * (prefill + decode))


def llama_config_kwargs(config: ModelConfig) -> dict[str, Any]:
    """``transformers.LlamaConfig`` keyword arguments of a Llama-family :class:`ModelConfig`."""
    if (config.norm, config.positional, config.activation) != ("rms", "rope", "swiglu") or config.rope_scaling:
        raise ValueError(f"the PyTorch side needs a plain Llama-family model (RMSNorm, RoPE without scaling, "
                         f"SwiGLU); {config.name!r} is norm={config.norm!r}, positional={config.positional!r}, "
                         f"activation={config.activation!r}, rope_scaling={config.rope_scaling!r}")
    return dict(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.mlp_dim,
                num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rope_theta=config.rope_theta,
                rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
                max_position_embeddings=config.max_seq_len, attention_bias=config.qkv_bias,
                mlp_bias=config.mlp_bias)


def _torch_sampler(config: ModelConfig, prompt_tokens: np.ndarray, new_tokens: int, temperature: float,
                   top_p: float | None, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(config))).to(torch.float32).eval()
    ids = torch.as_tensor(prompt_tokens, dtype=torch.long)
    attention = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0 if top_p is None else top_p, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")

    return run, model.config._attn_implementation


def generate_report(preset: str = "smollm2-135m", prompts: int = 64, prompt_len: int = 96, new_tokens: int = 32,
                    temperature: float = 1.0, top_p: float | None = None, repeats: int = 3,
                    compare_torch: bool = True, seed: int = 0) -> dict[str, Any]:
    """The ``mopo bench generate`` report (module docstring)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the benchmark samples), got {temperature}")
    config = get_preset(preset)
    params = init_params(config, jax.random.PRNGKey(seed))
    prompt_tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (prompts, prompt_len)).astype(np.int32)
    prompt_mask = np.ones_like(prompt_tokens, bool)
    rng = jax.random.PRNGKey(seed + 1)

    def run_jax():
        out = generate(config, params, prompt_tokens, new_tokens, prompt_mask=prompt_mask, temperature=temperature,
                       top_p=top_p, rng=rng)
        jax.block_until_ready(out)
        if not bool(out.mask.all()):
            raise RuntimeError("the JAX sampler stopped early although no end-of-sequence token is set")

    contenders = {"jax": run_jax}
    report: dict[str, Any] = {
        "preset": preset, "prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "temperature": temperature, "top_p": top_p, "repeats": repeats, "jax_version": jax.__version__,
        "device": {"platform": jax.devices()[0].platform, "kind": jax.devices()[0].device_kind,
                   "cpu_count": os.cpu_count()},
        "flop_accounting": __doc__.split("FLOP accounting: ")[1].split("\n\n")[0].replace("\n", " "),
    }
    if compare_torch:
        import torch

        run_torch, attention = _torch_sampler(config, prompt_tokens, new_tokens, temperature, top_p, seed)
        contenders["torch"] = run_torch
        report["torch"] = {"version": torch.__version__, "num_threads": torch.get_num_threads(),
                           "attn_implementation": attention}
    seconds = interleaved_seconds(contenders, repeats)
    flops = generation_flops(config, prompts, prompt_len, new_tokens)
    peak = measure_matmul_peak()
    report["peak"] = {"source": "matmul measured in this run", **peak}
    limit = flops / peak["flops_per_second"]
    report["model_flops"] = flops
    report["compute_bound_seconds"] = limit
    for name, times in seconds.items():
        median = statistics.median(times)
        report[name] = {**report.get(name, {}), "seconds": times, "median_seconds": median,
                        "new_tokens_per_second": prompts * new_tokens / median,
                        "fraction_of_compute_bound_limit": limit / median}
    if compare_torch:
        report["jax_over_torch"] = ratio_summary(seconds["jax"], seconds["torch"])
    return report
