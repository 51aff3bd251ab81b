"""SCOPE (Deng et al., NeurIPS 2025): saliency-weighted greedy coverage. Follows the official code
(kinredon/SCOPE @ 6bf7306, `scope/clip_encoder.py`; spec: /work/shared/methods/scope.md; docs/methods/scope.md).

Per image, before the language model: cosine similarities S of the patch features; the coverage of a set A is
sum_i max(0, max_{a in A} S[i, a]). Each of T steps adds the token whose coverage gain, times its [CLS] saliency to the
power alpha (or plus it, combine="add"), is largest (ties: lowest index). Kept tokens go to the LLM in raster order,
renumbered; [CLS] is not kept.

Signals (official, LLaVA-1.5): saliency = the [CLS] row of the feature layer (CLIP layer 22), post-softmax over all
keys, summed over heads; features = that layer's patch outputs, the projector's input (`features="encoder"`, needs
`ProjectorInput`). `features="projected"` uses the LLM input embeddings instead (Tencent AngelSlim's port), which every
adapter with [CLS] attention can give. Budgets follow vtprune.core.scope ("tile" per encoder input: the official
LLaVA-NeXT rule splits the budget evenly over the tiles, i.e. keep=T // tiles with scope="tile").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import (
    ClsAttention,
    KeepPlan,
    Method,
    ModelInfo,
    ProjectorInput,
    SiteContext,
    VisualLayout,
    VTPruneError,
    check_scope,
    register,
)
from ..core.scope import keep_selected
from ._scores import ordinal_scores

COMBINES = ("multi", "add")
FEATURES = ("encoder", "projected")


def scope_select(features: Tensor, saliency: Tensor, count: int, alpha: float = 1.0, combine: str = "multi") -> Tensor:
    """Greedy saliency-weighted coverage. features [B, N, D], saliency [B, N] -> [B, count] indices in greedy order.

    Computed in float32 (the official code runs in the model dtype; fp16 can flip near-ties).
    """
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True)
    similarity = x @ x.transpose(1, 2)  # [B, N, N], symmetric
    batch, n = similarity.shape[:2]
    rows = torch.arange(batch, device=x.device)
    weight = saliency.float() ** alpha  # [B, N]
    covered = torch.zeros(batch, n, device=x.device)  # best similarity of each token to the chosen set, floored at 0
    chosen = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
    picks = torch.empty(batch, count, dtype=torch.long, device=x.device)
    for step in range(count):
        # gain[b, j] = sum_i max(0, S[i, j] - covered[i]); a chosen column adds nothing
        gain = (similarity.masked_fill(chosen[:, None, :], 0.0) - covered[:, :, None]).clamp(min=0).sum(dim=1)
        gain = gain * weight if combine == "multi" else gain + weight
        best = gain.masked_fill(chosen, float("-inf")).argmax(dim=1)  # first index among equal gains
        picks[:, step] = best
        chosen[rows, best] = True
        covered = torch.maximum(covered, similarity[rows, best])
    return picks


def ordinal_rows(layout: VisualLayout, sample: int, table: Tensor, offset: int) -> Tensor:
    """[n_visual, D]: table[view, patch + offset] for every visual token of `sample` (non-patch tokens: row 0).

    table: [encoder inputs, tokens, D]; `offset` = 1 when the encoder's token 0 is [CLS].
    """
    parts = []
    for span in layout.spans[sample]:
        view = torch.full_like(span.patch_index, span.image) if span.view is None else span.view
        patch = span.patch_index if span.view_patch is None else span.view_patch
        parts.append(table[view.clamp(min=0).to(table.device), (patch.clamp(min=0) + offset).to(table.device)])
    return torch.cat(parts) if parts else table.new_zeros(0, table.shape[-1])


@register
@dataclass
class Scope(Method):
    name: ClassVar[str] = "scope"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 64  # tokens per image (int) or ratio; the README's LLaVA-1.5 setting is 64
    alpha: float = 1.0  # saliency exponent (official env ALPHA, scripts use 1.0; 0: coverage only)
    combine: str = "multi"  # "multi": gain * saliency^alpha (official default), "add": gain + saliency^alpha
    features: str = "encoder"  # "encoder": projector input (official); "projected": LLM input embeddings (AngelSlim)
    scope: str = "image"  # which tokens share a budget: "image", "tile", "video" or "sample" (see vtprune.core.scope)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.combine not in COMBINES:
            raise VTPruneError(f"scope combine={self.combine!r}: use 'multi' (official) or 'add'")
        if self.features not in FEATURES:
            raise VTPruneError(f"scope features={self.features!r}: use 'encoder' (official) or 'projected' (AngelSlim)")
        if not self.alpha >= 0:
            raise VTPruneError(f"scope alpha={self.alpha}: use an exponent >= 0 (1.0 official, 0 = coverage only)")
        check_scope(self.scope, self.name)

    def requests(self, info: ModelInfo) -> list[Any]:
        if not info.vision_has_cls:
            raise VTPruneError(
                f"scope needs a vision encoder with a [CLS] token (its saliency is the [CLS] attention); "
                f"the {info.family} tower has none"
            )
        requests: list[Any] = [ClsAttention(layers=(info.vision_feature_layer,))]
        return requests + ([ProjectorInput()] if self.features == "encoder" else [])

    def plan(self, ctx: SiteContext) -> KeepPlan:
        layout, info = ctx.layout, ctx.info
        saliency = ctx.signals[ClsAttention(layers=(info.vision_feature_layer,))][:, 0].float().sum(dim=1)  # [N, P]
        scores = ordinal_scores(layout, saliency)
        keep = []
        for b in range(layout.batch_size):
            if self.features == "encoder":
                rows = ordinal_rows(layout, b, ctx.signals[ProjectorInput()], int(info.vision_has_cls))
            else:
                rows = ctx.hidden_states[b, layout.visual_positions(b).to(ctx.hidden_states.device)]

            def select(ordinals: Tensor, count: int) -> Tensor:
                index = ordinals.to(rows.device)
                saliency = scores[b][index.to(scores[b].device)][None].to(rows.device)
                return scope_select(rows[index][None], saliency, count, self.alpha, self.combine)[0]

            keep.append(keep_selected(layout, b, self.keep, self.scope, select))
        return KeepPlan(keep=keep, scores=[s.detach().float().cpu() for s in scores])
