"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse visual tokens, chosen greedily before the language model.
Follows the official code (spec: /work/shared/methods/divprune.md; docs/methods/divprune.md).

Features: the visual tokens as the language model receives them (LLaVA: the projector's outputs; Qwen2-VL: the
merger's outputs). Distance: 1 - cosine similarity. Greedy max-min selection: first the most isolated token (largest
distance to its nearest other token), then, step by step, the token farthest from everything chosen so far. The kept
tokens go to the language model in their original order and are numbered contiguously (as in the official LLaVA code).

Budget: `keep` tokens per budget group (int, or a ratio: round(ratio * n), Python rounding, as the official code);
`scope` says which tokens share one greedy run (default "image"; see vtprune.core.scope). Row-end / newline tokens are
always kept, outside the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core import KeepPlan, Method, SiteContext, VTPruneError, budget_groups, check_scope, keep_count, register
from ..core.scope import non_patch_ordinals


def divprune_order(features: Tensor, count: int) -> Tensor:
    """[count] token indices in the order the greedy max-min selection picks them.

    features: [n, d] the tokens' features; count: 1..n. Computed in float32. A token already chosen is never chosen
    again (the official code only skips it implicitly, through its near-zero distance to itself).
    """
    x = features.float()
    unit = x / x.norm(dim=1, keepdim=True)
    distance = 1.0 - torch.mm(unit, unit.t())  # [n, n]
    n = distance.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=distance.device)
    order = torch.empty(count, dtype=torch.long, device=distance.device)
    isolation = distance.topk(2, dim=0, largest=False).values[1]  # [n] distance to the nearest other token
    order[0] = torch.argmax(isolation)
    nearest = distance[order[0]].clone()  # [n] distance of every token to the chosen set
    chosen[order[0]] = True
    for i in range(1, count):
        order[i] = torch.argmax(nearest.masked_fill(chosen, float("-inf")))
        chosen[order[i]] = True
        nearest = torch.minimum(nearest, distance[order[i]])
    return order


@register
@dataclass
class DivPrune(Method):
    name: ClassVar[str] = "divprune"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 0.098  # tokens per image (int) or ratio; the official SUBSET_RATIO 0.098 keeps 56 of 576
    scope: str = "image"  # which tokens share one greedy selection: "image", "tile", "video" or "sample"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scope(self.scope, self.name)

    def plan(self, ctx: SiteContext) -> KeepPlan:
        layout, hidden = ctx.layout, ctx.hidden_states
        if hidden is None:
            raise VTPruneError("divprune needs the language model's input embeddings at its pre_llm cut")
        keep, scores = [], []
        for b in range(layout.batch_size):
            visual = layout.visual_positions(b)
            kept = [non_patch_ordinals(layout, b)]
            score = torch.zeros(visual.numel())  # trace: 1 for the first pick, falling to 1/count for the last
            for ordinals, units, what in budget_groups(layout, b, self.scope):
                if not ordinals.numel():
                    continue
                budget = self.keep * units if isinstance(self.keep, int) else self.keep
                count = keep_count(budget, int(ordinals.numel()), what=what)
                order = divprune_order(hidden[b, visual[ordinals].to(hidden.device)], count).cpu()
                kept.append(ordinals[order])
                score[ordinals[order]] = torch.arange(count, 0, -1, dtype=torch.float) / count
            keep.append(torch.sort(torch.cat(kept)).values)
            scores.append(score)
        return KeepPlan(keep=keep, scores=scores)
