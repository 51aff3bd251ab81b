"""CDPruner (Zhang et al., NeurIPS 2025): the visual tokens kept are the greedy MAP subset of a determinantal point
process whose kernel weighs the tokens' cosine similarity by their relevance to the instruction. Follows the official
code (Theia-4869/CDPruner @ 9541616, `llava/model/llava_arch.py` `encode_images`; spec:
/work/shared/methods/cdpruner.md; docs/methods/cdpruner.md).

Per image, before the language model, in float32:
  S = cosine similarity of the LLM input embeddings of the image's tokens (the projector output, as official);
  r = relevance, min-max normalised over the image's tokens: (rel - min + 1e-6) / (max - min);
  L = diag(r) S diag(r); greedy MAP (Chen et al. 2018): T picks of the largest residual, no early stop;
kept tokens go to the LLM in raster order, renumbered.

Relevance (interpretation, marked): the official code uses CLIP's image-text space (penultimate patch features through
CLIP's post-layernorm and visual projection, against the CLIP text tower's embedding of the bare question) and negates
the cosine. transformers' LLaVA has neither CLIP's visual projection nor its text tower, so vtprune computes it in the
LLM input space: the mean cosine of each visual token to the input embeddings of the instruction tokens (the sample's
real tokens after its last image), not negated by default (`negate=True` mirrors the official sign).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core import (
    KeepPlan,
    Method,
    SiteContext,
    VTPruneError,
    check_scope,
    register,
)
from ..core.scope import keep_selected

RELEVANCE = ("llm", "none")


def relevance_scores(visual: Tensor, text: Tensor, negate: bool = False) -> Tensor:
    """visual [N, C], text [M, C] -> [N] mean over the M text vectors of the cosine (negated if `negate`)."""
    v = visual.float() / visual.float().norm(dim=-1, keepdim=True)
    t = text.float() / text.float().norm(dim=-1, keepdim=True)
    cosine = v @ t.T
    return (-cosine if negate else cosine).mean(dim=-1)


def normalize_relevance(relevance: Tensor, theta: float | None = None) -> Tensor:
    """Min-max over every entry given (official: +1e-6 in the numerator only); equal values give 1.

    theta (off in the released code): r -> exp(theta / (2 (1 - theta)) * r).
    """
    low, span = relevance.min(), relevance.max() - relevance.min()
    r = (relevance - low + 1e-6) / span if span > 0 else torch.ones_like(relevance)
    return torch.exp(theta / (2 * (1 - theta)) * r) if theta is not None else r


def dpp_select(features: Tensor, relevance: Tensor, count: int) -> Tensor:
    """Greedy MAP of the DPP with kernel r_i S_ij r_j. features [B, N, D], relevance [B, N] -> [B, count] picks in
    greedy order. Exactly `count` picks (no stopping rule); a non-positive residual is floored at 1e-12 before its
    square root (the official code would produce NaN there: feature rank below `count`)."""
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True)
    kernel = relevance[:, :, None] * (x @ x.transpose(1, 2)) * relevance[:, None, :]  # [B, N, N]
    batch = kernel.shape[0]
    rows = torch.arange(batch, device=kernel.device)
    residual = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [B, N] marginal gain of every candidate
    factors = kernel.new_zeros(count, batch, kernel.shape[1])  # [T, B, N] incremental Cholesky rows
    picks = torch.empty(count, batch, dtype=torch.long, device=kernel.device)
    for i in range(count):
        best = residual.argmax(dim=-1)  # [B]; first index among equals
        picks[i] = best
        projected = torch.einsum("tb,tbn->bn", factors[:i, rows, best], factors[:i])
        e = (kernel[rows, best] - projected) / residual[rows, best].clamp(min=1e-12).sqrt()[:, None]
        factors[i] = e
        residual = residual - e**2
        residual[rows, best] = float("-inf")
    return picks.T


@register
@dataclass
class CDPruner(Method):
    name: ClassVar[str] = "cdpruner"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 64  # tokens per image (int) or ratio (official LLaVA-1.5 settings: 64, 128, 192)
    relevance: str = "llm"  # "llm": instruction relevance in the LLM input space (vtprune); "none": diversity only
    negate: bool = False  # negate the cosine, as the official code does in CLIP space
    theta: float | None = None  # quality/diversity trade-off, off in the released code; in (0, 1) to switch it on
    scope: str = "image"  # which tokens share a budget; "tile" = the official LLaVA-NeXT rule (keep per tile)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.relevance not in RELEVANCE:
            raise VTPruneError(f"cdpruner relevance={self.relevance!r}: use 'llm' (instruction relevance) or 'none'")
        if self.theta is not None and not 0.0 < self.theta < 1.0:
            raise VTPruneError(f"cdpruner theta={self.theta}: use a value in (0, 1), or None (official: off)")
        check_scope(self.scope, self.name)

    def plan(self, ctx: SiteContext) -> KeepPlan:
        layout, hidden = ctx.layout, ctx.hidden_states
        mask = ctx.attention_mask
        if mask is None:
            mask = torch.ones(hidden.shape[:2], device=hidden.device)
        keep, scores = [], []
        for b in range(layout.batch_size):
            positions = layout.visual_positions(b)
            if not positions.numel():  # a sample without images
                keep.append(positions)
                scores.append(torch.zeros(0))
                continue
            visual = hidden[b, positions.to(hidden.device)].float()  # [n, D]
            r = self._relevance(layout, b, visual, hidden[b], mask[b])
            scores.append(r.cpu())

            def select(ordinals: Tensor, count: int) -> Tensor:
                index = ordinals.to(visual.device)
                return dpp_select(visual[index][None], r[index][None], count)[0]

            keep.append(keep_selected(layout, b, self.keep, self.scope, select))
        return KeepPlan(keep=keep, scores=scores)

    def _relevance(self, layout, sample: int, visual: Tensor, hidden: Tensor, mask: Tensor) -> Tensor:
        """[n_visual] relevance of every visual token, normalised per image over its patch tokens (1 elsewhere)."""
        r = torch.ones(visual.shape[0], device=visual.device)
        if self.relevance == "none":
            return r
        positions = layout.visual_positions(sample)
        after = torch.arange(hidden.shape[0], device=hidden.device) > int(positions.max())
        text = hidden[after & mask.bool()]
        if not text.shape[0]:
            raise VTPruneError(
                f"cdpruner's relevance needs instruction text after the last image, and sample {sample} has none; "
                "put the question after the image, or use relevance='none' (diversity only)"
            )
        raw = relevance_scores(visual, text, self.negate)
        images: dict[int, list[Tensor]] = {}
        for span, sl in layout.ordinal_slices(sample):
            images.setdefault(span.image, []).append(torch.arange(sl.start, sl.stop)[span.patch_index >= 0])
        for parts in images.values():
            index = torch.cat(parts).to(visual.device)
            if index.numel():
                r[index] = normalize_relevance(raw[index], self.theta)
        return r
