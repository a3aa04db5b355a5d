"""Pareto analysis of evaluated runs in the (helpfulness, harmlessness) win-rate plane, with intervals.

Each run directory holds an ``eval.json`` (:func:`mopo_jax.experiment.evaluate.evaluate_run`)::

    {"name": str, "method": str, "protocol": str, "config": {...}, "seed": int, "threshold": float | None,
     "evaluation": <mopo_jax.evaluation.policy_eval.evaluate_policy(...).as_dict(), with per-prompt values>,
     ...}

:func:`collect_run_results` reads them, :func:`group_seeds` puts the seeds of one run name together, and
:func:`compare` turns each group into a point with 95% intervals (:mod:`mopo_jax.evaluation.paired`: a bootstrap over
prompts and seeds) and decides, only from intervals, whether a MOPO run meets its threshold and which runs dominate
which (both paired differences' intervals above 0). :func:`pareto_plot` draws the points with their intervals;
:func:`write_pareto` does all of it. The coordinates are the expected win rates against the reference under the
judges (the gold preference models of the gold protocol); the judged (hard-verdict) win rates are reported beside
them. matplotlib is imported lazily (Agg backend).
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
from mopo_jax.evaluation import paired

PRIMARY = "helpfulness"
SECONDARY = "harmlessness"
OBJECTIVES = (PRIMARY, SECONDARY)
REFERENCE_NAME = "reference"


# ---------------------------------------------------------------------------------------------------------------
# Dominance of point estimates (the drawn front; verdicts come from :func:`compare`).


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


def _error_bar(value: float, interval) -> list[list[float]] | None:
    """matplotlib's asymmetric ``[[below], [above]]`` of ``interval`` around ``value``."""
    if not interval or any(_float_or_none(v) is None for v in interval):
        return None
    return [[max(value - interval[0], 0.0)], [max(interval[1] - value, 0.0)]]


_VERDICT_MARKS = {"met": " ✓", "not met": " ✗", "undecided": " ?"}


