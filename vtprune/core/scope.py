"""Budget scopes: which visual tokens of a sample share one budget.

- "image": each image, or each video frame, on its own (an anyres image's base view and tiles share its budget);
- "tile": each vision-encoder input on its own (an anyres image's base view and each tile; FasterVLM's rule);
- "video": all frames of a video share one budget, so a method that scores frames on a common scale moves tokens
  between frames (images are budgeted on their own);
- "sample": all visual tokens of a sample share one budget.

An int budget counts tokens per unit (image, tile, or frame: a video of F frames gets F times the budget); a ratio
applies to the tokens of each group. Non-patch tokens (row ends, a video's newline) are always kept, outside the budget.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .budget import keep_count
from .errors import VTPruneError
from .layout import VisualLayout
from .plan import KeepPlan, top_k

SCOPES = ("image", "tile", "video", "sample")


def check_scope(scope: str, method: str) -> str:
    if scope not in SCOPES:
        raise VTPruneError(f"{method} scope={scope!r}: use one of {', '.join(map(repr, SCOPES))}")
    return scope


def budget_groups(layout: VisualLayout, sample: int, scope: str) -> list[tuple[Tensor, int, str]]:
    """(patch-token ordinals, budget units, name) of every group of `sample` that shares one budget."""
    groups: dict[tuple, list[Tensor]] = {}
    units: dict[tuple, set] = {}
    names: dict[tuple, str] = {}
    for span, sl in layout.ordinal_slices(sample):
        ordinals = torch.arange(sl.start, sl.stop)
        patch = span.patch_index >= 0
        if scope == "tile" and span.view is not None:
            views = span.view[patch]
            for view in views.unique().tolist():
                key = ("tile", span.image, view)
                groups.setdefault(key, []).append(ordinals[patch][views == view])
                units[key] = {view}
                names[key] = f"encoder input {view} of image {span.image}"
            continue
        if scope == "sample":
            key, name = ("sample",), f"sample {sample}"
        elif scope == "video" and span.video is not None:
            key, name = ("video", span.video), f"video {span.video}"
        else:
            key, name = ("image", span.image), f"{'frame' if span.kind == 'frame' else 'image'} {span.image}"
        groups.setdefault(key, []).append(ordinals[patch])
        units.setdefault(key, set()).add(span.image)
        names[key] = name
    return [(torch.cat(groups[key]), len(units[key]), names[key]) for key in groups]


def keep_selected(
    layout: VisualLayout, sample: int, keep: int | float, scope: str, select: Callable[[Tensor, int], Tensor]
) -> Tensor:
    """The ordinals sample `sample` keeps: every non-patch token, and in every budget group the `count` patch tokens
    `select(ordinals, count)` picks (as indices into `ordinals`); a group whose budget covers it stays whole."""
    kept = [non_patch_ordinals(layout, sample)]
    for ordinals, units, name in budget_groups(layout, sample, scope):
        if not ordinals.numel():  # every patch of the group was dropped at an earlier cut
            continue
        budget = keep * units if isinstance(keep, int) else keep
        count = keep_count(budget, int(ordinals.numel()), what=name)
        kept.append(ordinals if count == ordinals.numel() else ordinals[select(ordinals, count).cpu()])
    return torch.sort(torch.cat(kept)).values


def keep_top(layout: VisualLayout, scores: list[Tensor], keep: int | float, scope: str = "image") -> KeepPlan:
    """Keep the top-scored patch tokens of every budget group (ties: lower ordinal) and every non-patch token.

    scores[b]: one score per visual ordinal of sample b.
    """
    out = [
        keep_selected(layout, b, keep, scope, lambda ordinals, count: top_k(scores[b][ordinals.to(scores[b].device)].cpu(), count))
        for b in range(layout.batch_size)
    ]
    return KeepPlan(keep=out, scores=[s.detach().float().cpu() for s in scores])


def non_patch_ordinals(layout: VisualLayout, sample: int) -> Tensor:
    """Ordinals of the sample's non-patch visual tokens (row ends, newlines, [CLS])."""
    parts = [torch.arange(sl.start, sl.stop)[span.patch_index < 0] for span, sl in layout.ordinal_slices(sample)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
