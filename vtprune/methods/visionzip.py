"""VisionZip (Yang et al., CVPR 2025): dominant tokens by [CLS] attention plus contextual tokens made by merging.
Follows the official code; see docs/methods/visionzip.md.

Per image, everything from the encoder layer whose output feeds the projector (LLaVA-1.5: layer 22):
- dominant: [CLS] itself (it counts as one of the `keep`) and the patches with the largest [CLS] attention (summed
  over heads);
- contextual: the remaining patches in raster order; `contextual` targets at a uniform stride max(1, R // C) over them;
  every other remaining patch joins the target whose head-mean key is most cosine-similar (ties: the lower target);
  contextual token = target + mean(members) (the target is added to the mean, not averaged with it);
- merged on the vision features *before* the projector, as the official code does; then projected.

How this maps onto LLaVA's slots: the language model must see, per image, [CLS], the dominant patches in raster order,
then the contextual tokens in target order, numbered contiguously — exactly what the official code feeds it. Dominant
patches keep their own slots; contextual token j sits at its target's slot (a merge with space="encoder": the target
with weight 1 and each member with 1/n); [CLS], which has no slot in LLaVA's default feature selection, is carried by
the slot of the lowest-ordinal merged (pruned) patch; the plan's `order` puts the contents in the official order.
The trace's merged entries name every source (-1 stands for [CLS]).

merge_space="projected" is an approximation offered as an option (never used silently): the same weights applied to
the projected features, for adapters without `ProjectorInput`; it cannot carry [CLS], so it needs cls_token=False.

LLaVA-NeXT anyres images (spec B4) are compressed view by view (`select_view`); `anyres_sequence` gives the official
sequence of one image, checked against the official code's outputs: the base view as above, then the dominant
patches of all tiles in raster order of the whole tile mosaic, then every tile's [CLS], then every tile's contextual
tokens. Our choice, following the official code: no row-end (newline) tokens, and every patch of a tile is a candidate
(no unpadding). The paper's LLaVA-NeXT results were measured this way, and row ends would not fit the budget: at the
paper's 160 tokens for 5 views (32 per view) a 2 x 2 mosaic has up to 48 rows, more row ends than tile tokens. The
LLaVA-NeXT adapters give the per-view [CLS] attention and keys, but an encoder-space merge cannot yet name the tile it
reads (it is resolved through its slot's image), so the method runs on single-view images and refuses anyres and frame
layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import (
    ClsAttention,
    IntRange,
    KeepPlan,
    Merge,
    Method,
    ModelInfo,
    ProjectorInput,
    SiteContext,
    VisionKeys,
    VTPruneError,
    keep_count,
    register,
    top_k,
)

CONTEXTUAL_SHARE = 10 / 64  # the paper's splits 54+10, 108+20, 162+30


def contextual_groups(keys: Tensor, remaining: Tensor, count: int) -> tuple[Tensor, list[Tensor]]:
    """Targets (uniform stride over `remaining`) and, per target, the other remaining tokens assigned to it.

    keys: [T, d] head-mean keys of the encoder tokens; remaining: [R] ascending token indices; count: C.
    """
    if count == 0:
        return remaining[:0], []
    step = max(1, remaining.numel() // count)
    targets = remaining[::step][:count]
    is_target = torch.zeros(remaining.numel(), dtype=torch.bool)
    is_target[::step] = True
    is_target[step * count :] = False
    others = remaining[~is_target]
    normed = F.normalize(keys.float(), dim=-1)
    nearest = (normed[others] @ normed[targets].T).argmax(dim=1) if others.numel() else others
    return targets, [others[nearest == j] for j in range(targets.numel())]


def select_view(dominance: Tensor, keys: Tensor, dominant: int, contextual: int, offset: int = 1
                ) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One encoder input: (dominant patches ascending, contextual targets, each target's members), in patch numbers.

    dominance: [P] [CLS] attention to the patches (summed over heads); keys: [T, d] head-mean keys of the encoder
    tokens, patch p at token p + offset ([CLS] first: offset 1); dominant: patches kept by attention ([CLS] not
    counted); contextual: merged tokens made from the remaining patches (`contextual_groups`).
    """
    top = top_k(dominance, dominant)
    rest = torch.ones(dominance.numel(), dtype=torch.bool)
    rest[top] = False
    remaining = rest.nonzero().squeeze(1)
    targets, members = contextual_groups(keys, remaining + offset, contextual)
    return top, targets - offset, [m - offset for m in members]


