"""``mopo``: a thin command line over the library (parses arguments, builds configs, calls the library)."""

from __future__ import annotations

import argparse
import sys

import numpy as np


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
        run_user_problem(args.problem, args.thresholds, config, args.out)
    else:
        if args.thresholds is not None:
            raise ValueError("--thresholds applies to --problem; the built-in structures use their own sweeps")
        run_benchmark(config, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mopo", description="Multi-Objective Preference Optimization in JAX")
    commands = parser.add_subparsers(dest="command", required=True)

    synthetic = commands.add_parser(
        "synthetic",
        help="synthetic Pareto benchmark against an exact solver (or a user's .npz problem)",
        description="Runs every canonical preference structure and method, or solves --problem FILE. "
        "Extra key=value arguments override fields of SyntheticConfig (e.g. steps=1000 structures=bt_aligned).",
    )
    synthetic.add_argument("--out", default="runs/synthetic", help="output directory (results.json, plots)")
    synthetic.add_argument("--problem", help=".npz with pref [K,X,N,N] (NaN = unlabeled), ref [X,N], "
                           "optional mu [X,N], prompt_weights [X]")
    synthetic.add_argument("--tau", type=float, help="KL temperature (default 0.08)")
    synthetic.add_argument("--thresholds", type=_parse_thresholds,
                           help="b1,b2,... (sweep of one constraint) or b1,b2;b1,b2 (points for several)")
    synthetic.add_argument("--config", help="YAML file with SyntheticConfig fields")
    synthetic.add_argument("overrides", nargs="*", help="key=value overrides of SyntheticConfig")
    synthetic.set_defaults(handler=_synthetic)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"mopo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
