"""The train step for language models: pure, jitted, sharded over a (data, fsdp, tensor) mesh, objective-agnostic.

``train_step(state, batch) -> (state, metrics)`` with

* the loss and its dual/state updates from ``TrainConfig.objective``, an :class:`mopo_jax.policy_objectives.Objective`
  (MOPO pairwise or on candidate pools, DPO, IPO, their weighted variants, MODPO, or a user's own); the step calls its
  ``prepare`` / ``loss`` / ``update`` / ``metrics`` and never asks which objective it is;
* sequence log-probs of every response of the batch in one forward pass (chosen/rejected/candidates on the batch
  axis), completion-only, float32 log-softmax; responses with an empty completion are marked in
  ``batch["response_valid"]`` for the objective to drop, and counted; the reference forward runs only when the
  objective reads it;
* gradient accumulation over micro-batches that sums gradients *and* loss denominators, then divides once;
* the reference live (frozen parameters in the state) or precomputed (log-probs in the batch); LoRA adapters or
  frozen entries as set by ``TrainConfig.trainable`` (:mod:`mopo_jax.training.trainable`);
* the objective's state (e.g. MOPO's multipliers, chi, thresholds) in the train state; when the objective keeps a
  lagged reference, every refresh makes the reference the policy of ``t0`` steps earlier, kept in the state, so the
  refresh needs no data.

Batch layout (leading axis ``B`` prompts, ``S`` responses per prompt: 2 for pairs, ``N`` for candidates):

* ``tokens`` int ``[B, S, T]``, ``completion_mask`` ``[B, S, T]``, ``attention_mask`` ``[B, S, T]``;
* the objective's fields (``objective.fields``), e.g. ``preference_probs`` / ``label_mask`` ``[B, K]`` for pair
  objectives, ``candidate_preferences`` / ``candidate_label_mask`` ``[B, K, N, N]`` for candidate pools;
* optional ``ref_log_probs`` ``[B, S]`` when ``TrainConfig.reference == "precomputed"``;
* optional ``inputs_hidden`` ``[B, S, T, D]``: cached residual stream of frozen lower layers when the trained model
  is the upper part of :func:`mopo_jax.models.split_layers` (the CPU profile's "train the top layers" lever).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mopo_jax.models import ModelConfig
from mopo_jax.policy_objectives import MOPOPairwise, Objective, ResponseLogProbs
from mopo_jax.parallel import sharding
from mopo_jax.training import trainable
from mopo_jax.training.logprobs import sequence_log_probs
from mopo_jax.state import lagged_reference_update
from mopo_jax.training.trainable import TrainableConfig


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up and (unless ``max_grad_norm`` is None) global-norm clipping.

    Attributes:
      learning_rate: peak learning rate (finite, > 0).
      warmup_steps: steps of linear warm-up from 0.
      weight_decay: AdamW's decoupled weight decay.
      max_grad_norm: clip the global gradient norm to this (None: no clipping).
    """

    learning_rate: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        def number(name, value, integral=False):
            kinds = (int,) if integral else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
                raise ValueError(f"OptimizerConfig.{name} must be a finite {'integer' if integral else 'number'}, "
                                 f"got {value!r}")

        number("learning_rate", self.learning_rate)
        number("warmup_steps", self.warmup_steps, integral=True)
        number("weight_decay", self.weight_decay)
        if self.learning_rate <= 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps and weight_decay must be >= 0, got {self.warmup_steps}, "
                             f"{self.weight_decay}")
        if self.max_grad_norm is not None:
            number("max_grad_norm", self.max_grad_norm)
            if self.max_grad_norm <= 0:
                raise ValueError(f"OptimizerConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Configuration of the train step (hashable: it is a static argument of the compiled step).

    Attributes:
      objective: the training objective (:mod:`mopo_jax.policy_objectives`).
      optimizer: the optimiser (:class:`OptimizerConfig`).
      trainable: which parameters train (:class:`~mopo_jax.training.trainable.TrainableConfig`: all, all but frozen
        entries, or LoRA adapters).
      micro_batches: gradient-accumulation steps per train step (must divide the batch).
      reference: ``"live"`` (frozen reference parameters in the state) or ``"precomputed"`` (``ref_log_probs`` in
        the batch; no lagged reference possible).
      vocab_chunk: chunk the log-softmax over the vocabulary (None: one shot).
      completion_start: first column of the batch that can hold a completion token (the prompt width of the data
        layout); earlier positions skip the unembedding (see :func:`mopo_jax.training.sequence_log_probs`).
    """

    objective: Objective = MOPOPairwise()
    optimizer: OptimizerConfig = OptimizerConfig()
    trainable: TrainableConfig = TrainableConfig()
    micro_batches: int = 1
    reference: str = "live"
    vocab_chunk: int | None = None
    completion_start: int = 0

    def __post_init__(self):
        if not isinstance(self.objective, Objective):
            raise ValueError(f"TrainConfig.objective must be an Objective (mopo_jax.policy_objectives), got "
                             f"{type(self.objective).__name__}")
        if self.reference not in ("live", "precomputed"):
            raise ValueError(f"TrainConfig.reference must be 'live' or 'precomputed', got {self.reference!r}")
        if self.reference == "precomputed" and self.trainable.lora_rank:
            raise ValueError("TrainConfig: LoRA uses its frozen base as the reference; set reference='live'")
        if self.reference == "precomputed" and self.objective.lagged_reference:
            raise ValueError("TrainConfig: a precomputed reference cannot be refreshed; use an objective without a "
                             "lagged reference (e.g. MOPOConfig(refresh_every=None))")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"TrainConfig.micro_batches must be an integer >= 1, got {self.micro_batches!r}")

    @property
    def keeps_initial_reference(self) -> bool:
        """The state keeps the initial reference beside a lagged one: the objective's constraint is measured
        against the distribution its data came from, which a refresh does not change
        (:attr:`mopo_jax.policy_objectives.Objective.reads_initial_reference`)."""
        return self.keeps_snapshot and self.objective.reads_initial_reference

    @property
    def keeps_snapshot(self) -> bool:
        """The state holds the policy recorded at the last refresh (the next lagged reference)."""
        return self.reference == "live" and self.objective.lagged_reference


class TrainState(NamedTuple):
    """Everything a step reads and writes; every field is a pytree of arrays (``None`` where unused)."""

    step: jax.Array
    params: Any  # trained weights: the model's parameters, the non-frozen entries, or the LoRA adapters
    opt_state: Any
    reference: Any  # reference weights in the same structure as ``params`` (None when precomputed)
    snapshot: Any  # ``params`` at the last refresh, the next reference (None without a lagged reference)
    initial_reference: Any  # the reference before any refresh (only when the objective reads it; else None)
    base: Any  # frozen weights: the whole base model in LoRA mode, the frozen entries otherwise, or None
    objective_state: Any  # the objective's state (MOPO's MOPOState; () for stateless objectives)
    rng: jax.Array


# ---------------------------------------------------------------------------------------------------------------
# State construction and shardings.


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and (unless ``max_grad_norm`` is None) global-norm clipping."""
    schedule = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
    if config.warmup_steps == 0:
        schedule = config.learning_rate
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
    if config.max_grad_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optimizer)
    return optimizer


