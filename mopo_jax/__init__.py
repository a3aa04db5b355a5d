"""mopo-jax: Multi-Objective Preference Optimization (Agnihotri et al., arXiv 2505.10892) as pure JAX functions.

The public API below is what other JAX pipelines compose with: every function is pure, jittable and vmappable, and
documents the equation of docs/algorithm.md it implements.
"""

from mopo_jax.losses import (
    LossTerms,
    dpo_loss,
    ipo_loss,
    log_ratio_margin,
    mopo_pairwise_loss,
    pairwise_win_rate_margins,
    weighted_bc_loss,
)
from mopo_jax.objectives import (
    MASKED_LOG_WEIGHT,
    MultiplierUpdate,
    RobustBound,
    closed_form_log_weights,
    combined_win_rate,
    dual_objective,
    importance_weighted_secondaries,
    kl_divergence,
    log_barrier_penalty,
    masked_log_normalize,
    objective_values,
    optimal_robust_chi,
    pairwise_objective_values,
    ratchet_thresholds,
    robust_lower_bound,
    secondary_values,
    update_barrier_multipliers,
    update_multipliers,
    win_rates,
)
from mopo_jax.state import (
    MOPOConfig,
    MOPOState,
    MOPOTransformation,
    MOPOUpdate,
    lagged_reference_update,
    mopo,
    reference_refresh_due,
)

__version__ = "0.1.0"

__all__ = [
    "LossTerms",
    "MASKED_LOG_WEIGHT",
    "MOPOConfig",
    "MOPOState",
    "MOPOTransformation",
    "MOPOUpdate",
    "MultiplierUpdate",
    "RobustBound",
    "closed_form_log_weights",
    "combined_win_rate",
    "dpo_loss",
    "dual_objective",
    "importance_weighted_secondaries",
    "ipo_loss",
    "kl_divergence",
    "lagged_reference_update",
    "log_barrier_penalty",
    "log_ratio_margin",
    "masked_log_normalize",
    "mopo",
    "mopo_pairwise_loss",
    "objective_values",
    "optimal_robust_chi",
    "pairwise_objective_values",
    "pairwise_win_rate_margins",
    "ratchet_thresholds",
    "reference_refresh_due",
    "robust_lower_bound",
    "secondary_values",
    "update_barrier_multipliers",
    "update_multipliers",
    "weighted_bc_loss",
    "win_rates",
]
