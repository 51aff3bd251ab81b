"""ToMe, Token Merging (Bolya et al., ICLR 2023): merge the most similar tokens of a ViT step by step, by bipartite
soft matching on the attention keys. Follows facebookresearch/ToMe; see docs/methods/tome.md.

One matching step on the tokens [T, d] of one image ([CLS] first when protected): the tokens alternate into set A
(even positions) and B (odd); every A token points at its most cosine-similar B token; the r A tokens with the most
similar partners are merged into them (the [CLS] row never is); the rest of A stays. The output sequence is ToMe's:
A's unmerged tokens ([CLS] first), then B. A merged token is the size-weighted average of its members, its size their
sum, and with proportional attention later blocks add log(size) to each key's attention logits.

Where vtprune runs it:
- `encoder` site (open_clip towers, or `blocks` given): one step after each of `blocks` (default: every block but the
  last), on that block's keys; `keep`, the patches left at the tower's output, is reached by an even schedule (r per
  step as equal as possible, the first steps taking the remainder). The official code merges inside each block,
  between attention and MLP; vtprune's cut sits after a block, so that block's MLP still sees the unmerged tokens.
- `pre_llm` (LLaVA-style towers): steps on the keys of the layer that feeds the projector until `keep` patches are
  left (one step merges at most half, so keep < half takes several, each on the size-weighted mean keys of the
  merged tokens: an interpretation), merged before the projector (`ProjectorInput`) as the uniform mean of each
  group's encoder features (= ToMe's size-weighted average); the kept tokens stay in raster order of their slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import (
    KeepPlan, Merge, Method, ModelInfo, ProjectorInput, SiteContext, VisionKeys, VTPruneError, keep_all, keep_count,
    register,
)


def bipartite_soft_matching(metric: Tensor, r: int, class_token: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One ToMe step on one image: (order [T-r], src [r], dst [r]), token indices of `metric` [T, d].

    Token src[i] is merged into token dst[i] (a B token); `order` lists the tokens that remain, in ToMe's output
    order: A's unmerged tokens (ascending with a class token, else by falling similarity), then every B token.
    r is capped at half the unprotected tokens, as in the official code; class_token protects token 0.
    """
    t = metric.shape[0]
    r = min(r, (t - int(class_token)) // 2)
    everything = torch.arange(t)
    if r <= 0:
        return everything, everything[:0], everything[:0]
    metric = F.normalize(metric.float(), dim=-1)
    scores = metric[0::2] @ metric[1::2].T  # [|A|, |B|] cosine similarity
    if class_token:
        scores[0, :] = -torch.inf
    node_max, node_idx = scores.max(dim=-1)
    edges = node_max.argsort(descending=True)
    unmerged, merged = edges[r:], edges[:r]
    if class_token:
        unmerged = unmerged.sort().values
    order = torch.cat([2 * unmerged, 2 * torch.arange(scores.shape[1]) + 1])
    return order, 2 * merged, 2 * node_idx[merged] + 1


def merge_step(sizes: Tensor, order: Tensor, src: Tensor, dst: Tensor
               ) -> tuple[list[tuple[int, Tensor, Tensor]], Tensor]:
    """The weighted averages of one step: ([(dst, members, weights)] per B token that receives merges, new sizes).

    sizes: [T] tokens each token stands for; members: dst first, then its sources ascending; weights: size / total.
    New sizes follow `order`.
    """
    new = sizes.clone()
    new.index_add_(0, dst, sizes[src])
    groups = []
    for target in dst.unique().tolist():
        members = torch.cat([torch.tensor([target]), src[dst == target].sort().values])
        groups.append((target, members, sizes[members] / new[target]))
    return groups, new[order]


def even_schedule(patches: int, keep: int, steps: int) -> list[int]:
    """Tokens merged at each of `steps` steps to go from `patches` to `keep`: as equal as possible, the remainder on
    the first steps. Refused when a step would merge more than half the tokens it sees."""
    total = patches - keep
    schedule = [total // steps + (1 if i < total % steps else 0) for i in range(steps)]
    left = patches
    for r in schedule:
        if r > left // 2:
            least = next(k for k in range(keep, patches + 1) if _feasible(patches, k, steps))
            raise VTPruneError(
                f"tome keep={keep}: {steps} merging steps of at most half the tokens each, on an even schedule, "
                f"reach no fewer than {least} of {patches} patches; raise keep or merge after more blocks"
            )
        left -= r
    return schedule


def _feasible(patches: int, keep: int, steps: int) -> bool:
    total, left = patches - keep, patches
    for i in range(steps):
        r = total // steps + (1 if i < total % steps else 0)
        if r > left // 2:
            return False
        left -= r
    return True


@register
@dataclass
class ToMe(Method):
    name: ClassVar[str] = "tome"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)
    positions: ClassVar[str] = "renumber"

    keep: int | float = 64  # patch tokens per image after the last step (int) or a ratio of the patches
    blocks: tuple[int, ...] | None = None  # merge inside the encoder after these blocks; None: every block but the
    # last on a tower with no language model, else one merge before the language model (pre_llm)
    prop_attn: bool = True  # proportional attention in the encoder's later blocks (encoder site)

    def cut_sites(self, info: ModelInfo) -> tuple[str, ...]:
        return ("encoder",) if self.blocks is not None or info.llm_layers == 0 else self.sites

    def encoder_blocks(self, info: ModelInfo) -> list[int]:
        if "encoder" not in self.cut_sites(info):
            return []
        n = info.vision_layers
        blocks = list(range(n - 1)) if self.blocks is None else list(self.blocks)
        resolved = [b % n for b in blocks if -n <= b < n]
        if not blocks or len(resolved) != len(blocks) or n - 1 in resolved or sorted(set(resolved)) != resolved:
            raise VTPruneError(
                f"tome blocks={self.blocks}: give ascending, distinct encoder blocks in 0..{n - 2} (a merge sits "
                f"between two of the vision encoder's {n} blocks)"
            )
        return resolved

    def requests(self, info: ModelInfo) -> list[Any]:
        blocks = self.encoder_blocks(info)
        if blocks:
            return [VisionKeys(layer=b) for b in blocks]
        return [VisionKeys(layer=info.vision_feature_layer), ProjectorInput()]

    def plan(self, ctx: SiteContext) -> KeepPlan:
        if isinstance(self.keep, float) and self.keep >= 1.0:  # nothing merges, on any layout: exactly dense
            return keep_all(ctx.layout)
        if ctx.site == "encoder":
            return self._encoder_plan(ctx)
        return self._tower_output_plan(ctx)

    # --------------------------------------------------------------------------------- inside the encoder
    def _encoder_plan(self, ctx: SiteContext) -> KeepPlan:
        """One step after block ctx.layer; the sequence is [CLS] (when the tower has one) + the image's tokens."""
        layout, cls = ctx.layout, int(ctx.info.vision_has_cls)
        keys = ctx.signals[VisionKeys(layer=ctx.layer)].cpu()  # [N, T, d]
        steps = len(self.encoder_blocks(ctx.info))
        if ctx.stage == 0:
            ctx.state["schedule"] = {}  # image -> r per step
            ctx.state["sizes"] = [torch.ones(keys.shape[1]) for _ in range(layout.batch_size)]  # per image [T]
        keep, order, merges, sizes = [], [], [], []
        for b in range(layout.batch_size):
            span = layout.spans[b][0] if len(layout.spans[b]) == 1 else None
            if span is None or span.start != cls or layout.seq_len != cls + span.length:
                raise VTPruneError("tome inside the encoder needs the sequence [CLS] + one image's tokens")
            if span.image not in ctx.state["schedule"]:
                patches = span.length
                ctx.state["schedule"][span.image] = even_schedule(patches, keep_count(self.keep, patches,
                                                                  what=f"image {span.image}"), steps)
            r = ctx.state["schedule"][span.image][ctx.stage]
            token_order, src, dst = bipartite_soft_matching(keys[b], r, class_token=bool(cls))
            groups, new_sizes = merge_step(ctx.state["sizes"][b], token_order, src, dst)
            ctx.state["sizes"][b] = new_sizes
            visual = token_order[cls:] - cls  # ordinals in the new sequence order ([CLS] stays first)
            keep.append(visual.sort().values)
            order.append(visual)
            merges.append([Merge(slot=t - cls, sources=m - cls, weights=w) for t, m, w in groups])
            sizes.append(new_sizes[cls:])
        with_sizes = self.prop_attn and any(bool((s > 1).any()) for s in sizes)
        return KeepPlan(keep=keep, merges=merges, order=order, sizes=sizes if with_sizes else None)

    # --------------------------------------------------------------------- at the tower's output (pre_llm)
    def _tower_output_plan(self, ctx: SiteContext) -> KeepPlan:
        layout, cls = ctx.layout, int(ctx.info.vision_has_cls)
        keys = ctx.signals[VisionKeys(layer=ctx.info.vision_feature_layer)].cpu()  # [images, T, d]
        keep, merges = [], []
        for b in range(layout.batch_size):
            kept, sample_merges = [], []
            for span, sl in layout.ordinal_slices(b):
                patch = span.patch_index
                rows, cols = span.grid or (0, 0)
                patches = rows * cols
                extra = int((patch < 0).sum())  # [CLS] in the layout ("full" feature selection) stays, unmerged
                if span.view is not None or not torch.equal(patch[extra:], torch.arange(patches)) or extra > cls:
                    raise VTPruneError(
                        f"tome runs on single-grid images (LLaVA-1.5) before the language model: image {span.image} "
                        "is not one encoder input with every patch in raster order (anyres tiles and video frames "
                        "are not supported yet)"
                    )
                target = keep_count(self.keep, patches, what=f"image {span.image}")
                groups = tower_output_groups(keys[span.image], patches - target, bool(cls))
                kept.append(torch.arange(sl.start, sl.start + extra))
                for members in groups:  # encoder tokens; the slot is the group's surviving token
                    slot = sl.start + extra + int(members[0]) - cls
                    kept.append(torch.tensor([slot]))
                    if members.numel() > 1:
                        weights = torch.full((members.numel(),), 1.0 / members.numel())
                        sample_merges.append(Merge(slot=slot, sources=members, weights=weights, space="encoder"))
            keep.append(torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long))
            merges.append(sample_merges)
        return KeepPlan(keep=keep, merges=merges)


def tower_output_groups(keys: Tensor, merged: int, class_token: bool) -> list[Tensor]:
    """ToMe steps on one image's tower-output keys [T, d] until `merged` patches are merged away: per remaining patch
    token, its group of encoder tokens (the surviving token first). Each step merges at most half the tokens; the
    next step matches on the size-weighted mean keys of the groups."""
    t = keys.shape[0]
    metric, sizes = keys.float(), torch.ones(t)
    groups = [torch.tensor([i]) for i in range(t)]
    while merged > 0:
        order, src, dst = bipartite_soft_matching(metric, merged, class_token)
        for target in dst.unique().tolist():
            sources = src[dst == target]
            total = sizes[target] + sizes[sources].sum()
            metric[target] = (metric[target] * sizes[target] + (metric[sources] * sizes[sources, None]).sum(0)) / total
            groups[target] = torch.cat([groups[target], *(groups[s] for s in sources.sort().values.tolist())])
            sizes[target] = total
        metric, sizes, groups = metric[order], sizes[order], [groups[i] for i in order.tolist()]
        merged -= int(src.numel())
    return sorted(groups[int(class_token):], key=lambda g: int(g[0]))
