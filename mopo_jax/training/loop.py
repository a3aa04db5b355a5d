"""The training loop: sharded state, compiled step, checkpoints with data positions, JSON-lines metrics.

``train(...)`` is resumable and deterministic: it restores the newest good checkpoint (state *and* data position),
asks ``next_batch`` for each step's batch from that position on, and so a run killed at any point and restarted
produces the same per-step losses as an uninterrupted one.

``next_batch(position: dict, state: TrainState)`` returns ``(batch, next_position)``, or ``None`` when the data
ends: ``batch`` is this process's rows of the step's batch as host numpy arrays (see
:mod:`mopo_jax.training.train_step` for the layout), ``next_position`` a JSON-serialisable dict from which the batch
after this one starts (e.g. ``{"epoch": 0, "index": 40}``). ``state`` is the train state the step will update, so
data that depends on the policy (Algorithm 1's candidates, sampled from the current reference; the dual's readings
of the current policy) is a function of it, like any other batch of its position. Offline data ignores it
(:func:`mopo_jax.data.batch_at`). A fresh run starts from ``LoopConfig.initial_position`` (default ``{}``).

``hooks`` are :class:`Hook` s (``Hook(fn, every=N)``): ``fn(StepInfo)`` on every ``N``-th step's fetched metrics
(progress bars, TensorBoard, a user's own logging), as Levanter's ``add_hook(every=)``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mopo_jax import storage
from mopo_jax.models import ModelConfig
from mopo_jax.parallel import sharding
from mopo_jax.training.checkpoint import CheckpointConfig, Checkpointer, abstract_train_state
from mopo_jax.training.preemption import Preempted, PreemptionGuard
from mopo_jax.training.train_step import (
    TrainConfig,
    TrainState,
    compile_train_step,
    init_train_state,
    make_optimizer,
    train_state_shardings,
)

logger = logging.getLogger(__name__)

NextBatch = Callable[[dict, TrainState], "tuple[dict, dict] | None"]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long the loop runs and what it keeps.

    Attributes:
      num_steps: total number of train steps (counting those of a restored checkpoint).
      checkpoint: where and how often to checkpoint; ``None`` disables checkpointing and resuming.
      metrics_path: append one JSON line per step to this file (process 0 only; a local path or a URL).
      log_every: fetch metrics from the devices (and write them and call the hooks) every this many steps; with
        ``> 1`` the steps of one window share its average step time.
      rng: seed of the train state (a fresh start only).
      initial_position: data position of a fresh start (default ``{}``).
    """

    num_steps: int
    checkpoint: CheckpointConfig | None = None
    metrics_path: str | None = None
    log_every: int = 1
    rng: int = 0
    initial_position: dict | None = None

    def __post_init__(self):
        if self.num_steps < 0:
            raise ValueError(f"LoopConfig.num_steps must be >= 0, got {self.num_steps}")
        if self.log_every < 1:
            raise ValueError(f"LoopConfig.log_every must be >= 1, got {self.log_every}")


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook sees: the step, its metrics record (as written to ``metrics.jsonl``) and the newest state."""

    step: int
    metrics: dict
    state: TrainState


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(StepInfo)`` after every ``every``-th step, once its metrics are fetched."""

    fn: Callable[[StepInfo], None]
    every: int = 1

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"Hook.every must be >= 1, got {self.every}")


class NonFiniteError(RuntimeError):
    """A train step produced a non-finite loss, gradient norm, multiplier or other metric; the run stopped without
    saving that state (its newest checkpoint is the last finite step's, or older)."""

    def __init__(self, step: int, names: list[str], last_saved: int | None):
        where = f"the newest checkpoint is step {last_saved}" if last_saved else "no checkpoint was saved"
        super().__init__(f"step {step} produced non-finite {', '.join(names)}; stopped without saving it ({where}). "
                         "Lower the learning rate or check the batch of that step.")
        self.step, self.names, self.last_saved = step, names, last_saved


class ZeroGradientWarning(UserWarning):
    """A step's gradient norm was exactly 0: training goes on but learns nothing."""


def _non_finite(metrics: dict, no_data: frozenset[str]) -> list[str]:
    """Names of the metrics holding a NaN or an infinity; in the objective's ``no_data_metrics`` a NaN means "no
    data" and only an infinity counts."""
    bad = []
    for name, value in metrics.items():
        array = np.asarray(value)
        if array.dtype.kind in "fc":
            finite = np.isfinite(array) | (np.isnan(array) if name in no_data else False)
            if not np.all(finite):
                bad.append(name)
    return bad

