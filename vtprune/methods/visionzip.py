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

LLaVA-NeXT family (spec B4): every encoder input (an anyres image's base view and each tile, a video frame) is
compressed on its own by `select_view`, `keep` tokens each ([CLS] included). An anyres image gets the official
sequence (`anyres_tokens`, checked against the official code's outputs): the base view as above, then the dominant
patches of all tiles in raster order of the whole tile mosaic, then every tile's [CLS], then every tile's contextual
tokens. Our choice, following the official code: no row-end (newline) tokens, and every patch of a tile is a candidate
(no unpadding: a dominant patch that unpadding removed from the layout comes back through an encoder merge). The
paper's LLaVA-NeXT results were measured this way, and row ends would not fit the budget: at the paper's 160 tokens
for 5 views (32 per view) a 2 x 2 mosaic has up to 48 rows, more row ends than tile tokens. A video frame (pooled
before the projector, LLaVA-NeXT-Video) is a single view on its pooled grid: [CLS], the dominant pooled tokens, the
contextual tokens, from the adapter's pooled [CLS] attention, keys and projector input (our interpretation: the
paper applies VisionZip per frame, on an encoder whose frames are not pooled). On these layouts every merge names its
encoder input (`Merge.view`); tokens keep their own slot where the layout has one, the others take free slots of
the same span (base view or tile mosaic), and the plan's `order` gives the sequence.
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


def anyres_tokens(selections: list[tuple[Tensor, Tensor, list[Tensor]]], origins: list[tuple[int, int]], side: int,
                  cls_token: bool = True) -> list[tuple[int, Tensor, Tensor]]:
    """The official LLaVA-NeXT sequence of one anyres image: per LLM token (view, encoder tokens, weights), its value
    being sum(weights * encoder features of `view` at those tokens) ([CLS] is token 0, patch p token p + 1).

    selections: `select_view` of every view, base (view 0) first, then the tiles (views 1..T, each side x side
    patches); origins: per tile, the mosaic (row, col) of its patch 0 (any constant shift of all origins gives the same
    sequence). Base: [CLS], dominant patches ascending, contextual tokens in target order. Tiles: the dominant patches
    of all tiles in raster order of the whole mosaic, padding included; then each tile's [CLS]; then each tile's
    contextual tokens. No row ends.
    """
    if len(origins) != len(selections) - 1:
        raise VTPruneError(f"visionzip anyres: {len(selections) - 1} tiles but {len(origins)} tile origins")
    one = torch.ones(1)
    base_top, base_targets, base_members = selections[0]
    out = [(0, torch.tensor([0]), one)] if cls_token else []
    out += [(0, torch.tensor([int(p) + 1]), one) for p in base_top]
    out += [contextual_token(0, t, m) for t, m in zip(base_targets, base_members)]
    dominant = []  # (mosaic row, mosaic col, view, patch)
    for tile, ((top, _, _), (row, col)) in enumerate(zip(selections[1:], origins)):
        for p in top.tolist():
            dominant.append((row + p // side, col + p % side, 1 + tile, p))
    out += [(view, torch.tensor([p + 1]), one) for _, _, view, p in sorted(dominant)]
    if cls_token:
        out += [(1 + tile, torch.tensor([0]), one) for tile in range(len(origins))]
    for tile, (_, targets, members) in enumerate(selections[1:]):
        out += [contextual_token(1 + tile, t, m) for t, m in zip(targets, members)]
    return out


def anyres_sequence(selections: list[tuple[Tensor, Tensor, list[Tensor]]], tiles: tuple[int, int], side: int,
                    cls_token: bool = True) -> list[tuple[int, Tensor, Tensor]]:
    """`anyres_tokens` for tiles = (rows, cols) of tiles, row-major (the official grid, no unpadding)."""
    rows, cols = tiles
    if len(selections) != 1 + rows * cols:
        raise VTPruneError(f"visionzip anyres: {len(selections) - 1} tiles for a {rows} x {cols} tile grid")
    origins = [(r * side, c * side) for r in range(rows) for c in range(cols)]
    return anyres_tokens(selections, origins, side, cls_token)


def view_tokens(selection: tuple[Tensor, Tensor, list[Tensor]], cls_token: bool = True) -> list[tuple[int, Tensor, Tensor]]:
    """One view's sequence (LLaVA-1.5 layout): [CLS], dominant patches ascending, contextual tokens; as `anyres_tokens`."""
    top, targets, members = selection
    one = torch.ones(1)
    out = [(0, torch.tensor([0]), one)] if cls_token else []
    out += [(0, torch.tensor([int(p) + 1]), one) for p in top]
    return out + [contextual_token(0, t, m) for t, m in zip(targets, members)]


def place_tokens(tokens: list[tuple[int, Tensor, Tensor]], views: list[int], token_of: dict[tuple[int, int], int],
                 ordinals: Tensor) -> tuple[list[int], list[Merge]]:
    """Slots for a span's tokens (`anyres_tokens` / `view_tokens`, local views mapped to encoder inputs by `views`).

    token_of: (encoder input, encoder token) -> ordinal of the span's token showing it; ordinals: the span's ordinals.
    A token that is one encoder token with weight 1 keeps that token's own slot; a merged token takes its first
    source's slot when free, else the lowest free slot of the span. Returns (slot per token, in sequence order; merges).
    """
    slots: list[int | None] = [None] * len(tokens)
    used: set[int] = set()
    plain = [len(s) == 1 and float(w[0]) == 1.0 for _, s, w in tokens]
    for rule in ("plain", "first source"):
        for i, (view, sources, _) in enumerate(tokens):
            if slots[i] is not None or (rule == "plain") != plain[i]:
                continue
            own = token_of.get((views[view], int(sources[0])))
            if own is not None and own not in used:
                slots[i] = own
                used.add(own)
    free = iter(o for o in ordinals.tolist() if o not in used)
    merges = []
    for i, (view, sources, weights) in enumerate(tokens):
        if slots[i] is None:
            slots[i] = next(free, None)
            if slots[i] is None:
                raise VTPruneError(
                    f"visionzip: {len(tokens)} tokens do not fit the {ordinals.numel()} tokens of an encoder input's "
                    "span; lower keep"
                )
        if not (plain[i] and token_of.get((views[view], int(sources[0]))) == slots[i]):
            merges.append(Merge(slot=slots[i], sources=sources, weights=weights, space="encoder", view=views[view]))
    return slots, merges


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
            return self._view_plan(ctx, dominance, keys)
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

    def _split(self, patches: int, what: str) -> tuple[int, int, int]:
        """(tokens, dominant patches, contextual tokens) of one encoder input of `patches` patches."""
        total = keep_count(self.keep, patches, what=what)
        contextual = round(total * CONTEXTUAL_SHARE) if self.contextual is None else self.contextual
        dominant = total - contextual - int(self.cls_token)
        if dominant < 0:
            raise VTPruneError(f"visionzip keep={total} leaves no room for [CLS] and {contextual} contextual tokens")
        return total, dominant, contextual

    def _view_plan(self, ctx: SiteContext, dominance: Tensor, keys: Tensor) -> KeepPlan:
        """The LLaVA-NeXT family: anyres images (base span + tiles span) and frames, every encoder input on its own."""
        if self.merge_space != "encoder":
            raise VTPruneError("visionzip on anyres tiles and video frames merges encoder features: use "
                               "merge_space='encoder' (the adapter gives ProjectorInput)")
        layout = ctx.layout
        keep, order, merges, scores = [], [], [], []
        for b in range(layout.batch_size):
            slices = layout.ordinal_slices(b)
            score = torch.zeros(layout.num_visual(b))
            for span, sl in slices:
                patch = span.patch_index >= 0
                score[torch.arange(sl.start, sl.stop)[patch]] = dominance[span.view[patch], span.view_patch[patch]]
            scores.append(score)
            kept, ordered, sample_merges = [], [], []
            i = 0
            while i < len(slices):
                span, sl = slices[i]
                if span.kind == "base" and i + 1 < len(slices) and slices[i + 1][0].kind == "tiles":
                    groups = [slices[i], slices[i + 1]]
                    i += 2
                elif span.kind == "frame":
                    groups = [slices[i]]
                    i += 1
                else:
                    raise VTPruneError(f"visionzip: image {span.image} is a {span.kind!r} span; it compresses anyres "
                                       "images (base view and tiles) and video frames")
                slots, image_merges = self._group_plan(groups, dominance, keys)
                kept += slots
                ordered += slots
                sample_merges += image_merges
            keep.append(torch.sort(torch.tensor(kept, dtype=torch.long)).values)
            order.append(torch.tensor(ordered, dtype=torch.long))
            merges.append(sample_merges)
        return KeepPlan(keep=keep, scores=scores, merges=merges, order=order)

    def _group_plan(self, spans: list[tuple[Any, slice]], dominance: Tensor, keys: Tensor) -> tuple[list[int], list[Merge]]:
        """Slots in sequence order and merges of one anyres image ([base, tiles] spans) or one frame ([frame])."""
        first, _ = spans[0]
        patches = first.grid[0] * first.grid[1]
        views = []  # encoder inputs: the base view / frame, then the tiles in encoder order
        for span, _ in spans:
            views += sorted(set(span.view[span.patch_index >= 0].tolist()) - set(views))
        total, dominant, contextual = self._split(patches, f"encoder input {views[0]} (image {first.image})")
        if total == patches:  # every view keeps all its patches: nothing is merged, the image stays as it is
            return [o for _, sl in spans for o in range(sl.start, sl.stop)], []
        selections = [select_view(dominance[v, :patches], keys[v], dominant, contextual) for v in views]
        slots, merges = [], []
        if first.kind == "frame":
            parts = [(view_tokens(selections[0], self.cls_token), spans[0])]
        else:
            tiles, tiles_sl = spans[1]
            width = tiles.grid[1]
            side = first.grid[1]
            origins = []
            for view in views[1:]:  # the mosaic (row, col) of the tile's patch 0, from any token of the tile
                at = int(((tiles.view == view) & (tiles.patch_index >= 0)).nonzero()[0, 0])
                index, own = int(tiles.patch_index[at]), int(tiles.view_patch[at])
                origins.append((index // width - own // side, index % width - own % side))
            tokens = anyres_tokens(selections, origins, side, self.cls_token)
            base_count = int(self.cls_token) + selections[0][0].numel() + selections[0][1].numel()
            parts = [(tokens[:base_count], spans[0]), (tokens[base_count:], spans[1])]
        for part, (span, sl) in parts:
            if not part:
                continue
            local = views if first.kind != "frame" else views[:1]
            patch = span.patch_index >= 0
            ordinals = torch.arange(sl.start, sl.stop)
            token_of = {(int(v), int(p) + 1): int(o) for v, p, o in
                        zip(span.view[patch], span.view_patch[patch], ordinals[patch])}
            part_slots, part_merges = place_tokens(part, local, token_of, ordinals)
            slots += part_slots
            merges += part_merges
        return slots, merges
