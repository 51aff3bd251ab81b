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


def prefill_seconds(model: torch.nn.Module, inputs: dict, method: Any = None, repeats: int = 5, warmup: int = 1) -> float:
    """Median time of one prefill forward (vision encoder included), with `method` applied if given."""

    def run() -> None:
        with torch.no_grad(), (method(model) if method is not None else nullcontext()):
            model(**inputs, use_cache=True, logits_to_keep=1)

    return median_seconds(run, repeats=repeats, warmup=warmup)