# Compiled steps by (model config, train config, mesh, state and batch shapes): a second ``train`` call in the same
# process (e.g. a resume) reuses the executable instead of compiling again.
_STEP_CACHE: dict[Any, Any] = {}
_STEP_CACHE_SIZE = 8


def _shapes_key(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)


def _compiled_step(model_config, train_config, optimizer, mesh, state_shapes, batch_shapes):
    key = (model_config, train_config, mesh, _shapes_key(state_shapes), _shapes_key(batch_shapes))
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) >= _STEP_CACHE_SIZE:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        step, _ = compile_train_step(model_config, train_config, optimizer, mesh, state_shapes, batch_shapes)
        _STEP_CACHE[key] = step
    return _STEP_CACHE[key]


@jax.jit
def _count_tokens(batch):
    mask = batch.get("attention_mask")
    if mask is None:
        return jnp.asarray(batch["tokens"].size, jnp.int32)
    return jnp.sum(jnp.asarray(mask, bool), dtype=jnp.int32)


def _to_json(value, nan_as_null: bool = False):
    value = np.asarray(value)
    if nan_as_null and value.dtype.kind == "f":
        value = np.where(np.isnan(value), None, value.astype(object))
    return value.item() if value.ndim == 0 else value.tolist()


def _initial_state(model_config, train_config, optimizer, params, key, mesh, state_shardings) -> TrainState:
    """The initial state built directly in its shardings: each device receives only its shard of ``params`` (host
    arrays, the same on every process), and the state's copies are made in place."""
    params = sharding.put_params(model_config, params, mesh)
    init = jax.jit(
        lambda p, k: init_train_state(model_config, train_config, p, optimizer, k), out_shardings=state_shardings
    )
    return init(params, key)


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    params,
    next_batch: NextBatch,
    mesh,
    loop: LoopConfig,
    hooks: Sequence[Hook] = (),
) -> tuple[TrainState, list[dict]]:
    """Train until the state's step reaches ``loop.num_steps``, resuming from the newest good checkpoint if any.

    Args:
      model_config, train_config: the model and the train step's configuration.
      params: initial model parameters (ignored when a checkpoint is restored).
      next_batch: ``(position, state) -> (host batch, next position)`` or ``None``; see the module docstring.
      mesh: the device mesh (:func:`mopo_jax.parallel.sharding.make_mesh`).
      loop: steps, checkpoints, metrics file, seed (:class:`LoopConfig`).
      hooks: called on the fetched metrics of their steps (:class:`Hook`).

    Raises:
      NonFiniteError: a step's metrics (loss, gradient norm, the objective's multipliers and estimates) hold a NaN
        or an infinity: checked on the metrics fetched anyway, before any checkpoint of that state is written.
      Preempted: SIGTERM arrived (on any process); the state after the current step was checkpointed (every
        process stops after the same step) and the run can be resumed by calling ``train`` again.

    Returns:
      ``(state, history)``: the final state and one metrics dict per step this call ran, with ``step`` (the
      state's step after the update), ``time`` (Unix time when the metrics were fetched), ``step_time_s`` (wall
      time per step, data loading and the first step's compilation included), ``data_time_s``, ``tokens``
      (non-padding tokens of the global batch), ``tokens_per_s`` and the train step's metrics (floats, arrays as
      lists).
    """
    num_steps, log_every = loop.num_steps, loop.log_every
    optimizer = make_optimizer(train_config.optimizer)
    key = jax.random.PRNGKey(loop.rng)
    state_shapes = jax.eval_shape(
        lambda p, k: init_train_state(model_config, train_config, p, optimizer, k), params, key
    )
    state_shardings = train_state_shardings(model_config, train_config, optimizer, mesh, state_shapes)

    checkpointer = Checkpointer(loop.checkpoint) if loop.checkpoint is not None else None
    metrics_log = storage.AppendLog(loop.metrics_path) if loop.metrics_path and storage.is_primary() else None
    history: list[dict] = []
    # Without checkpoints there is nothing to save on SIGTERM: leave its default (terminate) in place.
    guard = PreemptionGuard().start() if checkpointer is not None else None
    try:
        restored = None
        if checkpointer is not None:
            restored = checkpointer.restore_latest(abstract_train_state(state_shapes, state_shardings))
        if restored is not None:
            state, position, start = restored.state, dict(restored.data_position), restored.step
            logger.info("resuming at step %d from data position %s", start, position)
            if metrics_log is not None:  # steps after the checkpoint ran before a crash; they run again now
                metrics_log.truncate_after(start)
        else:
            state = _initial_state(model_config, train_config, optimizer, params, key, mesh, state_shardings)
            position, start = dict(loop.initial_position or {}), 0
            if metrics_log is not None:  # an attempt killed before its first checkpoint (or a save torn by it)
                metrics_log.truncate_after(0)

        step_fn = None
        warned_zero_gradient: list[int] = []
        pending: list[tuple[int, dict, Any, float]] = []  # (step, device metrics, device token count, data time)
        window_start = time.perf_counter()
        last_saved = start if restored is not None else None
        no_data = getattr(train_config.objective, "no_data_metrics", frozenset())

        def flush():
            nonlocal window_start
            if not pending:
                return
            fetched = sharding.to_host([(metrics, tokens) for _, metrics, tokens, _ in pending])
            now = time.perf_counter()
            step_time = (now - window_start) / len(pending)
            records = []
            for (step, _, _, data_time), (metrics, tokens) in zip(pending, fetched):
                bad = _non_finite(metrics, no_data)
                if bad:
                    pending.clear()
                    if metrics_log is not None:
                        metrics_log.append(records)  # the finite steps before it
                    raise NonFiniteError(step, bad, last_saved)
                if "grad_norm" in metrics and float(metrics["grad_norm"]) == 0.0 and not warned_zero_gradient:
                    warned_zero_gradient.append(step)
                    warnings.warn(f"step {step}: the gradient norm is exactly 0, so the parameters no longer move "
                                  "(a saturated model after too large a learning rate, or a loss that does not "
                                  "depend on them)", ZeroGradientWarning, stacklevel=2)
                record = {
                    "step": step,
                    "time": time.time(),
                    "step_time_s": step_time,
                    "data_time_s": data_time,
                    "tokens": int(tokens),
                    "tokens_per_s": float(tokens) / step_time if step_time > 0 else float("nan"),
                }
                record.update({name: _to_json(value, name in no_data) for name, value in sorted(metrics.items())})
                history.append(record)
                for hook in hooks:
                    if step % hook.every == 0:
                        hook.fn(StepInfo(step, record, state))
                records.append(record)
                logger.info("step %d: loss %.6g, %.1f tokens/s", step, record.get("loss", float("nan")),
                            record["tokens_per_s"])
            if metrics_log is not None:
                metrics_log.append(records)
            pending.clear()
            window_start = time.perf_counter()

        for step in range(start, num_steps):
            data_start = time.perf_counter()
            drawn = next_batch(position, state)
            if drawn is None:
                logger.warning("the data ran out after step %d (of %d)", step, num_steps)
                break
            batch, next_position = drawn
            # The Python boundary: a malformed batch is named here, not inside the compiled step.
            train_config.objective.check_batch(batch, where=f"batch of step {step + 1}")
            global_batch = sharding.global_batch(batch, mesh)
            data_time = time.perf_counter() - data_start
            if step_fn is None:
                batch_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), global_batch)
                step_fn = _compiled_step(model_config, train_config, optimizer, mesh, state_shapes, batch_shapes)
            state, metrics = step_fn(state, global_batch)
            position = dict(next_position)
            pending.append((step + 1, metrics, _count_tokens(global_batch), data_time))
            if len(pending) >= log_every:
                flush()
            if guard is not None and guard.reached(step + 1):
                flush()
                checkpointer.save(step + 1, state, position, force=True)
                raise Preempted(step + 1)
            if checkpointer is not None and checkpointer.should_save(step + 1):
                flush()  # metrics reach the file before the checkpoint that covers them
                checkpointer.save(step + 1, state, position)
                last_saved = step + 1
        flush()
        final_step = int(jax.device_get(state.step))
        if checkpointer is not None and final_step > start and last_saved != final_step:
            checkpointer.save(final_step, state, position, force=True)
    finally:
        if guard is not None:
            guard.stop()
        if checkpointer is not None:
            checkpointer.close()  # waits for the last save to be committed
    return state, history
