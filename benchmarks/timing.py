"""Side-by-side timing that survives bursty machine noise: build every contender in one process, run their steps
in alternation (A B C A B C ...), and report the median of per-round ratios to a baseline.

A single run on these machines can swing by 50% when a noisy neighbour bursts; a burst hits all contenders of
one round alike, so the per-round ratio is stable where the absolute times are not.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def alternate(steps: dict[str, Callable[[], None]], *, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run each step ``warmup`` times (not timed), then ``rounds`` rounds of one timed call each, alternating.
    Returns the seconds of every timed call per name."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of times[name][i] / times[baseline][i]."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def median_ms(times: dict[str, list[float]], name: str) -> float:
    return 1e3 * statistics.median(times[name])


def write_rows(path: Path, args, rows: list[dict]) -> None:
    """A benchmark's results as JSON at ``path`` (atomically): its arguments, torch version, machine, threads, rows."""
    import torch

    from moe_lora.atomic_dir import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
