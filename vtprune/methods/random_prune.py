"""Random pruning: the baseline every method must beat. Seeded, so a run can be repeated.

Cuts before the language model, or inside the vision encoder after block `encoder_block` (see `EncoderCut`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import KeepPlan, Method, SiteContext, keep_count, per_image, register
from ._encoder import EncoderCut


@register
@dataclass
class RandomPrune(EncoderCut, Method):
    name: ClassVar[str] = "random"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 64  # tokens per image (int) or ratio
    seed: int = 0
    encoder_block: int | None = None  # cut inside the vision encoder, after this block (see `EncoderCut`)

    def plan(self, ctx: SiteContext) -> KeepPlan:
        generator = torch.Generator().manual_seed(self.seed)
        scores = [torch.rand(ctx.layout.num_visual(b), generator=generator) for b in range(ctx.layout.batch_size)]
        return per_image(ctx.layout, scores, lambda span, n: keep_count(self.keep, n, what=f"image {span.image}"))
