"""What one request costs: prefill time and peak memory read from hooks, and KV-cache bytes (FLOPs: `flops.py`).

Peak memory is the increase over the memory in use when the model starts running:
- CUDA: the allocator's peak, `torch.cuda.max_memory_allocated`.
- CPU (Linux): the process's peak resident set size (`VmHWM`), reset through `/proc/self/clear_refs` at the start,
  after `malloc_trim(0)` has handed the memory glibc keeps from earlier frees back to the system (else the call would
  reuse it unseen and read low).
"""

from __future__ import annotations

import ctypes
import sys
import time
from typing import Any

import torch
from torch import nn

from .speed import synchronize


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_libc = _glibc()


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

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
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


class RequestMeter:
    """Hooks that measure one request (a `generate` or a forward) of `model`.

    The prefill runs from the first module call (the vision encoder, which `generate` runs before the first forward) to
    the end of the model's first forward; peak memory is measured from that first module call to `__exit__`.
    `forwards`: the model's completed forwards (in a `generate`, one per new token); `error`: what a forward raised.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.memory = PeakMemory(self.device)
        self.prefill_seconds: float | None = None
        self.peak_memory_bytes: int | None = None
        self.forwards = 0
        self.error: BaseException | None = None
        self._start: float | None = None
        self._handles: list[Any] = []

    def _on_first_call(self, module: nn.Module, args: tuple) -> None:
        self._handles.pop(0).remove()  # only the very first module call of the request
        self.memory.start()
        synchronize(self.device)
        self._start = time.perf_counter()

    def _on_forward_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        error = sys.exc_info()[1]  # always_call: this hook also runs when the forward raised
        if error is not None:
            self.error = self.error or error
            return
        self.forwards += 1
        if self.forwards == 1:
            synchronize(self.device)
            self.prefill_seconds = time.perf_counter() - self._start

    def __enter__(self) -> "RequestMeter":
        self._handles.append(nn.modules.module.register_module_forward_pre_hook(self._on_first_call))
        self._handles.append(self.model.register_forward_hook(self._on_forward_end, always_call=True))
        return self

    def __exit__(self, *exc: Any) -> bool:
        while self._handles:
            self._handles.pop().remove()
        if self._start is not None:
            self.peak_memory_bytes = self.memory.stop()
        return False


def cache_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a transformers cache (layers may hold different lengths)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
