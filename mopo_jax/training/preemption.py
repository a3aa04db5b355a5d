"""Preemption (SIGTERM from a Cloud TPU maintenance event, a spot reclaim or a SLURM time limit): the loop finishes
the step it is in, saves a checkpoint and stops with :class:`Preempted`; the rerun resumes from that checkpoint.

Every process of a multi-process job must stop after the *same* step (a checkpoint save is collective). JAX's
coordination service provides exactly that: when any process gets SIGTERM the notice reaches every process, which
agree on the first step all of them can still reach (``multihost_utils.reached_preemption_sync_point``). A single
process needs no agreement: a SIGTERM handler sets a flag that the loop reads after each step.
"""

from __future__ import annotations

import signal
import threading

import jax

#: Exit status of a run stopped by SIGTERM after saving (128 + SIGTERM, the shell's convention for it), so a driving
#: script (``set -e``) stops instead of starting the next run on a machine that is going away.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
    """The run saved a checkpoint at ``step`` after a preemption notice and stopped; rerun to resume."""

    def __init__(self, step: int):
        super().__init__(f"preempted (SIGTERM): checkpoint saved at step {step}; rerun the same command to resume")
        self.step = step


class PreemptionGuard:
    """Listens for SIGTERM while a training loop runs (``with PreemptionGuard() as guard: ... guard.reached(step)``)."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._multi_process = jax.process_count() > 1

    def start(self) -> "PreemptionGuard":
        """Starts listening (single process: installs the SIGTERM handler)."""
        # Multi-process: the coordination service's own SIGTERM notifier is already listening (jax.distributed).
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._flag.set())
        return self

    def stop(self) -> None:
        """Puts the previous SIGTERM handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> "PreemptionGuard":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (call after every step, on every process)."""
        if self._multi_process:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()
