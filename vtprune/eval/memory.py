"""Peak memory of one call, measured as the increase over the memory in use when the call starts.

CUDA: the allocator's peak (`torch.cuda.max_memory_allocated`). CPU: the process's resident set size, sampled every
millisecond by a helper thread while the call runs (torch's CPU allocator has no peak counter). Report ratios against
a baseline measured the same way; on CPU, measure each configuration in a fresh process, as freed memory may stay
resident.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import torch


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak memory `fn()` adds on top of what is in use before it runs."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    start = resident_bytes()
    peak, done = [start], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], resident_bytes()) - start
