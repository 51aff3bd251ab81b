"""FastV (Chen et al., 2024): after decoder layer K-1, keep the visual tokens the last token attends to most.
See docs/methods/fastv.md.

Score: layer K-1's attention of the last prompt token (recomputed from that layer's q/k with RoPE), mean over heads,
read at the visual keys. Layers 0..K-1 see every token and keep a full cache; the kept tokens keep their original
positions (gaps stay), and decoding continues at the unpruned length. Selection is per sample (the official code
lets sample 0 decide for the batch), with the budget per image, or shared as `scope` says (see vtprune.core.scope:
"tile", "video" — frames compete for one video budget —, "sample"). Non-patch tokens (row ends) are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..core import KeepPlan, Method, ModelInfo, QueryAttention, SiteContext, VTPruneError, check_scope, keep_top, register


def fastv_scores(last_token_attention: Tensor, visual_positions: Tensor) -> Tensor:
    """[heads, seq] attention of the last token -> [visual] head-mean attention at the visual positions."""
    return last_token_attention.float().mean(dim=0)[visual_positions]


@register
@dataclass
class FastV(Method):
    name: ClassVar[str] = "fastv"
    sites: ClassVar[tuple[str, ...]] = ("llm_layer",)
    positions: ClassVar[str] = "original"

    keep: int | float = 0.5  # visual tokens kept per image (int) or ratio; the paper's R=50% keeps 0.5
    layer: int = 2  # K: the cut sits before decoder layer K and uses layer K-1's attention
    scope: str = "image"  # which tokens share a budget: "image", "tile", "video" or "sample" (see vtprune.core.scope)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer < 1:
            raise VTPruneError(f"fastv layer={self.layer}: K must be >= 1 (layer K-1's attention ranks the tokens)")
        check_scope(self.scope, self.name)

    def cut_layers(self, info: ModelInfo) -> list[int]:
        return [self.layer]

    def requests(self, info: ModelInfo) -> list[QueryAttention]:
        return [QueryAttention(layer=self.layer - 1, queries="last")]

    def plan(self, ctx: SiteContext) -> KeepPlan:
        (request,) = self.requests(ctx.info)
        layout = ctx.layout
        scores = [
            fastv_scores(rows[:, -1], layout.visual_positions(b).to(rows.device)).cpu()
            for b, rows in enumerate(ctx.signals[request])
        ]
        return keep_top(layout, scores, self.keep, self.scope)
