"""What the command-line tests of the `tiny` HH profile share: its arguments and a run's logged metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lm_assets import HH_DATA as DATA

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "hh_tiny.yaml"
STEPS = 4


def common(work_dir: Path) -> list[str]:
    """`mopo train` arguments of a 4-step tiny run (8 pairs a step, a checkpoint every 2) on the shared data."""
    return ["--config", str(CONFIG), f"work_dir={work_dir}", f"data.source={DATA}",
            f"training.steps={STEPS}", "training.batch_pairs=8", "training.save_every=2"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged_losses(run_dir: Path) -> tuple[np.ndarray, list[int]]:
    logged = records(run_dir)
    return np.asarray([r["loss"] for r in logged]), [r["step"] for r in logged]
