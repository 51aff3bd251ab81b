"""Random pruning: the baseline every method must beat. Seeded, so a run can be repeated. See docs/methods/random.md.

Cuts before the language model, or inside the vision encoder after block `encoder_block` (see `EncoderCut`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import KeepPlan, Method, SiteContext, check_scope, keep_top, register
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
    scope: str = "image"  # which tokens share a budget: "image", "tile", "video" or "sample" (see vtprune.core.scope)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scope(self.scope, self.name)

    def plan(self, ctx: SiteContext) -> KeepPlan:
        # one draw per sample from the seed alone: a sample keeps the same tokens whatever its batch, and the rows
        # generate() repeats for beam search (or several return sequences) all see the same pruned prompt
        scores = [
            torch.rand(ctx.layout.num_visual(b), generator=torch.Generator().manual_seed(self.seed))
            for b in range(ctx.layout.batch_size)
        ]
        return keep_top(ctx.layout, scores, self.keep, self.scope)
