"""Configuration of the HH-RLHF experiment: one dataclass per component, loaded from YAML with ``key=value``
overrides (:func:`mopo_jax.configs.load_config`).

The library's own configs are nested as they are, under their own names: ``optimizer`` is
:class:`mopo_jax.training.OptimizerConfig`, ``mopo`` is :class:`mopo_jax.MOPOConfig` and ``dpo`` is the
:class:`mopo_jax.policy_objectives.DPO` objective (its ``beta``; each DPO-family method picks the labels). Which
method a run trains, and what its trade-off knob means, comes from the method registry
(:mod:`mopo_jax.experiment.methods`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math

from mopo_jax.data.preference_dataset import PreferenceDataConfig
from mopo_jax.policy_objectives import DPO
from mopo_jax.state import MOPOConfig
from mopo_jax.parallel.sharding import MeshConfig
from mopo_jax.training.train_step import OptimizerConfig
from mopo_jax.training.trainable import LORA_TARGETS


def _check_temperature(name: str, value: float, allow_zero: bool = False) -> None:
    """A sampling temperature: finite and > 0 (>= 0 where 0 means greedy)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the pairs come from and how much of each split is used.

    ``format: hh-rlhf`` reads ``source``, a local directory of HH-RLHF ``*.jsonl.gz`` files or a hub name
    (``Anthropic/hh-rlhf``), one subset per objective. ``format: pairs`` reads any preference dataset through the
    column mapping of ``pairs`` (:class:`mopo_jax.data.PreferenceDataConfig`: a ``datasets`` name or local
    JSONL/JSON/Parquet/CSV files, the prompt and response columns, one label column per objective, e.g.
    PKU-SafeRLHF's ``better_response_id`` and ``safer_response_id`` on the same pair), or one objective (TRL's
    ``prompt/chosen/rejected``: ``pairs.columns: trl``), which the methods of one preference train on (DPO, MOPO
    without a constraint; ``mopo train --help`` marks them). Caps are totals per split; with one label per pair
    they are split evenly between the objectives.
    """

    format: str = "hh-rlhf"
    source: str = "../shared/data/hh-rlhf"
    subsets: tuple[str, ...] = ("helpful-base", "harmless-base")
    pairs: PreferenceDataConfig = PreferenceDataConfig()
    max_prompt_tokens: int = 96
    max_response_tokens: int = 48
    policy_pairs: int = 512
    labeler_pairs: int = 512
    judge_pairs: int = 512
    eval_pairs: int = 256
    eval_prompts: int = 64
    split_salt: str = "mopo-hh"

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_response_tokens", "policy_pairs", "labeler_pairs", "judge_pairs",
                     "eval_pairs", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.format not in ("hh-rlhf", "pairs"):
            raise ValueError(f"data.format must be 'hh-rlhf' or 'pairs', got {self.format!r}")
        if self.format == "pairs" and self.pairs.columns.num_objectives > 2:
            raise ValueError(f"data.pairs.columns.labels: the HH comparison has one or two objectives (helpfulness, "
                             f"harmlessness); got {self.pairs.columns.num_objectives} "
                             f"{list(self.pairs.columns.objective_names)} (more objectives serve a loop of your own: "
                             "mopo_jax.data.load_preference_dataset and mopo_jax.MOPOPairwise)")

    @property
    def objective_names(self) -> tuple[str, ...]:
        """The objectives the runs are trained and judged on: helpfulness and harmlessness (HH-RLHF, or pairs
        labelled for two objectives, under the comparison's names), or a one-objective layout's own name."""
        if self.format == "pairs" and self.pairs.columns.num_objectives == 1:
            return self.pairs.columns.objective_names
        return ("helpfulness", "harmlessness")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The pretrained policy (a preset, a local directory or a hub name) and which of its parameters train.

    * ``trainable_top_layers > 0``: only the top blocks train, on cached activations of the frozen lower blocks (the
      CPU lever);
    * ``lora_rank > 0``: rank-``lora_rank`` adapters (scale ``lora_alpha / lora_rank``) on ``lora_targets`` train
      over the frozen model, which is also the reference;
    * both 0: every parameter trains.

    ``dtype`` is the compute dtype; ``param_dtype`` the storage dtype of the pretrained weights (``bfloat16`` halves
    a frozen LoRA base; trained parameters and optimizer moments of a full run should stay ``float32``). ``remat``
    and ``attention`` (None: the model's default) are :class:`mopo_jax.models.ModelConfig` fields.
    """

    name: str = "smollm2-135m"
    trainable_top_layers: int = 2
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str | None = None

    def __post_init__(self):
        if self.trainable_top_layers < 0 or self.lora_rank < 0:
            raise ValueError(f"model.trainable_top_layers and model.lora_rank must be >= 0, got "
                             f"{self.trainable_top_layers} and {self.lora_rank}")
        if self.trainable_top_layers and self.lora_rank:
            raise ValueError("model: choose trainable_top_layers (top blocks on cached activations) or lora_rank "
                             "(adapters over the whole model), not both")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"model.lora_targets: unknown matrices {sorted(unknown)}; choose from {LORA_TARGETS}")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Which registered method a run trains (``mopo train --help`` lists them), and its trade-off knob.

    ``threshold`` is MOPO's harmlessness threshold ``b``; ``weights`` the (helpfulness, harmlessness) weights of the
    weighted methods; ``soups_from`` the run directories of the helpful and the harmless DPO models that
    ``rewarded_soups`` interpolates. Each method reads only the knob its registry entry names.
    """

    name: str = "mopo_pairwise"
    threshold: float = 0.55
    weights: tuple[float, ...] = (0.5, 0.5)
    soups_from: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The training loop: ``steps`` of ``batch_pairs`` prompts (the global batch, whatever the number of processes),
    each split into ``micro_batches`` for gradient accumulation, a checkpoint every ``save_every`` steps.
    ``reference``: ``"live"`` (the reference model runs in the step) or ``"precomputed"`` (its log-probabilities of
    the training pairs are computed once, before training, and read from the batch; pair methods without a lagged
    reference only)."""

    steps: int = 60
    batch_pairs: int = 8
    micro_batches: int = 1
    save_every: int = 20
    reference: str = "live"


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    """On-policy MOPO's candidates: ``candidates`` responses per prompt sampled at ``temperature`` from the current
    (lagged) reference and labelled by the labelers. ``mopo_onpolicy`` requires temperature 1: its estimates take
    the candidates as draws from the reference itself.

    ``policy_step`` is :class:`mopo_jax.policy_objectives.MOPOCandidates`'s: ``weighted_bc`` (Eq. 7, the published
    step) or ``pairwise`` (Eq. 8 over every pair of the pool). Why both: the weighted-BC gradient carries the
    samples' own score ``sum_i grad log pi(y_i) / N``, zero in expectation but of norm about 28 on cpu-small against
    ``max_grad_norm`` 1 (docs/results/hh-cpu-small-onpolicyfixed0), so every step is clipped; the pairwise step
    differences it out (its gradient weighs each candidate by ``g_i`` minus the pool's mean).

    ``max_new_tokens``: the candidates' length (default ``data.max_response_tokens``). The candidates' estimate of
    the harmlessness win rate is a win rate of responses of this length, while the evaluation (and the policy-sample
    dual) scores ``eval.max_new_tokens``: set it to that length for a dual that reads what the run is judged on (on
    cpu-small the 48-token pools read 0.005-0.007 below 32-token ones, docs/algorithm.md section 4).
    ``jackknife``: the candidates' estimate corrected for its small-pool bias
    (:class:`mopo_jax.policy_objectives.MOPOCandidates`'s ``jackknife``)."""

    candidates: int = 4
    temperature: float = 1.0
    policy_step: str = "weighted_bc"
    max_new_tokens: int | None = None
    jackknife: bool = False

    def __post_init__(self):
        if self.candidates < 2:
            raise ValueError(f"onpolicy.candidates must be >= 2 (pairs of candidates), got {self.candidates}")
        _check_temperature("onpolicy.temperature", self.temperature)
        if self.policy_step not in ("weighted_bc", "pairwise"):
            raise ValueError(f"onpolicy.policy_step must be 'weighted_bc' or 'pairwise', got {self.policy_step!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"onpolicy.max_new_tokens must be >= 1 (or null: data.max_response_tokens), got "
                             f"{self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class DualConfig:
    """Where MOPO's multiplier step reads the harmlessness win rate (:class:`mopo_jax.policy_objectives.MOPOPairwise`'s
    ``dual``).

    * ``source: batch``: the training batch's own estimate (the offline pairs' importance-weighted value; Algorithm
      1's closed form over its candidates);
    * ``source: policy_samples``: every ``every`` steps, ``samples`` responses of the current policy on ``prompts``
      prompts of the labeler-train split, scored by the labelers against the reference's samples with the
      evaluation's statistic (:mod:`mopo_jax.experiment.policy_samples`); ``seed`` is their sampling key.

    ``margin``: the multipliers enforce ``b + margin`` while the run is judged against ``b`` (``method.threshold``),
    one setting for every threshold of a plan.
    """

    source: str = "batch"
    prompts: int = 32
    samples: int = 2
    every: int = 4
    margin: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.source not in ("batch", "policy_samples"):
            raise ValueError(f"dual.source must be 'batch' or 'policy_samples', got {self.source!r}")
        if self.prompts < 2 or self.samples < 1 or self.every < 1:
            raise ValueError(f"dual.prompts must be >= 2 (a standard error), dual.samples and dual.every >= 1; got "
                             f"{self.prompts}, {self.samples} and {self.every}")
        if not math.isfinite(self.margin) or not -1.0 < self.margin < 1.0:
            raise ValueError(f"dual.margin must be a finite number in (-1, 1), got {self.margin}")


@dataclasses.dataclass(frozen=True)
class PreferenceModelConfig:
    """Bradley-Terry labelers and judges on mean-pooled hidden states after ``feature_layer`` blocks; the ridge
    strength is chosen per model from ``l2_grid`` by ``cv_folds``-fold cross-validation on its own training split
    (a single value skips the selection).

    ``protocol`` says which preferences train the policies:

    * ``"human"``: the policy-train pairs keep their human labels; on-policy candidates and MODPO's margins come
      from the labelers (fitted on the labeler-train split);
    * ``"gold"``: the judges (fitted on the judge-train split) are the gold preference functions, the ground truth
      of a controlled comparison: every policy-train pair is relabelled for the objective it was collected for with
      the gold probability ``P = sigmoid(r(y_1) - r(y_2))`` (``gold_labels: soft``) or a label drawn from it
      (``gold_labels: sampled``, one fixed draw per pair, the same for every run), and the gold models also label
      the on-policy candidates and give MODPO its margins.

    Evaluation is the same under both: the judges score the policy against the reference.
    """

    feature_layer: int = 16
    l2_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    cv_folds: int = 5
    protocol: str = "human"
    gold_labels: str = "soft"

    def __post_init__(self):
        if self.protocol not in ("human", "gold"):
            raise ValueError(f"preference.protocol must be 'human' or 'gold', got {self.protocol!r}")
        if self.gold_labels not in ("soft", "sampled"):
            raise ValueError(f"preference.gold_labels must be 'soft' or 'sampled', got {self.gold_labels!r}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Sampling of the judged responses: ``samples_per_prompt`` responses per eval prompt from the policy and as
    many from the reference, drawn with common random numbers from the key ``seed`` (the same for every run and
    training seed, so all runs are measured on the same reference samples and their per-prompt values pair). At
    ``temperature`` 1 without ``top_p`` the same samples also estimate the KL to the reference; otherwise separate
    temperature-1 samples are drawn for it."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float | None = None
    batch_size: int = 32
    samples_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.samples_per_prompt < 1:
            raise ValueError(f"eval.max_new_tokens, eval.batch_size and eval.samples_per_prompt must be >= 1, got "
                             f"{self.max_new_tokens}, {self.batch_size} and {self.samples_per_prompt}")
        _check_temperature("eval.temperature", self.temperature, allow_zero=True)
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"eval.top_p must be in (0, 1] or null, got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A run of the HH-RLHF comparison. ``work_dir`` holds what runs share (tokenized splits, activations of the
    frozen layers, labelers and judges); ``run_dir`` one method's config, checkpoints, metrics, policy and eval.

    ``plugins`` are modules imported before the method is looked up: a method (or objective) registered in a
    user's module (:func:`mopo_jax.experiment.methods.register_method`) is then available by name, and a run
    directory's stored config re-imports them for ``mopo eval``.
    """

    profile: str = "cpu-small"
    run_dir: str = "runs/hh/cpu-small/mopo_pairwise"
    work_dir: str = "runs/hh/cpu-small/shared"
    seed: int = 0
    plugins: tuple[str, ...] = ()
    data: DataConfig = DataConfig()
    model: ModelSpec = ModelSpec()
    method: MethodConfig = MethodConfig()
    training: TrainingConfig = TrainingConfig()
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=5e-5)
    dpo: DPO = DPO(beta=0.1)
    mopo: MOPOConfig = MOPOConfig(tau=0.1, eps=0.0, refresh_every=None)
    onpolicy: OnPolicyConfig = OnPolicyConfig()
    dual: DualConfig = DualConfig()
    preference: PreferenceModelConfig = PreferenceModelConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        from mopo_jax.experiment import methods

        for module in self.plugins:
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ValueError(f"plugins: cannot import {module!r}: {error}") from error
        methods.get_method(self.method.name).validate(self)
        if not self.preference.l2_grid or not all(math.isfinite(v) and v >= 0 for v in self.preference.l2_grid):
            raise ValueError(f"preference.l2_grid must hold finite nonnegative values, got {self.preference.l2_grid}")
        if self.preference.cv_folds < 2:
            raise ValueError(f"preference.cv_folds must be >= 2 (cross-validation over l2_grid), got "
                             f"{self.preference.cv_folds}")
        if self.preference.feature_layer < 1:
            raise ValueError(f"preference.feature_layer must be >= 1 (a block's output), got "
                             f"{self.preference.feature_layer}")
        weights = self.method.weights
        if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"method.weights must be finite, nonnegative and not all 0, got {list(weights)}")
        if not 0.0 <= self.method.threshold <= 1.0:
            raise ValueError(f"method.threshold must be in [0, 1], got {self.method.threshold}")
        if not 0.0 <= self.method.threshold + self.dual.margin <= 1.0:
            raise ValueError(f"method.threshold + dual.margin must be in [0, 1], got {self.method.threshold} + "
                             f"{self.dual.margin}")
        if (self.onpolicy.max_new_tokens or 0) > self.data.max_response_tokens:
            raise ValueError(f"onpolicy.max_new_tokens={self.onpolicy.max_new_tokens} exceeds "
                             f"data.max_response_tokens={self.data.max_response_tokens}, the response length the "
                             "model's context is sized for")
        if self.onpolicy.jackknife and self.dual.source != "batch" and self.onpolicy.policy_step != "pairwise":
            raise ValueError("onpolicy.jackknife corrects the candidates' policy estimate, which weighted BC computes "
                             "only for the batch dual: set dual.source=batch or onpolicy.policy_step=pairwise")
        if self.dual.source == "policy_samples" and self.mopo.eps > 0:
            raise ValueError("dual.source=policy_samples measures the policy itself; the robust bound of mopo.eps "
                             "applies to the batch's importance-weighted estimate: set mopo.eps=0")
        if self.training.reference not in ("live", "precomputed"):
            raise ValueError(f"training.reference must be 'live' or 'precomputed', got {self.training.reference!r}")
        for name in ("steps", "batch_pairs", "save_every", "micro_batches"):
            if getattr(self.training, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self.training, name)}")
