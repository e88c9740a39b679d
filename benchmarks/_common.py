"""Shared helpers of the benchmark scripts: medians of repeated timings."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Each of `fns` timed `repeats` times, taking turns within every round (after `warmup`
    rounds), so that a change in the machine's load falls on all of them alike: the times by
    name, in round order (ratios of one round compare like with like)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
