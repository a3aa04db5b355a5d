"""The methods of the HH-RLHF comparison: one registry entry each.

A :class:`Method` names its training objective (built from the experiment config), where its training data come
from (the human policy-train pairs through a transform, or candidates sampled on-policy), whether it needs the
labelers, and which knob of ``method:`` sets its trade-off. The runner (:mod:`mopo_jax.experiment.hh_rlhf`) and the
command line look methods up here and never test a method's name; adding a method is one :func:`register_method`
call, from this module or from a user's (``plugins:`` in the config imports it)::

    from mopo_jax.experiment.methods import Method, offline_pairs, only_objective, register_method
    from mopo_jax.policy_objectives import IPO

    register_method(Method(
        name="ipo_helpful", summary="IPO on the helpfulness pairs",
        objective=lambda config: IPO(tau=0.1, label=0),  # IPO's own KL strength, not MOPO's tau
        data=offline_pairs(only_objective(0)),
    ))

Data transforms take ``(config, arrays, context)`` and return the arrays a method trains on: ``arrays`` are the
policy-train pairs (``tokens [B, 2, T]`` with the human-preferred response first, masks, ``preference_probs`` and
``label_mask [B, K]`` with one label per pair, ``objective [B]``, and ``inputs_hidden`` when only the top blocks
train); ``context`` (:class:`mopo_jax.experiment.hh_rlhf.RunContext`) is what a run offers every method: the
tokenized splits, the model and its frozen/trained split, the labelers and their reward margins, another run's trained
policy, and the shuffled batches. What is particular to a method (the soup's interpolation, MODPO's margins,
Algorithm 1's sampling) is written in its entry here, so a new method is one entry in one file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from mopo_jax.policy_objectives import MODPO, MOPOCandidates, MOPOPairwise, Objective, WeightedDPO

Transform = Callable[[Any, dict, Any], dict]


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the comparison.

    Attributes:
      name: what ``method.name`` selects.
      summary: one line for ``mopo train --help``.
      objective: ``config -> Objective`` (None for methods that build their policy without training).
      data: ``(config, context) -> next_batch(position, state)`` of the training loop (:func:`offline_pairs` or
        :func:`onpolicy_candidates`); None without training.
      policy: ``(config, context) -> upper-block parameters`` for methods that do not train (the reference, soups).
      knob: the ``method.*`` field that sets its trade-off (``"threshold"``, ``"weights"``) or None; a
        ``"threshold"`` method is judged on whether it meets it.
      needs_labelers: trains on labels from the labeler preference models (fitted on their own split first).
      check: ``config -> None``, raising ``ValueError`` on settings this method cannot run with.
      one_objective: also runs on data of a single objective (TRL's chosen/rejected): it reads only objective 0's
        labels and, for MOPO, has no secondary to constrain.
    """

    name: str
    summary: str
    objective: Callable[[Any], Objective] | None = None
    data: Callable[[Any, Any], Callable] | None = None
    policy: Callable[[Any, Any], Any] | None = None
    knob: str | None = None
    needs_labelers: bool = False
    check: Callable[[Any], None] | None = None
    one_objective: bool = False

    def __post_init__(self):
        trained = self.objective is not None and self.data is not None and self.policy is None
        untrained = self.policy is not None and self.objective is None and self.data is None
        if not (trained or untrained):
            raise ValueError(f"method {self.name!r}: give either objective and data (a trained method) or policy "
                             "(a method that builds its policy without training)")
        if self.knob not in (None, "threshold", "weights"):
            raise ValueError(f"method {self.name!r}: knob must be 'threshold', 'weights' or None, got {self.knob!r}")

    @property
    def trains(self) -> bool:
        return self.policy is None

    def validate(self, config) -> None:
        objectives = config.data.objective_names
        if len(objectives) == 1 and not self.one_objective:
            able = ", ".join(name for name, method in registered_methods().items() if method.one_objective)
            raise ValueError(f"method.name={self.name}: the data have one objective ({objectives[0]!r}, "
                             f"data.pairs.columns), and {self.name} trains on or constrains two; on one objective "
                             f"run {able}")
        if self.knob == "weights":
            weights = config.method.weights
            if len(weights) != 2 or min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
                raise ValueError(f"method.weights: {self.name} needs two nonnegative numbers summing to 1, got "
                                 f"{weights}")
        if self.check is not None:
            self.check(config)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Adds ``method`` to the registry (a second registration under the same name replaces the first)."""
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"method.name: unknown method {name!r}; registered: {', '.join(sorted(_METHODS))} "
                         "(a method of your own: register_method in a module named by plugins)")
    return _METHODS[name]


def registered_methods() -> dict[str, Method]:
    return dict(sorted(_METHODS.items()))


def describe_methods() -> str:
    """The registry as text (``mopo train --help``)."""
    lines = []
    for name, method in registered_methods().items():
        knob = f"method.{method.knob}" if method.knob else "-"
        extra = (", labelers" if method.needs_labelers else "") + (", one objective too" if method.one_objective
                                                                     else "")
        lines.append(f"  {name:<16} {method.summary} (knob: {knob}{extra})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Data sources and transforms.


def offline_pairs(transform: Transform | None = None):
    """Training data: the human policy-train pairs, optionally transformed, in shuffled resumable batches."""

    def data(config, context):
        arrays = context.policy_pairs()
        if transform is not None:
            arrays = transform(config, arrays, context)
        return context.pair_batches(arrays)

    return data


def onpolicy_candidates(config, context):
    """Training data: per prompt, ``onpolicy.candidates`` responses sampled from the current (lagged) reference and
    labelled by the labelers (the published Algorithm 1)."""
    from mopo_jax.experiment.onpolicy import onpolicy_batches

    return onpolicy_batches(config, context.train_config, *context.model, *context.split[:2],
                            context.data["policy_train"], context.labelers(), context.mesh,
                            context.process_rows(config.training.batch_pairs), *context.end_of_turn_and_pad)


def only_objective(k: int) -> Transform:
    """Keeps the pairs labelled for objective ``k``."""

    def transform(config, arrays, context):
        keep = arrays["label_mask"][:, k]
        return {name: value[keep] for name, value in arrays.items()}

    return transform


def pooled_labels(config, arrays, context):
    """Every pair's label, whichever objective it is for, as objective 0's (one preference for everything)."""
    labels = arrays["label_mask"]
    labelled = np.where(labels, arrays["preference_probs"], 0.0).sum(-1)
    pooled = np.where(labels.any(-1), labelled / np.maximum(labels.sum(-1), 1), 0.0)
    out = dict(arrays)
    out["preference_probs"] = np.stack([pooled, np.zeros_like(pooled)], axis=-1).astype(np.float32)
    out["label_mask"] = np.stack([labels.any(-1), np.zeros_like(labels[:, 0])], axis=-1)
    return out


def with_secondary_reward_margins(config, arrays, context):
    """The helpfulness pairs with the harmlessness labeler's reward margin ``r(y) - r(y')`` (MODPO's input)."""
    margins = context.reward_margins(arrays, context.labeler(1))
    keep = arrays["label_mask"][:, 0]
    out = {name: value[keep] for name, value in arrays.items()}
    out["reward_margins"] = margins[keep][:, None].astype(np.float32)
    return out


def rewarded_soup(config, context):
    """The soup's policy: ``w_help theta_help + w_harm theta_harm`` of the trained parameters of the helpful and the
    harmless DPO runs (``method.soups_from``), elementwise over the parameter tree."""
    helpful, harmless = (context.trained_policy(run_dir) for run_dir in config.method.soups_from)
    w_help, w_harm = config.method.weights
    return jax.tree.map(lambda a, b: w_help * a + w_harm * b, helpful, harmless)


def _soups_check(config):
    if len(config.method.soups_from) != 2:
        raise ValueError("method.soups_from must name the helpful and the harmless DPO run directories")


def _modpo_check(config):
    if config.method.weights[0] <= 0:
        raise ValueError("method.weights: MODPO needs a positive helpfulness weight")


def _onpolicy_check(config):
    # The candidates' leave-one-out win rates (against the reference), the closed form's uniform base over the
    # pool and the policy's weights pi/pi_ref all take the candidates to be draws from the reference itself.
    if config.onpolicy.temperature != 1.0:
        raise ValueError(f"onpolicy.temperature={config.onpolicy.temperature}: Algorithm 1's estimates take the "
                         "candidates as draws from the reference (temperature 1); tempered draws would need importance "
                         "weights pi_ref/q_T, which mopo_onpolicy does not apply")


# ---------------------------------------------------------------------------------------------------------------
# The built-in methods.

def _enforced_threshold(config) -> float:
    """The threshold MOPO's multipliers enforce: ``method.threshold`` (what the run is judged on) plus
    ``dual.margin``."""
    return config.method.threshold + config.dual.margin


def _secondary_thresholds(config) -> tuple[float, ...]:
    """MOPO's thresholds, one per secondary objective: none on one-objective data, where MOPO is the KL-regularised
    maximisation of the one preference's win rate (Eq. 2 without constraints)."""
    return (_enforced_threshold(config),) if len(config.data.objective_names) > 1 else ()


register_method(Method(
    name="reference", summary="the pretrained model itself (no training)",
    policy=lambda config, context: context.reference_policy(), one_objective=True,
))
register_method(Method(
    name="dpo_helpful", summary="DPO on the helpfulness pairs",
    objective=lambda config: dataclasses.replace(config.dpo, label=0),
    data=offline_pairs(only_objective(0)), one_objective=True,
))
register_method(Method(
    name="dpo_harmless", summary="DPO on the harmlessness pairs",
    objective=lambda config: dataclasses.replace(config.dpo, label=1),
    data=offline_pairs(only_objective(1)),
))
register_method(Method(
    name="dpo_pooled", summary="DPO on every pair, both preferences pooled into one",
    objective=lambda config: dataclasses.replace(config.dpo, label=0),
    data=offline_pairs(pooled_labels),
))
register_method(Method(
    name="weighted_dpo", summary="linear scalarisation of DPO over the two preferences",
    objective=lambda config: WeightedDPO(weights=config.method.weights, beta=config.dpo.beta),
    data=offline_pairs(), knob="weights",
))
register_method(Method(
    name="modpo", summary="MODPO: DPO on helpfulness with the harmlessness labeler's margin",
    objective=lambda config: MODPO(beta=config.dpo.beta, weights=config.method.weights),
    data=offline_pairs(with_secondary_reward_margins), knob="weights", needs_labelers=True, check=_modpo_check,
))
register_method(Method(
    name="rewarded_soups", summary="interpolation of the helpful and the harmless DPO policies",
    policy=rewarded_soup, knob="weights", check=_soups_check,
))
register_method(Method(
    name="mopo_pairwise", summary="MOPO on the offline pairs (Eq. 8 and the pairwise dual)",
    objective=lambda config: MOPOPairwise(mopo=config.mopo, thresholds=_secondary_thresholds(config),
                                          dual=config.dual.source),
    data=offline_pairs(), knob="threshold", one_objective=True,
))
register_method(Method(
    name="mopo_onpolicy", summary="MOPO on candidates sampled from the lagged reference (Algorithm 1)",
    objective=lambda config: MOPOCandidates(mopo=config.mopo, thresholds=(_enforced_threshold(config),),
                                            policy_step=config.onpolicy.policy_step, candidates="sampled",
                                            dual=config.dual.source, jackknife=config.onpolicy.jackknife),
    data=onpolicy_candidates, knob="threshold", needs_labelers=True, check=_onpolicy_check,
))
