"""HoloV (Zou et al., NeurIPS 2025): budget spread over contiguous partitions of the image by saliency plus feature
diversity. Follows the official code (obananas/HoloV @ 1d2e65e, `llava/model/utils.py` `HoloV`; spec:
/work/shared/methods/holov.md; docs/methods/holov.md).

Per image, before the language model, on its patch tokens in sequence order:
- P contiguous chunks (sizes N // P, the first N % P one larger; empty chunks skipped);
- chunk score = mean over its tokens of 1000 a + w * var', where a is the [CLS] attention (head mean), var the variance
  of the token's cosine similarities to the chunk's other tokens (the zeroed diagonal entry included, divided by n - 1)
  and var' = var * mean|1000 a| / (mean|var| + 1e-6); a chunk of one token scores mean(a);
- T is shared out as floor(T * score / (sum + 1e-6)), the remainder +1 to the top chunks by score; a chunk keeps its
  top-attention tokens, or all of them when its share is at least its size (the excess is lost);
- the LLM sees the chunks in order, tokens in descending attention within a chunk (whole chunks in raster order), then
  zero vectors for the lost excess (`excess="pad"`), at renumbered positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import (
    ClsAttention,
    KeepPlan,
    Merge,
    Method,
    ModelInfo,
    SiteContext,
    VTPruneError,
    keep_count,
    register,
)
from ._scores import ordinal_scores

EPS = 1e-6
EXCESS = ("pad", "redistribute", "drop")
ORDERS = ("official", "ascending")


def holov_partitions(count: int, keep: int) -> int:
    """The official Qwen2.5-VL rule for P: max(1, int(1024 / 576 * N / T)) (16 for LLaVA-1.5's 576 tokens at T = 64)."""
    return max(1, int(((1024 / 576) * count) / keep))


def holov_select(features: Tensor, attention: Tensor, partitions: int, keep: int, weight: float = 0.09) -> Tensor:
    """features [N, D], attention [N] -> [keep] token indices in the official output order; -1 marks a zero token.

    Computed in float32 (the official similarity runs in the model dtype).
    """
    n = features.shape[0]
    size, extra = divmod(n, partitions)
    bounds, start = [], 0
    for p in range(partitions):
        stop = start + size + (1 if p < extra else 0)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    attention = attention.float()
    scores = torch.stack([_chunk_score(features[a:b].float(), attention[a:b], weight) for a, b in bounds])
    shares = scores / (scores.sum() + EPS)
    alloc = (shares * keep).floor().long()
    remaining = keep - int(alloc.sum())
    if remaining > 0:
        alloc[torch.topk(shares, k=min(remaining, len(bounds))).indices] += 1
    picked = []
    for (a, b), k in zip(bounds, alloc.tolist()):
        if k >= b - a:
            picked.append(torch.arange(a, b))
        elif k > 0:
            picked.append(torch.topk(attention[a:b], k=k).indices.cpu() + a)
    chosen = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)
    return torch.cat([chosen, torch.full((keep - chosen.numel(),), -1, dtype=torch.long)])


def _chunk_score(features: Tensor, attention: Tensor, weight: float) -> Tensor:
    """Score of one chunk: features [n, D], attention [n] (see the module docstring)."""
    n = features.shape[0]
    if n <= 1:
        return attention.mean()
    unit = features / (features.norm(dim=1, keepdim=True) + EPS)
    similarity = (unit @ unit.T) * (1 - torch.eye(n, device=unit.device))
    mean = similarity.sum(dim=1) / (n - 1)
    variance = ((similarity - mean[:, None]) ** 2).sum(dim=1) / (n - 1)
    scaled = attention * 1e3
    variance = variance * (scaled.abs().mean() / (variance.abs().mean() + EPS))
    return (scaled + weight * variance).mean()


