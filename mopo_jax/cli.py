"""``mopo``: a thin command line over the library (parses arguments, builds configs, calls the library)."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


# The optional dependencies (pyproject.toml extras) each command needs beyond the core.
EXTRA_OF_COMMAND = {"synthetic": "synthetic", "train": "experiments", "eval": "experiments", "pareto": "experiments",
                    "generate": "lm", "export": "experiments", "bench": "all"}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions kept as written; every option's default shown after its help (those without one, None or a
    flag's False, say nothing)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parse_thresholds(text: str) -> np.ndarray:
    """``"0.5,0.6,0.7"`` (a sweep of one constraint) or ``"0.5,0.6;0.55,0.65"`` (points of several constraints)."""
    try:
        points = [[float(v) for v in point.split(",") if v.strip()] for point in text.split(";") if point.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--thresholds {text!r}: {error}") from error
    if not points or len({len(p) for p in points}) != 1:
        raise argparse.ArgumentTypeError(f"--thresholds {text!r}: every point needs the same number of values")
    return np.asarray(points[0] if len(points) == 1 else points, np.float64)


def _synthetic(args) -> int:
    from mopo_jax.configs import load_config
    from mopo_jax.synthetic.benchmark import SyntheticConfig, run_benchmark, run_user_problem

    overrides = list(args.overrides)
    if args.tau is not None:
        if args.tau <= 0:
            raise ValueError(f"--tau must be > 0, got {args.tau}")
        overrides.append(f"tau={args.tau}")
    config = load_config(SyntheticConfig, args.config, overrides)
    if args.problem:
        # A problem's results go under its own name, never over the benchmark's runs/synthetic/results.json.
        out = args.out or os.path.join("runs", "synthetic", os.path.splitext(os.path.basename(args.problem))[0])
        run_user_problem(args.problem, args.thresholds, config, out)
    else:
        if args.thresholds is not None:
            raise ValueError("--thresholds applies to --problem; the built-in structures use their own sweeps")
        run_benchmark(config, args.out or os.path.join("runs", "synthetic"))
    return 0


def _generate(args) -> int:
    from mopo_jax.models.generation import generate_cli

    print(generate_cli(args.model, args.prompt, max_new_tokens=args.max_new_tokens, system=args.system))
    return 0


def _bench_step(args) -> int:
    import json

    from mopo_jax.bench.step import step_report

    report = step_report(preset=args.preset, mesh=args.mesh, loss=args.loss, pairs=args.pairs,
                         prompt_len=args.prompt_len, response_len=args.response_len, steps=args.steps,
                         compute_dtype=args.dtype, remat=args.remat, compare_torch=not args.no_torch,
                         completion_only=args.completion_only)
    print(json.dumps(report, indent=1))
    return 0


def _bench_generate(args) -> int:
    import json

    from mopo_jax.bench.generate import generate_report

    report = generate_report(preset=args.preset, prompts=args.prompts, prompt_len=args.prompt_len,
                             new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                             repeats=args.repeats, compare_torch=not args.no_torch)
    print(json.dumps(report, indent=1))
    return 0


def _bench_memory(args) -> int:
    from mopo_jax.bench.memory import main as memory_main

    return memory_main(args.memory_args)


def _mesh_overrides(text: str | None) -> list[str]:
    """``--mesh fsdp=4,tensor=2`` as config overrides of the ``mesh`` section (unnamed axes are 1)."""
    if text is None:
        return []
    from mopo_jax.parallel.sharding import parse_mesh

    mesh = parse_mesh(text)
    return [f"mesh.data={mesh.data}", f"mesh.fsdp={mesh.fsdp}", f"mesh.tensor={mesh.tensor}"]


def _join_job(args) -> None:
    """Joins the multi-process job (explicit flags or the detected cluster) before anything touches a backend."""
    from mopo_jax.parallel.distributed import initialize_from_arguments

    job = initialize_from_arguments(args.coordinator, args.num_processes, args.process_id,
                                    auto=not args.single_process)
    import jax

    if jax.process_index() == 0:
        print(f"mopo {args.command}: {job}, {jax.device_count()} devices ({jax.local_device_count()} local, "
              f"{jax.devices()[0].platform})", file=sys.stderr, flush=True)


def _train(args) -> int:
    from mopo_jax.configs import load_config
    from mopo_jax.experiment.config import ExperimentConfig

    # The config is checked before joining the job: a bad key fails at once on every process.
    config = load_config(ExperimentConfig, args.config, [*args.overrides, *_mesh_overrides(args.mesh)])
    _join_job(args)
    from mopo_jax.experiment.hh_rlhf import train_run
    from mopo_jax.training.loop import NonFiniteError
    from mopo_jax.training.preemption import PREEMPTED_EXIT_CODE, Preempted

    try:
        train_run(config, force_new=args.force_new)
    except Preempted as stop:  # the checkpoint is saved: rerunning the same command resumes
        print(f"mopo train: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except NonFiniteError as error:
        print(f"mopo train: error: {error}", file=sys.stderr)
        return 1
    return 0


def _eval(args) -> int:
    import json

    _mesh_overrides(args.mesh)  # a malformed --mesh fails before joining the job
    _join_job(args)
    from mopo_jax import storage
    from mopo_jax.experiment.evaluate import evaluate_run

    # Every run that can be evaluated is; the others are named at the end (exit 2), none stops the rest. Each
    # process meets the same failure (the same files), so a multi-process job stays in step.
    overrides = [token for token in args.run_dirs if "=" in token]
    run_dirs = [token for token in args.run_dirs if "=" not in token]
    if not run_dirs:
        raise ValueError("mopo eval: give at least one run directory")
    failed = []
    for number, run_dir in enumerate(run_dirs, 1):
        if storage.is_primary():
            print(f"mopo eval: run {number} of {len(run_dirs)}: {run_dir}", flush=True)
        try:
            if storage.is_local(run_dir) and os.path.isdir(run_dir) and not os.access(run_dir, os.W_OK):
                raise ValueError(f"{run_dir} is not writable: eval.json could not be saved there")
            result = evaluate_run(run_dir, [*overrides, *_mesh_overrides(args.mesh)])
        except (ValueError, OSError) as error:
            failed.append(run_dir)
            print(f"mopo eval: {run_dir}: {error}", file=sys.stderr)
            continue
        if storage.is_primary():
            evaluation = result["evaluation"]
            print(json.dumps({"run": run_dir, "expected_win_rate": evaluation["expected_win_rate"],
                              "interval": evaluation["expected_win_rate_interval"], "kl": evaluation["kl"],
                              "judged_win_rate": evaluation["win_rate"],
                              "constraint": result["constraint_verdict"]}))
    if failed:
        print(f"mopo eval: error: {len(failed)} of {len(run_dirs)} runs not evaluated: {', '.join(failed)}",
              file=sys.stderr)
        return 2
    return 0


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The mesh and the multi-process job of ``mopo train`` / ``mopo eval``."""
    group = parser.add_argument_group(
        "mesh and processes",
        "One process per host (TPU VM worker, GPU node); every process runs the same command. On a Cloud TPU VM "
        "and under srun (SLURM) the job is detected; elsewhere pass all three of --coordinator, --num-processes "
        "and --process-id.")
    group.add_argument("--mesh", default=None,
                       help="device mesh, e.g. fsdp=4,tensor=2 or data=2,fsdp=-1 (axes data, fsdp, tensor; -1 = the "
                       "remaining devices; unnamed axes are 1); default: the config's mesh section")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the job")
    group.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0 to N-1")
    group.add_argument("--single-process", action="store_true",
                       help="do not join a detected cluster (run this process alone)")


