"""What one request costs: prefill time and peak memory (see `memory.py`) read from hooks, and KV-cache bytes."""

from __future__ import annotations

import sys
import time
from typing import Any

from torch import nn

from .memory import PeakMemory
from .speed import synchronize


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
    """Bytes held by the keys and values of a transformers cache (layers may hold different lengths; compressed layers
    count their codes and quantisation parameters)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes
        else:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
    return total
