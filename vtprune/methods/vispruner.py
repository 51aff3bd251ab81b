"""VisPruner (Zhang et al., ICCV 2025): important tokens by [CLS] attention, then diverse tokens by removing duplicates.
Follows the official code (spec: /work/shared/methods/vispruner.md; docs/methods/vispruner.md).

Per image, from the vision encoder layer that feeds the projector (LLaVA-1.5: layer 22 of 24):
- important: the int(keep * important_ratio) patches with the largest head-mean [CLS] attention;
- diverse: the other patches, in descending attention order, are thinned out round by round: they are split
  alternately into sets A and B, each A token is scored by its largest cosine similarity to a B token (pre-projector
  features), and the (at most 8) highest-scoring A tokens are dropped; the kept A tokens (descending score) followed by
  B form the next round's order. Rounds stop when the important and diverse tokens together number `keep`.
The kept patches go to the language model in raster order and are numbered contiguously. Odd residual counts (where
the official code fails to index) keep every surviving A token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import (
    ClsAttention, KeepPlan, Method, ModelInfo, ProjectorInput, SiteContext, VTPruneError, keep_count, register,
)
from ._scores import ordinal_scores

ROUND = 8  # tokens dropped per round (official constant)


def vispruner_select(attention: Tensor, features: Tensor, count: int, important_ratio: float) -> tuple[Tensor, Tensor]:
    """Boolean masks [B, N] of the kept patches and of the important ones among them.

    attention: [B, heads, N] the [CLS] query's post-softmax row over the patch keys, per head; features: [B, N, C] the
    patches' features at the same layer; count: patches to keep (0..N); important_ratio in [0, 1].
    Float32, with the official code's order of operations (the diverse set depends on whole sort orders).
    """
    batch, n = attention.shape[0], attention.shape[-1]
    important_count = int(count * important_ratio)
    diverse_count = count - important_count
    ranking = attention.float().mean(dim=1).argsort(dim=-1, descending=True)  # [B, N]
    important, residual = ranking[:, :important_count], ranking[:, important_count:]
    features = features.float()
    unit = features / features.norm(dim=-1, keepdim=True)
    rows = torch.arange(batch, device=unit.device)[:, None]
    while diverse_count > 0:
        step = min(ROUND, residual.shape[1] - diverse_count)
        if step <= 0:
            break
        tokens = unit[rows, residual]  # [B, R, C] in the current residual order
        a, b = tokens[:, ::2], tokens[:, 1::2]
        redundancy = (a @ b.transpose(-1, -2)).max(dim=-1).values  # [B, ceil(R / 2)]
        survivors = redundancy.argsort(dim=-1, descending=True)[:, step:]  # least redundant A tokens, descending
        residual = torch.cat([residual[:, ::2].gather(1, survivors), residual[:, 1::2]], dim=-1)
    selected = torch.cat([important, residual], dim=-1) if diverse_count > 0 else important
    kept = torch.zeros(batch, n, dtype=torch.bool, device=unit.device).scatter_(1, selected, True)
    important_mask = torch.zeros_like(kept).scatter_(1, important, True)
    return kept, important_mask


@register
@dataclass
class VisPruner(Method):
    name: ClassVar[str] = "vispruner"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 128  # patches kept per image (int) or ratio; the official README example keeps 128
    important_ratio: float = 0.5  # share of `keep` chosen by [CLS] attention (floor), the rest by diversity

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.important_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise VTPruneError(f"vispruner important_ratio={ratio!r}: give a number in [0, 1] (official default 0.5)")

    def requests(self, info: ModelInfo) -> list[Any]:
        if not info.vision_has_cls:
            raise VTPruneError(f"vispruner needs a vision encoder with a [CLS] token; the {info.family} tower has none")
        return [ClsAttention(layers=(info.vision_feature_layer,)), ProjectorInput()]

    def plan(self, ctx: SiteContext) -> KeepPlan:
        (attention_request, features_request) = self.requests(ctx.info)
        attention = ctx.signals[attention_request][:, 0]  # [images, heads, P]
        patches = attention.shape[-1]
        features = ctx.signals[features_request][:, -patches:]  # [images, P, C] ([CLS] row dropped)
        layout = ctx.layout
        if any(span.view is not None for spans in layout.spans for span in spans):
            raise VTPruneError("vispruner runs on single-grid images (LLaVA-1.5); anyres tiles and video frames are not "
                               "wired (its [CLS] attention and features are read by image number)")
        keep, important = [], []
        for b in range(layout.batch_size):
            kept, chosen = [], []
            for span, sl in layout.ordinal_slices(b):
                is_patch = span.patch_index >= 0
                if span.grid is None or not torch.equal(span.patch_index[is_patch], torch.arange(patches)):
                    raise VTPruneError(f"vispruner needs every patch of image {span.image} in raster order")
                count = keep_count(self.keep, patches, what=f"image {span.image}")
                mask, important_mask = vispruner_select(
                    attention[span.image : span.image + 1], features[span.image : span.image + 1], count,
                    self.important_ratio,
                )
                ordinals = torch.arange(sl.start, sl.stop)
                patch = span.patch_index.clamp(min=0)
                kept.append(ordinals[~is_patch | mask[0].cpu()[patch]])
                chosen.append(ordinals[is_patch & important_mask[0].cpu()[patch]])
            keep.append(torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long))
            important.append(torch.cat(chosen).tolist() if chosen else [])
        scores = ordinal_scores(layout, attention.float().mean(dim=1))
        return KeepPlan(keep=keep, scores=scores, notes={"important": important})
