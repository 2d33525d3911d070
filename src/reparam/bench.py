"""Side-by-side CPU timing: candidates run interleaved, round after round, so
load on a shared machine hits all of them alike; the median is reported."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


@torch.no_grad()
def compare_latency(candidates: dict[str, Callable[[], object]], *, rounds: int = 20,
                    warmup: int = 3, min_seconds: float = 0.01) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in interleaved rounds.

    Each round calls a candidate enough times to last ``min_seconds``, so
    very fast calls are not lost in timer resolution.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    reps = {name: _reps_for(fn, min_seconds) for name, fn in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / reps[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def _reps_for(fn: Callable[[], object], min_seconds: float) -> int:
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(min_seconds / once))
