"""`pip install mopo-jax` without extras gives a working core: the losses, MOPO's dual state, the training objectives
and the optax example run with jax, optax, numpy and flax alone. A fresh interpreter refuses to import every package
an extra brings (scipy, yaml, orbax, transformers, ...), as a machine without them would."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (PyYAML and etils are not here: flax and optax, core dependencies, bring them.)
EXTRAS_ONLY = ("scipy", "orbax", "transformers", "tokenizers", "safetensors", "gguf", "datasets", "tqdm",
               "tensorboardX", "matplotlib", "torch", "chex", "jinja2")

SCRIPT = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {EXTRAS_ONLY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (an extra, refused by this test)")
            return None

    sys.meta_path.insert(0, Refuse())
    sys.path.insert(0, {str(REPO / "examples")!r})

    import jax.numpy as jnp
    import mopo_jax as mj

    objective = mj.MOPOPairwise(mj.MOPOConfig(eps=0.0, refresh_every=None), thresholds=(0.5,))
    batch = {{"preference_probs": jnp.ones((4, 2)), "label_mask": jnp.eye(2, dtype=bool)[jnp.array([0, 1, 0, 1])],
             "response_valid": jnp.ones((4, 2), bool)}}
    state, rows = objective.prepare(objective.init(), batch)
    log_probs = mj.ResponseLogProbs(jnp.zeros((4, 2)), jnp.zeros((4, 2)))
    terms, aux = objective.loss(state, {{**batch, **rows}}, log_probs)
    state = objective.update(state, {{**batch, **rows}}, aux)
    assert float(terms.mean()) > 0 and state.step == 1

    import optax_pairwise_loop
    values, state = optax_pairwise_loop.main(steps=20, verbose=False)
    assert values.shape == (2,)
    from mopo_jax import cli
    parser = cli.build_parser()  # the command line itself needs no extra; `mopo synthetic` names the one it needs
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {EXTRAS_ONLY!r})
    assert not loaded, loaded
    print("CORE OK")
    """
)


def test_core_runs_without_any_extra():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and "CORE OK" in result.stdout, result.stderr[-4000:]


def test_command_line_names_the_missing_extra(tmp_path):
    script = SCRIPT.split("import jax.numpy")[0] + textwrap.dedent(
        """
        from mopo_jax import cli
        code = cli.main(["synthetic", "--out", "OUT"])
        print("EXIT", code)
        """
    ).replace("OUT", str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert "EXIT 2" in result.stdout, result.stderr[-4000:]
    assert "pip install" in result.stderr and "mopo-jax[synthetic]" in result.stderr


def test_lower_floors_load_no_training_stack():
    """Storage, the mesh helpers and the models are the floors the trainer stands on: importing them loads neither
    the trainer nor orbax (the import picture of docs/api.md)."""
    script = ("import sys, mopo_jax.storage, mopo_jax.parallel.sharding, mopo_jax.parallel.distributed, "
              "mopo_jax.models\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'orbax' or m.startswith('mopo_jax.training')))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout


#: The floors of docs/api.md ("Import floors"), lowest first.
FLOORS = {"objectives": 1, "losses": 1, "state": 1, "policy_objectives": 1, "validation": 1, "parallel": 2,
          "storage": 2, "configs": 2, "compilation_cache": 2, "models": 3, "data": 3, "training": 4, "evaluation": 5,
          "synthetic": 5, "experiment": 6, "bench": 6, "cli": 6}


def test_no_import_reaches_a_higher_floor():
    """Every `import mopo_jax.X` / `from mopo_jax.X import` / `from mopo_jax import X` in the package, deferred
    ones inside functions included, goes to the same floor or a lower one."""
    import re

    package = REPO / "mopo_jax"
    assert {p.stem if p.is_file() else p.name for p in package.iterdir()
            if not p.name.startswith(("_", ".")) and (p.suffix == ".py" or p.is_dir())} <= set(FLOORS)
    upward = []
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[0] == "__init__":
            continue
        text = path.read_text()
        targets = re.findall(r"(?:from|import) mopo_jax\.(\w+)", text)
        targets += [name.strip() for group in re.findall(r"from mopo_jax import ([\w, ]+)", text)
                    for name in group.split(",")]
        upward += [f"{path.relative_to(REPO)} -> {t}" for t in targets if FLOORS.get(t, 0) > FLOORS[parts[0]]]
    assert not upward, upward
