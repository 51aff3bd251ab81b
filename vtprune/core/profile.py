"""Named stages of vtprune's own work inside a forward, for the torch profiler (`vtprune bench --profile`).

Each stage is a `torch.profiler.record_function` range named `vtprune.<stage>`; with no profiler running it costs
about a microsecond. The stages:
- signals: what a method reads besides the model's own outputs ([CLS] rows, attention rows from q/k, keys, norms);
- score: the method's `plan` (scoring and top-k);
- compact: compiling and applying a plan to the sequence (gather, merges, positions, mask);
- cache: rewriting the KV cache (a kv_cache site's compaction, decode-time eviction).
"""

from __future__ import annotations

import torch

STAGES = ("signals", "score", "compact", "cache")


def stage(name: str) -> torch.profiler.record_function:
    """`with stage("score"): ...` marks vtprune's work for the profiler."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}")
    return torch.profiler.record_function(f"vtprune.{name}")
