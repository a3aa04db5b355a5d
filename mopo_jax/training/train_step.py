"""The MOPO train step for language models: pure, jitted, sharded over a (data, fsdp, tensor) mesh.

``train_step(state, batch) -> (state, metrics)`` with

* the loss any of the core's: MOPO weighted BC over sampled candidates (Eq. 7), MOPO pairwise (Eq. 8), DPO, IPO;
* sequence log-probs of every response of the batch in one forward pass (chosen/rejected/candidates on the batch
  axis), completion-only, float32 log-softmax; rows with an empty completion are dropped and counted;
* gradient accumulation over micro-batches that sums gradients *and* loss denominators, then divides once;
* the reference live (frozen parameters in the state) or precomputed (log-probs in the batch); in LoRA mode the
  frozen base model is the reference and only the adapters train;
* the MOPO state (multipliers, chi, thresholds, lag bookkeeping) in the train state, updated by the core's pure
  functions; every ``t0`` steps the reference becomes the policy of ``t0`` steps earlier, kept in the state, so the
  refresh needs no data.

Batch layout (leading axis ``B`` prompts, ``S`` responses per prompt: 2 for pairs, ``N`` for candidates):

* ``tokens`` int ``[B, S, T]``, ``completion_mask`` ``[B, S, T]``, ``attention_mask`` ``[B, S, T]``;
* pair losses: ``preference_probs`` ``[B, K]`` (``P_k(first > second)``, 1 for a human "chosen" label) and
  ``label_mask`` ``[B, K]``; DPO and IPO use objective 0;
* weighted BC: ``candidate_preferences`` ``[B, K, N, N]``, ``candidate_label_mask`` ``[B, K, N, N]``;
* optional ``ref_log_probs`` ``[B, S]`` when ``TrainConfig.reference == "precomputed"``;
* optional ``pair_weights`` ``[B]`` (row weights of the pair losses: linear scalarisation over objectives) and
  ``margin_offset`` ``[B]`` (DPO logit offset: MODPO's secondary reward margin);
* optional ``inputs_hidden`` ``[B, S, T, D]``: cached residual stream of frozen lower layers when the trained model
  is the upper part of :func:`mopo_jax.models.split_layers` (the CPU profile's "train the top layers" lever).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mopo_jax import losses, objectives
from mopo_jax.models import ModelConfig, param_logical_axes
from mopo_jax.state import MOPOConfig, MOPOState, lagged_reference_update, mopo, reference_refresh_due
from mopo_jax.training import sharding
from mopo_jax.training.logprobs import sequence_log_probs

LOSSES = ("mopo_weighted_bc", "mopo_pairwise", "dpo", "ipo")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the train step (hashable: it is a static argument of the compiled step).

    Attributes:
      loss: one of :data:`LOSSES`.
      beta: DPO's inverse temperature.
      mopo: MOPO's hyper-parameters (``tau`` is also IPO's).
      thresholds: initial thresholds ``b`` of the secondary objectives.
      learning_rate, warmup_steps, weight_decay, max_grad_norm: AdamW with linear warm-up and global-norm clipping
        (``max_grad_norm=None``: no clipping).
      micro_batches: gradient-accumulation steps per train step (must divide the batch).
      reference: ``"live"`` (frozen reference parameters in the state) or ``"precomputed"`` (``ref_log_probs`` in
        the batch; no lagged refresh possible).
      lora_rank: 0 trains every parameter; > 0 trains rank-r adapters on ``lora_targets`` with the frozen base as
        the reference.
      lora_alpha: adapter scale numerator (the update is ``alpha / r * A @ B``).
      vocab_chunk: chunk the log-softmax over the vocabulary (None: one shot).
      include_self: whether the comparison policy of a pair puts mass on the response itself (Eq. 1).
      frozen_params: top-level parameter names held fixed (no gradient, no update), e.g. ``("embed",)`` when the
        upper layers train on cached activations of a tied-embedding model.
      completion_start: first column of the batch that can hold a completion token (the prompt width of the data
        layout); earlier positions skip the unembedding (see :func:`mopo_jax.training.sequence_log_probs`).
    """

    loss: str = "mopo_pairwise"
    beta: float = 0.1
    mopo: MOPOConfig = MOPOConfig()
    thresholds: tuple[float, ...] = (0.5,)
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    micro_batches: int = 1
    reference: str = "live"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    vocab_chunk: int | None = None
    include_self: bool = True
    frozen_params: tuple[str, ...] = ()
    completion_start: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.reference not in ("live", "precomputed"):
            raise ValueError(f"TrainConfig.reference must be 'live' or 'precomputed', got {self.reference!r}")
        if self.reference == "precomputed" and self.lora_rank:
            raise ValueError("TrainConfig: LoRA uses its frozen base as the reference; set reference='live'")
        if self.reference == "precomputed" and self.uses_mopo and self.mopo.refresh_every is not None:
            raise ValueError("TrainConfig: a precomputed reference cannot be refreshed; set mopo.refresh_every=None")
        if self.micro_batches < 1:
            raise ValueError(f"TrainConfig.micro_batches must be >= 1, got {self.micro_batches}")
        if self.lora_rank < 0:
            raise ValueError(f"TrainConfig.lora_rank must be >= 0, got {self.lora_rank}")

    @property
    def uses_mopo(self) -> bool:
        return self.loss.startswith("mopo")

    @property
    def refreshes_reference(self) -> bool:
        return self.uses_mopo and self.mopo.refresh_every is not None