@register
@dataclass
class HoloV(Method):
    name: ClassVar[str] = "holov"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 64  # tokens per image (int) or ratio; the official LLaVA file hard-codes 64
    partitions: int | None = None  # P; None: max(1, int(1024/576 * N / keep)) (official Qwen rule; 16 at 576 -> 64)
    diversity_weight: float = 0.09  # weight of the rescaled similarity variance against the attention (official 0.09)
    excess: str = "pad"  # a chunk's unusable share: "pad" zero tokens (official), "redistribute" or "drop"
    order: str = "official"  # "official": chunk by chunk, by attention within a chunk; "ascending": raster order

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.partitions is not None and (isinstance(self.partitions, bool) or not isinstance(self.partitions, int)
                                            or self.partitions < 1):
            raise VTPruneError(
                f"holov partitions={self.partitions!r}: give a count >= 1, or None for the official rule"
            )
        if self.excess not in EXCESS:
            raise VTPruneError(f"holov excess={self.excess!r}: use 'pad' (official), 'redistribute' or 'drop'")
        if self.order not in ORDERS:
            raise VTPruneError(f"holov order={self.order!r}: use 'official' or 'ascending'")
        if self.excess == "pad" and self.order != "official":
            raise VTPruneError("holov excess='pad' puts zero tokens after the chunks, in the official order; "
                               "use order='official', or excess='drop' / 'redistribute' with order='ascending'")

    def requests(self, info: ModelInfo) -> list[Any]:
        if not info.vision_has_cls:
            raise VTPruneError(
                f"holov needs a vision encoder with a [CLS] token (its saliency is the [CLS] attention); "
                f"the {info.family} tower has none"
            )
        return [ClsAttention(layers=(info.vision_feature_layer,))]

    def plan(self, ctx: SiteContext) -> KeepPlan:
        layout = ctx.layout
        attention = ctx.signals[ClsAttention(layers=(ctx.info.vision_feature_layer,))][:, 0].float().mean(dim=1)
        scores = ordinal_scores(layout, attention)
        keep, order, merges = [], [], []
        for b in range(layout.batch_size):
            rows = ctx.hidden_states[b, layout.visual_positions(b).to(ctx.hidden_states.device)]
            images: dict[int, list[tuple[Any, slice]]] = {}
            for span, sl in layout.ordinal_slices(b):
                images.setdefault(span.image, []).append((span, sl))
            kept, sequence, zeros = [], [], []
            for image, spans in images.items():
                ordinals = torch.cat([torch.arange(sl.start, sl.stop) for _, sl in spans])
                patch = torch.cat([span.patch_index for span, _ in spans]) >= 0
                fixed, ordinals = ordinals[~patch], ordinals[patch]  # non-patch tokens: always kept, in place
                chosen, zero = self._image(rows, scores[b], ordinals, image, len(spans))
                kept += [fixed, chosen, zero]
                sequence.append(self._sequence(fixed, chosen, zero))
                zeros.append(zero)
            kept_b = torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long)
            keep.append(kept_b)
            order.append(torch.cat(sequence) if sequence else kept_b)
            merges.append([Merge(slot=int(z), sources=torch.zeros(0, dtype=torch.long), weights=torch.zeros(0))
                           for z in (torch.cat(zeros).tolist() if zeros else [])])
        plan = KeepPlan(keep=keep, scores=[s.detach().float().cpu() for s in scores], merges=merges)
        if self.order == "official":
            plan.order = order
        return plan

    def _image(self, rows: Tensor, scores: Tensor, ordinals: Tensor, image: int, spans: int) -> tuple[Tensor, Tensor]:
        """(chosen patch ordinals in the official order, ordinals whose slots carry zero tokens) of one image."""
        n = ordinals.numel()
        if not n:
            return ordinals, ordinals
        count = keep_count(self.keep, n, what=f"image {image}")
        if count == n:  # keep-all keeps every token, in place (the official allocation could lose some)
            return ordinals, ordinals[:0]
        if self.order == "official" and spans > 1:
            raise VTPruneError(
                f"holov's official order moves tokens within an image, and image {image} is split into {spans} spans "
                "(an anyres base view and tiles); use order='ascending' with excess='drop' or 'redistribute'"
            )
        partitions = self.partitions if self.partitions is not None else holov_partitions(n, count)
        attention = scores[ordinals.to(scores.device)]
        picks = holov_select(rows[ordinals.to(rows.device)], attention, partitions, count, self.diversity_weight)
        chosen = picks[picks >= 0]
        missing = count - chosen.numel()
        free = torch.ones(n, dtype=torch.bool)
        free[chosen] = False
        if self.excess == "redistribute" and missing:
            leftover = free.nonzero().squeeze(1)
            extra = leftover[torch.sort(attention.cpu()[leftover], descending=True, stable=True).indices[:missing]]
            return ordinals[torch.cat([chosen, extra])], ordinals[:0]
        if self.excess == "pad" and missing:
            return ordinals[chosen], ordinals[free.nonzero().squeeze(1)[:missing]]  # lowest free slots carry zeros
        return ordinals[chosen], ordinals[:0]

    def _sequence(self, fixed: Tensor, chosen: Tensor, zero: Tensor) -> Tensor:
        """The image's kept ordinals in the order their contents take: patch slots (ascending) get the chosen tokens in
        the official order, then the zero tokens; non-patch tokens stay in their own slots."""
        slots = torch.sort(torch.cat([fixed, chosen, zero])).values
        contents = slots.clone()
        patch_slots = ~torch.isin(slots, fixed)
        contents[patch_slots] = torch.cat([chosen, zero])
        return contents
