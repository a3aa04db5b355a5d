"""Compare committed runs of several plans with `mopo pareto`, from their `per_run/NAME.eval.json` copies.

    python experiments/compare_committed_runs.py OUT_DIR PREFIX=docs/results/PLAN/per_run/NAME.eval.json ...

Each argument is one committed evaluation; ``PREFIX=`` (optional) renames the run to ``PREFIX`` + its name, so that
runs of different plans that share a name (e.g. ``mopo_b0.51`` of the `front` and the `dual` plans) stay apart, while
seeds of one configuration (same name, another seed) pool. Writes OUT_DIR/pareto.png, results.json and results.md.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile


def main(argv: list[str]) -> int:
    from mopo_jax.evaluation.pareto import results_markdown, write_pareto

    if len(argv) < 2:
        print(__doc__)
        return 2
    out = pathlib.Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        run_dirs = []
        for spec in argv[1:]:
            prefix, _, source = spec.rpartition("=")
            record = json.loads(pathlib.Path(source).read_text())
            record["name"] = prefix + record["name"]
            source_path = pathlib.Path(source)  # .../PLAN/per_run/NAME.eval.json -> SCRATCH/PLAN/NAME
            run_dir = pathlib.Path(scratch) / source_path.parent.parent.name / source_path.name.split(".eval.")[0]
            run_dir.mkdir(parents=True)
            (run_dir / "eval.json").write_text(json.dumps(record))
            run_dirs.append(str(run_dir))
        results = write_pareto(run_dirs, out / "pareto.png", results_json=out / "results.json")
    table = results_markdown(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
