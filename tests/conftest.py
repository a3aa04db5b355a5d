"""Test-wide setup: simulate 8 CPU devices (before JAX is imported) so sharding is tested on real meshes; the
`mopo` commands the tests start share one persistent compilation cache in a temporary directory (not the user's)."""

import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


os.environ.setdefault("MOPO_COMPILATION_CACHE", tempfile.mkdtemp(prefix="mopo-jax-test-compilation-cache-"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_work_dir(tmp_path_factory):
    """One work directory for the runs of the `tiny` HH profile across test modules: its caches (tokenized splits,
    frozen-block activations, labelers and judges, the reference's evaluation samples) are built by the first run
    that needs them and read by the others, as runs of one experiment share them."""
    return tmp_path_factory.mktemp("tiny_shared")

