"""Training objectives: what a trainer minimises over a policy's log-probabilities, and the state it updates.

An objective is a frozen dataclass of hyper-parameters (hashable, so a jitted step can take it as static
configuration) whose methods are pure functions. A trainer (the sharded language-model step, the tabular trainer of
the synthetic benchmark, or a user's loop) calls them in this order every step and never asks which objective runs::

    state, rows = objective.prepare(state, batch)            # whole batch, before the gradient
    terms, aux = objective.loss(state, micro_batch, log_probs)  # each micro-batch; differentiated
    state = objective.update(state, batch, aux)               # whole batch, after the gradient
    metrics = objective.metrics(state, batch, aux)

* ``batch`` is a dict of arrays whose leading axis is the batch's rows (prompts); the trainer adds
  ``response_valid [B, S]``, True for a response with at least one scored token. ``fields`` and
  ``optional_fields`` declare the rest, with symbolic shapes (``B`` rows, ``S`` responses per row, ``K``
  objectives, ``N`` candidates), and :meth:`Objective.check_batch` checks a host batch against them.
* ``prepare`` returns per-row arrays (``rows``) that the trainer adds to the batch and splits with it across
  micro-batches: quantities of the whole batch (label rates) that every micro-batch's loss needs, so that the
  accumulated loss is the batch's loss.
* ``log_probs`` is a :class:`ResponseLogProbs`: the policy's and (when ``needs_reference``) the reference's sequence
  log-probabilities of every response ``[b, S]``.
* ``loss`` returns :class:`mopo_jax.LossTerms` (a sum and its denominator: the trainer adds them over micro-batches
  and divides once) and ``aux``, a dict of per-row arrays that the trainer concatenates over micro-batches and hands
  to ``update`` and ``metrics``.
* ``lagged_reference`` says whether the reference is periodically replaced by a lagged copy of the policy (the
  trainer keeps a snapshot), and ``reference_refresh_due(state)`` when; ``reads_initial_reference`` whether the
  objective also needs the reference from before any refresh (``ResponseLogProbs.initial_reference``).

Every objective registers itself under a name (:func:`register_objective`), so command lines and configs can name
it; a user's objective, written outside this package, does the same and trains through the same trainers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from mopo_jax import losses, objectives, validation
from mopo_jax.state import MOPOConfig, SecondaryEstimate, mopo, reference_refresh_due

Array = jax.Array


class Field(NamedTuple):
    """A batch field: symbolic shape (ints or names bound consistently over the batch) and dtype."""

    shape: tuple
    dtype: str = "float32"
    probability: bool = False  # values in [0, 1] (NaN allowed where a mask says unlabelled)


class ResponseLogProbs(NamedTuple):
    """Sequence log-probabilities of a micro-batch's responses."""

    policy: Array  # [b, S] log pi(y_s | x_b)
    reference: Array | None  # [b, S] log pi_ref(y_s | x_b); None when the objective does not need it
    # [b, S] the reference before any lagged refresh, when the objective reads it (reads_initial_reference)
    initial_reference: Array | None = None


_REGISTRY: dict[str, type] = {}


