"""Spatial average pooling of each image's patch grid down to the budget: the downsampling baseline.
See docs/methods/pool.md.

The grid (rows × cols) is pooled to h × w cells with h·w ≤ keep (as many cells as the budget allows, shaped like the
grid), exactly as `adaptive_avg_pool2d` bins it. Each cell becomes one token, the mean of its patches' language-model
inputs, placed at the cell's top-left patch; positions are renumbered as for any pre-LLM cut. Inside the vision encoder
(`encoder_block` set, or a tower with no language model, see `EncoderCut`) it pools the hidden states after that block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import KeepPlan, Merge, Method, SiteContext, VTPruneError, keep_count, register
from ._encoder import EncoderCut


def pool_shape(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """The (h, w) with h <= rows, w <= cols, h*w <= budget: most cells first, then the aspect closest to the grid's."""
    best = None
    for h in range(1, rows + 1):
        w = min(cols, budget // h)
        if w < 1:
            break
        key = (h * w, -round(abs(math.log((h / w) / (rows / cols))), 9))
        if best is None or key > best[0]:
            best = (key, (h, w))
    return best[1]


def pool_cells(rows: int, cols: int, h: int, w: int) -> list[torch.Tensor]:
    """Row-major patch indices of each of the h×w adaptive-average-pooling cells over a rows×cols grid."""
    cells = []
    for i in range(h):
        r0, r1 = (i * rows) // h, -((-(i + 1) * rows) // h)
        for j in range(w):
            c0, c1 = (j * cols) // w, -((-(j + 1) * cols) // w)
            rr, cc = torch.meshgrid(torch.arange(r0, r1), torch.arange(c0, c1), indexing="ij")
            cells.append((rr * cols + cc).flatten())
    return cells


@register
@dataclass
class SpatialPool(EncoderCut, Method):
    name: ClassVar[str] = "pool"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 64  # tokens per image (int) or ratio of the patches
    encoder_block: int | None = None  # cut inside the vision encoder, after this block (see `EncoderCut`)

    def plan(self, ctx: SiteContext) -> KeepPlan:
        layout = ctx.layout
        keep, merges = [], []
        for b in range(layout.batch_size):
            kept, sample_merges = [], []
            for span, sl in layout.ordinal_slices(b):
                patch = span.patch_index
                is_patch = patch >= 0
                rows, cols = span.grid
                if int(is_patch.sum()) != rows * cols:
                    raise VTPruneError(f"pool needs every patch of image {span.image}; it was already pruned")
                ordinal_of_patch = torch.empty(rows * cols, dtype=torch.long)
                ordinal_of_patch[patch[is_patch]] = torch.arange(sl.start, sl.stop)[is_patch]
                kept.append(torch.arange(sl.start, sl.stop)[~is_patch])  # non-patch tokens stay
                h, w = pool_shape(rows, cols, keep_count(self.keep, rows * cols, what=f"image {span.image}"))
                cells = pool_cells(rows, cols, h, w)
                sizes = [cell.numel() for cell in cells]
                members = ordinal_of_patch[torch.cat(cells)]  # every cell's ordinals, cell after cell
                cell_of = torch.arange(len(cells)).repeat_interleave(torch.tensor(sizes))
                slots = members.new_zeros(len(cells)).scatter_reduce(0, cell_of, members, "amin", include_self=False)
                slots = slots.tolist()  # each cell's lowest ordinal, read once
                kept.append(torch.tensor(slots, dtype=torch.long))
                for slot, sources in zip(slots, members.split(sizes)):
                    if sources.numel() > 1:
                        weights = torch.full((sources.numel(),), 1.0 / sources.numel())
                        sample_merges.append(Merge(slot=slot, sources=sources, weights=weights))
            keep.append(torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long))
            merges.append(sample_merges)
        return KeepPlan(keep=keep, merges=merges)
