"""Per-device memory of a sharded train step, from an ahead-of-time compile (nothing is allocated).

:func:`memory_report` builds the train state as ``jax.ShapeDtypeStruct`` s (``jax.eval_shape`` of
:func:`~mopo_jax.training.train_step.init_train_state` over :func:`~mopo_jax.models.param_shapes`), the batch as
``ShapeDtypeStruct`` s, lowers and compiles the step of :func:`~mopo_jax.training.train_step.compile_train_step` with
``jit(...).lower(...).compile()``, and reads XLA's buffer assignment from ``compiled.memory_analysis()``. The numbers
are those of the per-device SPMD program: argument, output, temporary, aliased (the donated state the outputs reuse) and
generated-code bytes, and ``total = argument + output + temp - alias``, the peak the device must hold.

On a CPU host the mesh's devices are simulated (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), so the step
can be sized for an 8-chip slice from a laptop. The compile is then the CPU backend's: its fusion and scheduling
differ from the TPU's or GPU's, so treat the temporary bytes as an estimate; argument and output bytes (the sharded
state and batch) are exact.

Command line (prints one JSON object)::

    python -m mopo_jax.bench.memory --preset gpt-1.3b --mesh fsdp=4,tensor=2
    python -m mopo_jax.bench.memory --preset smollm2-1.7b --mesh fsdp=8 --pairs 32 --prompt-len 256 \
        --response-len 256 --lora-rank 16 --loss dpo

``--prompt-len``/``--response-len`` lay the sequences out as the training data does (prompt columns, then response
columns) and unembed only the response columns (``TrainConfig.completion_start``), as ``mopo train`` does.

:func:`main` sets ``XLA_FLAGS`` itself when JAX has not initialised a backend yet, and re-runs itself in a fresh
interpreter when it has, with too few devices.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

GIB = 1024**3
#: HBM per chip of a TPU v5e, the acceptance budget of the default report.
TPU_V5E_HBM_GIB = 16.0
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _required_devices(mesh_text: str, default: int = 8) -> int:
    """Devices the mesh needs: the product of its sizes, or ``default`` when one axis is ``-1``."""
    from mopo_jax.parallel.sharding import parse_mesh

    config = parse_mesh(mesh_text)
    sizes = (config.data, config.fsdp, config.tensor)
    if -1 in sizes:
        return default
    return int(math.prod(sizes))


def _too_few_devices(have: int, need: int, platform: str) -> RuntimeError:
    return RuntimeError(
        f"the mesh needs {need} devices but JAX sees {have} {platform} device(s). To simulate them on a CPU host, set "
        f"XLA_FLAGS={_DEVICE_FLAG}={need} in the environment before JAX initialises its backend (e.g. "
        f"`XLA_FLAGS={_DEVICE_FLAG}={need} python ...`), or run `python -m mopo_jax.bench.memory`, which does it."
    )


def _bytes(value: int) -> dict:
    return {"bytes": int(value), "gib": round(int(value) / GIB, 4)}


def _sharded_bytes(tree, shardings) -> int:
    """Bytes of the largest shard of every leaf (what one device holds)."""
    import jax

    leaves = jax.tree.leaves(tree)
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: hasattr(x, "shard_shape"))
    if len(leaves) != len(shard_leaves):
        raise AssertionError("state and shardings differ in structure")
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shard_leaves))


def memory_report(
    preset: str = "gpt-1.3b",
    mesh: str = "fsdp=4,tensor=2",
    global_batch_pairs: int = 8,
    seq_len: int = 1024,
    loss: str = "mopo_pairwise",
    compute_dtype: str = "bfloat16",
    remat: str = "full",
    lora_rank: int = 0,
    *,
    vocab_chunk: int | None = None,
    micro_batches: int = 1,
    completion_start: int = 0,
    param_dtype: str | None = None,
    attention: str | None = None,
    reference: str = "live",
    refresh_every: int | None = 500,
    num_objectives: int = 2,
    budget_gib: float = TPU_V5E_HBM_GIB,
    platform: str | None = None,
    model_config=None,
) -> dict[str, Any]:
    """Ahead-of-time compile one train step on ``mesh`` and report its per-device memory.

    Args:
      preset: model preset (:data:`mopo_jax.models.PRESETS`); ignored when ``model_config`` is given.
      mesh: ``"fsdp=4,tensor=2"`` style (:func:`mopo_jax.parallel.sharding.parse_mesh`).
      global_batch_pairs: prompts per step; each has 2 responses (``2 * global_batch_pairs`` sequences: a pair, or
        two candidates for ``mopo_candidates``), scored by the policy and, when the objective reads it and
        ``reference="live"``, by the reference.
      seq_len: tokens per sequence (prompt + response).
      loss: a registered objective name (:func:`mopo_jax.policy_objectives.registered_objectives`).
      compute_dtype: activation / matmul dtype (parameters and optimizer state keep ``param_dtype``).
      remat: ``"none"``, ``"full"`` or ``"dots"`` per-layer rematerialisation.
      lora_rank: 0 trains every parameter; > 0 trains adapters (frozen base).
      vocab_chunk: chunk the log-softmax over the vocabulary (must divide the vocabulary size).
      micro_batches: gradient-accumulation steps.
      completion_start: first column that can hold a response token (the prompt width); earlier columns skip the
        unembedding (``TrainConfig.completion_start``).
      param_dtype: parameter storage dtype (default: the preset's, float32 for the built-in presets). With LoRA this
        is the frozen base's dtype; the adapters (and their optimizer state) are float32.
      attention: ``ModelConfig.attention`` override (default: the preset's).
      reference: ``"live"`` or ``"precomputed"``.
      refresh_every: MOPO's lagged-reference period (a snapshot of the policy lives in the state); None: none.
      num_objectives: objectives per pair label (primary + secondaries).
      budget_gib: per-device memory the total is compared with (default 16 GiB, a TPU v5e chip).
      platform: ``jax.devices(platform)`` to build the mesh from (default: the default backend).
      model_config: a :class:`~mopo_jax.models.ModelConfig` to use instead of ``preset`` (dtype/remat still apply).

    Returns:
      A JSON-serialisable dict: ``per_device`` (argument, output, temp, alias, generated code and total, each in
      bytes and GiB), ``state_per_device`` (the sharded train state by field, computed from the shardings),
      ``fits`` (total <= ``budget_gib``), ``compile_seconds``, the mesh, parameter counts and the configuration.
    """
    import jax

    from mopo_jax.bench.step import bench_objective
    from mopo_jax.models import count_params, get_preset, param_shapes
    from mopo_jax.parallel import sharding
    from mopo_jax.training import TrainableConfig
    from mopo_jax.training.train_step import TrainConfig, compile_train_step, init_train_state, make_optimizer

    devices = jax.devices(platform) if platform else jax.devices()
    mesh_config = sharding.parse_mesh(mesh)
    need = _required_devices(mesh, default=len(devices))
    if len(devices) < need:
        raise _too_few_devices(len(devices), need, devices[0].platform)
    devices = devices[:need]
    device_mesh = sharding.make_mesh(mesh_config, devices)

    overrides = {"dtype": compute_dtype, "remat": remat}
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    if attention is not None:
        overrides["attention"] = attention
    base_config = model_config if model_config is not None else get_preset(preset)
    model = base_config.replace(**overrides)
    if seq_len > model.max_seq_len and model.positional == "learned":
        raise ValueError(f"seq_len={seq_len} exceeds the learned position table ({model.max_seq_len})")
    if not 0 <= completion_start < seq_len:
        raise ValueError(f"completion_start={completion_start} must be in [0, seq_len={seq_len})")

    objective = bench_objective(loss, num_objectives, refresh_every if reference == "live" else None)
    config = TrainConfig(
        objective=objective,
        micro_batches=micro_batches,
        reference=reference,
        trainable=TrainableConfig(lora_rank=lora_rank),
        vocab_chunk=vocab_chunk,
        completion_start=completion_start,
    )
    optimizer = make_optimizer(config.optimizer)

    # Shapes only: eval_shape traces init_train_state over ShapeDtypeStructs, so no weight is ever allocated.
    weights = param_shapes(model)
    key = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
    state_shapes = jax.eval_shape(lambda p, r: init_train_state(model, config, p, optimizer, r), weights, key)

    b, s, t, k = global_batch_pairs, 2, seq_len, num_objectives
    sds = jax.ShapeDtypeStruct
    batch_shapes = {
        "tokens": sds((b, s, t), jax.numpy.int32),
        "completion_mask": sds((b, s, t), jax.numpy.int32),
        "attention_mask": sds((b, s, t), jax.numpy.int32),
        **objective.batch_shapes(b, s, k),
    }
    if reference == "precomputed":
        batch_shapes["ref_log_probs"] = sds((b, s), jax.numpy.float32)

    step, state_shardings = compile_train_step(model, config, optimizer, device_mesh, state_shapes, batch_shapes)
    start = time.perf_counter()
    lowered = step.lower(state_shapes, batch_shapes)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start

    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError(f"the {devices[0].platform} backend does not report a memory analysis")
    argument = analysis.argument_size_in_bytes
    output = analysis.output_size_in_bytes
    temp = analysis.temp_size_in_bytes
    alias = analysis.alias_size_in_bytes
    total = argument + output + temp - alias

    state_fields = {}
    for field in state_shapes._fields:
        tree, shard = getattr(state_shapes, field), getattr(state_shardings, field)
        if tree is not None and jax.tree.leaves(tree):
            state_fields[field] = _bytes(_sharded_bytes(tree, shard))
    state_total = sum(v["bytes"] for v in state_fields.values())

    return {
        "preset": preset if model_config is None else "custom",
        "mesh": dict(zip(sharding.MESH_AXES, (int(n) for n in device_mesh.devices.shape))),
        "devices": len(devices),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "params": count_params(weights),
        "trained_params": count_params(state_shapes.params),
        "config": {
            "loss": loss,
            "global_batch_pairs": b,
            "sequences": b * s,
            "seq_len": t,
            "completion_start": completion_start,
            "compute_dtype": model.dtype,
            "param_dtype": model.param_dtype,
            "remat": remat,
            "attention": model.attention,
            "lora_rank": lora_rank,
            "lora_targets": list(config.trainable.lora_targets) if lora_rank else [],
            "vocab_chunk": vocab_chunk,
            "micro_batches": micro_batches,
            "reference": reference,
            "lagged_reference": config.keeps_snapshot,
        },
        "per_device": {
            "argument": _bytes(argument),
            "output": _bytes(output),
            "temp": _bytes(temp),
            "alias": _bytes(alias),
            "generated_code": _bytes(analysis.generated_code_size_in_bytes),
            "total": _bytes(total),
        },
        "state_per_device": {**state_fields, "total": _bytes(state_total)},
        "budget_gib": budget_gib,
        "fits": bool(total <= budget_gib * GIB),
        "compile_seconds": round(compile_seconds, 2),
    }


#: Objectives the command line sizes (registered objectives whose batch the benchmark can build).
_LOSSES = ["mopo_pairwise", "mopo_candidates", "dpo", "ipo", "weighted_dpo", "weighted_ipo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mopo bench memory",
        description="Ahead-of-time compile a sharded train step (on simulated CPU devices unless the default backend "
        "has enough) and print its per-device memory as JSON.",
    )
    parser.add_argument("--preset", default="gpt-1.3b")
    parser.add_argument("--mesh", default="fsdp=4,tensor=2", help="e.g. fsdp=8 or data=2,fsdp=2,tensor=2")
    parser.add_argument("--pairs", type=int, default=8, help="prompts per step, global (2 responses each)")
    parser.add_argument("--seq-len", type=int, default=1024,
                        help="tokens per response sequence (ignored when --prompt-len and --response-len are given)")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="prompt columns; with --response-len: seq-len = prompt + response, and only the response "
                        "columns are unembedded (TrainConfig.completion_start = prompt length)")
    parser.add_argument("--response-len", type=int, default=None, help="response columns (see --prompt-len)")
    parser.add_argument("--loss", default="mopo_pairwise", choices=_LOSSES,
                        help="training objective (mopo_candidates: two on-policy candidates per prompt)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--param-dtype", default=None,
                        help="parameter storage dtype (default: the preset's); with --lora-rank the frozen base's "
                        "dtype (the adapters stay float32)")
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    parser.add_argument("--attention", default=None, choices=["xla", "reference", "cudnn", "auto"],
                        help="attention kernel (ModelConfig.attention; default: the preset's)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="train rank-r adapters on the attention and MLP matrices over a frozen base (0: all)")
    parser.add_argument("--vocab-chunk", type=int, default=None)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--reference", default="live", choices=["live", "precomputed"])
    parser.add_argument("--no-refresh", action="store_true", help="no lagged reference (no policy snapshot)")
    parser.add_argument("--budget-gib", type=float, default=TPU_V5E_HBM_GIB)
    parser.add_argument("--devices", type=int, default=8,
                        help="simulated CPU devices when the mesh has a -1 axis (default 8)")
    parser.add_argument("--platform", default=None, help="build the mesh from jax.devices(PLATFORM), e.g. cpu")
    return parser


def _backends_initialized() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume the worst
        return True


def _with_device_flag(flags: str, count: int) -> str:
    kept = [f for f in flags.split() if not f.startswith(_DEVICE_FLAG)]
    return " ".join(kept + [f"{_DEVICE_FLAG}={count}"])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mopo_jax.bench.memory [--preset P] [--mesh M] ...``: print :func:`memory_report` as JSON.

    Makes sure the CPU backend simulates enough devices: sets ``XLA_FLAGS`` when no JAX backend is initialised yet,
    or re-runs this module in a fresh interpreter (with ``XLA_FLAGS`` set) when one is, with too few devices.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.prompt_len is None) != (args.response_len is None):
        parser.error("--prompt-len and --response-len go together")
    seq_len, completion_start = args.seq_len, 0
    if args.prompt_len is not None:
        if args.prompt_len < 1 or args.response_len < 1:
            parser.error("--prompt-len and --response-len must be >= 1")
        seq_len, completion_start = args.prompt_len + args.response_len, args.prompt_len
    need = _required_devices(args.mesh, default=args.devices)

    if not _backends_initialized():
        flags = os.environ.get("XLA_FLAGS", "")
        current = [f for f in flags.split() if f.startswith(_DEVICE_FLAG)]
        if not current or int(current[-1].split("=")[1]) < need:
            os.environ["XLA_FLAGS"] = _with_device_flag(flags, need)
    else:
        import jax

        have = len(jax.devices(args.platform) if args.platform else jax.devices())
        if have < need:
            if os.environ.get("_MOPO_MEMORY_REEXEC"):
                raise _too_few_devices(have, need, args.platform or jax.default_backend())
            env = dict(os.environ, _MOPO_MEMORY_REEXEC="1",
                       XLA_FLAGS=_with_device_flag(os.environ.get("XLA_FLAGS", ""), need))
            return subprocess.run([sys.executable, "-m", "mopo_jax.bench.memory", *argv], env=env).returncode

    report = memory_report(
        preset=args.preset,
        mesh=args.mesh,
        global_batch_pairs=args.pairs,
        seq_len=seq_len,
        loss=args.loss,
        compute_dtype=args.dtype,
        remat=args.remat,
        lora_rank=args.lora_rank,
        vocab_chunk=args.vocab_chunk,
        micro_batches=args.micro_batches,
        completion_start=completion_start,
        param_dtype=args.param_dtype,
        attention=args.attention,
        reference=args.reference,
        refresh_every=None if args.no_refresh else 500,
        budget_gib=args.budget_gib,
        platform=args.platform,
    )
    if args.prompt_len is not None:
        report["config"].update(prompt_len=args.prompt_len, response_len=args.response_len)
    report["command"] = shlex.join(["python", "-m", "mopo_jax.bench.memory", *argv])
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
