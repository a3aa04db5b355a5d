"""Plots of the synthetic benchmark (matplotlib, imported lazily so the library does not need it)."""

from __future__ import annotations

from typing import Any

import numpy as np

_STYLES = {
    "mopo_weighted_bc": dict(marker="o", color="tab:red", label="MOPO (weighted BC)", s=46, zorder=5),
    "mopo_pairwise": dict(marker="x", color="black", label="MOPO (pairwise, closed-form dual)", s=40, zorder=6),
    "mopo_pairwise_sampled": dict(marker="1", color="tab:brown", label="MOPO (pairwise, sampled pairs)", s=60,
                                  zorder=6),
    "dpo_primary": dict(marker="s", color="tab:blue", label="DPO (primary)", s=50),
    "ipo_primary": dict(marker="D", color="tab:cyan", label="IPO (primary)", s=46),
    "weighted_dpo": dict(marker="^", color="tab:green", label="weighted DPO", s=34),
    "weighted_ipo": dict(marker="v", color="tab:olive", label="weighted IPO", s=34),
    "modpo": dict(marker="P", color="tab:purple", label="MODPO", s=40),
    "rewarded_soups": dict(marker="*", color="tab:orange", label="Rewarded Soups", s=56),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _method_points(method: dict[str, Any]) -> np.ndarray:
    rows = [
        [p["primary_value"], *p["secondary_values"]]
        for p in method["points"]
        if p.get("primary_value") is not None
    ]
    return np.array(rows, np.float64)


def pareto_plot(result: dict[str, Any], path: str) -> None:
    """Exact front, MOPO points and baselines in the (primary, secondary_k) planes of one structure."""
    plt = _pyplot()
    num_secondary = result["shape"]["objectives"] - 1
    fig, axes = plt.subplots(1, num_secondary, figsize=(6.2 * num_secondary, 5.0), squeeze=False)
    exact_points = np.array([p["values"] for p in result["exact"]["points"] if p["feasible"]], np.float64)
    reference = np.asarray(result["reference_values"])
    for k in range(1, num_secondary + 1):
        axis = axes[0, k - 1]
        if exact_points.size:
            order = np.argsort(exact_points[:, k])
            axis.plot(exact_points[order, k], exact_points[order, 0], "-", color="0.6", lw=3, label="exact front",
                      zorder=1)
        axis.scatter([reference[k]], [reference[0]], marker="h", color="0.3", s=50, label="reference policy")
        for name, method in result["methods"].items():
            points = _method_points(method)
            if points.size:
                axis.scatter(points[:, k], points[:, 0], **_STYLES.get(name, dict(label=name)))
        infeasible = [p["threshold"][k - 1] for p in result["methods"]["mopo_weighted_bc"]["points"]
                      if p["status"] == "infeasible"]
        for b in infeasible:
            axis.axvline(b, color="tab:red", lw=0.6, ls=":")
        axis.set_xlabel(f"secondary win rate V_{k} (dotted: thresholds MOPO reports infeasible)")
        axis.set_ylabel("primary win rate V_0")
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{result['structure']}: tau={result['tau']}, win rates against mu")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ablation_plot(ablation: dict[str, Any], path: str) -> None:
    """Primary and secondary trajectories of every (beta, t0) schedule, one column per t0."""
    plt = _pyplot()
    periods = []
    for run in ablation["runs"]:
        if run["t0"] not in periods:
            periods.append(run["t0"])
    fig, axes = plt.subplots(2, len(periods), figsize=(4.2 * len(periods), 6.4), sharey="row", squeeze=False)
    colors = plt.get_cmap("viridis")
    betas = sorted({run["beta"] for run in ablation["runs"]})
    for run in ablation["runs"]:
        column = periods.index(run["t0"])
        steps = np.arange(len(run["trajectory_primary"])) * run["trajectory_every"]
        color = colors(betas.index(run["beta"]) / max(1, len(betas) - 1))
        axes[0, column].plot(steps, run["trajectory_primary"], color=color, label=f"beta={run['beta']}")
        axes[1, column].plot(steps, np.asarray(run["trajectory_secondary"])[:, 0], color=color)
        axes[0, column].set_title(f"t0 = {run['t0']}")
    for column in range(len(periods)):
        axes[1, column].axhline(ablation["threshold"][0], color="tab:red", ls="--", lw=1, label="threshold b")
        axes[1, column].set_xlabel("step")
    axes[0, 0].set_ylabel("primary win rate")
    axes[1, 0].set_ylabel("secondary win rate")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle(f"MOPO schedule ablation on {ablation['structure']} (lagged reference + threshold ratchet)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
