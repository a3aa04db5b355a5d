"""A Flax NNX face of the decoder, for users who build models as ``nnx.Module`` objects.

The computation is the functional :func:`mopo_jax.models.forward` (one implementation); the module holds the same
parameter pytree as ``nnx.Param`` variables. ``nnx.split(model)`` gives ``(graphdef, state)`` and
``nnx.to_pure_dict(state)["params"]`` is exactly the params pytree the train step, sharding rules and checkpoints
use, so NNX users and functional users share every other part of the library.
"""

from __future__ import annotations

import jax
from flax import nnx

from mopo_jax.models.config import ModelConfig
from mopo_jax.models.transformer import forward, init_params


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class Transformer(nnx.Module):
    """Decoder-only transformer (Llama family or GPT-2, per ``config``) as an NNX module.

    Args:
      config: the model configuration.
      rngs: ``nnx.Rngs`` for random initialisation (ignored when ``params`` is given).
      params: an existing params pytree (e.g. from :func:`mopo_jax.models.load_pretrained`).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, params=None):
        if params is None:
            if rngs is None:
                raise ValueError("Transformer needs either rngs (random init) or params")
            params = init_params(config, rngs.params())
        self.config = config
        self.params = nnx.data(jax.tree.map(nnx.Param, params))

    def pure_params(self):
        """The params pytree (plain arrays), as the functional API takes it."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)

    def __call__(self, tokens, positions=None, mask=None, *, return_hidden: bool = False):
        """Logits ``[B, T, V]`` in float32 (see :func:`mopo_jax.models.forward`)."""
        return forward(self.config, self.pure_params(), tokens, positions, mask, return_hidden=return_hidden)

    @classmethod
    def from_pretrained(cls, path_or_name: str, **kwargs) -> "Transformer":
        """Loads weights with :func:`mopo_jax.models.load_pretrained` into a module."""
        from mopo_jax.models.weights import load_pretrained

        config, params = load_pretrained(path_or_name, **kwargs)
        return cls(config, params=params)
