"""The keep plan: what a method decides at a site, in terms of visual ordinals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import VTPruneError
from .layout import VisualLayout


@dataclass
class Merge:
    """A token made from several tokens: it takes the slot of `slot` and the value sum(weights * sources).

    `slot` is a visual ordinal of one sample at the site and must be among the kept ordinals. With space="sequence"
    the sources are visual ordinals too, combined from the hidden states at the site. With space="encoder" (pre_llm
    only, needs the `ProjectorInput` signal) they are token indices of the slot's image in the vision encoder's
    sequence ([CLS] first when the tower has one), combined before the projector, which then maps the result. A
    sequence merge with no source writes a zero token (HoloV feeds such tokens).

    `view` (space="encoder" only) names the encoder input the sources belong to (its index in the encoder's batch, as
    `VisualSpan.view` numbers them: an anyres tile, a base view, a frame); None: the slot's image (`span.image`).
    """

    slot: int
    sources: Tensor  # [m] long
    weights: Tensor  # [m] float
    space: str = "sequence"  # "sequence" | "encoder"
    view: int | None = None  # space="encoder": the encoder input of the sources; None: the slot's image


@dataclass
class KeepPlan:
    """Per sample, the visual ordinals kept (ascending), optional scores and merges.

    At the kv_cache site `heads` says what one layer's cache keeps: per sample, [H_c, C_b] sequence positions per cache
    head (any token, text included); `keep` then lists the visual ordinals kept by at least one head (see `keep_heads`).
    """

    keep: list[Tensor]
    scores: list[Tensor] | None = None  # per sample: [n_visual] score of every visual token (trace, heatmaps)
    merges: list[list[Merge]] = field(default_factory=list)  # per sample (empty list: no merges)
    heads: list[Tensor] | None = None  # kv_cache site, per sample: [H_c, C_b] kept sequence positions per head
    # per sample: the kept ordinals in the order their contents take in the new sequence (None: ascending). The
    # contents of kept slots are permuted within each image; positions belong to the slots.
    order: list[Tensor] | None = None
    # encoder site, per sample: [K] float, how many original tokens each kept token stands for, aligned with
    # `sequence_order(sample)`. Given, the encoder's later blocks attend proportionally to size (ToMe: log(size) added
    # to every key's attention logits) until a later cut's plan says otherwise; None: plain attention.
    sizes: list[Tensor] | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # anything the method reports for the trace

    def validate(self, layout: VisualLayout) -> None:
        """Refuse a plan that does not fit `layout`: kept ordinals in range, strictly ascending (sorted, unique); merge
        slots kept, each slot merged once, sequence-space sources in range, weights one per source; `order` a
        permutation of the kept ordinals within each image."""
        if len(self.keep) != layout.batch_size:
            raise VTPruneError(f"plan has {len(self.keep)} samples, the batch has {layout.batch_size}")
        if self.merges and len(self.merges) != layout.batch_size:
            raise VTPruneError(f"plan has merges for {len(self.merges)} samples, the batch has {layout.batch_size}")
        for b, kept in enumerate(self.keep):
            n = layout.num_visual(b)
            if kept.dim() != 1 or kept.dtype not in (torch.int64, torch.int32):
                raise VTPruneError(f"plan's kept ordinals of sample {b} must be a 1-D integer tensor")
            if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n):
                raise VTPruneError(f"plan keeps ordinals outside 0..{n - 1} in sample {b}")
            if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
                raise VTPruneError(f"plan's kept ordinals of sample {b} are not strictly ascending (sorted, unique)")
        for b, merges in enumerate(self.merges):
            kept, slots, n = set(self.keep[b].tolist()), set(), layout.num_visual(b)
            sequence, which = [], []  # sequence-space sources (and their merges), range-checked at once below
            for i, merge in enumerate(merges):
                if merge.slot not in kept:
                    raise VTPruneError(f"merge slot {merge.slot} of sample {b} is not a kept token")
                if merge.slot in slots:
                    raise VTPruneError(f"merge slot {merge.slot} of sample {b} is merged into twice")
                slots.add(merge.slot)
                if merge.space not in ("sequence", "encoder"):
                    raise VTPruneError(f"merge space {merge.space!r}: use 'sequence' or 'encoder'")
                sources = merge.sources
                if sources.dim() != 1 or merge.weights.shape != sources.shape:
                    raise VTPruneError(f"merge into slot {merge.slot} of sample {b} needs [m] sources and [m] weights")
                if merge.view is not None and (merge.space != "encoder" or merge.view < 0):
                    raise VTPruneError(f"merge into slot {merge.slot} of sample {b} names an encoder input "
                                       f"(view={merge.view}): only a space='encoder' merge can, with a view >= 0")
                if not sources.numel() and merge.space != "sequence":  # no sequence source: a zero token
                    raise VTPruneError(f"encoder merge into slot {merge.slot} of sample {b} has no source")
                if merge.space == "sequence":
                    sequence.append(sources.cpu()), which.append(i)
            if sequence and (outside := _outside(sequence, n)) is not None:
                slot = merges[which[outside]].slot
                raise VTPruneError(f"merge into slot {slot} of sample {b} draws on ordinals outside 0..{n - 1}")
        for b, sizes in enumerate(self.sizes or []):
            if sizes.shape != self.keep[b].shape or not bool((sizes >= 1).all()):
                raise VTPruneError(f"plan's sizes of sample {b} must be one value >= 1 per kept token")
        if self.sizes is not None and len(self.sizes) != layout.batch_size:
            raise VTPruneError(f"plan has sizes for {len(self.sizes)} samples, the batch has {layout.batch_size}")
        for b, order in enumerate(self.order or []):
            kept = self.keep[b].cpu()
            if not torch.equal(torch.sort(order.cpu()).values, kept):
                raise VTPruneError(f"plan's order of sample {b} is not a permutation of its kept ordinals")
            image_of = torch.zeros(layout.num_visual(b), dtype=torch.long)
            for i, (_, sl) in enumerate(layout.ordinal_slices(b)):
                image_of[sl] = i
            if not torch.equal(image_of[order.cpu()], image_of[kept]):
                raise VTPruneError(f"plan's order of sample {b} moves tokens between images")

    def sequence_order(self, sample: int) -> Tensor:
        """The kept ordinals of `sample` in the order they take in the new sequence."""
        return self.keep[sample] if self.order is None else self.order[sample]

    def keep_positions(self, layout: VisualLayout) -> list[Tensor]:
        """Per sample, the sorted sequence positions to keep: every non-visual position plus the kept visual ones."""
        out = []
        for b in range(layout.batch_size):
            keep = torch.ones(layout.seq_len, dtype=torch.bool)
            visual = layout.visual_positions(b)
            keep[visual] = False
            keep[visual[self.keep[b].cpu()]] = True
            out.append(keep.nonzero().squeeze(1))
        return out


def _outside(sources: list[Tensor], n: int) -> int | None:
    """The first of these source lists with an entry outside 0..n-1, or None (one read for all of them)."""
    every = torch.cat(sources)
    bad = (every < 0) | (every >= n)
    if not bool(bad.any()):
        return None
    owner = torch.arange(len(sources)).repeat_interleave(torch.tensor([t.numel() for t in sources]))
    return int(owner[bad][0])


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, ascending. Ties go to the lower index (stable), on any device."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def keep_heads(layout: VisualLayout, heads: list[Tensor], scores: list[Tensor] | None = None) -> KeepPlan:
    """A kv_cache plan from per-head kept positions (per sample [H_c, C_b]); `keep` = visual ordinals any head keeps."""
    keep = []
    for b, positions in enumerate(heads):
        visual = layout.visual_positions(b)
        kept = torch.zeros(layout.seq_len, dtype=torch.bool)
        kept[positions.flatten().cpu()] = True
        keep.append(kept[visual].nonzero().squeeze(1))
    return KeepPlan(keep=keep, scores=scores, heads=heads)


def keep_all(layout: VisualLayout) -> KeepPlan:
    return KeepPlan(keep=[torch.arange(layout.num_visual(b)) for b in range(layout.batch_size)])
