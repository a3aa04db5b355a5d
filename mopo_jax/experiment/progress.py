"""What a run reports while it works: timestamped stage lines, and during training a progress bar and TensorBoard
scalars (process 0 only; TensorBoard for a local run directory)."""

from __future__ import annotations

import os
import time

from mopo_jax import storage
from mopo_jax.experiment.config import ExperimentConfig


def log(message: str) -> None:
    """A timestamped line on process 0's stdout."""
    if storage.is_primary():
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class TrainingProgress:
    """Process 0's progress bar and TensorBoard scalars (TensorBoard only for a local run directory); a training
    loop hook (``Hook(progress.update)``)."""

    def __init__(self, config: ExperimentConfig, name: str):
        from tqdm import tqdm

        self.bar = tqdm(total=config.training.steps, desc=name, unit="step", dynamic_ncols=True)
        self.writer = _tensorboard(config.run_dir) if storage.is_local(config.run_dir) else None

    def update(self, info) -> None:
        """Shows a step's :class:`mopo_jax.training.StepInfo`."""
        record = info.metrics
        self.bar.n = record["step"]
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        self.bar.refresh()
        if self.writer is not None:
            for name, value in record.items():
                values = value if isinstance(value, list) else [value]
                for i, v in enumerate(values):
                    if isinstance(v, (int, float)) and name not in ("step", "time"):
                        self.writer.add_scalar(name if len(values) == 1 else f"{name}/{i}", v, record["step"])

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _tensorboard(run_dir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional: the JSONL log always exists
        return None
    return SummaryWriter(os.path.join(run_dir, "tensorboard"))
