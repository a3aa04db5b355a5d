"""Checkpoints of the full train state with Orbax, verified on restore.

A checkpoint of step ``s`` is one Orbax step directory ``<directory>/<s>/`` with two items:

* ``state``: every non-``None`` array of the :class:`~mopo_jax.training.train_step.TrainState` (parameters,
  optimizer state, reference, snapshot, LoRA base, the objective's state, step counter, PRNG key), flattened to a dict keyed by
  the dotted pytree path (``"params.layers.wq"``, ``"opt_state.1.0.mu.embed"``, ``"objective_state.multipliers"``); the
  structure itself (``None`` fields, optax's empty states, namedtuples) comes back from the abstract state given to
  :meth:`Checkpointer.restore_latest`, so nothing but arrays is stored. Zero-size arrays (Orbax refuses them) are
  recorded in the metadata only, and typed PRNG keys are stored as their ``uint32`` key data;
* ``meta``: a small JSON document with the step, the caller's data position (any JSON-serialisable dict, e.g.
  ``{"epoch": 0, "batch_index": 12}``) and the layout (path -> shape, dtype) of the saved arrays.

Saves are asynchronous (Orbax copies the arrays to host memory before :meth:`Checkpointer.save` returns, so the
caller may donate the state to the next step right away) and atomic (Orbax writes into a temporary directory and
renames it when every process is done). Once Orbax has committed a step, a background thread writes
``mopo_manifest.json`` into the step directory: the size and SHA-256 of every file. The manifest is this module's
commit marker: Orbax itself lists a step directory that lost its ``commit_success.txt`` and reads truncated or
bit-flipped data files without complaint in some layouts, so :meth:`Checkpointer.restore_latest` checks every file
against the manifest before it restores. A checkpoint that fails the check (no manifest, a missing, truncated or
changed file, or an Orbax error while reading it) is reported with a :class:`CheckpointWarning` naming its directory,
moved aside to ``<directory>/quarantine/`` (so the resumed run can save that step again; nothing is deleted) and
the next older checkpoint is tried.

Usage::

    checkpointer = Checkpointer(CheckpointConfig("/ckpt", save_every=500))
    restored = checkpointer.restore_latest(abstract_train_state(state_shapes, state_shardings))
    ...
    checkpointer.save(step, state, {"epoch": epoch, "batch_index": i})   # every save_every steps
    checkpointer.close()                                                   # waits for the last save

Multi-process: every process calls every method; files are checked and moved by the primary process (0) and the
verdict is shared, so all processes restore the same step. The manifest assumes a file system that every process
sees (as Orbax does).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import threading
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mopo_jax import storage
from mopo_jax.parallel.distributed import barrier, broadcast_from_primary

logger = logging.getLogger(__name__)

MANIFEST_NAME = "mopo_manifest.json"
QUARANTINE_DIR = "quarantine"
FORMAT_VERSION = 1
_STATE_ITEM, _META_ITEM = "state", "meta"


class CheckpointWarning(UserWarning):
    """A checkpoint was found corrupt or incomplete and was skipped."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often to checkpoint.

    Attributes:
      directory: root directory of the step directories (a local path or anything ``etils.epath`` opens).
      save_every: save when ``step % save_every == 0`` (``<= 0``: only forced saves).
      keep: how many of the latest checkpoints Orbax keeps (``None`` keeps all).
      async_save: write in a background thread (the arrays are copied to host memory first).
      checksums: record and verify SHA-256 digests of every file (False: sizes only, for very large checkpoints
        on slow storage).
    """

    directory: str
    save_every: int
    keep: int | None = 3
    async_save: bool = True
    checksums: bool = True

    def __post_init__(self):
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"CheckpointConfig.keep must be >= 1 or None, got {self.keep}")


class Restored(NamedTuple):
    state: Any
    data_position: dict
    step: int


# ---------------------------------------------------------------------------------------------------------------
# Flattening the state into named arrays.


def _path_name(path) -> str:
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:  # pragma: no cover - future key types
            parts.append(str(entry).strip(".[]'\""))
    return ".".join(parts) or "value"


def _is_key(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _named_leaves(tree) -> tuple[list[tuple[str, Any]], Any]:
    """``[(name, leaf)]`` in flattening order and the treedef; names are unique dotted paths."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = [(_path_name(path), leaf) for path, leaf in with_paths]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"checkpoint: pytree paths collide after joining with '.': {duplicates}")
    return named, treedef


