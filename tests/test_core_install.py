"""`pip install mopo-jax` without extras gives a working core: the losses, MOPO's dual state, the training objectives
and the optax example run with jax, optax, numpy and flax alone. A fresh interpreter refuses to import every package
an extra brings (scipy, yaml, orbax, transformers, ...), as a machine without them would."""

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