def register_objective(name: str):
    """Class decorator: makes an :class:`Objective` subclass known as ``name`` (see :func:`objective_class`)."""

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"register_objective({name!r}) decorates Objective subclasses, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"objective name {name!r} is already registered to {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def objective_class(name: str) -> type:
    """The objective registered as ``name``; a ``ValueError`` lists the registered names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_objectives() -> dict[str, type]:
    return dict(sorted(_REGISTRY.items()))


class Objective:
    """Base class of training objectives (see the module docstring for the protocol). Subclasses are frozen
    dataclasses; they override :meth:`loss` and whatever else they need."""

    name: ClassVar[str] = "objective"
    fields: ClassVar[dict[str, Field]] = {}
    optional_fields: ClassVar[dict[str, Field]] = {}
    #: Metrics whose NaN entries mean "no data for this objective (yet)", not a failed step: the trainer logs them as
    #: null and does not stop on them (every other non-finite metric stops the run).
    no_data_metrics: ClassVar[frozenset[str]] = frozenset()

    @property
    def needs_reference(self) -> bool:
        return True

    @property
    def lagged_reference(self) -> bool:
        return False

    @property
    def reads_initial_reference(self) -> bool:
        """With a lagged reference, the trainer also hands ``ResponseLogProbs.initial_reference``: the reference
        before any refresh."""
        return False

    @property
    def labels_read(self) -> tuple[int, ...]:
        """The objectives (columns of ``label_mask``) whose labelled pairs the loss or the constraints need: a
        training set with none for one of them trains or constrains nothing there, so callers refuse it."""
        return ()

    def init(self) -> Any:
        return ()

    def prepare(self, state, batch: dict) -> tuple[Any, dict]:
        return state, {}

    def loss(self, state, batch: dict, log_probs: ResponseLogProbs) -> tuple[losses.LossTerms, dict]:
        raise NotImplementedError(f"{type(self).__name__} must define loss()")

    def update(self, state, batch: dict, aux: dict) -> Any:
        return state

    def metrics(self, state, batch: dict, aux: dict) -> dict:
        return {}

    def reference_refresh_due(self, state) -> Array:
        return jnp.zeros((), bool)

    def check_batch(self, batch: dict, where: str = "batch") -> dict:
        """Checks a host batch at the Python boundary: every required field present, every declared field of the
        declared rank and consistent sizes, probabilities in [0, 1]. Returns the bound sizes (``B``, ``K``, ...)."""
        missing = [name for name in self.fields if name not in batch]
        if missing:
            raise ValueError(f"{where}: objective {self.name!r} needs field(s) {missing}; got {sorted(batch)}")
        sizes: dict = {}
        for name, field in {**self.fields, **self.optional_fields}.items():
            if name not in batch:
                continue
            sizes = validation.check_array_shape(f"{where}[{name!r}]", batch[name], field.shape, sizes)
            if field.probability:
                validation.check_unit_interval(f"{where}[{name!r}]", batch[name], allow_nan=True)
        if "K" in sizes and "K-1" in sizes and sizes["K-1"] != sizes["K"] - 1:
            raise ValueError(f"{where}: K-1 = {sizes['K-1']} fields do not match K = {sizes['K']} fields")
        return sizes

    def batch_shapes(self, rows: int, responses: int, num_objectives: int, optional: tuple[str, ...] = ()) -> dict:
        """``jax.ShapeDtypeStruct`` of the objective's fields (and the named optional ones), for ahead-of-time
        compilation without data."""
        sizes = {"B": rows, "S": responses, "N": responses, "K": num_objectives, "K-1": num_objectives - 1}
        chosen = {**self.fields, **{k: v for k, v in self.optional_fields.items() if k in optional}}
        return {name: jax.ShapeDtypeStruct(tuple(sizes.get(d, d) for d in field.shape), jnp.dtype(field.dtype))
                for name, field in chosen.items()}


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by the pair objectives (responses [B, 2]: the first is the "chosen" side of the labels).

PAIR_FIELDS = {
    "preference_probs": Field(("B", "K"), "float32", probability=True),
    "label_mask": Field(("B", "K"), "bool"),
}
PAIR_OPTIONAL = {"pair_weights": Field(("B",), "float32")}


def response_valid(batch: dict) -> Array:
    """``[B, S]`` ``batch["response_valid"]``, which the trainer adds (a composing user's loop too: True where the
    response has a scored token, e.g. ``completion_mask.any(-1)``); its absence is named, not a bare KeyError."""
    if "response_valid" not in batch:
        raise ValueError("batch has no 'response_valid' [B, S]: the trainer adds it to every batch (True where a "
                         "response has at least one scored token, e.g. completion_mask.any(-1))")
    return jnp.asarray(batch["response_valid"], bool)


def pair_valid(batch: dict) -> Array:
    """``[B]`` True where both responses of the pair have a scored token."""
    valid = response_valid(batch)
    return valid[:, 0] & valid[:, 1]


def _pair_args(log_probs: ResponseLogProbs):
    if log_probs.reference is None:
        raise ValueError("this objective needs the reference's log-probabilities: ResponseLogProbs.reference is None")
    return log_probs.policy[:, 0], log_probs.policy[:, 1], log_probs.reference[:, 0], log_probs.reference[:, 1]


def _log_ratios(log_probs: ResponseLogProbs) -> Array:
    return jnp.asarray(log_probs.policy, jnp.float32) - jnp.asarray(log_probs.reference, jnp.float32)


def _reward_margin(batch: dict, aux: dict) -> dict:
    """Mean implicit reward margin ``h`` over the valid pairs."""
    valid = pair_valid(batch)
    margins = aux["log_ratios"][:, 0] - aux["log_ratios"][:, 1]
    return {"reward_margin": jnp.sum(jnp.where(valid, margins, 0.0)) / jnp.maximum(jnp.sum(valid), 1)}


def _labelled_rates(batch: dict) -> dict:
    """The whole batch's label rates ``pi_k`` (:func:`mopo_jax.pairwise_label_rates`), one copy per row so the
    trainer can split them with the batch."""
    rates = losses.pairwise_label_rates(batch["label_mask"], pair_valid(batch), batch.get("pair_weights"))
    return {"label_rates": jnp.broadcast_to(rates, jnp.shape(batch["label_mask"]))}


class _OneLabelPairs(Objective):
    """What DPO and IPO share: a pair loss on one objective's labels (``label``, a column of ``preference_probs``),
    over the pairs that are valid and carry that label, with the implicit reward margin as a metric. A subclass
    names its strength and :meth:`pair_loss`."""

    fields: ClassVar = PAIR_FIELDS
    optional_fields: ClassVar = PAIR_OPTIONAL

    @property
    def labels_read(self) -> tuple[int, ...]:
        return (self.label,)

    def pair_loss(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, preference_probs, valid_mask,
                  weights) -> losses.LossTerms:
        raise NotImplementedError

    def loss(self, state, batch, log_probs):
        keep = pair_valid(batch) & jnp.asarray(batch["label_mask"], bool)[:, self.label]
        terms = self.pair_loss(*_pair_args(log_probs), batch["preference_probs"][:, self.label], keep,
                               batch.get("pair_weights"))
        return terms, {"log_ratios": _log_ratios(log_probs)}

    def metrics(self, state, batch, aux):
        return _reward_margin(batch, aux)


@register_objective("dpo")
@dataclasses.dataclass(frozen=True)
class DPO(_OneLabelPairs):
    """DPO (Rafailov et al. 2023) on one objective's labels: ``-log sigmoid(beta h)`` (soft labels: the
    cross-entropy of :func:`mopo_jax.dpo_loss`).

    Attributes:
      beta: inverse KL strength.
      label: which objective's labels (column of ``preference_probs``) it fits.
    """

    beta: float = 0.1
    label: int = 0

    def __post_init__(self):
        validation.check_positive(f"{type(self).__name__}.beta", self.beta)

    def pair_loss(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, preference_probs, valid_mask,
                  weights):
        return losses.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, preference_probs,
                               valid_mask=valid_mask, weights=weights)


@register_objective("ipo")
@dataclasses.dataclass(frozen=True)
class IPO(_OneLabelPairs):
    """IPO (Azar et al. 2023) on one objective's labels: ``(h - 1/(2 tau))^2`` (soft labels: its expectation).

    Attributes:
      tau: KL strength.
      label: which objective's labels it fits.
    """

    tau: float = 0.1
    label: int = 0

    def __post_init__(self):
        validation.check_positive(f"{type(self).__name__}.tau", self.tau)

    def pair_loss(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, preference_probs, valid_mask,
                  weights):
        return losses.ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.tau, preference_probs,
                               valid_mask=valid_mask, weights=weights)


@dataclasses.dataclass(frozen=True)
class _Scalarised(Objective):
    """Linear scalarisation ``sum_k alpha_k E_{pairs labelled k}[loss_k]`` of one pair loss over the objectives.

    Each objective's mean runs over the pairs that carry its label; with micro-batches the per-objective means are
    the whole batch's: each row's ``loss_k`` is weighted by ``alpha_k r_bk / pi_k`` (``pi_k`` the batch's label
    rate, computed in ``prepare``), and the sum over the kept rows divided by their (weighted) number is the
    scalarised loss.
    """

    weights: tuple[float, ...] = (0.5, 0.5)
    fields: ClassVar = PAIR_FIELDS
    optional_fields: ClassVar = PAIR_OPTIONAL

    @property
    def labels_read(self) -> tuple[int, ...]:
        return tuple(k for k, weight in enumerate(self.weights) if weight != 0)

    def __post_init__(self):
        if isinstance(self.weights, list):
            object.__setattr__(self, "weights", tuple(self.weights))
        for name in ("beta", "tau"):  # the KL strength of whichever pair loss is scalarised
            if hasattr(self, name):
                validation.check_positive(f"{type(self).__name__}.{name}", getattr(self, name))

    def _pair_loss(self, args, probs, valid_mask, weights) -> losses.LossTerms:
        raise NotImplementedError

    def prepare(self, state, batch):
        return state, _labelled_rates(batch)

    def loss(self, state, batch, log_probs):
        labels = jnp.asarray(batch["label_mask"], bool)
        validation.check_array_shape(f"{type(self).__name__}.weights", self.weights, (labels.shape[1],), {})
        rates = batch["label_rates"][0]
        keep = pair_valid(batch) & jnp.any(labels, axis=-1)
        row = jnp.ones(labels.shape[:1], jnp.float32) if "pair_weights" not in batch else batch["pair_weights"]
        row = jnp.where(keep, jnp.asarray(row, jnp.float32), 0.0)
        args = _pair_args(log_probs)
        total = jnp.zeros((), jnp.float32)
        for k in range(labels.shape[1]):
            scale = jnp.where(rates[k] > 0, self.weights[k] / jnp.where(rates[k] > 0, rates[k], 1.0), 0.0)
            total = total + self._pair_loss(args, batch["preference_probs"][:, k], keep & labels[:, k],
                                            row * scale).total
        return losses.LossTerms(total, jnp.sum(row)), {"log_ratios": _log_ratios(log_probs)}

    def metrics(self, state, batch, aux):
        return _reward_margin(batch, aux)


@register_objective("weighted_dpo")
@dataclasses.dataclass(frozen=True)
class WeightedDPO(_Scalarised):
    """Linear scalarisation of DPO over the objectives (``weights`` on the simplex), all at KL strength ``beta``."""

    beta: float = 0.1

    def _pair_loss(self, args, probs, valid_mask, weights):
        return losses.dpo_loss(*args, self.beta, probs, valid_mask=valid_mask, weights=weights)


@register_objective("weighted_ipo")
@dataclasses.dataclass(frozen=True)
class WeightedIPO(_Scalarised):
    """Linear scalarisation of IPO over the objectives (``weights`` on the simplex), all at KL strength ``tau``."""

    tau: float = 0.1

    def _pair_loss(self, args, probs, valid_mask, weights):
        return losses.ipo_loss(*args, self.tau, probs, valid_mask=valid_mask, weights=weights)


@register_objective("modpo")
@dataclasses.dataclass(frozen=True)
class MODPO(Objective):
    """MODPO (Zhou et al. 2023): DPO on the primary labels with the secondary objectives as a margin,
    ``-log sigmoid((beta h - alpha_{1:} . (r(y) - r(y'))) / alpha_0)``, from secondary reward margins
    ``r_k(y) - r_k(y')`` that the data supply (``reward_margins [B, K-1]``, e.g. from fitted Bradley-Terry models).

    Attributes:
      beta: KL strength of the combined reward.
      weights: ``(alpha_0, ..., alpha_{K-1})`` with ``alpha_0 > 0``.
    """

    beta: float = 0.1
    weights: tuple[float, ...] = (0.5, 0.5)
    fields: ClassVar = {**PAIR_FIELDS, "reward_margins": Field(("B", "K-1"), "float32")}
    optional_fields: ClassVar = PAIR_OPTIONAL

    @property
    def labels_read(self) -> tuple[int, ...]:
        return (0,)  # the secondaries enter through reward_margins

    def __post_init__(self):
        if isinstance(self.weights, list):
            object.__setattr__(self, "weights", tuple(self.weights))
        if validation.is_concrete(self.weights) and not float(self.weights[0]) > 0:
            raise ValueError(f"MODPO.weights[0] (the primary weight) must be > 0, got {self.weights}")
        validation.check_positive("MODPO.beta", self.beta)

    def loss(self, state, batch, log_probs):
        alpha = jnp.asarray(self.weights, jnp.float32)
        validation.check_array_shape("MODPO.weights", self.weights, (jnp.shape(batch["reward_margins"])[1] + 1,), {})
        keep = pair_valid(batch) & jnp.asarray(batch["label_mask"], bool)[:, 0]
        offset = (jnp.asarray(batch["reward_margins"], jnp.float32) @ alpha[1:]) / alpha[0]
        terms = losses.dpo_loss(*_pair_args(log_probs), self.beta / alpha[0], batch["preference_probs"][:, 0],
                                valid_mask=keep, weights=batch.get("pair_weights"), margin_offset=offset)
        return terms, {"log_ratios": _log_ratios(log_probs)}

    def metrics(self, state, batch, aux):
        return _reward_margin(batch, aux)


# ---------------------------------------------------------------------------------------------------------------
# MOPO.


def _mopo_metrics(state, estimate: SecondaryEstimate) -> dict:
    """The dual state after the step, and ``secondary_estimates_plain``: this batch's plain self-normalised
    importance-sampling estimate of ``G_k`` (Eq. 2; ``SecondaryEstimate.plain_values``), logged beside
    ``secondary_estimates`` (what the multiplier step used: the robust bound of Eq. 5 when ``mopo.eps > 0``, or the
    policy-sample measurement with ``dual: policy_samples``, pooled over ``mopo.estimate_window``), so that the gap
    between the two is measured, not inferred. An estimate without data is NaN (logged as null), never a number
    the data did not give."""
    plain = jnp.where(estimate.has_data, estimate.plain_values, jnp.nan)
    return {"multipliers": state.multipliers, "chi": state.chi, "thresholds": state.thresholds,
            "secondary_estimates": state.secondary_estimates, "secondary_estimates_plain": plain}


#: Where the multiplier step reads ``G_k``: the objective's own batch, or a measurement of the policy's own samples
#: handed in with the batch (``dual_estimates`` / ``dual_counts``; see :class:`_MOPO`).
DUAL_SOURCES = ("batch", "policy_samples")
DUAL_FIELDS = {"dual_estimates": Field(("B", "K-1"), "float32", probability=True),
               "dual_stderr": Field(("B", "K-1"), "float32"),
               "dual_counts": Field(("B", "K-1"), "float32")}


@dataclasses.dataclass(frozen=True)
class _MOPO(Objective):
    """What both MOPO objectives share: the dual state, the lagged reference and the ratchet (Eq. 4-6).

    ``dual`` says where the multiplier step reads ``G_k``:

    * ``"batch"``: from the batch the policy step trains on (the pairs' importance-sampling estimate, or the
      policy's value over the candidate pool, :class:`MOPOCandidates`'s ``batch_estimate``);
    * ``"policy_samples"``: from a measurement of the trained policy's own samples against the reference, made by
      the caller (e.g. every ``M`` steps on held-out prompts, scored by the labeler) and handed in as the batch
      fields ``dual_estimates [B, K-1]`` (the value, the same in every row), ``dual_stderr`` (its standard error,
      logged) and ``dual_counts [B, K-1]`` (the number of prompts behind it; 0 on the steps without a fresh
      measurement, which leave the multipliers where they are). This reads ``V_k(pi)`` itself, the quantity the
      constraint is judged on, where the pairs' estimate over offline data, or on pairs the policy has fitted, reads
      something else (docs/algorithm.md, section 4).
    """

    mopo: MOPOConfig = MOPOConfig()
    thresholds: tuple[float, ...] = (0.5,)
    dual: str = "batch"

    def __post_init__(self):
        # One float per constraint, as a tuple: hashable, so the objective can be static configuration of a jit.
        # (Elements may be traced: the tabular trainer vmaps over thresholds.)
        thresholds = self.thresholds
        if isinstance(thresholds, (int, float)) or (hasattr(thresholds, "ndim") and thresholds.ndim == 0):
            thresholds = (thresholds,)
        object.__setattr__(self, "thresholds", tuple(thresholds))
        if not isinstance(self.mopo, MOPOConfig):
            raise ValueError(f"{type(self).__name__}.mopo must be a MOPOConfig, got {type(self.mopo).__name__}")
        validation.check_unit_interval(f"{type(self).__name__}.thresholds", self.thresholds)
        if self.dual not in DUAL_SOURCES:
            raise ValueError(f"{type(self).__name__}.dual must be one of {DUAL_SOURCES}, got {self.dual!r}")
        if self.dual == "policy_samples" and self.mopo.eps > 0:
            raise ValueError(f"{type(self).__name__}: the robust bound (mopo.eps > 0) applies to the batch's "
                             "importance-weighted estimate; with dual='policy_samples' set mopo.eps=0")

    @property
    def fields(self):  # type: ignore[override]
        return {**self.batch_fields, **(DUAL_FIELDS if self.dual == "policy_samples" else {})}

    @property
    def labels_read(self) -> tuple[int, ...]:
        return tuple(range(len(self.thresholds) + 1))  # the primary and every constrained secondary

    def check_batch(self, batch: dict, where: str = "batch") -> dict:
        sizes = super().check_batch(batch, where)
        if "K" in sizes and sizes["K"] != len(self.thresholds) + 1:
            raise ValueError(f"{where}: {sizes['K']} objectives' labels for {len(self.thresholds)} threshold(s): "
                             f"{type(self).__name__} needs K = {len(self.thresholds) + 1} (the primary and one per "
                             "threshold)")
        return sizes

    @property
    def transformation(self):
        return mopo(self.mopo)

    @property
    def lagged_reference(self) -> bool:
        return self.mopo.refresh_every is not None

    def init(self):
        return self.transformation.init(jnp.asarray(self.thresholds, jnp.float32))

    def reference_refresh_due(self, state):
        return reference_refresh_due(state, self.mopo.refresh_every)

    def _estimate(self, state, batch, aux) -> SecondaryEstimate:
        raise NotImplementedError

    no_data_metrics: ClassVar = frozenset({"secondary_estimates", "secondary_estimates_plain",
                                           "policy_sample_estimates", "policy_sample_stderr"})

    def metrics(self, state, batch, aux):
        metrics = _mopo_metrics(state, self._estimate(state, batch, aux))
        if self.dual == "policy_samples":  # the measurement this step handed in (counts 0: none, logged as null)
            measured = batch["dual_counts"][0] > 0
            metrics.update(policy_sample_estimates=jnp.where(measured, batch["dual_estimates"][0], jnp.nan),
                           policy_sample_stderr=jnp.where(measured, batch["dual_stderr"][0], jnp.nan),
                           policy_sample_counts=batch["dual_counts"][0])
        return metrics

    def update(self, state, batch, aux):
        if self.dual == "policy_samples":
            estimate = SecondaryEstimate.from_values(batch["dual_estimates"][0], batch["dual_counts"][0])
        else:
            estimate = self._estimate(state, batch, aux)
        return self.transformation.update_from_estimates(state, estimate)


@register_objective("mopo_pairwise")
@dataclasses.dataclass(frozen=True)
class MOPOPairwise(_MOPO):
    """MOPO on pairwise preference data: the pairwise estimator (Eq. 8) for the policy step, the objective values
    estimated from the same pairs for the multiplier step.

    * Loss: :func:`mopo_jax.mopo_pairwise_loss` with margins ``P_k - 1/2``, missing labels left out and each
      objective renormalised over the pairs that carry it (label rates of the whole batch).
    * Dual: after the gradient, ``G_k`` of the policy *before* its step from the batch's pairs
      (:func:`mopo_jax.pairwise_value_samples`: self-normalised importance sampling with ``rho = pi/q``); the robust
      bound of Eq. 5 over the pairs when ``mopo.eps > 0``; pooled over ``mopo.estimate_window`` steps.

    ``q``, the distribution the pair's responses were drawn from, is the reference unless the batch gives
    ``sampling_log_probs [B, 2]`` (``log q`` of each response). Offline preference data collected from other
    policies are not reference draws; the estimate then measures the policy against that data's distribution.
    With a lagged reference, ``q`` stays the reference from before any refresh (the pairs were drawn before the
    schedule began), so the constraint keeps its meaning, ``V_k`` against the user's reference, and the ratchet
    records values on that one scale; the loss regresses on the lagged reference, as the schedule intends.
    """

    @property
    def reads_initial_reference(self) -> bool:
        return self.lagged_reference and self.dual == "batch"

    optional_fields: ClassVar = {**PAIR_OPTIONAL, "sampling_log_probs": Field(("B", 2), "float32")}
    batch_fields: ClassVar = PAIR_FIELDS

    def prepare(self, state, batch):
        return state, _labelled_rates(batch)

    def loss(self, state, batch, log_probs):
        labels = jnp.asarray(batch["label_mask"], bool)
        margins = losses.pairwise_win_rate_margins(batch["preference_probs"], labels)
        terms = losses.mopo_pairwise_loss(
            *_pair_args(log_probs), margins, state.multipliers, self.mopo.tau, valid_mask=pair_valid(batch),
            weights=batch.get("pair_weights"), label_mask=labels, label_rates=batch["label_rates"][0],
        )
        sampling = batch.get("sampling_log_probs")
        if sampling is None:
            sampling = log_probs.reference if log_probs.initial_reference is None else log_probs.initial_reference
        importance = log_probs.policy - sampling
        return terms, {"log_ratios": _log_ratios(log_probs),
                       "importance_log_ratios": jax.lax.stop_gradient(jnp.asarray(importance, jnp.float32))}

    def _estimate(self, state, batch, aux):
        return self.transformation.estimate_from_pairs(
            state, aux["importance_log_ratios"], batch["preference_probs"], batch["label_mask"], pair_valid(batch),
            batch.get("pair_weights"))

    def metrics(self, state, batch, aux):
        return {**super().metrics(state, batch, aux), **_reward_margin(batch, aux)}


@register_objective("mopo_candidates")
@dataclasses.dataclass(frozen=True)
class MOPOCandidates(_MOPO):
    """MOPO on a pool of candidate responses per prompt (Algorithm 1): the closed form over the pool (Eq. 3), the
    multiplier step from its values (Eq. 4, 5), and a policy step towards it.

    Attributes:
      policy_step: ``"weighted_bc"`` (Eq. 7, cross-entropy to the closed-form weights) or ``"pairwise"`` (Eq. 8 over
        every pair of the pool: the policy's log-ratio margins regressed on ``(g(y) - g(y'))/tau``, which per prompt
        is twice the pool-weighted variance of ``log pi/pi_ref - g/tau``).
      candidates: ``"sampled"`` (drawn from the reference, the language-model case: win rates are leave-one-out
        means, :func:`mopo_jax.sampled_win_rates`, and the closed form is the self-normalised importance weight over
        the samples) or ``"enumerated"`` (the whole support with its reference probabilities, the tabular case:
        :func:`mopo_jax.win_rates` against ``comparison_probs`` with the self-comparison tie, and the closed form
        over ``log pi_ref``).
      batch_estimate: with ``dual="batch"``, whose value over the pool the multiplier step reads. ``"policy"``: the
        trained policy's (the pool weighted by ``pi/pi_ref``, :func:`mopo_jax.policy_pool_log_weights`), the
        ``V_k(pi)`` the constraint is judged on. ``"closed_form"``: the closed form's (Eq. 3) that the policy step
        aims at, the exact gradient of the dual (Eq. 4) and the paper's Algorithm 1; it reads the policy only where
        the policy step reaches its target (the tabular benchmark). A language model's step does not: on HH-RLHF
        the closed form's value read 0.003-0.041 above the trained policy's gold value (docs/algorithm.md, section 4).
        Under ``dual="policy_samples"`` the multiplier reads the measurement instead, and ``"policy"`` still logs
        the policy's value over the pool as ``secondary_estimates_plain`` where the step has the reference (the
        pairwise step, an enumerated pool); weighted BC on a sampled pool runs no reference pass and logs null.
      jackknife: the policy's value over a *sampled* pool corrected for the ``O(1/N)`` bias of its self-normalised
        weights (:func:`mopo_jax.jackknife_pool_secondary_values`), where the step has the reference. It is the plain
        estimate (what the multiplier reads at ``eps = 0``, what the ratchet records); the uncorrected value is
        logged as ``pool_estimates_uncorrected``. The robust bound (``eps > 0``) stays the bound of the uncorrected
        pool. Off by default: weighted-BC runs (KL about 0.13) showed no pool-size bias, the pairwise step's
        (KL 0.55-0.65) read 0.004-0.005 low at 8 candidates (docs/algorithm.md, section 4).

    The closed-form weights use the multipliers before this step's update; the multiplier step runs after the
    gradient on the whole batch's pool.
    """

    policy_step: str = "weighted_bc"
    candidates: str = "sampled"
    batch_estimate: str = "policy"
    jackknife: bool = False
    no_data_metrics: ClassVar = _MOPO.no_data_metrics | {"closed_form_estimates", "pool_effective_size_mean",
                                                          "pool_effective_size_min", "pool_estimates_uncorrected"}
    batch_fields: ClassVar = {
        "candidate_preferences": Field(("B", "K", "N", "N"), "float32", probability=True),
        "candidate_label_mask": Field(("B", "K", "N", "N"), "bool"),
    }
    optional_fields: ClassVar = {"comparison_probs": Field(("B", "N"), "float32"),
                                 "prompt_weights": Field(("B",), "float32")}

    def __post_init__(self):
        super().__post_init__()
        if self.policy_step not in ("weighted_bc", "pairwise"):
            raise ValueError(f"MOPOCandidates.policy_step must be 'weighted_bc' or 'pairwise', got {self.policy_step!r}")
        if self.candidates not in ("sampled", "enumerated"):
            raise ValueError(f"MOPOCandidates.candidates must be 'sampled' or 'enumerated', got {self.candidates!r}")
        if self.batch_estimate not in ("policy", "closed_form"):
            raise ValueError("MOPOCandidates.batch_estimate must be 'policy' or 'closed_form', got "
                             f"{self.batch_estimate!r}")
        if self.jackknife and not (self.candidates == "sampled" and self._weighs_by_policy):
            raise ValueError("MOPOCandidates.jackknife corrects the policy's value over a sampled pool: it needs "
                             "candidates='sampled', batch_estimate='policy' and the reference in the step (dual='batch' "
                             f"or policy_step='pairwise'); got candidates={self.candidates!r}, "
                             f"batch_estimate={self.batch_estimate!r}, dual={self.dual!r}, "
                             f"policy_step={self.policy_step!r}")

    @property
    def needs_reference(self) -> bool:
        # The batch dual reading the policy's value over the pool weighs it by pi/pi_ref.
        return (self.candidates == "enumerated" or self.policy_step == "pairwise"
                or (self.dual == "batch" and self.batch_estimate == "policy"))

    @property
    def _weighs_by_policy(self) -> bool:
        """The pool's plain estimate is the policy's value wherever the step has the reference at hand (with the
        policy-sample dual too, where it is logged beside the measurement the multiplier reads)."""
        return self.batch_estimate == "policy" and self.needs_reference

    @staticmethod
    def _labels(batch):
        """The pool's preferences and label mask, objective-major ``[K, b, N, N]``."""
        return (jnp.moveaxis(jnp.asarray(batch["candidate_preferences"], jnp.float32), 1, 0),
                jnp.moveaxis(jnp.asarray(batch["candidate_label_mask"], bool), 1, 0))

    def _pool(self, batch, reference):
        """Win rates ``[K, b, N]``, the base ``log pi_ref`` of the closed form ``[b, N]`` and the pool mask."""
        mask = response_valid(batch)
        preferences, labels = self._labels(batch)
        if self.candidates == "sampled":
            rates = objectives.sampled_win_rates(preferences, labels, mask)
            base = objectives.masked_log_normalize(jnp.zeros(mask.shape, jnp.float32), mask)
        else:
            comparison = batch.get("comparison_probs", jnp.where(mask, 1.0, 0.0))
            rates = objectives.win_rates(preferences, comparison, labels, mask, include_self=True)
            base = jnp.where(mask, jnp.asarray(reference, jnp.float32), objectives.MASKED_LOG_WEIGHT)
        return rates, base, mask

    def loss(self, state, batch, log_probs):
        rates, base, mask = self._pool(batch, log_probs.reference)
        log_weights = objectives.closed_form_log_weights(rates, state.multipliers, self.mopo.tau, base, mask)
        prompt_weights = batch.get("prompt_weights")
        if self.policy_step == "weighted_bc":
            terms = losses.weighted_bc_loss(log_probs.policy, log_weights, mask, prompt_weights)
        else:
            terms = _pool_pairwise_loss(log_probs, rates, state.multipliers, self.mopo.tau, mask,
                                        batch.get("comparison_probs"), prompt_weights)
        aux = {"log_weights": log_weights, "win_rates": jnp.moveaxis(rates, 0, 1), "base": base}
        if self._weighs_by_policy:
            aux["policy_log_weights"] = objectives.policy_pool_log_weights(log_probs.policy, log_probs.reference,
                                                                           base, mask)
        return terms, jax.lax.stop_gradient(aux)

    def _estimate(self, state, batch, aux):
        log_weights = aux["policy_log_weights"] if self._weighs_by_policy else aux["log_weights"]
        estimate = self.transformation.estimate_from_candidates(
            state, log_weights, jnp.moveaxis(aux["win_rates"], 1, 0), aux["base"],
            response_valid(batch), batch.get("prompt_weights"))
        if not self.jackknife:
            return estimate
        corrected = objectives.jackknife_pool_secondary_values(log_weights, *self._labels(batch),
                                                               response_valid(batch), batch.get("prompt_weights"))
        values = corrected if self.mopo.eps == 0 else estimate.values
        return estimate._replace(values=values, plain_values=corrected)

    def metrics(self, state, batch, aux):
        metrics = super().metrics(state, batch, aux)
        # The value of the closed form the step aims at (Eq. 3), beside the policy's: their gap is how far the
        # policy step is from its target.
        target = objectives.secondary_values(aux["log_weights"], jnp.moveaxis(aux["win_rates"], 1, 0),
                                             batch.get("prompt_weights"), response_valid(batch))
        has_data = jnp.isfinite(metrics["secondary_estimates_plain"])
        metrics["closed_form_estimates"] = jnp.where(has_data, target, jnp.nan)
        if self._weighs_by_policy:
            metrics.update(_pool_effective_sizes(aux["policy_log_weights"], response_valid(batch)))
            if self.jackknife:
                uncorrected = objectives.secondary_values(aux["policy_log_weights"],
                                                          jnp.moveaxis(aux["win_rates"], 1, 0),
                                                          batch.get("prompt_weights"), response_valid(batch))
                metrics["pool_estimates_uncorrected"] = jnp.where(has_data, uncorrected, jnp.nan)
        elif self.batch_estimate == "policy":
            # Weighted BC on a sampled pool under the policy-sample dual runs no reference pass, so the policy's
            # value over the pool is not computed: null, not the closed form's value (closed_form_estimates).
            metrics["secondary_estimates_plain"] = jnp.full_like(metrics["secondary_estimates_plain"], jnp.nan)
        return metrics


def _pool_effective_sizes(log_weights, mask):
    """Kish's effective sample size ``1 / sum_i pi~_i^2`` of each prompt's self-normalised policy weights over its
    pool (``N`` when ``pi = pi_ref``, 1 when one candidate takes all): its mean and minimum over the prompts with a
    pool. A small one says the policy estimate rests on few candidates, where self-normalisation is biased."""
    weights = jnp.where(mask, jnp.exp(log_weights), 0.0)
    has_pool = jnp.any(mask, axis=-1)
    per_prompt = 1.0 / jnp.maximum(jnp.sum(jnp.square(weights), axis=-1), 1e-30)
    count = jnp.sum(has_pool)
    mean = jnp.sum(jnp.where(has_pool, per_prompt, 0.0)) / jnp.maximum(count, 1)
    minimum = jnp.min(jnp.where(has_pool, per_prompt, jnp.inf))
    return {"pool_effective_size_mean": jnp.where(count > 0, mean, jnp.nan),
            "pool_effective_size_min": jnp.where(count > 0, minimum, jnp.nan)}


def _pool_pairwise_loss(log_probs, rates, multipliers, tau, mask, comparison_probs, prompt_weights):
    """Eq. 8 over every ordered pair ``(y_i, y_j)`` of each prompt's pool, weighted by ``a_i a_j``, in the units of
    :func:`mopo_jax.mopo_pairwise_loss` (``(tau h - T)^2 / 2``):
    ``tau^2/2 sum_ij a_i a_j (e_i - e_j)^2 / sum_ij a_i a_j = tau^2 Var_a(e)`` with ``e = log pi/pi_ref - g/tau`` and
    ``g = w_0 + lambda . w``; ``a`` is the comparison policy (uniform over the pool by default)."""
    target = jax.lax.stop_gradient(objectives.combined_win_rate(rates, multipliers) / tau)
    residual = jnp.where(mask, jnp.asarray(log_probs.policy, jnp.float32) - jnp.asarray(log_probs.reference,
                                                                                         jnp.float32) - target, 0.0)
    a = jnp.where(mask, 1.0 if comparison_probs is None else jnp.asarray(comparison_probs, jnp.float32), 0.0)
    a = a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1e-30)
    mean = jnp.sum(a * residual, axis=-1, keepdims=True)
    per_prompt = jnp.square(tau) * jnp.sum(a * jnp.square(residual - mean), axis=-1)
    row = jnp.where(jnp.any(mask, axis=-1), 1.0 if prompt_weights is None else jnp.asarray(prompt_weights,
                                                                                           jnp.float32), 0.0)
    return losses.LossTerms(jnp.sum(row * per_prompt), jnp.sum(row))
