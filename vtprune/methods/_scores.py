"""Small helpers shared by methods: turning per-image patch scores into per-sample visual-ordinal scores."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import VisualLayout


def ordinal_scores(layout: VisualLayout, image_scores: Tensor, extra: float = float("inf")) -> list[Tensor]:
    """Per sample, one score per visual token: image_scores[view, patch]; tokens that are no patch get `extra`.

    image_scores: [encoder inputs, patches]; a token's (view, patch) is its (`span.view`, `span.view_patch`), or
    (`span.image`, `span.patch_index`) when the span has no view.
    """
    out = []
    for b in range(layout.batch_size):
        parts = []
        for span in layout.spans[b]:
            is_patch = (span.patch_index >= 0).to(image_scores.device)
            if span.view is None:
                view, patch = torch.full_like(span.patch_index, span.image), span.patch_index
            else:
                view, patch = span.view, span.view_patch
            value = image_scores[view.to(image_scores.device).clamp(min=0), patch.to(image_scores.device).clamp(min=0)]
            parts.append(torch.where(is_patch, value.float(), torch.full_like(value, extra, dtype=torch.float)))
        out.append(torch.cat(parts) if parts else torch.zeros(0))
    return out
