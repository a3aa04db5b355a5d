"""Pareto analysis of evaluated runs in the (helpfulness win rate, harmlessness win rate) plane.

Each run directory holds an ``eval.json``::

    {"name": str, "method": str, "config": {...}, "seed": int,
     "evaluation": <mopo_jax.evaluation.policy_eval.evaluate_policy output>,
     "threshold": float | None, "constraint_met": bool | None}

:func:`collect_run_results` turns them into flat points, :func:`aggregate_seeds` averages seeds of the same name,
:func:`dominance_table` / :func:`pareto_front` compare them (both coordinates maximised) and :func:`pareto_plot` draws
them; :func:`write_pareto` does all of it. matplotlib is imported lazily (Agg backend).
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mopo_jax import storage

PRIMARY = "helpfulness"
SECONDARY = "harmlessness"
REFERENCE_NAME = "reference"


# ---------------------------------------------------------------------------------------------------------------
# Dominance.


def _finite(point) -> bool:
    return point is not None and all(v is not None and math.isfinite(float(v)) for v in point)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` Pareto-dominates ``b`` (maximisation): ``a >= b`` everywhere and ``a > b`` somewhere.

    Points with a missing or non-finite coordinate neither dominate nor are dominated.
    """
    if not (_finite(a) and _finite(b)):
        return False
    if len(a) != len(b):
        raise ValueError(f"points of different dimension: {a} and {b}")
    a, b = [float(v) for v in a], [float(v) for v in b]
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def dominance_table(points: Mapping[str, Sequence[float]]) -> dict[str, dict[str, list[str]]]:
    """``{name: {"dominates": [names], "dominated_by": [names]}}`` over all ordered pairs of ``points``."""
    table = {name: {"dominates": [], "dominated_by": []} for name in points}
    for a, pa in points.items():
        for b, pb in points.items():
            if a != b and dominates(pa, pb):
                table[a]["dominates"].append(b)
                table[b]["dominated_by"].append(a)
    return table


def pareto_front(points: Mapping[str, Sequence[float]]) -> list[str]:
    """Names of the non-dominated points with finite coordinates, in input order (duplicates all stay)."""
    return [name for name, p in points.items()
            if _finite(p) and not any(dominates(q, p) for other, q in points.items() if other != name)]


# ---------------------------------------------------------------------------------------------------------------
# Plot.

# Plot styles of the built-in methods (mopo_jax.experiment.methods); any other name gets a fallback style and its raw
# name.
_METHOD_STYLES = {
    "reference": dict(marker="h", color="0.3", label="reference (SFT)"),
    "mopo_pairwise": dict(marker="o", color="tab:red", label="MOPO (pairwise)"),
    "mopo_onpolicy": dict(marker="8", color="tab:pink", label="MOPO (on-policy)"),
    "dpo_helpful": dict(marker="s", color="tab:blue", label="DPO (helpful pairs)"),
    "dpo_harmless": dict(marker="D", color="tab:cyan", label="DPO (harmless pairs)"),
    "dpo_pooled": dict(marker="p", color="tab:brown", label="DPO (pooled pairs)"),
    "weighted_dpo": dict(marker="^", color="tab:green", label="weighted DPO"),
    "modpo": dict(marker="P", color="tab:purple", label="MODPO"),
    "rewarded_soups": dict(marker="*", color="tab:orange", label="Rewarded Soups"),
}
_FALLBACK_MARKERS = ("<", ">", "d", "H", "1", "2", "3", "4")
_FALLBACK_COLORS = ("tab:brown", "tab:gray", "darkgoldenrod", "teal", "navy", "crimson", "darkgreen", "indigo")


