"""Configuration of the HH-RLHF experiment: one dataclass per component, loaded from YAML with ``key=value``
overrides (:func:`mopo_jax.configs.load_config`)."""

from __future__ import annotations

import dataclasses

METHODS = (
    "reference",
    "mopo_pairwise",
    "mopo_onpolicy",
    "dpo_helpful",
    "dpo_harmless",
    "dpo_pooled",
    "weighted_dpo",
    "modpo",
    "rewarded_soups",
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the pairs come from and how much of each split is used.

    ``source`` is a local directory of HH-RLHF ``*.jsonl.gz`` files or a hub name (``Anthropic/hh-rlhf``). Caps are
    totals per split, split evenly between the two objectives.
    """

    source: str = "../shared/data/hh-rlhf"
    subsets: tuple[str, ...] = ("helpful-base", "harmless-base")
    max_prompt_tokens: int = 96
    max_response_tokens: int = 48
    policy_pairs: int = 512
    labeler_pairs: int = 512
    judge_pairs: int = 512
    eval_pairs: int = 256
    eval_prompts: int = 64
    split_salt: str = "mopo-hh"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The pretrained policy. ``trainable_top_layers > 0`` trains only the top blocks on cached activations of the
    frozen lower blocks (the CPU lever); 0 trains every parameter."""

    name: str = "smollm2-135m"
    trainable_top_layers: int = 2
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Which method a run trains, and its trade-off knob.

    ``weights`` are the (helpfulness, harmlessness) weights of ``weighted_dpo``, ``modpo`` and ``rewarded_soups``;
    ``threshold`` is MOPO's harmlessness threshold ``b``; ``soups_from`` the run directories of the helpful and the
    harmless DPO models that ``rewarded_soups`` interpolates.
    """

    name: str = "mopo_pairwise"
    weights: tuple[float, ...] = (0.5, 0.5)
    threshold: float = 0.55
    soups_from: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    steps: int = 60
    batch_pairs: int = 8
    learning_rate: float = 5e-5
    beta: float = 0.1
    tau: float = 0.1
    multiplier_lr: float = 0.5
    refresh_every: int = 0  # t0; 0 keeps the initial reference
    ratchet_beta: float = 0.9995
    save_every: int = 20
    candidates: int = 4  # mopo_onpolicy: responses sampled per prompt from the current reference
    candidate_temperature: float = 1.0
    robust_eps: float = 0.15  # mopo_onpolicy: KL radius of the robust secondary estimate (paper: 0.15)


@dataclasses.dataclass(frozen=True)
class PreferenceModelConfig:
    """Bradley-Terry labelers and judges on mean-pooled hidden states after ``feature_layer`` blocks; the ridge
    strength is chosen per model from ``l2_grid`` by ``cv_folds``-fold cross-validation on its own training split
    (a single value skips the selection)."""

    feature_layer: int = 16
    l2_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    cv_folds: int = 5


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Sampling of the judged responses. At ``temperature`` 1 without ``top_p`` the same samples also estimate the
    KL to the reference; otherwise separate temperature-1 samples are drawn for it."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float | None = None
    batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A run of the HH-RLHF comparison. ``work_dir`` holds what runs share (tokenized splits, activations of the
    frozen layers, labelers and judges); ``run_dir`` one method's config, checkpoints, metrics, policy and eval."""

    profile: str = "cpu-small"
    run_dir: str = "runs/hh/cpu-small/mopo_pairwise"
    work_dir: str = "runs/hh/cpu-small/shared"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelSpec = ModelSpec()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    preference: PreferenceModelConfig = PreferenceModelConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        if self.method.name not in METHODS:
            raise ValueError(f"method.name must be one of {METHODS}, got {self.method.name!r}")
        if self.method.name in ("weighted_dpo", "modpo", "rewarded_soups"):
            weights = self.method.weights
            if len(weights) != 2 or min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
                raise ValueError(f"method.weights must be two nonnegative numbers summing to 1, got {weights}")
            if self.method.name == "modpo" and weights[0] <= 0:
                raise ValueError("method.weights: MODPO needs a positive helpfulness weight")
        if self.method.name == "rewarded_soups" and len(self.method.soups_from) != 2:
            raise ValueError("method.soups_from must name the helpful and the harmless DPO run directories")
        if not self.preference.l2_grid or min(self.preference.l2_grid) < 0:
            raise ValueError(f"preference.l2_grid must hold nonnegative values, got {self.preference.l2_grid}")
        if not 0.0 <= self.method.threshold <= 1.0:
            raise ValueError(f"method.threshold must be in [0, 1], got {self.method.threshold}")
