"""Timing helpers. Absolute CPU times are noisy: report ratios against a baseline measured in the same run."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefill(model: torch.nn.Module, inputs: dict, method: Any = None) -> Callable[[], None]:
    """One prefill forward (vision encoder included), with `method` applied if given."""

    def run() -> None:
        with torch.no_grad(), (method(model) if method is not None else nullcontext()):
            model(**inputs, use_cache=True, logits_to_keep=1)

    return run


def prefill_seconds(model: torch.nn.Module, inputs: dict, method: Any = None, repeats: int = 5, warmup: int = 1) -> float:
    """Median time of one prefill forward (vision encoder included), with `method` applied if given."""
    return median_seconds(prefill(model, inputs, method), repeats=repeats, warmup=warmup)


def paired_ratio(baseline: Callable[[], Any], other: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median over `repeats` of time(other) / time(baseline), the two run back to back each time, so that the load of
    a shared machine, drifting over minutes, weighs on both alike."""
    for _ in range(warmup):
        baseline()
        other()
    ratios = [median_seconds(other, 1, 0) / median_seconds(baseline, 1, 0) for _ in range(repeats)]
    return statistics.median(ratios)
