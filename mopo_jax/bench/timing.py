"""Interleaved A/B timing: the contenders take turns, so a slow phase of the machine hits all of them alike.

Timing each contender in its own block lets background load or frequency changes land on one of them only; ratios
of such blocks swung by 30% between runs on a shared 2-core machine. Here every round runs each contender once, in
turn, and ratios are taken round by round before the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_seconds(contenders: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of ``repeats`` calls of every contender, round-robin (each ``fn()`` must block until its work
    is done), after ``warmup`` untimed rounds. Returns ``{name: [seconds of round 0, 1, ...]}``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def ratio_summary(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """The ratio of two contenders' times: the ratio of their medians, and the median, min and max of the
    round-by-round ratios (their spread says how far one run's ratio can be trusted)."""
    rounds = [a / b for a, b in zip(numerator, denominator)]
    return {"ratio_of_medians": statistics.median(numerator) / statistics.median(denominator),
            "median_of_round_ratios": statistics.median(rounds), "min_round_ratio": min(rounds),
            "max_round_ratio": max(rounds)}
