"""Peak memory of one call, measured as the increase over the memory in use when the call starts.

CUDA: the allocator's peak (`torch.cuda.max_memory_allocated`). CPU (Linux, glibc): the process's peak resident set
size (`VmHWM`, kept by the kernel; torch's CPU allocator has no peak counter), reset through `/proc/self/clear_refs`
at the start, right after `malloc_trim(0)` has handed back the memory glibc keeps from earlier frees (else the call
would reuse it unseen and read low). Report ratios against a baseline measured the same way.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import torch


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_libc = _glibc()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def cpu_peak_supported() -> bool:
    """Linux with glibc: the peak resident set size can be reset and read."""
    try:
        _status_bytes("VmHWM:")
        with open("/proc/self/clear_refs", "w"):
            return _libc is not None
    except OSError:
        return False


class PeakMemory:
    """`start()` then `stop()` -> bytes in use at the peak beyond those in use at `start()`; None if not measurable."""

    def __init__(self, device: torch.device | str | None) -> None:
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.supported = self.cuda or cpu_peak_supported()
        self.base: int | None = None

    def start(self) -> None:
        if not self.supported:
            return
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            _libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset the peak resident set size to the current one
            self.base = _status_bytes("VmRSS:")

    def stop(self) -> int | None:
        if self.base is None:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self.base)
        return max(0, _status_bytes("VmHWM:") - self.base)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str | None = None) -> int | None:
    """Peak memory `fn()` adds on top of what is in use before it runs (None where it cannot be measured)."""
    meter = PeakMemory(device)
    meter.start()
    fn()
    return meter.stop()


def peak_tensor_bytes(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes of the tensors `fn()` allocates on top of those alive before it runs.

    CUDA: the allocator's peak, as `peak_memory_bytes`. CPU: replayed from the torch profiler's memory events (each
    operator's allocations net of its frees, in time order), so it does not depend on what the process already holds
    or on other threads: a server can measure one request while serving others.
    """
    if device is not None and torch.device(device).type == "cuda":
        return peak_memory_bytes(fn, device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