def init_train_state(
    model_config: ModelConfig, config: TrainConfig, params, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """The initial state: the policy starts at ``params``, which is also the reference.

    The state holds its own copies (the compiled step donates the state), so ``params`` stays usable.
    """
    lora_key, rng = jax.random.split(rng)
    trained, base = trainable.split(config.trainable, params, lora_key)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trained,
        opt_state=optimizer.init(trained),
        reference=None if config.reference == "precomputed" else copy(trained),
        snapshot=copy(trained) if config.keeps_snapshot else None,
        initial_reference=copy(trained) if config.keeps_initial_reference else None,
        base=base,
        objective_state=config.objective.init(),
        rng=rng,
    )


def train_state_shardings(model_config: ModelConfig, config: TrainConfig, optimizer, mesh, state_shapes: TrainState):
    """NamedShardings of every leaf of the train state: parameter-shaped trees by the logical rules, the optimizer
    state like the parameters it tracks, everything else replicated."""
    trained_axes = trainable.logical_axes(config.trainable, model_config, state_shapes.params)
    trained = sharding.tree_shardings(trained_axes, state_shapes.params, mesh)
    replicated = sharding.replicated(mesh)

    def like_params(tree):
        return None if tree is None else trained

    # Optimizer moments are parameter-shaped: shard them like the parameters; counters stay replicated.
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, leaf_sharding: leaf_sharding, state_shapes.opt_state, trained,
        transform_non_params=lambda _: replicated,
    )
    base = None
    if state_shapes.base is not None:
        base = sharding.tree_shardings(trainable.logical_axes(TrainableConfig(), model_config, state_shapes.base),
                                       state_shapes.base, mesh)
    return TrainState(
        step=replicated,
        params=trained,
        opt_state=opt_shardings,
        reference=like_params(state_shapes.reference),
        snapshot=like_params(state_shapes.snapshot),
        initial_reference=like_params(state_shapes.initial_reference),
        base=base,
        objective_state=jax.tree.map(lambda _: replicated, state_shapes.objective_state),
        rng=replicated,
    )