class TrainState(NamedTuple):
    """Everything a step reads and writes; every field is a pytree of arrays (``None`` where unused)."""

    step: jax.Array
    params: Any  # trained weights: the model's parameters, or the LoRA adapters
    opt_state: Any
    reference: Any  # reference weights in the same structure as ``params`` (None when precomputed)
    snapshot: Any  # ``params`` at the last refresh, the next reference (None without a lagged reference)
    base: Any  # frozen weights: the whole base model in LoRA mode, the ``frozen_params`` entries otherwise, or None
    mopo_state: MOPOState | None
    rng: jax.Array


# ---------------------------------------------------------------------------------------------------------------
# LoRA: adapters on the stacked [L, in, out] projection weights.


def init_lora(config: TrainConfig, base_params, rng: jax.Array):
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


def lora_logical_axes(model_config: ModelConfig, config: TrainConfig):
    layer_axes = param_logical_axes(model_config)["layers"]
    axes = {}
    for name in config.lora_targets:
        if name in layer_axes:
            layers_axis, in_axis, out_axis = layer_axes[name]
            axes[name] = {"a": (layers_axis, in_axis, "lora_rank"), "b": (layers_axis, "lora_rank", out_axis)}
    return axes


def merge_lora(config: TrainConfig, base_params, adapters):
    """Base weights plus ``alpha / r * A @ B`` on the adapted projections."""
    scale = config.lora_alpha / config.lora_rank
    layers = dict(base_params["layers"])
    for name, adapter in adapters.items():
        delta = jnp.einsum("lir,lro->lio", adapter["a"], adapter["b"])
        layers[name] = layers[name] + (scale * delta).astype(layers[name].dtype)
    return {**base_params, "layers": layers}


def _weights(config: TrainConfig, state_base, trained):
    """The model's full parameters from the trained part and the frozen part (LoRA base or frozen entries)."""
    if config.lora_rank:
        return merge_lora(config, state_base, trained)
    if config.frozen_params:
        return {**state_base, **trained}
    return trained


# ---------------------------------------------------------------------------------------------------------------
# State construction and shardings.


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
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
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    lora_key, rng = jax.random.split(rng)
    if config.lora_rank:
        base, trained = copy(params), init_lora(config, params, lora_key)
    elif config.frozen_params:
        missing = set(config.frozen_params) - set(params)
        if missing:
            raise ValueError(f"TrainConfig.frozen_params names {sorted(missing)}, not in the model's parameters "
                             f"{sorted(params)}")
        base = copy({k: v for k, v in params.items() if k in config.frozen_params})
        trained = copy({k: v for k, v in params.items() if k not in config.frozen_params})
    else:
        base, trained = None, copy(params)
    reference = None if config.reference == "precomputed" else copy(trained)
    mopo_state = mopo(config.mopo).init(jnp.asarray(config.thresholds, jnp.float32)) if config.uses_mopo else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trained,
        opt_state=optimizer.init(trained),
        reference=reference,
        snapshot=copy(trained) if config.refreshes_reference else None,
        base=base,
        mopo_state=mopo_state,
        rng=rng,
    )


