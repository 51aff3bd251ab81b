"""SpAtten (Wang, Zhang & Han, HPCA 2021): cascade token pruning by attention accumulated across layers and heads.

Every visual token j carries one score s_j; each decoder layer l adds the softmax attention j receives there, summed
over all query heads and all (live) query rows: s_j += Σ_h Σ_i P_l[h, i, j], with P_l recomputed in float32 from layer
l's own norm, q/k and RoPE on the sequence that layer runs on (`ReceivedAttention`), so the model keeps SDPA. Before
each cut layer the lowest-scored visual tokens leave for good (top-k on s, never re-admitted), so fewer and fewer
tokens go deeper ("cascade"). Text is never pruned; kept tokens keep their original positions (the paper's models use
absolute positions, so it says nothing about renumbering); decoding continues with the kept set frozen.
Paper rule, not official code: the released SpAtten-LLM code implements a different, later algorithm (KV pruning
between chat turns), so this is PAPER-DERIVED. Head pruning, local value pruning and progressive quantisation are
left out. Spec: /work/shared/methods/spatten.md; docs: docs/methods/spatten.md.

Budget: `keep` (per image, or a ratio) is what the *last* cut keeps. With K cuts, cut k keeps
round(N − (N − F)·(k + 1)/K) of an image's N original tokens, F = its final count: the kept share falls linearly
from all tokens to the budget, which on the default layers (every layer from max(3, ceil(0.15·L)) on) is the linear
schedule LTP gives as SpAtten's. keep=1.0 keeps everything at every cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core import (
    KeepPlan,
    Method,
    ModelInfo,
    ReceivedAttention,
    SiteContext,
    VTPruneError,
    budget_groups,
    check_scope,
    keep_count,
    register,
    top_k,
)
from ..core.scope import non_patch_ordinals

QUERIES = ("all", "text")


def cascade_counts(total: int, final: int, stages: int) -> list[int]:
    """Tokens kept after each of `stages` cuts out of `total`: round(total − (total − final)·(k + 1)/stages)."""
    return [math.floor(total - (total - final) * (k + 1) / stages + 0.5) for k in range(stages)]


def default_layers(n_layers: int) -> tuple[int, ...]:
    """LTP's SpAtten schedule: no pruning in the first max(3, ceil(0.15·L)) layers, then a cut before every layer."""
    first = max(3, math.ceil(0.15 * n_layers))
    return tuple(range(first, n_layers))


def accumulate(scores: Tensor, received: Tensor, visual_positions: Tensor, original: Tensor) -> Tensor:
    """scores [N_original] += received [L] (one layer's attention per position) read at the live visual tokens
    (sequence positions [n], original ordinals [n])."""
    scores[original] += received.float().cpu()[visual_positions]
    return scores


@register
@dataclass
class SpAtten(Method):
    name: ClassVar[str] = "spatten"
    sites: ClassVar[tuple[str, ...]] = ("llm_layer",)
    positions: ClassVar[str] = "original"

    keep: int | float = 0.25  # visual tokens per image (int) or ratio kept after the last cut
    layers: tuple[int, ...] | None = None  # cuts before these 0-based layers; None: each layer from max(3, ⌈0.15L⌉)
    queries: str = "all"  # query rows that score: "all" (paper) or "text" (non-visual rows; less causal bias)
    scope: str = "image"  # which tokens share a budget: "image", "tile", "video" or "sample" (paper: one pool)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.queries not in QUERIES:
            raise VTPruneError(f"spatten queries={self.queries!r}: use 'all' (every row) or 'text' (non-visual rows)")
        check_scope(self.scope, self.name)
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1:
                raise VTPruneError(
                    f"spatten layers={self.layers}: give ascending, distinct 0-based layers >= 1 (a cut before each)"
                )

    def cut_layers(self, info: ModelInfo) -> list[int]:
        layers = self.layers if self.layers is not None else default_layers(info.llm_layers)
        if not layers or layers[-1] >= info.llm_layers:
            raise VTPruneError(
                f"spatten cuts before layers {list(layers)}, but the language model has layers 0..{info.llm_layers - 1}"
                f"; give layers in 1..{info.llm_layers - 1}"
            )
        return list(layers)

    def requests(self, info: ModelInfo) -> list[ReceivedAttention]:
        last = self.cut_layers(info)[-1]
        return [ReceivedAttention(layer=layer, queries=self.queries) for layer in range(last)]

    def plan(self, ctx: SiteContext) -> KeepPlan:
        layout, cuts = ctx.layout, self.cut_layers(ctx.info)
        stage = cuts.index(ctx.layer)
        state = ctx.state
        if "scores" not in state:  # the first cut sees every image whole
            state["scores"] = [torch.zeros(layout.num_visual(b)) for b in range(layout.batch_size)]
            state["totals"] = [
                {name: (int(ordinals.numel()), units) for ordinals, units, name in budget_groups(layout, b, self.scope)}
                for b in range(layout.batch_size)
            ]
            state["next_layer"] = 0
        for layer in range(state["next_layer"], ctx.layer):  # layers that ran on the current sequence
            received = ctx.signals[ReceivedAttention(layer=layer, queries=self.queries)]
            for b in range(layout.batch_size):
                accumulate(state["scores"][b], received[b], layout.visual_positions(b), layout.original_ordinal[b])
        state["next_layer"] = ctx.layer
        keep, scores = [], []
        for b in range(layout.batch_size):
            current = state["scores"][b][layout.original_ordinal[b]]
            kept = [non_patch_ordinals(layout, b)]
            for ordinals, _, name in budget_groups(layout, b, self.scope):
                total, units = state["totals"][b][name]
                budget = self.keep * units if isinstance(self.keep, int) else self.keep
                final = keep_count(budget, total, what=name)
                count = min(cascade_counts(total, final, len(cuts))[stage], int(ordinals.numel()))
                kept.append(ordinals[top_k(current[ordinals], count)])
            keep.append(torch.sort(torch.cat(kept)).values)
            scores.append(current)
        return KeepPlan(keep=keep, scores=scores)
