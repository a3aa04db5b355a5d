"""JAX's persistent compilation cache for the command-line entry points.

A run of ``mopo synthetic`` or ``mopo train`` spends much of its wall time compiling programs that the previous run
compiled already. With the cache on, compiled executables are stored on disk and loaded by the next process. Entries
are keyed by JAX itself on everything the executable depends on (the lowered program, compile options, backend,
device kind and jax/jaxlib versions), so a stale entry cannot be loaded for a changed program.

Default directory: ``$MOPO_COMPILATION_CACHE`` if set, else ``$XDG_CACHE_HOME/mopo-jax/jax`` (``~/.cache/mopo-jax/jax``).
``MOPO_COMPILATION_CACHE=off`` (or ``mopo ... --no-compilation-cache``) turns it off.
"""

from __future__ import annotations

import os
import warnings

ENVIRONMENT_VARIABLE = "MOPO_COMPILATION_CACHE"
_OFF = {"off", "0", "false", "no", "none", ""}


def default_directory() -> str | None:
    """The cache directory the CLI uses (None: the environment turned the cache off)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    if value is not None:
        return None if value.strip().lower() in _OFF else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mopo-jax", "jax")


def enable(directory: str | None = None) -> str | None:
    """Turns JAX's persistent compilation cache on in ``directory`` (default :func:`default_directory`), for every
    program however short its compilation (the synthetic benchmark compiles dozens of sub-second programs). Returns
    the directory, or None when the cache stays off."""
    import jax

    directory = default_directory() if directory is None else directory
    if directory is None:
        return None
    if "://" not in directory:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as error:  # a read-only home must not stop a run: compile without the cache
            warnings.warn(f"compilation cache {directory!r} is not usable ({error}); compiling without it "
                          f"(set {ENVIRONMENT_VARIABLE} to another directory, or to off)", stacklevel=2)
            return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
