"""``mopo export``: a trained run's whole policy as a Hugging Face model directory.

The run's ``policy.npz`` holds the parameters it trained (the top blocks on cached activations, or LoRA
adapters); the export merges them onto the frozen parts of the run's base model and writes the complete model
(:func:`mopo_jax.models.export.save_pretrained`) with the tokenizer, so that ``transformers`` and ``mopo generate
--model DIR`` load it without this project.
"""

from __future__ import annotations

from mopo_jax import storage


def export_run(run_dir: str, out: str, dtype: str | None = None) -> list[str]:
    """Writes ``run_dir``'s trained policy to ``out`` (a new or empty directory) and returns the files written;
    ``dtype`` converts the weights (default: the run's parameter dtype)."""
    import jax

    from mopo_jax.experiment.hh_rlhf import base_model, split_model, trainable_for
    from mopo_jax.experiment.run_dir import load_policy, load_run_config
    from mopo_jax.models import join_layers, load_tokenizer
    from mopo_jax.models.export import save_pretrained
    from mopo_jax.parallel import sharding

    config = load_run_config(run_dir)
    policy_path = storage.path(run_dir) / "policy.npz"
    if not policy_path.exists():
        raise ValueError(f"{policy_path} does not exist: {run_dir} has not finished training (rerun `mopo train`)")
    out_path = storage.path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise ValueError(f"{out}: not empty; export into a new directory")
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), jax.devices()[:1])
    model_config, params = base_model(config, mesh)
    lower_config, lower, upper_config, upper = split_model(config, model_config, params)
    trained = load_policy(policy_path, upper, trainable_for(config))
    policy = trained if lower is None else join_layers(lower, trained)
    return save_pretrained(model_config, policy, out, tokenizer=load_tokenizer(config.model.name), dtype=dtype)