def train_state_shardings(model_config: ModelConfig, config: TrainConfig, optimizer, mesh, state_shapes: TrainState):
    """NamedShardings of every leaf of the train state: parameter-shaped trees by the logical rules, the optimizer
    state like the parameters it tracks, everything else replicated."""
    model_axes = param_logical_axes(model_config)
    if config.lora_rank:
        trained_axes = lora_logical_axes(model_config, config)
    else:
        trained_axes = {k: model_axes[k] for k in state_shapes.params}
    trained = sharding.tree_shardings(trained_axes, state_shapes.params, mesh)
    replicated = sharding.replicated(mesh)

    def like_params(tree):
        return None if tree is None else trained

    # Optimizer moments are parameter-shaped: shard them like the parameters; counters stay replicated.
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, leaf_sharding: leaf_sharding, state_shapes.opt_state, trained,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        step=replicated,
        params=trained,
        opt_state=opt_shardings,
        reference=like_params(state_shapes.reference),
        snapshot=like_params(state_shapes.snapshot),
        base=None if state_shapes.base is None else sharding.tree_shardings(
            {k: model_axes[k] for k in state_shapes.base}, state_shapes.base, mesh),
        mopo_state=jax.tree.map(lambda _: replicated, state_shapes.mopo_state),
        rng=replicated,
    )


# ---------------------------------------------------------------------------------------------------------------
# The step.


def _rows_with_completion(completion_mask, attention_mask, completion_start: int = 0):
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


def _response_log_probs(model_config, config, weights, batch, mesh=None):
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


def _micro_batch_loss(model_config, config, trained, state: TrainState, batch, multipliers, log_weights, mesh):
    """``LossTerms`` of one micro-batch, plus the pair margins (for the dual step) and token counts."""
    policy_weights = _weights(config, state.base, trained)
    policy, num_tokens = _response_log_probs(model_config, config, policy_weights, batch, mesh)
    if config.reference == "precomputed":
        reference = jnp.asarray(batch["ref_log_probs"], jnp.float32)
    else:
        ref_weights = _weights(config, state.base, jax.lax.stop_gradient(state.reference))
        reference, _ = _response_log_probs(model_config, config, ref_weights, batch, mesh)
        reference = jax.lax.stop_gradient(reference)
    row_valid = _rows_with_completion(batch["completion_mask"], batch["attention_mask"], config.completion_start)

    if config.loss == "mopo_weighted_bc":
        terms = losses.weighted_bc_loss(policy, log_weights, candidate_mask=row_valid)
        margins = jnp.zeros(policy.shape[:1], jnp.float32)
        return terms, (margins, num_tokens)

    pair_valid = row_valid[:, 0] & row_valid[:, 1]
    args = (policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1])
    margins = losses.log_ratio_margin(*args)
    probs, labels = batch["preference_probs"], jnp.asarray(batch["label_mask"], bool)
    weights = batch.get("pair_weights")
    if config.loss == "mopo_pairwise":
        win_margins = losses.pairwise_win_rate_margins(probs, labels, config.include_self)
        terms = losses.mopo_pairwise_loss(
            *args, win_margins, multipliers, config.mopo.tau, valid_mask=pair_valid & jnp.any(labels, axis=-1),
            weights=weights,
        )
    elif config.loss == "dpo":
        terms = losses.dpo_loss(*args, config.beta, probs[:, 0], valid_mask=pair_valid & labels[:, 0],
                                weights=weights, margin_offset=batch.get("margin_offset"))
    else:
        terms = losses.ipo_loss(*args, config.mopo.tau, probs[:, 0], valid_mask=pair_valid & labels[:, 0],
                                weights=weights)
    return terms, (margins, num_tokens)


