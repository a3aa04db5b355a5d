"""Which parameters train: everything, everything but some frozen entries, or LoRA adapters over a frozen base.

The train state holds the *trained* part (``params``: the model's parameters, the non-frozen entries, or the
adapters) and the *frozen* part (``base``: nothing, the frozen entries, or the whole base model). Everything that
needs the model's full parameters goes through :func:`merge` (or :func:`policy_params` / :func:`reference_params` on a
train state): the step's forward passes, the on-policy sampler, saving a policy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mopo_jax.models import ModelConfig, param_logical_axes

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
    """Attributes:
      lora_rank: 0 trains the parameters themselves; > 0 trains rank-r adapters on ``lora_targets`` with the frozen
        base as the reference.
      lora_alpha: adapter scale numerator (the update is ``alpha / r * A @ B``).
      lora_targets: stacked ``[L, in, out]`` projections that get adapters.
      frozen: top-level parameter names held fixed (no gradient, no optimizer state), e.g. ``("embed",)`` when the
        upper layers train on cached activations of a tied-embedding model.
    """

    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    frozen: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"TrainableConfig.lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        if self.lora_rank and self.frozen:
            raise ValueError("TrainableConfig: LoRA freezes the whole base already; leave frozen empty")


def init_lora(config: TrainableConfig, base_params, rng: jax.Array):
    """Adapters ``{name: {"a": [L, in, r], "b": [L, r, out]}}``: ``a`` Gaussian, ``b`` zero, so the initial policy
    equals the base."""
    adapters = {}
    layers = base_params["layers"]
    names = [n for n in config.lora_targets if n in layers]
    for name, key in zip(names, jax.random.split(rng, len(names))):
        num_layers, fan_in, fan_out = layers[name].shape
        adapters[name] = {
            "a": jax.random.normal(key, (num_layers, fan_in, config.lora_rank), jnp.float32) / fan_in**0.5,
            "b": jnp.zeros((num_layers, config.lora_rank, fan_out), jnp.float32),
        }
    return adapters


def base_of(config: TrainableConfig, params):
    """The frozen part of a model's parameters (no copy): the whole model under LoRA, the frozen entries, or None
    when everything trains."""
    if config.lora_rank:
        return params
    if config.frozen:
        missing = set(config.frozen) - set(params)
        if missing:
            raise ValueError(f"TrainableConfig.frozen names {sorted(missing)}, not in the model's parameters "
                             f"{sorted(params)}")
        return {k: v for k, v in params.items() if k in config.frozen}
    return None


def split(config: TrainableConfig, params, rng: jax.Array):
    """``(trained, base)`` from a model's parameters (copies: the train state is donated by the compiled step)."""
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    base = base_of(config, params)
    if config.lora_rank:
        return init_lora(config, params, rng), copy(base)
    if config.frozen:
        return copy({k: v for k, v in params.items() if k not in config.frozen}), copy(base)
    return copy(params), None


def merge(config: TrainableConfig, base, trained):
    """The model's full parameters from the frozen part and a trained part (the policy's, or the reference's)."""
    if config.lora_rank:
        scale = config.lora_alpha / config.lora_rank
        layers = dict(base["layers"])
        for name, adapter in trained.items():
            delta = jnp.einsum("lir,lro->lio", adapter["a"], adapter["b"])
            layers[name] = layers[name] + (scale * delta).astype(layers[name].dtype)
        return {**base, "layers": layers}
    if config.frozen:
        return {**base, **trained}
    return trained


def logical_axes(config: TrainableConfig, model_config: ModelConfig, trained_names):
    """Logical axes of the trained part (the adapters', or the trained entries' own)."""
    model_axes = param_logical_axes(model_config)
    if not config.lora_rank:
        return {k: model_axes[k] for k in trained_names}
    layer_axes = model_axes["layers"]
    axes = {}
    for name in config.lora_targets:
        if name in layer_axes:
            layers_axis, in_axis, out_axis = layer_axes[name]
            axes[name] = {"a": (layers_axis, in_axis, "lora_rank"), "b": (layers_axis, "lora_rank", out_axis)}
    return axes


def policy_params(config: TrainableConfig, state):
    """The current policy's full parameters from a train state."""
    return merge(config, state.base, state.params)


def reference_params(config: TrainableConfig, state):
    """The (possibly lagged) reference's full parameters from a train state; None when it is precomputed."""
    return None if state.reference is None else merge(config, state.base, state.reference)
