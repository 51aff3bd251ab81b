"""HiPrune (Liu et al., 2025): anchor, buffer and register tokens from the vision encoder's hierarchical attention.
Follows the official code (Danielement321/HiPrune @ 6e83a12, `LLaVA/llava/model/llava_arch.py`, `encode_images`;
docs/methods/hiprune.md).

Per image, before the language model, with T = the patches kept and a patch's "global attention" at a layer = the
post-softmax attention it receives, averaged over heads and then over every query row ([CLS] row included):
- anchors: the round(T * alpha / 5) patches with the largest global attention at the object layer (official: the 9th
  CLIP layer, 0-based 8);
- buffers: each anchor's raster neighbours index - 1, + 1, - width, + width, clamped to 0..N-1 (as the official code:
  no wrap check at row ends); anchors and buffers together, duplicates removed, are the "local" tokens;
- registers: the rest of the budget, the patches with the largest global attention at the deep layer (the one feeding
  the projector, LLaVA-1.5: layer 22 of 24) among those not already kept.
Kept patches go to the language model in raster order and are numbered contiguously.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import (
    KeepPlan,
    Method,
    ModelInfo,
    SiteContext,
    VisionAttention,
    VTPruneError,
    keep_count,
    register,
)
from ._scores import ordinal_scores


def global_attention(attention: Tensor, has_cls: bool) -> Tensor:
    """[B, N]: attention each patch receives, mean over all query rows. attention: [B, T, T] head-mean, rows queries;
    T = N + 1 with [CLS] first when `has_cls` (its key column is dropped after the mean)."""
    return attention.float().mean(dim=1)[:, int(has_cls):]


def anchor_count(count: int, alpha: float) -> int:
    """Anchors for a budget of `count` patches: Python's round (half to even), as the official code."""
    return round(count * alpha / 5)


def hiprune_select(
    object_scores: Tensor, deep_scores: Tensor, width: int, count: int, alpha: float
) -> tuple[Tensor, Tensor]:
    """Boolean masks [B, N] of the kept patches and of the local (anchor + buffer) ones among them.

    object_scores, deep_scores: [B, N] global attention at the object and deep layers (`global_attention`); width: patch
    columns of the raster grid; count: patches to keep (0..N); alpha: share of the budget for anchors and buffers.
    """
    batch, n = object_scores.shape
    anchors = object_scores.float().topk(anchor_count(count, alpha), dim=-1).indices  # [B, A]
    steps = torch.tensor([0, -1, 1, -width, width], device=anchors.device)
    neighbours = (anchors[:, :, None] + steps).flatten(1).clamp(0, n - 1)  # [B, 5A]
    local = torch.zeros(batch, n, dtype=torch.bool, device=anchors.device).scatter_(1, neighbours, True)
    kept = local.clone()
    ranked = deep_scores.float() - local.float()  # local patches drop below every other one (scores are in [0, 1])
    for b in range(batch):
        registers = count - int(local[b].sum())
        if registers < 0:
            raise VTPruneError(
                f"hiprune keep={count} with alpha={alpha}: the anchors and their neighbours ({int(local[b].sum())} "
                f"patches) exceed the budget; raise keep or lower alpha"
            )
        kept[b, ranked[b].topk(registers).indices] = True
    return kept, local


@register
@dataclass
class HiPrune(Method):
    name: ClassVar[str] = "hiprune"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 192  # patches kept per image (int) or ratio; the official LLaVA-1.5 script keeps 192
    alpha: float = 0.1  # share of `keep` for anchors and their 4 neighbours (anchors: round(keep * alpha / 5))
    object_layer: int = 8  # 0-based encoder layer of the anchors (official HIPRUNE_OBJECT_LAYER=9 counts from 1)
    deep_layer: int | None = None  # encoder layer of the registers; None: the one feeding the projector (official)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise VTPruneError(f"hiprune alpha={self.alpha}: give a share in [0, 1] (official default 0.1)")
        if isinstance(self.keep, int):
            self.check_budget(self.keep)

    def check_budget(self, count: int) -> None:
        """Refuse budgets where the anchors and their neighbours may not fit (the official code then fails)."""
        anchors = anchor_count(count, self.alpha)
        if 5 * anchors > count:
            raise VTPruneError(
                f"hiprune keep={count} with alpha={self.alpha}: {anchors} anchor(s) and their 4 neighbours each can "
                f"exceed the {count} kept patches (the official code then fails); raise keep or lower alpha"
            )

    def layers(self, info: ModelInfo) -> tuple[int, int]:
        return self.object_layer, info.vision_feature_layer if self.deep_layer is None else self.deep_layer

    def requests(self, info: ModelInfo) -> list[Any]:
        return [VisionAttention(layer=layer) for layer in self.layers(info)]

    def plan(self, ctx: SiteContext) -> KeepPlan:
        info, layout = ctx.info, ctx.layout
        object_attention, deep_attention = (ctx.signals[request] for request in self.requests(info))
        object_scores = global_attention(object_attention, info.vision_has_cls)  # [images, P]
        deep_scores = global_attention(deep_attention, info.vision_has_cls)
        patches = deep_scores.shape[-1]
        if any(span.view is not None for spans in layout.spans for span in spans):
            raise VTPruneError("hiprune runs on single-grid images (LLaVA-1.5); anyres tiles and video frames are "
                               "refused (the official LLaVA-NeXT path uses a layout without unpadding or row ends)")
        keep, local_tokens = [], []
        for b in range(layout.batch_size):
            kept, local = [], []
            for span, sl in layout.ordinal_slices(b):
                is_patch = span.patch_index >= 0
                if span.grid is None or not torch.equal(span.patch_index[is_patch], torch.arange(patches)):
                    raise VTPruneError(f"hiprune needs every patch of image {span.image} in raster order")
                count = keep_count(self.keep, patches, what=f"image {span.image}")
                self.check_budget(count)
                image = slice(span.image, span.image + 1)
                mask, local_mask = hiprune_select(
                    object_scores[image], deep_scores[image], span.grid[1], count, self.alpha
                )
                ordinals = torch.arange(sl.start, sl.stop)
                patch = span.patch_index.clamp(min=0)
                kept.append(ordinals[~is_patch | mask[0].cpu()[patch]])
                local.append(ordinals[is_patch & local_mask[0].cpu()[patch]])
            keep.append(torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long))
            local_tokens.append(torch.cat(local).tolist() if local else [])
        return KeepPlan(keep=keep, scores=ordinal_scores(layout, deep_scores), notes={"local": local_tokens})