# ---------------------------------------------------------------------------------------------------------------
# The step.


def responses_with_completion(completion_mask, attention_mask, completion_start: int = 0) -> jax.Array:
    """``[B, S]`` True for a response with at least one scored token (column ``>= max(completion_start, 1)``)."""
    start = max(completion_start, 1)
    scored = jnp.asarray(completion_mask[..., start:], bool) & jnp.asarray(attention_mask[..., start:], bool)
    return jnp.any(scored, axis=-1)


def _flatten_responses(batch):
    tokens = batch["tokens"]
    num_prompts, num_responses, length = tokens.shape
    flat = lambda a: a.reshape((num_prompts * num_responses, length) + a.shape[3:])  # noqa: E731
    hidden = batch.get("inputs_hidden")
    return (flat(tokens), flat(batch["completion_mask"]), flat(batch["attention_mask"]),
            None if hidden is None else flat(hidden), (num_prompts, num_responses))


def _sequence_log_probs(model_config, config, weights, batch, mesh=None):
    tokens, completion, attention, hidden, shape = _flatten_responses(batch)
    residual = None
    if mesh is not None:
        # Keep the flattened responses, and the residual stream, on the batch axes of the mesh (ACTIVATION_RULES):
        # left alone, XLA shards the activations like the FSDP-sharded weights (along embed) with the whole batch on
        # every device (a 1.3B step on fsdp=8: 13.7 GiB of temporaries per device instead of 2.6).
        rows = sharding.activation_sharding(mesh, ("batch", "length"))
        tokens, completion, attention = (jax.lax.with_sharding_constraint(a, rows) for a in (tokens, completion, attention))
        residual = sharding.activation_sharding(mesh, ("batch", "length", "embed"))
    out = sequence_log_probs(model_config, weights, tokens, completion, attention, config.vocab_chunk, hidden,
                             activation_sharding=residual, completion_start=config.completion_start)
    return out.log_probs.reshape(shape), out.num_tokens.reshape(shape)


def _response_log_probs(model_config, config: TrainConfig, state: TrainState, trained, batch, mesh):
    """The policy's (differentiable) and, when the objective reads it, the reference's log-probs ``[b, S]``."""
    policy, num_tokens = _sequence_log_probs(
        model_config, config, trainable.merge(config.trainable, state.base, trained), batch, mesh)
    reference = None
    if config.objective.needs_reference:
        if config.reference == "precomputed":
            reference = jnp.asarray(batch["ref_log_probs"], jnp.float32)
        else:
            weights = trainable.merge(config.trainable, state.base, jax.lax.stop_gradient(state.reference))
            reference, _ = _sequence_log_probs(model_config, config, weights, batch, mesh)
        reference = jax.lax.stop_gradient(reference)
    initial = None
    if config.keeps_initial_reference:
        weights = trainable.merge(config.trainable, state.base, jax.lax.stop_gradient(state.initial_reference))
        initial = jax.lax.stop_gradient(_sequence_log_probs(model_config, config, weights, batch, mesh)[0])
    return ResponseLogProbs(policy=policy, reference=reference, initial_reference=initial), num_tokens