def _layout_entry(shape, dtype, key_impl: str | None = None) -> dict:
    entry = {"shape": [int(d) for d in shape], "dtype": str(dtype)}
    if key_impl is not None:
        entry["key_impl"] = key_impl
    return entry


def flatten_state(state) -> tuple[dict[str, jax.Array], dict[str, dict]]:
    """The arrays Orbax saves (keyed by dotted path) and the layout of every leaf (``None`` fields have none)."""
    named, _ = _named_leaves(state)
    arrays, layout = {}, {}
    for name, leaf in named:
        if not isinstance(leaf, jax.Array):
            leaf = jnp.asarray(leaf)
        if _is_key(leaf.dtype):
            layout[name] = _layout_entry(leaf.shape, leaf.dtype, str(jax.random.key_impl(leaf)))
            leaf = jax.random.key_data(leaf)
        else:
            layout[name] = _layout_entry(leaf.shape, leaf.dtype)
        if leaf.size:
            arrays[name] = leaf
    return arrays, layout


def abstract_train_state(state_shapes, state_shardings):
    """``jax.ShapeDtypeStruct`` leaves carrying their target sharding: the argument of
    :meth:`Checkpointer.restore_latest`. ``state_shardings`` has ``None`` where ``state_shapes`` has ``None``."""
    return jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        state_shapes,
        state_shardings,
    )


def _abstract_targets(abstract_state):
    """Orbax restore targets, the expected layout, and a function rebuilding the state from the restored dict."""
    named, treedef = _named_leaves(abstract_state)
    targets, layout, builders = {}, {}, []
    for name, leaf in named:
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ValueError(f"checkpoint: the abstract state leaf {name!r} has no sharding to restore into")
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if _is_key(dtype):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
            layout[name] = _layout_entry(shape, dtype)
            target = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        else:
            layout[name] = _layout_entry(shape, dtype)
            target = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        if int(np.prod(target.shape)):
            targets[name] = target
        builders.append((name, target, _is_key(dtype)))

    def rebuild(restored: dict, saved_layout: dict):
        leaves = []
        for name, target, is_key in builders:
            if name in restored:
                value = restored[name]
            else:  # zero-size: nothing was written
                value = jax.device_put(np.zeros(target.shape, target.dtype), target.sharding)
            if is_key:
                value = jax.random.wrap_key_data(value, impl=saved_layout[name]["key_impl"])
            leaves.append(value)
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return targets, layout, rebuild