def _add_compilation_cache_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compilation cache (mopo_jax.compilation_cache)")
    group.add_argument("--compilation-cache", default=None, metavar="DIR",
                       help="directory of JAX's persistent compilation cache (default: $MOPO_COMPILATION_CACHE, else "
                       "~/.cache/mopo-jax/jax)")
    group.add_argument("--no-compilation-cache", action="store_true",
                       help="compile everything anew (also: MOPO_COMPILATION_CACHE=off)")


def _pareto(args) -> int:
    from mopo_jax import storage
    from mopo_jax.evaluation.pareto import results_markdown, write_pareto

    write_pareto(args.run_dirs, args.out, results_json=args.results, skip_missing=args.skip_missing)
    print(f"wrote {args.out}" + (f" and {args.results}" if args.results else ""))
    if args.results:
        table = results_markdown(storage.load_json(args.results))
        storage.save_text(args.results.rsplit(".", 1)[0] + ".md", table + "\n")
        print(table)
    return 0


def _export(args) -> int:
    from mopo_jax.experiment.export import export_run

    for written in export_run(args.run_dir, args.out, args.dtype):
        print(written)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mopo", description="Multi-Objective Preference Optimization in JAX",
                                     formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    synthetic = commands.add_parser(
        "synthetic", formatter_class=_HelpFormatter,
        help="synthetic Pareto benchmark against an exact solver (or a user's .npz problem)",
        description="Runs every canonical preference structure and method, or solves --problem FILE. "
        "Extra key=value arguments override fields of SyntheticConfig (e.g. steps=1000 structures=bt_aligned).",
    )
    synthetic.add_argument("--out", default=None, help="output directory (results.json, plots) [runs/synthetic; "
                           "with --problem P: runs/synthetic/P's file name without its extension]")
    synthetic.add_argument("--problem", help=".npz with pref [K,X,N,N] (NaN = unlabeled), ref [X,N], "
                           "optional mu [X,N], prompt_weights [X]")
    synthetic.add_argument("--tau", type=float, help="KL temperature (default: SyntheticConfig's 0.08)")
    synthetic.add_argument("--thresholds", type=_parse_thresholds,
                           help="b1,b2,... (sweep of one constraint) or b1,b2;b1,b2 (points for several)")
    synthetic.add_argument("--config", help="YAML file with SyntheticConfig fields")
    synthetic.add_argument("overrides", nargs="*", help="key=value overrides of SyntheticConfig")
    _add_compilation_cache_arguments(synthetic)
    synthetic.set_defaults(handler=_synthetic)

    from mopo_jax.experiment.methods import describe_methods

    train = commands.add_parser(
        "train", formatter_class=_HelpFormatter,
        help="train one method of the HH-RLHF comparison into its run directory",
        description="Trains method.name into run_dir (resuming from its last checkpoint). Config sections: data, "
        "model, method, training, optimizer (OptimizerConfig), dpo (DPO), mopo (MOPOConfig), onpolicy, preference, "
        "eval; a method of your own is registered by a module named in plugins=[...].",
        epilog="registered methods (method.name) and the knob that sets their trade-off:\n" + describe_methods())
    train.add_argument("--config", required=True, help="YAML with ExperimentConfig fields")
    train.add_argument("overrides", nargs="*", help="key=value overrides (nested keys with dots: method.name=dpo_pooled)")
    train.add_argument("--force-new", action="store_true",
                       help="run_dir holds a run of another configuration: move it aside (RUN_DIR.replaced-TIME) and "
                       "start a new run there")
    _add_job_arguments(train)
    _add_compilation_cache_arguments(train)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "eval", formatter_class=_HelpFormatter, help="evaluate trained runs (writes RUN_DIR/eval.json)",
        description="Evaluates each RUN_DIR with its stored config; key=value arguments override how it is evaluated "
        "(eval.*, mesh.*, work_dir), never what was trained.")
    evaluate.add_argument("run_dirs", nargs="+", metavar="RUN_DIR | key=value",
                          help="run directories, and overrides of how they are evaluated (eval.samples_per_prompt=8)")
    _add_job_arguments(evaluate)
    _add_compilation_cache_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)

    pareto = commands.add_parser(
        "pareto", formatter_class=_HelpFormatter, help="Pareto plot and dominance table of evaluated runs",
        description="Reads each RUN_DIR's eval.json: the plot of helpfulness against harmlessness win rates with "
        "their 95%% intervals, the paired dominance verdicts, and (with --results) results.json and results.md.")
    pareto.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="evaluated run directories")
    pareto.add_argument("--out", required=True, help="PNG path")
    pareto.add_argument("--results", default=None, help="also write the aggregated results.json here")
    pareto.add_argument("--skip-missing", action="store_true",
                        help="leave out (with a warning) runs without a readable eval.json instead of stopping (exit 2)")
    pareto.set_defaults(handler=_pareto)

    export = commands.add_parser(
        "export", formatter_class=_HelpFormatter,
        help="write a trained run's whole policy as a Hugging Face model directory",
        description="Merges RUN_DIR's trained parameters (top blocks, or LoRA adapters) onto its base model's frozen "
        "parts and "
        "writes config.json, safetensors weights and the tokenizer's files to --out, loadable by "
        "transformers.AutoModelForCausalLM.from_pretrained and mopo generate --model OUT.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory (holding policy.npz)")
    export.add_argument("--out", required=True, help="a new or empty directory")
    export.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight dtype of the files (default: the run's parameter dtype)")
    export.set_defaults(handler=_export)

    generate = commands.add_parser(
        "generate", formatter_class=_HelpFormatter, help="greedy chat completion with a pretrained model",
        description="Applies the model's chat template to --prompt and decodes greedily until the end of turn.")
    generate.add_argument("--model", default="smollm2-135m", help="preset name, GGUF file, HF directory or hub name")
    generate.add_argument("--prompt", required=True, help="the user's message")
    generate.add_argument("--system", default=None, help="system message (default: the model's own)")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="most tokens of the reply")
    _add_compilation_cache_arguments(generate)
    generate.set_defaults(handler=_generate)

    bench = commands.add_parser("bench", formatter_class=_HelpFormatter, help="benchmarks (throughput, MFU, memory)",
                                description="docs/benchmarks.md records their results and the commands.")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    step = bench_commands.add_parser(
        "step", formatter_class=_HelpFormatter,
        help="train-step tokens/s, FLOPs and MFU (and the PyTorch side-by-side)",
        description="Times compiled train steps of a random-weight model on this machine's devices.")
    step.add_argument("--preset", default="comparison",
                      help="'comparison' (the small Llama of the PyTorch side-by-side) or a model preset")
    step.add_argument("--mesh", default="", help="e.g. fsdp=4,tensor=2 (default: all devices on fsdp)")
    step.add_argument("--loss", default="mopo_pairwise", choices=["mopo_pairwise", "dpo", "ipo"],
                      help="the objective of the step")
    step.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    step.add_argument("--prompt-len", type=int, default=64, help="prompt tokens of every pair")
    step.add_argument("--response-len", type=int, default=64, help="response tokens of every pair")
    step.add_argument("--steps", type=int, default=10, help="timed steps (after one compile step)")
    step.add_argument("--dtype", default=None, help="compute dtype override (e.g. bfloat16)")
    step.add_argument("--remat", default=None, choices=["none", "full", "dots"],
                      help="per-layer rematerialisation (default: the preset's)")
    step.add_argument("--no-torch", action="store_true", help="skip the PyTorch side-by-side")
    step.add_argument("--completion-only", action="store_true",
                      help="unembed only the response columns (TrainConfig.completion_start = prompt length)")
    _add_compilation_cache_arguments(step)
    step.set_defaults(handler=_bench_step)
    sampling = bench_commands.add_parser(
        "generate", formatter_class=_HelpFormatter,
        help="sampling time of mopo_jax.models.generate against transformers' generate (interleaved)",
        description="Samples the same prompts with both implementations in alternating rounds.")
    sampling.add_argument("--preset", default="smollm2-135m", help="a Llama-family model preset (random weights)")
    sampling.add_argument("--prompts", type=int, default=64, help="prompts sampled per round")
    sampling.add_argument("--prompt-len", type=int, default=96, help="tokens of every prompt")
    sampling.add_argument("--new-tokens", type=int, default=32, help="tokens sampled per prompt")
    sampling.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    sampling.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: none)")
    sampling.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs JAX, then PyTorch)")
    sampling.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    _add_compilation_cache_arguments(sampling)
    sampling.set_defaults(handler=_bench_generate)
    memory = bench_commands.add_parser(
        "memory", formatter_class=_HelpFormatter,
        help="ahead-of-time compile a step on simulated devices and print per-device memory (JSON)", add_help=False)
    memory.add_argument("memory_args", nargs=argparse.REMAINDER, help="see mopo bench memory --help")
    memory.set_defaults(handler=_bench_memory)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # transformers, imported for tokenizers only, would print its notice that PyTorch is absent on every command.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if argv[:2] == ["bench", "memory"]:
        # argparse.REMAINDER does not take arguments that start with "--" after a sub-command: hand them over as is.
        from mopo_jax.bench.memory import main as memory_main

        return memory_main(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "no_compilation_cache") and not args.no_compilation_cache:
        from mopo_jax import compilation_cache

        compilation_cache.enable(args.compilation_cache)
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"mopo {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        from mopo_jax.models.weights import ModelUnavailable

        if not isinstance(error, ModelUnavailable):
            raise
        print(f"mopo {args.command}: error: model: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        extra = EXTRA_OF_COMMAND.get(args.command, "all")
        print(f"mopo {args.command}: error: {error}; this command needs the {extra!r} extra: "
              f"pip install 'mopo-jax[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
