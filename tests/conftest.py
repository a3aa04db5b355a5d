"""Test-wide setup: simulate 8 CPU devices (before JAX is imported) so sharding is tested on real meshes; the
`mopo` commands the tests start share one persistent compilation cache in a temporary directory (not the user's)."""

import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


os.environ.setdefault("MOPO_COMPILATION_CACHE", tempfile.mkdtemp(prefix="mopo-jax-test-compilation-cache-"))
# The multi-process tests kill one process on purpose: the survivor notices within 20 s instead of JAX's 100.
os.environ.setdefault("MOPO_HEARTBEAT_TIMEOUT_S", "20")

import pytest  # noqa: E402

from memory import free_memory  # noqa: E402


@pytest.fixture(scope="session")
def tiny_work_dir(tmp_path_factory):
    """One work directory for the runs of the `tiny` HH profile across test modules: its caches (tokenized splits,
    frozen-block activations, labelers and judges, the reference's evaluation samples) are built by the first run
    that needs them and read by the others, as runs of one experiment share them."""
    return tmp_path_factory.mktemp("tiny_shared")



@pytest.fixture(autouse=True, scope="module")
def _free_what_the_module_built():
    """After each module (two workers share this machine's memory with the multi-process tests' subprocesses)."""
    yield
    free_memory()


_MEMORY_LOG = os.environ.get("MOPO_TEST_MEMORY_LOG")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """With MOPO_TEST_MEMORY_LOG=FILE, one line per test: the process's peak resident memory after it (MiB) and
    the test, to find what raises a worker's peak."""
    yield
    if _MEMORY_LOG:
        import resource

        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        children_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        with open(_MEMORY_LOG, "a") as handle:
            handle.write(f"{peak_mib:.0f}\t{children_mib:.0f}\t{os.getpid()}\t{item.nodeid}\n")


# The modules that take longest, longest first (from `.ci/run --durations`; docs/benchmarks.md). pytest-xdist's
# `--dist loadfile` hands out whole modules and by default starts with those holding the most tests, which puts
# these few-test, long modules (a whole pipeline each) at the end, where one worker runs them while the other idles.
# Started first, they overlap, and the many short modules fill the end on whichever worker is free.
_LONGEST_FIRST = (
    "test_multiprocess_experiment.py",
    "test_hh_pipeline.py",
    "test_mesh_experiment.py",
    "test_synthetic.py",
    "test_run_records.py",
    "test_gcs_root.py",
    "test_experiment_data.py",
    "test_compilation_cache.py",
    "test_multihost.py",
    "test_checkpoint.py",
    "test_examples.py",
    "test_faults_inputs.py",
    "test_sharding.py",
    "test_models.py",
    "test_memory_bench.py",
)


def pytest_configure(config):
    # Keep the collection order below rather than xdist's by-count order (no effect without xdist).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