def _split_micro_batches(batch, micro_batches: int):
    def split(leaf):
        if leaf.shape[0] % micro_batches:
            raise ValueError(f"batch size {leaf.shape[0]} is not divisible by micro_batches={micro_batches}")
        return leaf.reshape((micro_batches, leaf.shape[0] // micro_batches) + leaf.shape[1:])

    return jax.tree.map(split, batch)


def _join_micro_batches(tree):
    """``[M, b, ...] -> [M * b, ...]``: per-row outputs of the micro-batches back in batch order."""
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), tree)


def train_step(
    model_config: ModelConfig,
    config: TrainConfig,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batch: dict,
    mesh=None,
) -> tuple[TrainState, dict]:
    """One update of the policy and of the objective's state; pure. Jit it with :func:`compile_train_step`.

    ``mesh`` (optional) pins the flattened responses to the mesh's batch axes.

    Returns:
      ``(new_state, metrics)``: the mean loss and its denominator, the gradient norm, the responses dropped for an
      empty completion, the completion tokens, and the objective's metrics.
    """
    objective = config.objective
    valid = responses_with_completion(batch["completion_mask"], batch["attention_mask"], config.completion_start)
    batch = {**batch, "response_valid": valid}
    objective_state, rows = objective.prepare(state.objective_state, batch)
    batch = {**batch, **rows}
    micro = _split_micro_batches(batch, config.micro_batches)

    def accumulate(carry, micro_batch):
        grad_sum, total, denominator = carry

        def loss_of(trained):
            log_probs, num_tokens = _response_log_probs(model_config, config, state, trained, micro_batch, mesh)
            terms, aux = objective.loss(objective_state, micro_batch, log_probs)
            return terms.total, (terms.denominator, aux, num_tokens)

        (loss_total, (loss_denominator, aux, num_tokens)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, total + loss_total, denominator + loss_denominator), (aux, num_tokens)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, total, denominator), (aux, num_tokens) = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro
    )
    aux = _join_micro_batches(jax.lax.stop_gradient(aux))
    scale = 1.0 / jnp.maximum(denominator, 1.0)
    grads = jax.tree.map(lambda g: g * scale, grad_sum)
    objective_state = objective.update(objective_state, batch, aux)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    reference, snapshot = state.reference, state.snapshot
    if config.keeps_snapshot:
        reference, snapshot = jax.lax.cond(
            objective.reference_refresh_due(objective_state),
            lambda: lagged_reference_update(True, reference, snapshot, params),
            lambda: (reference, snapshot),
        )

    grad_norm = optax.tree.norm(grads)
    max_norm = config.optimizer.max_grad_norm
    metrics = {
        "loss": total * scale,
        "loss_denominator": denominator,
        "grad_norm": grad_norm,
        # 1 when global-norm clipping shrank this step (its mean over steps is the run's clip fraction).
        "clipped": (grad_norm > max_norm).astype(jnp.float32) if max_norm is not None else jnp.zeros(()),
        "dropped_rows": jnp.sum(~valid),
        "completion_tokens": jnp.sum(num_tokens),
        **objective.metrics(objective_state, batch, aux),
    }
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        reference=reference,
        snapshot=snapshot,
        initial_reference=state.initial_reference,
        base=state.base,
        objective_state=objective_state,
        rng=jax.random.fold_in(state.rng, state.step),
    )
    return new_state, metrics


def batch_shardings(mesh, batch_shapes: dict):
    return {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}


def compile_train_step(model_config: ModelConfig, config: TrainConfig, optimizer, mesh, state_shapes, batch_shapes):
    """``jax.jit`` of :func:`train_step` with explicit in/out shardings on ``mesh`` and the state donated.

    ``state_shapes`` and ``batch_shapes`` are pytrees of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
    ``jax.eval_shape``), so a 1.3B step can be lowered and compiled without allocating it.

    Returns:
      ``(jitted_step, state_shardings)``.
    """
    state_shardings = train_state_shardings(model_config, config, optimizer, mesh, state_shapes)
    step = jax.jit(
        partial(train_step, model_config, config, optimizer, mesh=mesh),
        in_shardings=(state_shardings, batch_shardings(mesh, batch_shapes)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return step, state_shardings
