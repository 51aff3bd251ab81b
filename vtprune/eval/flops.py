"""Language-model FLOPs from token counts per layer: the formula FastV, PDrop and TransPrune report.

One decoder layer on n tokens of width d with an MLP of width m costs 4·n·d² (q, k, v, o projections) + 2·n²·d
(attention scores and weighted sum) + 3·n·d·m (gated MLP). The papers count n = image tokens only; pass the counts that
fit the question (image tokens to compare with published tables, all tokens for the whole prefill).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def layer_flops(tokens: int, hidden: int, intermediate: int) -> float:
    """FLOPs of one decoder layer on `tokens` tokens."""
    n, d, m = tokens, hidden, intermediate
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def llm_flops(tokens_per_layer: Sequence[int], hidden: int, intermediate: int) -> float:
    """FLOPs of the decoder stack, layer l seeing tokens_per_layer[l] tokens."""
    return float(sum(layer_flops(n, hidden, intermediate) for n in tokens_per_layer))


def schedule(tokens: int, n_layers: int, cuts: Sequence[tuple[int, int]]) -> list[int]:
    """Tokens per layer when the sequence is cut to `kept` tokens before 0-based layer `layer`, for (layer, kept) in
    `cuts` (ascending layers). A 1-indexed "prune after layer p" is a cut before 0-based layer p."""
    counts, current, pending = [], tokens, sorted(cuts)
    for layer in range(n_layers):
        while pending and pending[0][0] == layer:
            current = pending.pop(0)[1]
        counts.append(current)
    return counts


def visual_tokens_per_layer(trace: Any, n_layers: int, forward: int = -1, sample: int = 0) -> list[int]:
    """Visual tokens each decoder layer saw in one sample of a traced prefill (pre_llm cuts count from layer 0)."""
    record = trace.forwards[forward]
    cuts = [
        (0 if site.layer is None else site.layer, site.visual_after) for site in record.sites if site.sample == sample
    ]
    return schedule(record.layout.num_visual(sample), n_layers, cuts)
