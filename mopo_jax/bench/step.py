"""``mopo bench step``: throughput, model FLOPs and MFU of the train step, and the side-by-side against PyTorch.

FLOP accounting (stated in every report): per token, a forward pass costs ``2 N + 4 L T H`` where ``N`` counts the
weights that enter matrix multiplies (attention and MLP projections of every layer plus the unembedding; the
embedding lookup is free), ``L`` layers, ``T`` the sequence length and ``H = n_heads * head_dim`` (the ``QK^T`` and
``AV`` products, without halving for causality); the unembedding counts only on the positions that are unembedded
(all of them, or the completion region when ``completion_start`` skips the prompt). The policy's forward and
backward count three forward passes (``6 N`` per token plus attention); a live reference adds one forward pass.
Rematerialisation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import numpy as np

from mopo_jax.bench.peak import device_peak_flops, measure_matmul_peak
from mopo_jax.bench.timing import interleaved_seconds, ratio_summary
from mopo_jax.models import ModelConfig, get_preset, init_params
from mopo_jax.policy_objectives import Objective, objective_class
from mopo_jax.state import MOPOConfig
from mopo_jax.parallel import sharding
from mopo_jax.training.train_step import (
    OptimizerConfig,
    TrainConfig,
    compile_train_step,
    init_train_state,
    make_optimizer,
)

# The side-by-side workload (the same numbers as mopo_jax.bench.torch_reference.REFERENCE_LLAMA).
COMPARISON_MODEL = dict(
    vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, mlp_dim=768, max_seq_len=128,
    norm="rms", norm_eps=1e-5, positional="rope", rope_theta=10000.0, activation="swiglu", tie_embeddings=False,
    dtype="float32", param_dtype="float32",
)


def comparison_model() -> ModelConfig:
    # Four layers: unrolling the layer scan lets XLA schedule across blocks (about 12% faster here).
    return ModelConfig(**COMPARISON_MODEL, scan_unroll=COMPARISON_MODEL["n_layers"])


def matmul_params(config: ModelConfig) -> int:
    """Weights that enter matrix multiplies per token (``N`` of the FLOP count)."""
    d, f = config.d_model, config.mlp_dim
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    per_layer = d * q + 2 * d * kv + q * d + (3 if config.activation == "swiglu" else 2) * d * f
    return config.n_layers * per_layer + d * config.vocab_size


def step_flops(config: ModelConfig, sequences: int, length: int, live_reference: bool,
               unembedded_positions: int | None = None) -> dict[str, float]:
    unembedded_positions = length if unembedded_positions is None else unembedded_positions
    unembedding = config.d_model * config.vocab_size
    per_token = 2 * (matmul_params(config) - unembedding) + 4 * config.n_layers * length * config.n_heads * config.head_dim
    forward = sequences * (per_token * length + 2 * unembedding * unembedded_positions)
    policy = 3 * forward
    reference = forward if live_reference else 0.0
    return {"policy_forward_backward": float(policy), "reference_forward": float(reference),
            "total": float(policy + reference)}


def bench_objective(name: str, num_objectives: int = 2, refresh_every: int | None = None) -> Objective:
    """The registered objective ``name`` as the benchmarks run it: its defaults, and for MOPO objectives ``tau``
    0.1, the plain estimate, ``refresh_every`` and a threshold of 0.5 per secondary objective."""
    cls = objective_class(name)
    if "mopo" in {field.name for field in dataclasses.fields(cls)}:
        return cls(mopo=MOPOConfig(tau=0.1, eps=0.0, refresh_every=refresh_every),
                   thresholds=(0.5,) * (num_objectives - 1))
    return cls()


def _pair_batch(config: ModelConfig, pairs: int, prompt_len: int, response_len: int, num_objectives: int, seed: int):
    rng = np.random.default_rng(seed)
    length = prompt_len + response_len
    tokens = rng.integers(0, config.vocab_size, (pairs, 2, length)).astype(np.int32)
    tokens[:, 1, :prompt_len] = tokens[:, 0, :prompt_len]  # a pair shares its prompt
    completion = np.zeros_like(tokens)
    completion[..., prompt_len:] = 1
    labels = np.zeros((pairs, num_objectives), bool)
    labels[np.arange(pairs), np.arange(pairs) % num_objectives] = True
    return {"tokens": tokens, "completion_mask": completion, "attention_mask": np.ones_like(tokens),
            "preference_probs": np.ones((pairs, num_objectives), np.float32), "label_mask": labels}


class JaxTrainStep:
    """A compiled train step of ``train_config`` on a random batch of ``pairs`` pairs; each call runs one step and
    waits for it (the state is carried from call to call, as in training)."""

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, mesh_config: sharding.MeshConfig,
                 pairs: int, prompt_len: int, response_len: int, seed: int = 0):
        mesh = sharding.make_mesh(mesh_config)
        optimizer = make_optimizer(train_config.optimizer)
        params = init_params(model_config, jax.random.PRNGKey(seed))
        state = init_train_state(model_config, train_config, params, optimizer, jax.random.PRNGKey(seed + 1))
        del params
        batch = _pair_batch(model_config, pairs, prompt_len, response_len, 2, seed)
        start = time.perf_counter()
        self._step, state_shardings = compile_train_step(
            model_config, train_config, optimizer, mesh, jax.eval_shape(lambda: state), batch
        )
        self._state = jax.device_put(state, state_shardings)
        self._batch = sharding.global_batch(batch, mesh)
        self.metrics = None
        self()
        self.compile_and_first_step_seconds = time.perf_counter() - start
        sequences, length = 2 * pairs, prompt_len + response_len
        live_reference = train_config.reference == "live" and train_config.objective.needs_reference
        unembedded = length - max(train_config.completion_start, 1)
        self.tokens_per_step = sequences * length
        self.flops = step_flops(model_config, sequences, length, live_reference, unembedded)

    def __call__(self):
        self._state, self.metrics = self._step(self._state, self._batch)
        jax.block_until_ready(self.metrics)


def step_report(
    preset: str = "comparison",
    mesh: str = "",
    loss: str = "mopo_pairwise",
    pairs: int = 8,
    prompt_len: int = 64,
    response_len: int = 64,
    steps: int = 10,
    compute_dtype: str | None = None,
    remat: str | None = None,
    compare_torch: bool = True,
    completion_only: bool = False,
) -> dict[str, Any]:
    """The ``mopo bench step`` report: the step of ``loss`` (and, for the comparison workload, DPO in JAX and DPO in
    PyTorch in the same run), FLOPs, and MFU against the device's peak (on CPU: the matmul peak measured now).

    ``steps`` rounds after two warm-up rounds; each round runs every contender once, in turn, and each ratio is
    reported as the ratio of medians and as the spread of the round-by-round ratios."""
    model_config = comparison_model() if preset == "comparison" else get_preset(preset)
    overrides = {k: v for k, v in (("dtype", compute_dtype), ("remat", remat)) if v is not None}
    if overrides:
        model_config = model_config.replace(**overrides)
    mesh_config = sharding.parse_mesh(mesh) if mesh else sharding.MeshConfig()
    # completion_only: the unembedding skips the prompt columns (TrainConfig.completion_start); the PyTorch side
    # (transformers' full forward) always unembeds every position.
    common = dict(optimizer=OptimizerConfig(learning_rate=1e-5, weight_decay=0.0, max_grad_norm=None),
                  completion_start=prompt_len if completion_only else 0)
    device = jax.devices()[0]
    num_devices = int(np.prod(sharding.make_mesh(mesh_config).devices.shape))
    report: dict[str, Any] = {
        "preset": preset,
        "model": {k: getattr(model_config, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                      "mlp_dim", "dtype", "remat", "tie_embeddings")},
        "matmul_params": matmul_params(model_config),
        "batch": {"pairs": pairs, "prompt_len": prompt_len, "response_len": response_len},
        "mesh": dict(zip(sharding.MESH_AXES, sharding.make_mesh(mesh_config).devices.shape)),
        "device": {"platform": device.platform, "kind": device.device_kind, "count": num_devices},
        "flop_accounting": __doc__.split("FLOP accounting (stated in every report): ")[1].split("\n\n")[0].replace(
            "\n", " "),
        "jax_version": jax.__version__,
        "completion_only_unembedding": completion_only,
    }
    losses = [loss] if not compare_torch or loss == "dpo" else [loss, "dpo"]
    contenders = {
        name: JaxTrainStep(model_config, TrainConfig(objective=bench_objective(name), **common), mesh_config, pairs,
                           prompt_len, response_len)
        for name in losses
    }
    torch_step = None
    if compare_torch and preset == "comparison" and (pairs, prompt_len, response_len) == (8, 64, 64):
        from mopo_jax.bench.torch_reference import TorchDPOStep

        torch_step = contenders["torch_dpo"] = TorchDPOStep()
    # Round-robin (JAX objectives, then PyTorch, in turn): ratios are taken round by round (bench.timing).
    seconds = interleaved_seconds(contenders, repeats=steps, warmup=2)
    memory = getattr(jax.local_devices()[0], "memory_stats", lambda: None)() or {}
    report["steps"] = {}
    for name in losses:
        runner, durations = contenders[name], seconds[name]
        median = statistics.median(durations)
        report["steps"][name] = {
            "loss": name,
            "seconds_per_step": median,
            "all_step_seconds": durations,
            "compile_and_first_step_seconds": runner.compile_and_first_step_seconds,
            "tokens_per_step": runner.tokens_per_step,
            "tokens_per_second": runner.tokens_per_step / median,
            "model_flops_per_step": runner.flops,
            "model_flops_per_second": runner.flops["total"] / median,
            "final_loss": float(runner.metrics["loss"]),
            "peak_bytes_in_use": memory.get("peak_bytes_in_use"),
        }
    peak = device_peak_flops(device)
    if peak is None:
        measured = measure_matmul_peak()
        report["peak"] = {"source": "matmul measured in this run", **measured}
        # Simulated CPU devices share the same cores: the measured peak is the whole machine's.
        peak = measured["flops_per_second"]
    else:
        report["peak"] = {"source": "published dense bf16 peak", "flops_per_second": peak}
        peak = peak * num_devices
    for result in report["steps"].values():
        result["mfu"] = result["model_flops_per_second"] / peak
    if "mopo_pairwise" in seconds and "dpo" in seconds:
        report["mopo_over_dpo"] = ratio_summary(seconds["mopo_pairwise"], seconds["dpo"])
    if torch_step is not None:
        durations = seconds["torch_dpo"]
        report["torch_dpo"] = {"seconds_per_step": statistics.median(durations), "all_step_seconds": durations,
                               **torch_step.info()}
        report["jax_dpo_over_torch_dpo"] = ratio_summary(seconds["dpo"], durations)
    return report
