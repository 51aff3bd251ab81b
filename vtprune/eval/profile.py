"""Where a pruned prefill spends its time beyond the model, and how often it waits on the host.

- `stage_times(run)`: one call of `run` under the torch profiler; the CPU time inside each of vtprune's stages
  (`vtprune.core.profile`: signals, score, compact, cache) and the whole call, in seconds.
- `host_syncs(run)`: how many calls in `run` would make the host wait for the device on CUDA (a tensor read into
  Python: `.item()`, `.tolist()`, `bool(t)`, `int(t)`; shapes that depend on values: `nonzero`, `masked_select`,
  `unique`, ...), split into those made by vtprune's code and the rest (transformers, torch). Counted on any device
  with a torch function mode, so it runs on CPU machines; on CUDA `torch.cuda.set_sync_debug_mode` sees the same.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..core.profile import STAGES

SYNCING = {
    Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__, Tensor.numpy,
    Tensor.nonzero, torch.nonzero, Tensor.masked_select, torch.masked_select, Tensor.unique, torch.unique,
    torch.unique_consecutive,
}
_PACKAGE = str(Path(__file__).resolve().parents[1])  # .../vtprune
_TORCH = str(Path(torch.__file__).resolve().parent)


def stage_times(run: Callable[[], Any]) -> dict[str, float]:
    """Seconds of CPU time in each vtprune stage during one `run()`, and "total": its wall time (under the profiler,
    so a little longer than unprofiled; compare shares)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # the first profiled call also pays the profiler's start-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            run()
            total = time.perf_counter() - started
    times = dict.fromkeys(STAGES, 0.0)
    for event in prof.key_averages():
        name = event.key.removeprefix("vtprune.")
        if event.key.startswith("vtprune.") and name in times:
            times[name] += event.cpu_time_total / 1e6
    return {**times, "total": total}


class _SyncCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.vtprune: Counter[str] = Counter()  # "file.py:line" of vtprune's syncing calls
        self.other = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
                where = frame.f_code.co_filename[len(_PACKAGE) + 1 :]
                self.vtprune[f"{where}:{frame.f_lineno}"] += 1
            else:
                self.other += 1
        return func(*args, **(kwargs or {}))


def host_syncs(run: Callable[[], Any]) -> dict[str, Any]:
    """The syncing calls during one `run()`: "vtprune" (made by vtprune's code), "other" (the rest) and "sites"
    (vtprune's, by file and line, most frequent first)."""
    with _SyncCounter() as counter:
        run()
    return {"vtprune": sum(counter.vtprune.values()), "other": counter.other,
            "sites": dict(counter.vtprune.most_common())}