def _style(method: str, fallback_index: dict[str, int]) -> dict:
    if method in _METHOD_STYLES:
        return dict(_METHOD_STYLES[method])
    if method not in fallback_index:
        fallback_index[method] = len(fallback_index)
    i = fallback_index[method]
    return dict(marker=_FALLBACK_MARKERS[i % len(_FALLBACK_MARKERS)],
                color=_FALLBACK_COLORS[(i // len(_FALLBACK_MARKERS) + i) % len(_FALLBACK_COLORS)], label=method)


def _float_or_none(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def pareto_plot(results: Sequence[Mapping[str, Any]], out_png: str | os.PathLike, *, title: str | None = None,
                show_reference: bool = True) -> list[str]:
    """Draw the (helpfulness win rate, harmlessness win rate) plane.

    Args:
      results: dicts with ``name``, ``method``, ``helpfulness``, ``harmlessness`` and optionally
        ``helpfulness_stderr`` / ``harmlessness_stderr`` (error bars), ``threshold`` (MOPO points are annotated with
        it) and ``constraint_met`` (False draws a hollow marker).
      out_png: output path.
      title: optional title.
      show_reference: draw the reference at (0.5, 0.5) (skipped if a result has method ``reference``).

    Returns:
      The names on the non-dominated front (reference included when shown), connected in the plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = OrderedDict()
    for r in results:
        x, y = _float_or_none(r.get(PRIMARY)), _float_or_none(r.get(SECONDARY))
        if x is not None and y is not None:
            points[str(r["name"])] = (x, y)
    has_reference = any(r.get("method") == REFERENCE_NAME for r in results)
    if show_reference and not has_reference and REFERENCE_NAME not in points:
        points[REFERENCE_NAME] = (0.5, 0.5)
    front = pareto_front(points)

    fig, ax = plt.subplots(figsize=(7.0, 5.6))
    ax.axhline(0.5, color="0.75", lw=0.8, ls="--", zorder=0)
    ax.axvline(0.5, color="0.75", lw=0.8, ls="--", zorder=0)
    if front:
        xy = np.array(sorted(points[n] for n in front))
        ax.plot(xy[:, 0], xy[:, 1], "-", color="0.55", lw=2.0, alpha=0.7, zorder=1, label="non-dominated front")
    if show_reference and not has_reference:
        ax.scatter([0.5], [0.5], s=70, zorder=4, **_METHOD_STYLES["reference"])

    fallback: dict[str, int] = {}
    labelled: set[str] = set()
    for r in results:
        name = str(r["name"])
        if name not in points:
            continue
        x, y = points[name]
        method = str(r.get("method", name))
        style = _style(method, fallback)
        label = style.pop("label")
        color = style.pop("color")
        hollow = r.get("constraint_met") is False
        xerr, yerr = _float_or_none(r.get(f"{PRIMARY}_stderr")), _float_or_none(r.get(f"{SECONDARY}_stderr"))
        if xerr is not None or yerr is not None:
            ax.errorbar([x], [y], xerr=None if xerr is None else [xerr], yerr=None if yerr is None else [yerr],
                        fmt="none", ecolor=color, elinewidth=0.9, capsize=2.5, alpha=0.7, zorder=2)
        ax.scatter([x], [y], s=60, zorder=5, edgecolors=color, linewidths=1.4,
                   facecolors="none" if hollow else color, label=None if method in labelled else label, **style)
        labelled.add(method)
        threshold = _float_or_none(r.get("threshold"))
        if threshold is not None:  # a method with a constraint (its registry knob is the threshold)
            mark = "" if r.get("constraint_met") is None else (" ✓" if r["constraint_met"] else " ✗")
            ax.annotate(f"b={threshold:.3g}{mark}", (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8,
                        color=color)
    if any(r.get("constraint_met") is False for r in results):
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="0.3", label="constraint not met")

    coords = np.array(list(points.values()) or [(0.5, 0.5)])
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    pad = np.maximum(0.05, 0.12 * (hi - lo))
    ax.set_xlim(max(0.0, lo[0] - pad[0]), min(1.0, hi[0] + pad[0]))
    ax.set_ylim(max(0.0, lo[1] - pad[1]), min(1.0, hi[1] + pad[1]))
    ax.set_xlabel("helpfulness win rate vs reference (judge)")
    ax.set_ylabel("harmlessness win rate vs reference (judge)")
    ax.set_title(title or "HH-RLHF: win rates against the reference policy")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=150)
    plt.close(fig)
    storage.save_bytes(out_png, image.getvalue())
    return front


# ---------------------------------------------------------------------------------------------------------------
# Run collection.


def result_from_eval(record: Mapping[str, Any], run_dir: str | None = None) -> dict[str, Any]:
    """Flatten one ``eval.json`` record into a plot/dominance point."""
    evaluation = record.get("evaluation") or {}
    win = evaluation.get("win_rate") or {}
    stderr = evaluation.get("win_rate_stderr") or {}
    implicit = evaluation.get("implicit") or {}
    per_objective = implicit.get("per_objective") or {}
    name = record.get("name") or (os.path.basename(os.path.normpath(run_dir)) if run_dir else "run")
    out = {
        "name": str(name),
        "method": str(record.get("method", name)),
        "seed": record.get("seed"),
        PRIMARY: _float_or_none(win.get(PRIMARY)),
        SECONDARY: _float_or_none(win.get(SECONDARY)),
        f"{PRIMARY}_stderr": _float_or_none(stderr.get(PRIMARY)),
        f"{SECONDARY}_stderr": _float_or_none(stderr.get(SECONDARY)),
        "threshold": _float_or_none(record.get("threshold")),
        "constraint_met": record.get("constraint_met"),
        "constraint_met_pairs": record.get("constraint_met_pairs"),
        "kl": _float_or_none(evaluation.get("kl")),
        "implicit_accuracy": {k: _float_or_none(v.get("accuracy")) for k, v in per_objective.items()},
        "implicit_constraint_value": {k: _float_or_none(v.get("constraint_value")) for k, v in per_objective.items()},
        "config": record.get("config", {}),
    }
    raw = {PRIMARY: win.get(PRIMARY), SECONDARY: win.get(SECONDARY), "kl": evaluation.get("kl")}
    broken = [key for key, value in raw.items() if value is not None and not math.isfinite(float(value))]
    if broken:
        raise ValueError(f"{run_dir or name}: eval.json holds non-finite {', '.join(broken)}; a broken run is not "
                         "placed on the front")
    if run_dir is not None:
        out["run_dir"] = os.fspath(run_dir)
    return out


def collect_run_results(run_dirs: Iterable[str | os.PathLike], *, strict: bool = False) -> list[dict[str, Any]]:
    """Read ``RUN_DIR/eval.json`` of every run into flat points (see :func:`result_from_eval`).

    A missing or unreadable file raises with ``strict=True`` and is skipped with a warning otherwise.
    """
    out = []
    for run_dir in run_dirs:
        try:
            record = storage.load_json(storage.path(run_dir) / "eval.json")
        except (OSError, json.JSONDecodeError) as e:
            if strict:
                raise
            warnings.warn(f"skipping {run_dir}: cannot read eval.json ({e})", stacklevel=2)
            continue
        out.append(result_from_eval(record, os.fspath(run_dir)))
    return out


def aggregate_seeds(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Average runs that share a ``name`` (different seeds).

    The coordinates are the seed means; with several seeds the error bars are the standard errors across seeds,
    with one seed the run's own (within-run) standard errors. ``constraint_met`` is True only if every seed met it
    (None if no seed reports it); ``threshold`` is kept when all seeds agree.
    """
    groups: OrderedDict[str, list[Mapping[str, Any]]] = OrderedDict()
    for r in results:
        groups.setdefault(str(r["name"]), []).append(r)
    out = []
    for name, runs in groups.items():
        if len(runs) == 1:
            row = dict(runs[0])
            row["num_seeds"] = 1
            row["seeds"] = [runs[0].get("seed")]
            out.append(row)
            continue
        row = {"name": name, "method": runs[0].get("method", name), "num_seeds": len(runs),
               "seeds": [r.get("seed") for r in runs], "config": runs[0].get("config", {})}
        for key in (PRIMARY, SECONDARY, "kl"):
            values = np.array([v for v in (_float_or_none(r.get(key)) for r in runs) if v is not None])
            row[key] = float(values.mean()) if values.size else None
            if key != "kl":
                row[f"{key}_stderr"] = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else None
        thresholds = {_float_or_none(r.get("threshold")) for r in runs}
        row["threshold"] = thresholds.pop() if len(thresholds) == 1 else None
        for key in ("constraint_met", "constraint_met_pairs"):
            met = [r.get(key) for r in runs if r.get(key) is not None]
            row[key] = all(met) if met else None
        out.append(row)
    return out


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_pareto(run_dirs: Iterable[str | os.PathLike], out_png: str | os.PathLike,
                 results_json: str | os.PathLike | None = None, *, aggregate: bool = True,
                 title: str | None = None) -> dict[str, Any]:
    """Collect ``eval.json`` of ``run_dirs``, plot the plane to ``out_png`` and optionally write ``results_json``.

    Returns (and writes) ``{"runs": per-run points, "points": plotted points (seeds averaged when ``aggregate``),
    "pareto_front": names, "dominance": dominance_table incl. the reference at (0.5, 0.5)}``.
    """
    runs = collect_run_results(run_dirs)
    points = aggregate_seeds(runs) if aggregate else [dict(r) for r in runs]
    front = pareto_plot(points, out_png, title=title)
    coords = OrderedDict((p["name"], (p.get(PRIMARY), p.get(SECONDARY))) for p in points)
    if not any(p.get("method") == REFERENCE_NAME for p in points):
        coords.setdefault(REFERENCE_NAME, (0.5, 0.5))
    summary = {"runs": runs, "points": points, "pareto_front": front, "dominance": dominance_table(coords)}
    if results_json is not None:
        storage.save_text(results_json, json.dumps(summary, indent=2, default=_json_default))
    return summary


def markdown_table(results: dict) -> str:
    """The comparison as a markdown table from :func:`write_pareto`'s ``results.json`` payload: judge win rates
    against the reference (with standard errors), KL, held-out implicit accuracy, MOPO's threshold and whether it
    held on held-out data (the judged harmlessness win rate, and the pairwise value on held-out human pairs), and
    which runs each one dominates or is dominated by."""
    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    lines = [
        "| run | helpfulness win rate | harmlessness win rate | KL | implicit acc. (help / harm) | threshold | "
        "met (judged win rate >= b) | held-out pair value | met (pair value >= b) | dominates | dominated by |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: | :---: | --- | --- |",
    ]
    dominance = results.get("dominance", {})
    for point in results["points"]:
        name = point["name"]
        accuracy = point.get("implicit_accuracy") or {}
        value = (point.get("implicit_constraint_value") or {}).get("harmlessness")
        entry = dominance.get(name, {})

        def yes_no(key):
            met = point.get(key)
            return "" if met is None else ("yes" if met else "no")

        lines.append(
            f"| {name} | {fmt(point['helpfulness'])} ± {fmt(point.get('helpfulness_stderr'))} | "
            f"{fmt(point['harmlessness'])} ± {fmt(point.get('harmlessness_stderr'))} | {fmt(point.get('kl'))} | "
            f"{fmt(accuracy.get('helpfulness'), '.2f')} / {fmt(accuracy.get('harmlessness'), '.2f')} | "
            f"{fmt(point.get('threshold'), '.2f')} | {yes_no('constraint_met')} | {fmt(value)} | "
            f"{yes_no('constraint_met_pairs')} | {', '.join(entry.get('dominates', [])) or '-'} | "
            f"{', '.join(entry.get('dominated_by', [])) or '-'} |"
        )
    return "\n".join(lines)