def _split_micro_batches(batch, micro_batches: int):
    def split(leaf):
        if leaf.shape[0] % micro_batches:
            raise ValueError(f"batch size {leaf.shape[0]} is not divisible by micro_batches={micro_batches}")
        return leaf.reshape((micro_batches, leaf.shape[0] // micro_batches) + leaf.shape[1:])

    return jax.tree.map(split, batch)


def train_step(
    model_config: ModelConfig,
    config: TrainConfig,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batch: dict,
    mesh=None,
) -> tuple[TrainState, dict]:
    """One MOPO (or DPO/IPO) update; pure. Jit it with :func:`compile_train_step`.

    ``mesh`` (optional) pins the flattened responses to the mesh's batch axes.

    Returns:
      ``(new_state, metrics)`` with the mean loss, gradient norm, dropped rows, tokens, reward margins, and the MOPO
      multipliers, chi, thresholds and secondary estimates.
    """
    transformation = mopo(config.mopo) if config.uses_mopo else None
    mopo_state = state.mopo_state
    row_valid = _rows_with_completion(batch["completion_mask"], batch["attention_mask"], config.completion_start)
    log_weights = jnp.zeros(batch["tokens"].shape[:2], jnp.float32)
    multipliers = mopo_state.multipliers if mopo_state is not None else jnp.zeros((0,), jnp.float32)

    if config.loss == "mopo_weighted_bc":
        # The closed form needs only the candidates' win rates (they were sampled from the reference), so the dual
        # update runs once on the whole batch before the gradient pass.
        preferences = jnp.moveaxis(batch["candidate_preferences"], 1, 0)  # [K, B, N, N]
        labels = jnp.moveaxis(jnp.asarray(batch["candidate_label_mask"], bool), 1, 0)
        uniform = jnp.where(row_valid, 1.0, 0.0)
        rates = objectives.win_rates(preferences, uniform, labels, row_valid, config.include_self)
        update = transformation.update(mopo_state, rates, None, row_valid)
        log_weights, mopo_state = update.log_weights, update.state

    micro = _split_micro_batches({**batch, "log_weights": log_weights}, config.micro_batches)

    def accumulate(carry, micro_batch):
        grad_sum, total, denominator = carry

        def objective(trained):
            terms, aux = _micro_batch_loss(
                model_config, config, trained, state, micro_batch, multipliers, micro_batch["log_weights"], mesh
            )
            return terms.total, (terms.denominator, aux)

        (loss_total, (loss_denominator, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, total + loss_total, denominator + loss_denominator), aux

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, total, denominator), (margins, num_tokens) = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro
    )
    scale = 1.0 / jnp.maximum(denominator, 1.0)
    grads = jax.tree.map(lambda g: g * scale, grad_sum)
    margins = margins.reshape(-1)

    if config.loss == "mopo_pairwise":
        values = objectives.pairwise_objective_values(
            margins, batch["preference_probs"], batch["label_mask"], config.include_self
        )
        mopo_state = transformation.update_from_estimates(mopo_state, values[1:])

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    reference, snapshot = state.reference, state.snapshot
    if config.refreshes_reference:
        refresh = reference_refresh_due(mopo_state, config.mopo.refresh_every)
        reference, snapshot = jax.lax.cond(
            refresh,
            lambda: lagged_reference_update(True, reference, snapshot, params),
            lambda: (reference, snapshot),
        )

    metrics = {
        "loss": total * scale,
        "loss_denominator": denominator,
        "grad_norm": optax.tree.norm(grads),
        "dropped_rows": jnp.sum(~row_valid),
        "completion_tokens": jnp.sum(num_tokens),
    }
    if config.loss != "mopo_weighted_bc":
        pair_valid = row_valid[:, 0] & row_valid[:, 1]
        metrics["reward_margin"] = jnp.sum(jnp.where(pair_valid, margins, 0.0)) / jnp.maximum(jnp.sum(pair_valid), 1)
    if mopo_state is not None:
        metrics.update(
            multipliers=mopo_state.multipliers,
            chi=mopo_state.chi,
            thresholds=mopo_state.thresholds,
            secondary_estimates=mopo_state.secondary_estimates,
        )
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        reference=reference,
        snapshot=snapshot,
        base=state.base,
        mopo_state=mopo_state,
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
