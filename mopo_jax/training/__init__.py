"""Training language models with any objective of :mod:`mopo_jax.policy_objectives`: sequence log-probs, trainable
parameters (LoRA, frozen entries), the train step, checkpoints, and the loop. The mesh and sharding rules live in
:mod:`mopo_jax.parallel` (re-exported here as ``sharding`` and ``distributed``)."""

from mopo_jax.training.checkpoint import CheckpointConfig, Checkpointer
from mopo_jax.training.logprobs import SequenceLogProbs, sequence_log_probs
from mopo_jax.training.loop import Hook, LoopConfig, StepInfo, train
from mopo_jax.parallel import distributed, sharding
from mopo_jax.parallel.sharding import MeshConfig, global_batch, make_mesh, parse_mesh
from mopo_jax.training.train_step import (
    OptimizerConfig,
    TrainConfig,
    TrainState,
    compile_train_step,
    init_train_state,
    make_optimizer,
    train_step,
)
from mopo_jax.training.trainable import TrainableConfig, policy_params, reference_params

__all__ = [
    "distributed",
    "sharding",
    "CheckpointConfig",
    "Checkpointer",
    "Hook",
    "LoopConfig",
    "StepInfo",
    "MeshConfig",
    "OptimizerConfig",
    "SequenceLogProbs",
    "TrainConfig",
    "TrainState",
    "TrainableConfig",
    "compile_train_step",
    "global_batch",
    "init_train_state",
    "make_mesh",
    "make_optimizer",
    "parse_mesh",
    "policy_params",
    "reference_params",
    "sequence_log_probs",
    "train",
    "train_step",
]
