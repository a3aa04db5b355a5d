"""Freeing what a test process built, for the test session's fixtures and for the child processes that run the
heaviest experiments apart from the pytest worker."""

from __future__ import annotations


def free_memory() -> None:
    """Drops JAX's compiled programs and the experiment's in-process model and tokenizer caches (whatever of them
    is loaded), so a test process holds what the current work needs, not everything it ran before."""
    import gc
    import sys

    experiment = sys.modules.get("mopo_jax.experiment.hh_rlhf")
    if experiment is not None:
        for cached in (experiment._load_model, experiment._load_host_model):
            cached.cache_clear()
    tokenizer = sys.modules.get("mopo_jax.models.tokenizer")
    if tokenizer is not None:
        for name in ("_hf_tokenizer", "_gguf_tokenizer"):
            getattr(tokenizer, name).cache_clear()
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    _return_freed_heap()


def _return_freed_heap() -> None:
    """glibc keeps freed heap pages in its arenas (XLA's threads use many), so a worker's resident size only grows
    from module to module; ``malloc_trim`` hands them back to the system."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
