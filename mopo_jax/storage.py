"""Where run and work directories live: one path layer (``etils.epath``, as Orbax uses) for every artifact, so a
``gs://bucket/run`` directory holds config, metrics, caches, policies and evaluations as well as checkpoints.

Multi-process jobs: every process reads; only the primary process (``jax.process_index() == 0``) writes the files
of this module (``primary_only`` guards), so no two processes ever write the same file; :func:`barrier` makes the
others wait until a stage's files exist. Checkpoints are the exception: Orbax writes them collectively.

Writes are atomic: a file is written under a temporary name beside its destination and renamed, so a crash leaves
either the old file or the new one, never a truncated one that a later run would read.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import uuid
import warnings
import zipfile
from typing import Any, Callable, TypeVar

import numpy as np
from etils import epath

from mopo_jax.parallel.distributed import barrier, broadcast_from_primary

T = TypeVar("T")


def path(location: str | os.PathLike) -> epath.Path:
    """The path object of a local path or a URL (``gs://``, ...)."""
    return epath.Path(location)


def is_local(location: str | os.PathLike) -> bool:
    return "://" not in os.fspath(location)


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always True for a single process)."""
    import jax

    return jax.process_index() == 0


def _write_bytes(destination: epath.Path, payload: bytes) -> None:
    save_streamed(destination, lambda handle: handle.write(payload))


def save_streamed(location, write: Callable[[Any], Any]) -> None:
    """Writes ``location`` through ``write(handle)`` (a binary file) into a temporary file beside it, renamed over
    it once complete, so a reader never sees half a file; for payloads too large to hold in memory at once."""
    destination = path(location)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with temporary.open("wb") as handle:
            write(handle)
        temporary.replace(destination)
    except BaseException:
        # A full disk or an interrupt mid-write: leave neither a half-written file nor its space behind.
        try:
            temporary.unlink()
        except OSError:
            pass
        raise


def jsonable(value):
    """``value`` with arrays and NumPy scalars turned into lists and Python numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "__array__") and not isinstance(value, np.generic):
        return np.asarray(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_json(location, payload: Any) -> None:
    _write_bytes(path(location), json.dumps(jsonable(payload), indent=1).encode())


def load_json(location) -> Any:
    return json.loads(path(location).read_text())


def save_text(location, text: str) -> None:
    _write_bytes(path(location), text.encode())


def save_bytes(location, payload: bytes) -> None:
    _write_bytes(path(location), payload)


def save_arrays(location, arrays: dict[str, np.ndarray]) -> None:
    """A ``.npz`` of named arrays."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    _write_bytes(path(location), buffer.getvalue())


def load_arrays(location) -> dict[str, np.ndarray]:
    with path(location).open("rb") as handle, np.load(io.BytesIO(handle.read())) as data:
        return {k: data[k] for k in data.files}


def content_key(**dependencies) -> str:
    """A short hash of everything a cached result was computed from (config fields, input files' contents): a cache
    file named with it is never read for other inputs."""
    text = json.dumps(jsonable(dependencies), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def input_files_signature(source: str) -> list:
    """``[(name, size, sha256), ...]`` of the files under a local source (a file or a directory; ``name`` relative to
    it); ``[(name, size, modified), ...]`` under a URL (``gs://``: rewriting an object changes its time, and reading
    gigabytes of remote weights to hash them is what the cache exists to avoid); ``[source]`` for a hub name, whose
    content the name (and its revision) stands for.

    Content, not modification time, for local files: a dataset copied or unpacked again with the same bytes (a new
    clone, a re-provisioned machine) keeps its caches, and an edit that keeps the size and the second of the mtime
    does not.
    """
    if not is_local(source):
        return _remote_files_signature(source)
    local = os.path.expanduser(source)
    if not os.path.exists(local):
        return [source]
    if os.path.isfile(local):
        files = [(os.path.basename(local), local)]
    else:
        files = sorted((os.path.relpath(os.path.join(root, name), local), os.path.join(root, name))
                       for root, _, names in os.walk(local) for name in names)
    signature = []
    for name, file in files:
        stat = os.stat(file)
        signature.append((name, stat.st_size, _file_sha256(file, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                                                           stat.st_ino)))
    return signature


def _remote_files_signature(source: str) -> list:
    """``(name, size, version)`` of each object under a URL, ``version`` being what the store changes on every
    write (a GCS object's generation, else its checksum, ETag or modification time)."""
    import fsspec

    filesystem, root = fsspec.core.url_to_fs(source)
    if not filesystem.exists(root):
        return [source]
    found = filesystem.find(root, detail=True) if filesystem.isdir(root) else {root: filesystem.info(root)}
    signature = []
    for name, info in sorted(found.items()):
        version = next((info[key] for key in ("generation", "md5Hash", "crc32c", "ETag", "mtime", "updated")
                        if info.get(key) is not None), None)
        signature.append((os.path.relpath(name, root) if name != root else os.path.basename(name),
                          info.get("size"), str(version)))
    return signature


@functools.lru_cache(maxsize=4096)
def _file_sha256(file: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """The file's sha256, read once per process while its stat is unchanged (every cache key of a command asks for
    it; any write or ``utime`` moves ``ctime``, so an edit is always read again)."""
    del size, mtime_ns, ctime_ns, inode  # the memo's key only
    return file_sha256(file)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (a local path or any ``epath`` URL), read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def cached_stage(name: str, exists: Callable[[], bool], build: Callable[[bool], T], load: Callable[[], T], *,
                 everywhere: bool = False) -> T:
    """A preparation stage whose result is cached in files: done once, then read by every later run.

    When process 0 does not find the files (``exists``), or cannot read them (a truncated or corrupt cache is
    rebuilt, with a warning), the stage is built: by process 0 alone (host work such as tokenisation; the others
    wait at a barrier, then ``load``), or, with ``everywhere``, by every process together (device work on the mesh,
    whose collectives need all processes; ``build`` gets whether this process writes, and its return value is used
    directly). ``build(write)`` writes the files when ``write`` is True.
    """
    loaded, readable = None, False
    if is_primary() and exists():
        try:
            loaded, readable = load(), True
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            warnings.warn(f"stage {name!r}: its cache cannot be read ({type(error).__name__}: {error}); rebuilding it",
                          stacklevel=2)
    if broadcast_from_primary(int(readable)):
        return loaded if is_primary() else load()
    if everywhere:
        value = build(is_primary())
        barrier(f"stage-{name}")
        return value
    if is_primary():
        build(True)
    barrier(f"stage-{name}")
    if not exists():
        raise RuntimeError(f"stage {name!r}: its files are missing after process 0 wrote them; a multi-process job "
                           "needs its work directory on storage every process sees (a shared file system or gs://)")
    return load()


class AppendLog:
    """A JSON-lines file that grows by whole lines: appended in place on a local disk, rewritten whole (atomically)
    on object stores, which cannot append."""

    def __init__(self, location):
        self.path = path(location)
        self._local = is_local(location)
        self._lines: list[str] | None = None

    def truncate_after(self, step: int) -> int:
        """Drops the records of steps after ``step`` (and a line torn by a crash), so that a run resumed from the
        checkpoint of ``step`` writes each later step once. Returns how many lines were dropped."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            _write_bytes(self.path, "".join(kept).encode())
        self._lines = None
        return len(lines) - len(kept)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(jsonable(r)) + "\n" for r in records)
        if self._local:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(os.fspath(self.path), "a") as handle:
                handle.write(text)
            return
        if self._lines is None:
            self._lines = [self.path.read_text()] if self.path.exists() else []
        self._lines.append(text)
        _write_bytes(self.path, "".join(self._lines).encode())


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class DirectoryLock:
    """An exclusive lock on a local directory for one job (``with DirectoryLock(dir, "mopo train"): ...``): the
    primary process creates ``DIR.lock`` beside it (host, pid, what holds it; beside, so that neither creating the
    lock nor moving the directory aside touches the directory) atomically and removes it on exit; every process
    of the job learns the outcome, so the whole job stops when another job holds the directory. A lock left by a
    process that no longer runs on this host (a kill -9, a crash) is stale: it is taken over with a warning. A lock
    from another host is trusted (its process cannot be checked from here): remove the file if that job is gone.
    Remote directories (``gs://``) have no atomic create here, so they are not locked."""

    def __init__(self, location: str | os.PathLike, holder: str):
        self.location, self.holder = os.fspath(location), holder
        self._file = os.path.normpath(self.location) + ".lock"
        self._owned = False

    def _try_acquire(self) -> str | None:
        """Creates the lock file; returns None, or a description of the live job that holds it."""
        import socket

        os.makedirs(os.path.dirname(os.path.abspath(self._file)), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "holder": self.holder}
        for _ in range(2):
            try:
                fd = os.open(self._file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(open(self._file).read())
                except (OSError, json.JSONDecodeError):
                    other = {}
                same_host = other.get("host") == me["host"]
                if same_host and isinstance(other.get("pid"), int) and not _process_alive(other["pid"]):
                    warnings.warn(f"{self.location}: taking over the lock of {other.get('holder')} (pid "
                                  f"{other['pid']}), which no longer runs", stacklevel=3)
                    os.remove(self._file)
                    continue
                return (f"{other.get('holder', 'a process')} (pid {other.get('pid', '?')} on host "
                        f"{other.get('host', '?')})")
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(me))
            self._owned = True
            return None
        return "a process that keeps re-creating the lock"

    def __enter__(self) -> "DirectoryLock":
        if not is_local(self.location):
            return self
        held_by = self._try_acquire() if is_primary() else None
        if broadcast_from_primary(int(held_by is not None)):
            raise ValueError(f"{self.location} is in use by {held_by or 'another job'} ({self._file}); wait for it, "
                             "or remove the lock file if that job is gone")
        return self

    def __exit__(self, *exc) -> None:
        if self._owned:
            try:
                os.remove(self._file)
            except FileNotFoundError:
                pass
            self._owned = False