def _layout_mismatch(saved: dict, expected: dict) -> str | None:
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    different = [
        f"{name}: saved {saved[name]['shape']} {saved[name]['dtype']}, "
        f"expected {expected[name]['shape']} {expected[name]['dtype']}"
        for name in sorted(set(saved) & set(expected))
        if (saved[name]["shape"], saved[name]["dtype"]) != (expected[name]["shape"], expected[name]["dtype"])
    ]
    if not (missing or extra or different):
        return None
    parts = []
    if missing:
        parts.append(f"not in the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        parts.append(f"only in the checkpoint: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if different:
        parts.append(f"different: {different[:8]}{' ...' if len(different) > 8 else ''}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Manifest: the commit marker with per-file sizes and digests.


def _walk_files(root: epath.Path, prefix: str = ""):
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            yield from _walk_files(child, rel + "/")
        else:
            yield rel, child


def write_manifest(step_dir: epath.Path, step: int, checksums: bool = True) -> None:
    """Record every file of a committed step directory; written to a temporary name, then renamed."""
    files = {}
    for rel, path in _walk_files(step_dir):
        if rel in (MANIFEST_NAME, MANIFEST_NAME + ".tmp"):
            continue
        entry = {"size": path.stat().length}
        if checksums:
            entry["sha256"] = storage.file_sha256(path)
        files[rel] = entry
    manifest = {"format": FORMAT_VERSION, "step": step, "files": files}
    tmp = step_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.rename(step_dir / MANIFEST_NAME)


def verify_step_dir(step_dir: epath.Path, verify_checksums: bool = True) -> str | None:
    """``None`` if every file listed in the manifest is present, of its size and digest; else what is wrong."""
    if not step_dir.exists():
        return "the directory does not exist"
    manifest_path = step_dir / MANIFEST_NAME
    if not manifest_path.exists():
        return (f"it has no {MANIFEST_NAME} (the save never completed: the process died before the commit, or the "
                "directory was not written by this Checkpointer)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except Exception as e:  # noqa: BLE001 - any parse failure means an unusable manifest
        return f"its {MANIFEST_NAME} is unreadable ({type(e).__name__}: {e})"
    for rel, entry in sorted(files.items()):
        path = step_dir / rel
        if not path.exists():
            return f"file {rel} is missing"
        size = path.stat().length
        if size != entry["size"]:
            return f"file {rel} has {size} bytes, {entry['size']} were written (truncated or overwritten)"
        if verify_checksums and "sha256" in entry and storage.file_sha256(path) != entry["sha256"]:
            return f"file {rel} does not match its SHA-256 checksum (corrupted)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Multi-process agreement (no-ops on one process).


def _all_processes(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


# ---------------------------------------------------------------------------------------------------------------


class Checkpointer:
    """An ``orbax.checkpoint.CheckpointManager`` of train states with data positions, commit manifests, verified
    restores and fallback to the last good checkpoint. Use as a context manager or call :meth:`close`."""

    def __init__(self, config: CheckpointConfig):
        self.config = config
        directory = epath.Path(config.directory)
        if not str(config.directory).startswith(("gs://", "s3://")):
            directory = directory.absolute()
        self.directory = directory
        self._name_format = ocp.step.standard_name_format()
        options = ocp.CheckpointManagerOptions(
            step_name_format=self._name_format,
            preservation_policy=(
                ocp.checkpoint_managers.LatestN(n=config.keep) if config.keep is not None
                else ocp.checkpoint_managers.PreserveAll()
            ),
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=config.async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=(_STATE_ITEM, _META_ITEM), options=options)
        self._commit_thread: threading.Thread | None = None
        self._commit_error: BaseException | None = None
        self._closed = False

    # -- paths --------------------------------------------------------------------------------------------------

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / self._name_format.build_name(step)

    def all_steps(self) -> list[int]:
        """Steps Orbax lists (committed or not by this module's manifest), ascending."""
        self._join_commit()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    @property
    def manager(self) -> ocp.CheckpointManager:
        return self._manager

    # -- saving -------------------------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        return self.config.save_every > 0 and step % self.config.save_every == 0

    def save(self, step: int, state, data_position: dict | None = None, force: bool = False) -> bool:
        """Save ``state`` as step ``step`` if ``force`` or ``step % save_every == 0`` (and the step is not saved yet).

        Returns once the arrays are on the host; the write, Orbax's commit and the manifest happen in the background
        (:meth:`wait` blocks until they are done). Returns whether a save was started.
        """
        if self._closed:
            raise RuntimeError("Checkpointer.save after close()")
        if not (force or self.should_save(step)):
            return False
        data_position = dict(data_position or {})
        try:
            json.dumps(data_position)
        except TypeError as e:
            raise TypeError(f"Checkpointer.save: data_position must be JSON-serialisable: {e}") from e
        self._join_commit()
        if step in self._manager.all_steps():
            logger.info("checkpoint of step %d already exists in %s; not saving it again", step, self.directory)
            return False
        arrays, layout = flatten_state(state)
        meta = {"format": FORMAT_VERSION, "step": int(step), "data_position": data_position, "layout": layout}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE_ITEM: ocp.args.StandardSave(arrays), _META_ITEM: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )
        if saved:
            self._commit_thread = threading.Thread(
                target=self._commit, args=(step,), name=f"mopo-checkpoint-commit-{step}", daemon=True
            )
            self._commit_thread.start()
            if not self.config.async_save:
                self._join_commit()
        return saved

    def _commit(self, step: int) -> None:
        try:
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                write_manifest(self.step_dir(step), step, self.config.checksums)
            logger.info("checkpoint of step %d committed in %s", step, self.step_dir(step))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._commit_error = e

    def _join_commit(self) -> None:
        if self._commit_thread is not None:
            self._commit_thread.join()
            self._commit_thread = None
        if self._commit_error is not None:
            error, self._commit_error = self._commit_error, None
            raise RuntimeError(f"saving a checkpoint in {self.directory} failed") from error

    def wait(self) -> None:
        """Block until the last save is written, committed and has its manifest."""
        self._join_commit()
        barrier("mopo_checkpoint_wait")

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._join_commit()
        finally:
            self._closed = True
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restoring ----------------------------------------------------------------------------------------------

    def _check(self, step: int) -> str | None:
        """The primary process's verdict on a step directory, shared with every process."""
        problem = None
        if jax.process_index() == 0:
            problem = verify_step_dir(self.step_dir(step), self.config.checksums)
        bad = broadcast_from_primary(int(problem is not None))
        if bad and problem is None:
            problem = "the primary process found it corrupt or incomplete"
        return problem

    def _quarantine(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            target_root = self.directory / QUARANTINE_DIR
            target_root.mkdir(parents=True, exist_ok=True)
            for step in steps:
                source = self.step_dir(step)
                if source.exists():
                    target = target_root / f"{source.name}-{stamp}"
                    source.rename(target)
                    logger.warning("moved the unusable checkpoint %s to %s", source, target)
        barrier("mopo_checkpoint_quarantine")
        self._manager.reload()

    def restore_latest(self, abstract_state) -> Restored | None:
        """Restore the newest good checkpoint directly into the shardings of ``abstract_state``.

        ``abstract_state`` is the train state's structure with ``jax.ShapeDtypeStruct`` leaves that carry a
        ``.sharding`` (see :func:`abstract_train_state`; arrays work too), ``None`` where the state has ``None``.

        Returns:
          ``(state, data_position, step)``, or ``None`` when there is no usable checkpoint. Unusable checkpoints
          newer than the one restored are reported with a :class:`CheckpointWarning` and moved to ``quarantine/``.

        Raises:
          ValueError: the newest intact checkpoint holds a different state layout (another model or config):
            that is a mistake to fix, not a corruption to skip.
        """
        self._join_commit()
        self._manager.reload()
        targets, expected_layout, rebuild = _abstract_targets(abstract_state)
        bad: list[int] = []
        try:
            for step in sorted(self._manager.all_steps(), reverse=True):
                step_dir = self.step_dir(step)
                problem = self._check(step)
                meta = None
                if problem is None:
                    try:
                        meta_args = ocp.args.Composite(**{_META_ITEM: ocp.args.JsonRestore()})
                        meta = self._manager.restore(step, args=meta_args)[_META_ITEM]
                    except Exception as e:  # noqa: BLE001
                        problem = f"its metadata could not be read ({type(e).__name__}: {e})"
                    if not _all_processes(problem is None):
                        problem = problem or "another process could not read its metadata"
                if problem is None:
                    mismatch = _layout_mismatch(meta["layout"], expected_layout)
                    if mismatch:
                        raise ValueError(
                            f"checkpoint {step_dir} does not match the train state being restored ({mismatch}); "
                            "was it written with another model or TrainConfig?"
                        )
                    try:
                        restored = self._manager.restore(
                            step, args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardRestore(targets)})
                        )[_STATE_ITEM]
                        state = rebuild(dict(restored), meta["layout"])
                    except Exception as e:  # noqa: BLE001
                        problem = f"Orbax could not restore it ({type(e).__name__}: {str(e)[:500]})"
                    if not _all_processes(problem is None):
                        problem = problem or "another process could not restore it"
                if problem is not None:
                    message = (f"checkpoint {step_dir} (step {step}) is unusable: {problem}; "
                               "falling back to the previous checkpoint")
                    warnings.warn(message, CheckpointWarning, stacklevel=2)
                    logger.warning(message)
                    bad.append(step)
                    continue
                logger.info("restored step %d from %s", step, step_dir)
                return Restored(state, meta.get("data_position", {}), int(meta.get("step", step)))
            return None
        finally:
            self._quarantine(bad)


def save_and_wait(config: CheckpointConfig, step: int, state, data_position: dict | None = None) -> None:
    """One blocking save (for scripts and tests)."""
    with Checkpointer(config) as checkpointer:
        checkpointer.save(step, state, data_position, force=True)
