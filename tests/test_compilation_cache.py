"""The CLI's persistent compilation cache: on by default in the configured directory, off by flag or environment,
and a second run loads what the first compiled (same results)."""

import json
import os
import subprocess
import sys

import pytest

from mopo_jax import compilation_cache

TINY = ["structures=bt_aligned", "steps=20", "ablation=false", "plots=false", "sampled_pairs=0", "num_thresholds=3",
        "sweep_resolution=2"]


# `mopo synthetic` in a fresh process that counts JAX's persistent-cache hits (its monitoring event).
_COUNTING_MAIN = """
import sys
import jax.monitoring
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
from mopo_jax.cli import main
code = main(sys.argv[1:])
print("CACHE_HITS", len(hits))
sys.exit(code)
"""


def _synthetic(out, *flags, env=None):
    command = [sys.executable, "-c", _COUNTING_MAIN, "synthetic", "--out", str(out), *flags, *TINY]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    hits = int(done.stdout.rsplit("CACHE_HITS", 1)[1])
    return json.loads((out / "results.json").read_text())["structures"]["bt_aligned"]["methods"], hits


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(compilation_cache.ENVIRONMENT_VARIABLE, str(tmp_path / "cache"))
    assert compilation_cache.default_directory() == str(tmp_path / "cache")
    for off in ("off", "0", "false", ""):
        monkeypatch.setenv(compilation_cache.ENVIRONMENT_VARIABLE, off)
        assert compilation_cache.default_directory() is None
    monkeypatch.delenv(compilation_cache.ENVIRONMENT_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.default_directory() == str(tmp_path / "xdg" / "mopo-jax" / "jax")


def test_an_unusable_directory_warns_and_leaves_the_cache_off(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="not usable"):
        assert compilation_cache.enable(str(blocker / "cache")) is None


def test_cli_writes_then_reuses_the_cache_and_the_flag_turns_it_off(tmp_path):
    cache = tmp_path / "cache"
    first, first_hits = _synthetic(tmp_path / "a", "--compilation-cache", str(cache))
    entries = set(os.listdir(cache))
    assert entries and first_hits == 0, "the first run stored no compiled program"
    second, second_hits = _synthetic(tmp_path / "b", "--compilation-cache", str(cache))
    assert set(os.listdir(cache)) == entries  # nothing new was compiled and written
    assert second_hits >= 6, second_hits  # the sweeps (MOPO x2, DPO, IPO, MODPO, soups) were loaded, not compiled
    for method in ("mopo_weighted_bc", "dpo_primary", "modpo"):
        assert [p.get("primary_value") for p in first[method]["points"]] == \
            [p.get("primary_value") for p in second[method]["points"]]
    off = tmp_path / "off-cache"
    _synthetic(tmp_path / "c", "--no-compilation-cache", env={compilation_cache.ENVIRONMENT_VARIABLE: str(off)})
    assert not off.exists()