def contextual_token(view: int, target: Tensor, members: Tensor, offset: int = 1) -> tuple[int, Tensor, Tensor]:
    """(view, encoder tokens, weights) of a contextual token: the target plus the mean of its members."""
    sources = torch.cat([target.view(1), members]) + offset
    weights = torch.cat([torch.ones(1), torch.full((members.numel(),), 1.0 / max(1, members.numel()))])
    return view, sources, weights


def anyres_sequence(selections: list[tuple[Tensor, Tensor, list[Tensor]]], tiles: tuple[int, int], side: int,
                    cls_token: bool = True) -> list[tuple[int, Tensor, Tensor]]:
    """The official LLaVA-NeXT sequence of one anyres image: per LLM token (view, encoder tokens, weights), its value
    being sum(weights * encoder features of `view` at those tokens) ([CLS] is token 0, patch p token p + 1).

    selections: `select_view` of every view, base first, then the tiles row-major (tiles = (rows, cols) of tiles,
    each side x side patches). Base: [CLS], dominant patches ascending, contextual tokens in target order. Tiles: the
    dominant patches of all tiles in raster order of the (rows * side) x (cols * side) mosaic, padding included; then
    each tile's [CLS]; then each tile's contextual tokens. No row ends.
    """
    one = torch.ones(1)
    base_top, base_targets, base_members = selections[0]
    out = [(0, torch.tensor([0]), one)] if cls_token else []
    out += [(0, torch.tensor([int(p) + 1]), one) for p in base_top]
    out += [contextual_token(0, t, m) for t, m in zip(base_targets, base_members)]
    rows, cols = tiles
    if len(selections) != 1 + rows * cols:
        raise VTPruneError(f"visionzip anyres: {len(selections) - 1} tiles for a {rows} x {cols} tile grid")
    dominant = []  # (mosaic raster index, view, patch)
    for tile, (top, _, _) in enumerate(selections[1:]):
        tile_row, tile_col = divmod(tile, cols)
        for p in top.tolist():
            raster = (tile_row * side + p // side) * (cols * side) + tile_col * side + p % side
            dominant.append((raster, 1 + tile, p))
    out += [(view, torch.tensor([p + 1]), one) for _, view, p in sorted(dominant)]
    if cls_token:
        out += [(1 + tile, torch.tensor([0]), one) for tile in range(rows * cols)]
    for tile, (_, targets, members) in enumerate(selections[1:]):
        out += [contextual_token(1 + tile, t, m) for t, m in zip(targets, members)]
    return out


@register
@dataclass
class VisionZip(Method):
    name: ClassVar[str] = "visionzip"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 64  # tokens per image given to the LLM ([CLS] included), or a ratio of the patches
    contextual: int | None = None  # merged tokens among them; None: the paper's share, round(keep * 10 / 64)
    cls_token: bool = True  # official: [CLS] is one of the dominant tokens
    merge_space: str = "encoder"  # "encoder": before the projector (official); "projected": after it (approximation)
    layer: int | None = None  # encoder layer of the signals and features; None: the one that feeds the projector

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge_space not in ("encoder", "projected"):
            raise VTPruneError(f"visionzip merge_space={self.merge_space!r}: use 'encoder' or 'projected'")
        if self.merge_space == "projected" and self.cls_token:
            raise VTPruneError("visionzip merge_space='projected' cannot carry [CLS] (it is not projected); "
                               "use cls_token=False or merge_space='encoder'")
        if self.contextual is not None and self.contextual < 0:
            raise VTPruneError(f"visionzip contextual={self.contextual}: give a count >= 0")

    @classmethod
    def search_space(cls, info: ModelInfo, budget: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Tunes the split of a fixed budget (tokens per image, default 64) into dominant and contextual tokens."""
        keep = 64 if budget is None else int(budget)
        return {"contextual": IntRange(0, keep // 2)}, {"keep": keep}

    def encoder_layer(self, info: ModelInfo) -> int:
        return info.vision_feature_layer if self.layer is None else self.layer

    def requests(self, info: ModelInfo) -> list[Any]:
        if not info.vision_has_cls:
            raise VTPruneError(f"visionzip needs a vision encoder with a [CLS] token; the {info.family} tower has none")
        layer = self.encoder_layer(info)
        requests: list[Any] = [ClsAttention(layers=(layer,)), VisionKeys(layer=layer)]
        return requests + ([ProjectorInput()] if self.merge_space == "encoder" else [])

    def plan(self, ctx: SiteContext) -> KeepPlan:
        layer = self.encoder_layer(ctx.info)
        dominance = ctx.signals[ClsAttention(layers=(layer,))][:, 0].float().sum(dim=1).cpu()  # [N, P] sum over heads
        keys = ctx.signals[VisionKeys(layer=layer)].cpu()  # [N, T, d]
        layout = ctx.layout
        if any(span.view is not None for spans in layout.spans for span in spans):
            raise VTPruneError(
                "visionzip runs on single-grid images; anyres tiles and video frames need its merges to name an "
                "encoder input (the LLaVA-NeXT family's per-view rule, `anyres_sequence`, is not wired yet)"
            )
        keep, order, merges, scores = [], [], [], []
        for b in range(layout.batch_size):
            kept, ordered, sample_merges = [], [], []
            scores.append(torch.zeros(layout.num_visual(b)))
            for span, sl in layout.ordinal_slices(b):
                patch = span.patch_index
                if span.grid is None or not torch.equal(patch, torch.arange(span.grid[0] * span.grid[1])):
                    raise VTPruneError(f"visionzip needs every patch of image {span.image} in raster order, nothing else")
                scores[b][sl] = dominance[span.image]
                ordinals, sequence, image_merges = self._image_plan(dominance[span.image], keys[span.image], span.image)
                kept.append(ordinals + sl.start)
                ordered.append(sequence + sl.start)
                for merge in image_merges:
                    merge.slot += sl.start
                    if merge.space == "sequence":
                        merge.sources = merge.sources + sl.start
                sample_merges += image_merges
            keep.append(torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long))
            order.append(torch.cat(ordered) if ordered else torch.zeros(0, dtype=torch.long))
            merges.append(sample_merges)
        return KeepPlan(keep=keep, scores=scores, merges=merges, order=order)

    def _image_plan(self, dominance: Tensor, keys: Tensor, image: int) -> tuple[Tensor, Tensor, list[Merge]]:
        """(kept patches ascending, their order in the sequence, merges) of one image, in patch numbers."""
        patches = dominance.numel()
        total = keep_count(self.keep, patches, what=f"image {image}")
        if total == patches:  # nothing is pruned, so nothing is merged: the image stays as it is (keep-all exactness)
            everything = torch.arange(patches)
            return everything, everything, []
        contextual = round(total * CONTEXTUAL_SHARE) if self.contextual is None else self.contextual
        dominant = total - contextual - int(self.cls_token)
        if dominant < 0:
            raise VTPruneError(f"visionzip keep={total} leaves no room for [CLS] and {contextual} contextual tokens")
        top, targets, members = select_view(dominance, keys, dominant, contextual)
        rest = torch.ones(patches, dtype=torch.bool)
        rest[top] = False
        offset = 1  # encoder token of patch p is p + 1 ([CLS] first)
        merges = []
        for target, group in zip(targets.tolist(), members):
            weights = torch.cat([torch.ones(1), torch.full((group.numel(),), 1.0 / max(1, group.numel()))])
            sources = torch.cat([torch.tensor([target]), group])
            space = "encoder" if self.merge_space == "encoder" else "sequence"
            if space == "encoder":
                sources = sources + offset
            merges.append(Merge(slot=target, sources=sources, weights=weights, space=space))
        sequence = torch.cat([top, targets])
        if self.cls_token:
            free = rest.clone()
            free[targets] = False
            carrier = int(free.nonzero()[0, 0])  # exists: keep <= patches leaves a merged patch's slot
            merges.insert(0, Merge(slot=carrier, sources=torch.tensor([0]), weights=torch.ones(1), space="encoder"))
            sequence = torch.cat([torch.tensor([carrier]), sequence])
        return torch.sort(sequence).values, sequence, merges