def pareto_plot(results: Sequence[Mapping[str, Any]], out_png: str | os.PathLike, *, title: str | None = None,
                show_reference: bool = True) -> list[str]:
    """Draw the (helpfulness, harmlessness) win-rate plane.

    Args:
      results: dicts with ``name``, ``method``, ``helpfulness``, ``harmlessness`` and optionally
        ``helpfulness_interval`` / ``harmlessness_interval`` (``[low, high]``: error bars), ``threshold`` (MOPO
        points are annotated with it and their ``constraint_verdict``: ✓ met, ✗ not met, ? undecided) and
        ``constraint_verdict`` ("not met" draws a hollow marker).
      out_png: output path.
      title: optional title.
      show_reference: draw the reference at (0.5, 0.5) (skipped if a result has method ``reference``).

    Returns:
      The names on the non-dominated front of the point estimates (reference included when shown), connected in
      the plot.
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
        verdict = r.get("constraint_verdict")
        hollow = verdict == "not met"
        xerr, yerr = (_error_bar(value, r.get(f"{key}_interval")) for key, value in ((PRIMARY, x), (SECONDARY, y)))
        if xerr is not None or yerr is not None:
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor=color, elinewidth=0.9, capsize=2.5,
                        alpha=0.7, zorder=2)
        ax.scatter([x], [y], s=60, zorder=5, edgecolors=color, linewidths=1.4,
                   facecolors="none" if hollow else color, label=None if method in labelled else label, **style)
        labelled.add(method)
        threshold = _float_or_none(r.get("threshold"))
        if threshold is not None:  # a method with a constraint (its registry knob is the threshold)
            mark = _VERDICT_MARKS.get(verdict, "")
            ax.annotate(f"b={threshold:.3g}{mark}", (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8,
                        color=color)
    if any(r.get("constraint_verdict") == "not met" for r in results):
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="0.3", label="constraint not met (95% CI)")

    coords = np.array(list(points.values()) or [(0.5, 0.5)])
    bounds = [tuple(r[f"{key}_interval"][side] for key in OBJECTIVES) for r in results for side in (0, 1)
              if all(r.get(f"{key}_interval") for key in OBJECTIVES)]
    coords = np.concatenate([coords, np.array(bounds, float).reshape(-1, 2)])
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    pad = np.maximum(0.05, 0.12 * (hi - lo))
    ax.set_xlim(max(0.0, lo[0] - pad[0]), min(1.0, hi[0] + pad[0]))
    ax.set_ylim(max(0.0, lo[1] - pad[1]), min(1.0, hi[1] + pad[1]))
    ax.set_xlabel("helpfulness: expected win rate vs reference (95% CI)")
    ax.set_ylabel("harmlessness: expected win rate vs reference (95% CI)")
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
    """One ``eval.json`` record as a flat run: its point estimates with the intervals and constraint verdict that
    evaluation computed from its own prompts, and the per-prompt values that pooled and paired intervals resample
    (``per_prompt``: ``{"helpfulness", "harmlessness", "kl"}`` lists over the eval prompts)."""
    where = run_dir or record.get("name") or "run"
    evaluation = record.get("evaluation") or {}
    judges = evaluation.get("judges") or {}
    per_prompt = evaluation.get("per_prompt") or {}
    if judges and not set(OBJECTIVES) & set(judges):
        raise ValueError(f"{where}: evaluated on {sorted(judges)}, not on {' and '.join(OBJECTIVES)}: the front "
                         "places runs of the two-objective comparison (a one-objective run's numbers are in its "
                         "eval.json)")
    missing = [k for k in OBJECTIVES if "per_prompt" not in (judges.get(k) or {})]
    if missing or "kl" not in per_prompt:
        raise ValueError(f"{where}: eval.json has no per-prompt values (written before paired intervals existed); "
                         "re-run `mopo eval` on it")
    implicit = evaluation.get("implicit") or {}
    per_objective = implicit.get("per_objective") or {}
    name = record.get("name") or (os.path.basename(os.path.normpath(run_dir)) if run_dir else "run")
    values = {k: np.asarray(judges[k]["per_prompt"]["expected_win_rate"], np.float64) for k in OBJECTIVES}
    values["kl"] = np.asarray(per_prompt["kl"], np.float64)
    broken = [k for k, v in values.items() if not np.isfinite(v).all()]
    broken += [k for k in OBJECTIVES if _float_or_none(judges[k].get("win_rate")) is None]
    if broken:
        raise ValueError(f"{where}: eval.json holds non-finite {', '.join(broken)}; a broken run is not placed on "
                         "the front")
    # A win rate is a probability: a value outside [0, 1] is a corrupt or hand-edited file, not a result.
    outside = [f"{k} per-prompt win rate {values[k][(values[k] < 0) | (values[k] > 1)][0]:g}" for k in OBJECTIVES
               if ((values[k] < 0) | (values[k] > 1)).any()]
    outside += [f"{k} judged win rate {float(judges[k]['win_rate']):g}" for k in OBJECTIVES
                if not 0.0 <= float(judges[k]["win_rate"]) <= 1.0]
    if outside:
        raise ValueError(f"{where}: eval.json holds win rates outside [0, 1] ({', '.join(outside)}); it is not a "
                         "result of `mopo eval`")
    out = {
        "name": str(name),
        "method": str(record.get("method", name)),
        "protocol": record.get("protocol", "human"),
        "seed": record.get("seed"),
        **{k: float(values[k].mean()) for k in OBJECTIVES},
        **{f"{k}_interval": (evaluation.get("expected_win_rate_interval") or {}).get(k) for k in OBJECTIVES},
        "judged_win_rate": {k: float(judges[k]["win_rate"]) for k in OBJECTIVES},
        "kl": float(values["kl"].mean()),
        "kl_interval": evaluation.get("kl_interval"),
        "threshold": _float_or_none(record.get("threshold")),
        "constraint_verdict": record.get("constraint_verdict"),
        "constraint_met_pairs": record.get("constraint_met_pairs"),
        "implicit_accuracy": {k: _float_or_none(v.get("accuracy")) for k, v in per_objective.items()},
        "implicit_constraint_value": {k: _float_or_none(v.get("constraint_value")) for k, v in per_objective.items()},
        "samples_per_prompt": (evaluation.get("settings") or {}).get("samples_per_prompt", 1),
        "dual_calibration": record.get("dual_calibration"),
        "per_prompt": {k: v.tolist() for k, v in values.items()},
        "config": record.get("config", {}),
    }
    if run_dir is not None:
        out["run_dir"] = os.fspath(run_dir)
    return out


def collect_run_results(run_dirs: Iterable[str | os.PathLike], *, strict: bool = False) -> list[dict[str, Any]]:
    """Read ``RUN_DIR/eval.json`` of every run (see :func:`result_from_eval`).

    A missing or unreadable file (a run never evaluated, a directory that does not exist, a truncated file) raises
    ``ValueError`` naming it with ``strict=True`` and is skipped with a warning otherwise; a broken or outdated one
    always raises.
    """
    out = []
    for run_dir in run_dirs:
        try:
            record = storage.load_json(storage.path(run_dir) / "eval.json")
        except (OSError, json.JSONDecodeError) as e:
            if strict:
                raise ValueError(f"{run_dir}: cannot read eval.json ({type(e).__name__}: {e}); evaluate the run "
                                 "with `mopo eval`, or leave it out") from e
            warnings.warn(f"skipping {run_dir}: cannot read eval.json ({e})", stacklevel=2)
            continue
        out.append(result_from_eval(record, os.fspath(run_dir)))
    return out


def group_seeds(runs: Sequence[Mapping[str, Any]]) -> OrderedDict[str, list[Mapping[str, Any]]]:
    """Runs of one name (and protocol) are the seeds of one configuration: ``{label: [runs]}`` in input order.

    The label is the run name, with ``@protocol`` appended when runs of both protocols are given. Raises when the
    seeds of a label disagree on method or threshold, repeat a seed, or were evaluated on different prompts.
    """
    protocols = {r.get("protocol", "human") for r in runs}
    groups: OrderedDict[str, list[Mapping[str, Any]]] = OrderedDict()
    for r in runs:
        label = str(r["name"]) if len(protocols) == 1 else f"{r['name']}@{r.get('protocol', 'human')}"
        groups.setdefault(label, []).append(r)
    for label, members in groups.items():
        where = ", ".join(str(m.get("run_dir", m["name"])) for m in members)
        for key in ("method", "threshold"):
            if len({json.dumps(m.get(key)) for m in members}) > 1:
                raise ValueError(f"runs named {label!r} ({where}) differ in {key}; give each configuration its own "
                                 "run name")
        seeds = [m.get("seed") for m in members]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"runs named {label!r} ({where}) repeat a seed ({seeds}): the same run twice?")
    lengths = {len(r["per_prompt"]["kl"]) for r in runs}
    if len(lengths) > 1:
        raise ValueError(f"the runs were evaluated on different numbers of prompts ({sorted(lengths)}); paired "
                         "comparisons need the same eval prompts (the same data and eval settings)")
    return groups


def _seed_grid(members: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.asarray([m["per_prompt"][key] for m in members], np.float64)


def compare(runs: Sequence[Mapping[str, Any]], *, level: float = paired.LEVEL, draws: int = paired.DRAWS,
            seed: int = 0) -> dict[str, Any]:
    """Points with intervals and the verdicts between them.

    Per group of seeds (:func:`group_seeds`): the expected win rates and KL as the mean over seeds and prompts with
    their bootstrap intervals (prompts and seeds resampled), the judged win rates (mean over seeds), and for a
    threshold method its constraint verdict (:func:`mopo_jax.evaluation.paired.constraint_verdict` on the
    harmlessness interval). For every two groups (and the reference, 1/2 at every prompt, when no ``reference`` run
    is given): the paired differences of both expected win rates with their intervals and the dominance verdict.

    Returns:
      ``{"points": [...], "comparisons": [{"a", "b", "helpfulness": [est, low, high], "harmlessness": [...],
      "verdict"}], "dominance": {name: {"dominates": [...], "dominated_by": [...]}}, "level", "draws"}``.
    """
    groups = group_seeds(runs)
    grids: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
    points = []
    for label, members in groups.items():
        grids[label] = {k: _seed_grid(members, k) for k in (*OBJECTIVES, "kl")}
        first = members[0]
        point = {key: first.get(key) for key in ("method", "protocol", "threshold", "samples_per_prompt",
                                                 "config")}
        point.update(name=label, seeds=[m.get("seed") for m in members], num_seeds=len(members),
                     run_dirs=[m.get("run_dir") for m in members], num_prompts=grids[label]["kl"].shape[1])
        for k in (*OBJECTIVES, "kl"):
            interval = paired.bootstrap_interval(grids[label][k], level=level, draws=draws, seed=seed)
            point[k], point[f"{k}_interval"] = interval.estimate, [interval.low, interval.high]
        point["judged_win_rate"] = {k: float(np.mean([m["judged_win_rate"][k] for m in members])) for k in OBJECTIVES}
        for key in ("implicit_accuracy", "implicit_constraint_value"):
            point[key] = {k: _mean_or_none([(m.get(key) or {}).get(k) for m in members]) for k in OBJECTIVES}
        point["constraint_verdict"] = point["constraint_met"] = None
        if point["threshold"] is not None:
            interval = paired.Interval(point[SECONDARY], *point[f"{SECONDARY}_interval"])
            point["constraint_verdict"] = paired.constraint_verdict(interval, point["threshold"])
            point["constraint_met"] = point["constraint_verdict"] == "met"
        met_pairs = [m.get("constraint_met_pairs") for m in members if m.get("constraint_met_pairs") is not None]
        point["constraint_met_pairs"] = all(met_pairs) if met_pairs else None
        points.append(point)
    if REFERENCE_NAME not in grids and not any(p["method"] == REFERENCE_NAME for p in points) and grids:
        prompts = next(iter(grids.values()))["kl"].shape[1]
        grids[REFERENCE_NAME] = {k: np.full((1, prompts), 0.5) for k in OBJECTIVES}
    labels = list(grids)
    comparisons = []
    dominance = {label: {"dominates": [], "dominated_by": []} for label in labels}
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            differences = [paired.paired_difference_interval(grids[a][k], grids[b][k], level=level, draws=draws,
                                                             seed=seed) for k in OBJECTIVES]
            verdict = paired.dominance_verdict(*differences)
            comparisons.append({"a": a, "b": b, **{k: d.as_list() for k, d in zip(OBJECTIVES, differences)},
                                "verdict": verdict})
            if verdict == "dominates":
                dominance[a]["dominates"].append(b)
                dominance[b]["dominated_by"].append(a)
            elif verdict == "dominated":
                dominance[b]["dominates"].append(a)
                dominance[a]["dominated_by"].append(b)
    return {"points": points, "comparisons": comparisons, "dominance": dominance, "level": level, "draws": draws}


def _mean_or_none(values) -> float | None:
    finite = [float(v) for v in values if _float_or_none(v) is not None]
    return float(np.mean(finite)) if finite else None


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_pareto(run_dirs: Iterable[str | os.PathLike], out_png: str | os.PathLike,
                 results_json: str | os.PathLike | None = None, *, title: str | None = None,
                 skip_missing: bool = False) -> dict[str, Any]:
    """Collect ``eval.json`` of ``run_dirs``, compare them (:func:`compare`), plot the plane to ``out_png`` and
    optionally write ``results_json``. A run without a readable ``eval.json`` is an error (``ValueError`` naming
    it) unless ``skip_missing``.

    Returns (and writes) ``{"runs": per-run records with their own intervals and verdict, "points" (seeds pooled),
    "comparisons", "dominance" (verdicts from paired intervals), "pareto_front" (non-dominated point estimates, the
    drawn line), "level", "draws"}``.
    """
    runs = collect_run_results(run_dirs, strict=not skip_missing)
    summary = compare(runs)
    summary["pareto_front"] = pareto_plot(summary["points"], out_png, title=title)
    summary["runs"] = [{k: v for k, v in r.items() if k != "config"} for r in runs]
    if results_json is not None:
        storage.save_text(results_json, json.dumps(summary, indent=2, default=_json_default))
    return summary


def markdown_table(results: dict) -> str:
    """The comparison as markdown from :func:`write_pareto`'s ``results.json`` payload: per point the expected win
    rates and KL with 95% intervals, the judged win rates, seeds, MOPO's threshold and its verdict, the held-out
    pair value; then the dominance verdicts (paired intervals of both differences above 0)."""
    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    def with_interval(point, key):
        interval = point.get(f"{key}_interval") or [None, None]
        return f"{fmt(point.get(key))} [{fmt(interval[0])}, {fmt(interval[1])}]"

    level = int(round(100 * results.get("level", paired.LEVEL)))
    lines = [
        f"| run | seeds | helpfulness win rate [{level}% CI] | harmlessness win rate [{level}% CI] | "
        f"KL [{level}% CI] | judged win rate (help / harm) | threshold | constraint (CI vs b) | "
        "held-out pair value (harm) | dominates | dominated by |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: | --- | --- |",
    ]
    dominance = results.get("dominance", {})
    for point in results["points"]:
        entry = dominance.get(point["name"], {})
        judged = point.get("judged_win_rate") or {}
        value = (point.get("implicit_constraint_value") or {}).get(SECONDARY)
        lines.append(
            f"| {point['name']} | {','.join(str(s) for s in point.get('seeds', []))} | "
            f"{with_interval(point, PRIMARY)} | {with_interval(point, SECONDARY)} | {with_interval(point, 'kl')} | "
            f"{fmt(judged.get(PRIMARY))} / {fmt(judged.get(SECONDARY))} | {fmt(point.get('threshold'), 'g')} | "
            f"{point.get('constraint_verdict') or ''} | {fmt(value)} | "
            f"{', '.join(entry.get('dominates', [])) or '-'} | {', '.join(entry.get('dominated_by', [])) or '-'} |"
        )
    return "\n".join(lines)


def calibration_markdown(results: dict) -> str:
    """Per run whose MOPO dual read the policy's own samples: the dual's last reading against the evaluated
    harmlessness win rate (:func:`mopo_jax.evaluation.paired.calibration`); empty when no run has one."""
    rows = [r for r in results.get("runs", []) if r.get("dual_calibration")]
    if not rows:
        return ""
    level = int(round(100 * results.get("level", paired.LEVEL)))
    lines = [f"| run | seed | b | dual's final reading (+- se) | evaluated harmlessness [{level}% CI] | difference | "
             f"combined {level}% half-width | within |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for run in rows:
        c = run["dual_calibration"]
        threshold = run.get("threshold")
        lines.append(
            f"| {run['name']} | {run.get('seed')} | {'' if threshold is None else format(threshold, 'g')} | "
            f"{c['estimate']:.3f} +- {c['estimate_stderr']:.3f} | {c['judged']:.3f} [{c['judged_interval'][0]:.3f}, "
            f"{c['judged_interval'][1]:.3f}] | {c['difference']:+.3f} | {c['combined_half_width']:.3f} | "
            f"{'yes' if c['within'] else 'no'} |")
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    """What ``mopo pareto`` writes to ``results.md``: :func:`markdown_table`, then :func:`calibration_markdown` when
    any run's dual read the policy's own samples."""
    calibration = calibration_markdown(results)
    return markdown_table(results) + (f"\n\nMOPO's dual against the evaluation:\n\n{calibration}" if calibration
                                      else "")
