"""VTC-CLS (Wang et al., 2024): keep the patches the vision encoder's [CLS] token attends to most.
See docs/methods/vtc-cls.md.

Score of patch p: sum over encoder layers `start_layer ..` (up to the layer whose output feeds the projector) of the
head-mean [CLS] attention to p. The top-k patches of every image are kept, in raster order, before the language
model, which then numbers the shorter sequence contiguously. `start_layer` equal to the feature layer (22 for
LLaVA-1.5, or -2) switches the ensemble off: that is FasterVLM.

Inside the vision encoder (`encoder_block` set, or a tower with no language model such as open_clip's), the cut sits
after block `encoder_block` and the ensemble ends at that block: start_layer .. encoder_block.

Beyond the official single-image code (spec §6): scores are computed per encoder input (an anyres tile, the base view,
a video frame; each [CLS] row is softmax-normalised within its own input, so scores are comparable across inputs).
Frames pooled by the model (2×2) get their scores pooled the same way by the adapter. `scope` says which tokens share
a budget: "image" (default: per image, per frame), "tile" (per anyres tile: FasterVLM), "video" (one top-k over all
frames of a video: budget moves to the frames with the most-attended patches), "sample". Row-end and newline tokens
have no score and are always kept, outside the budget. Encoders without [CLS] (SigLIP) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..core import (
    ClsAttention, KeepPlan, Method, ModelInfo, SiteContext, VTPruneError, check_scope, keep_top, register,
)
from ._encoder import EncoderCut
from ._scores import ordinal_scores


def vtc_cls_scores(cls_attention: Tensor) -> Tensor:
    """[N, layers, heads, patches] [CLS] attention -> [N, patches]: mean over heads, sum over layers."""
    return cls_attention.float().mean(dim=2).sum(dim=1)


@register
@dataclass
class VTCCLS(EncoderCut, Method):
    name: ClassVar[str] = "vtc-cls"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 64  # tokens per image (int) or ratio
    start_layer: int | None = None  # first encoder layer of the ensemble (negative counts from the end);
    # None: the official default 16 of CLIP-L's 24 layers, scaled to the tower's depth
    encoder_block: int | None = None  # cut inside the vision encoder, after this block (see `EncoderCut`)
    scope: str = "image"  # which tokens share a budget: "image", "tile", "video" or "sample" (see vtprune.core.scope)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scope(self.scope, self.name)

    def layers(self, info: ModelInfo) -> list[int]:
        """Encoder layers start_layer .. feature layer (inclusive), as in the official `attentions[start:-1]`.

        At the encoder site the last layer is the block the cut follows.
        """
        cut = self.encoder_blocks(info)
        last = cut[0] if cut else info.vision_feature_layer
        scaled = min(round(16 * info.vision_layers / 24), last)
        start = scaled if self.start_layer is None else self.start_layer
        layers = list(range(info.vision_layers))[start : last + 1]
        if not layers:
            where = f"0..{last} (the block the encoder cut follows)" if cut else (
                f"0..{last} (the feature layer) or a negative index up to -2"
            )
            raise VTPruneError(f"start_layer={self.start_layer} selects no encoder layer; use a layer in {where}")
        return layers

    def requests(self, info: ModelInfo) -> list[ClsAttention]:
        if not info.vision_has_cls:
            raise VTPruneError(f"vtc-cls needs a vision encoder with a [CLS] token; the {info.family} tower has none")
        return [ClsAttention(layers=tuple(self.layers(info)))]

    def plan(self, ctx: SiteContext) -> KeepPlan:
        (request,) = self.requests(ctx.info)
        image_scores = vtc_cls_scores(ctx.signals[request])
        scores = ordinal_scores(ctx.layout, image_scores)
        return keep_top(ctx.layout, scores, self.keep, self.scope)
