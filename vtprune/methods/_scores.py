"""Small helpers shared by methods: turning per-image patch scores into per-sample visual-ordinal scores."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import VisualLayout


def ordinal_scores(layout: VisualLayout, image_scores: Tensor, extra: float = float("inf")) -> list[Tensor]:
    """Per sample, one score per visual token: image_scores[span.image, patch]; tokens that are no patch get `extra`.

    image_scores: [num_images, patches].
    """
    out = []
    for b in range(layout.batch_size):
        parts = []
        for span in layout.spans[b]:
            patch = span.patch_index.to(image_scores.device)
            row = image_scores[span.image].float()
            parts.append(torch.where(patch >= 0, row[patch.clamp(min=0)], torch.full_like(patch, extra, dtype=torch.float)))
        out.append(torch.cat(parts) if parts else torch.zeros(0))
    return out
