"""Timing graphs on a runtime's own buffers: what the engine's cost table and the benchmarks measure."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def median_forward_s(runtime, keys: Sequence, repeats: int, warmup: int = 0,
                     prepare: Callable | None = None, rows: Sequence[int] | None = None) -> dict:
    """Median seconds of one forward of each graph ``(step, L)`` in ``keys`` on the runtime's own
    buffers for cache rows ``rows`` (default: all of the artifact's; ``prepare(key)`` runs before
    each, untimed). The graphs take turns, one forward
    each per round, so a change of machine load during the measurement weighs on all of them
    alike (their ratios are what callers compare). The caller owns the cache meanwhile."""
    times: dict = {key: [] for key in keys}
    rows = list(range(runtime.batch_size)) if rows is None else list(rows)
    for _ in range(warmup + repeats):
        for key in keys:
            if prepare is not None:
                prepare(key)
            t0 = time.perf_counter()
            runtime.run(key, rows)
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t[warmup:]) for key, t in times.items()}
