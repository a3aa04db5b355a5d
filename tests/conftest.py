"""Test-wide setup: simulate 8 CPU devices (before JAX is imported) so sharding is tested on real meshes."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_work_dir(tmp_path_factory):
    """One work directory for the runs of the `tiny` HH profile across test modules: its caches (tokenized splits,
    frozen-block activations, labelers and judges, the reference's evaluation samples) are built by the first run
    that needs them and read by the others, as runs of one experiment share them."""
    return tmp_path_factory.mktemp("tiny_shared")


# Modules that take minutes, heaviest first. The suite runs on two workers that take whole modules in collection
# order (`pytest -n 2 --dist loadfile`): starting the long ones first keeps one worker from running them alone at
# the end (longest-first scheduling).
HEAVY_MODULES = ("test_mesh_experiment.py", "test_hh_pipeline.py", "test_synthetic.py", "test_multihost.py",
                 "test_sharding.py", "test_checkpoint.py", "test_faults_inputs.py", "test_attention.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_MODULES)))  # stable: file order kept otherwise
