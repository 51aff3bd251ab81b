"""A keep plan compiled for one sequence: the gather indices every site applies through `vtprune.kernels.apply_cut`.

`compile_cut` validates the plan once and turns it, on the CPU, into what the kernels need: per sample the sequence
positions kept (every text position, the padding the new length still needs, and the kept visual tokens), a
left-padded gather index, the sequence-space merges in CSR form (in sequence positions), the permutation
`KeepPlan.order` asks for, and the layout after the cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import VTPruneError
from .layout import VisualLayout
from .plan import KeepPlan, Merge


@dataclass
class MergeTable:
    """Sequence-space merges in CSR form: segment s writes sum(weights[e] * x[batch[s], sources[e]]) into
    x[batch[s], slot[s]] for e in offsets[s] .. offsets[s+1]-1 (positions of the sequence before the cut)."""

    batch: Tensor  # [S] long
    slot: Tensor  # [S] long
    offsets: Tensor  # [S + 1] long
    sources: Tensor  # [E] long
    weights: Tensor  # [E] float32

    def to(self, device: torch.device) -> "MergeTable":
        return MergeTable(*(t.to(device) for t in (self.batch, self.slot, self.offsets, self.sources, self.weights)))


@dataclass
class Cut:
    """What applying a plan does to a sequence [B, L] -> [B, L']."""

    keep: list[Tensor]  # per sample: ascending positions of the old sequence kept
    index: Tensor  # [B, L'] long: old position of every new slot (kept tokens right-aligned: left padding)
    valid: Tensor  # [B, L'] bool: False at the padding slots
    new_position: list[Tensor]  # per sample [L] long: new position of each old position (read at kept positions)
    merges: MergeTable | None  # sequence-space merges, applied before the gather
    encoder_merges: list[list[Merge]]  # per sample: merges of vision-encoder tokens (space="encoder"), for the site
    reorder: Tensor | None  # [B, L'] long: new slot whose contents each slot takes (KeepPlan.order); None: no reorder
    layout: VisualLayout  # the visual tokens of the new sequence

    @property
    def length(self) -> int:
        return int(self.index.shape[1])


def left_padded_index(keep: list[Tensor], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Ragged per-sample keep lists -> a padded gather index.

    keep[b]: ascending positions of sample b to keep. Returns index [B, L'] and valid [B, L'] (bool), L' = max length;
    kept tokens are right-aligned (left padding), so the last token of every sample stays last.
    """
    length = max((int(k.numel()) for k in keep), default=0)
    index = torch.zeros(len(keep), length, dtype=torch.long)
    valid = torch.zeros(len(keep), length, dtype=torch.bool)
    for b, kept in enumerate(keep):
        n = int(kept.numel())
        if n:
            index[b, length - n :] = kept.cpu()
            valid[b, length - n :] = True
    return index.to(device), valid.to(device)


def compile_cut(plan: KeepPlan, layout: VisualLayout, padding: Tensor | None = None) -> Cut:
    """Validate `plan` against `layout` and compile it. Padding positions are kept like text, as many as the new
    length needs: `padding` ([B, L] bool, True at padding) lets a sample drop the padding it no longer needs, so a
    ragged batch shrinks to its longest sample (a keep-all plan still changes nothing, whatever the mask); a sample
    that keeps fewer tokens gets more left padding."""
    plan.validate(layout)
    batch, length = layout.batch_size, layout.seq_len
    keep = plan.keep_positions(layout)
    if padding is not None:
        keep = _without_spare_padding(keep, padding.cpu())
    index, valid = left_padded_index(keep)
    new_length = index.shape[1]
    new_position = []
    for b in range(batch):
        lookup = torch.zeros(length, dtype=torch.long)
        lookup[keep[b]] = torch.arange(keep[b].numel()) + (new_length - keep[b].numel())
        new_position.append(lookup)
    order = [plan.sequence_order(b).cpu() for b in range(batch)]
    return Cut(
        keep=keep,
        index=index,
        valid=valid,
        new_position=new_position,
        merges=_merge_table(plan, layout),
        encoder_merges=[[m for m in merges if m.space == "encoder"] for merges in plan.merges],
        reorder=_reorder(plan, layout, new_position, new_length),
        layout=layout.after_keep(order, new_position, new_length),
    )


def _without_spare_padding(keep: list[Tensor], padding: Tensor) -> list[Tensor]:
    """Per sample, the kept positions less the padding beyond what the batch's new length needs: that length is the
    most real tokens any sample keeps plus the padding every sample has; each sample keeps its last pads up to it."""
    pads = [padding[b, kept] for b, kept in enumerate(keep)]  # per sample [n_b] bool: is each kept position padding
    real = [int((~p).sum()) for p in pads]
    length = max(real, default=0) + min((int(p.sum()) for p in pads), default=0)
    out = []
    for kept, pad, n in zip(keep, pads, real):
        spare = int(pad.sum()) - max(length - n, 0)  # the first `spare` pads go
        if spare > 0:
            drop = pad.nonzero().squeeze(1)[:spare]
            mask = torch.ones(kept.numel(), dtype=torch.bool)
            mask[drop] = False
            kept = kept[mask]
        out.append(kept)
    return out


def _merge_table(plan: KeepPlan, layout: VisualLayout) -> MergeTable | None:
    batch, slot, sources, weights, counts = [], [], [], [], []
    for b, merges in enumerate(plan.merges):
        positions = layout.visual_positions(b)
        for merge in merges:
            if merge.space != "sequence":
                continue
            batch.append(b)
            slot.append(merge.slot)  # an ordinal here, its position below (one lookup per sample)
            sources.append(positions[merge.sources.cpu()])
            weights.append(merge.weights.float().cpu())
            counts.append(merge.sources.numel())
    if not slot:
        return None
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    batch_t, ordinal = torch.tensor(batch), torch.tensor(slot)
    position = torch.zeros_like(ordinal)
    for b in range(len(plan.merges)):
        mine = batch_t == b
        position[mine] = layout.visual_positions(b)[ordinal[mine]]
    return MergeTable(batch_t, position, offsets, torch.cat(sources), torch.cat(weights))


def _reorder(plan: KeepPlan, layout: VisualLayout, new_position: list[Tensor], new_length: int) -> Tensor | None:
    """Kept slot i (ascending) takes the contents of plan.order[i]: the source slot of every new slot."""
    if plan.order is None:
        return None
    source = torch.arange(new_length).repeat(layout.batch_size, 1)  # [B, L']
    for b in range(layout.batch_size):
        visual = layout.visual_positions(b)
        slots = new_position[b][visual[plan.keep[b].cpu()]]
        source[b, slots] = new_position[b][visual[plan.order[b].cpu()]]
    return source


def left_padded_heads(keep: list[Tensor], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Ragged per-sample, per-head keep lists -> index [B, H, C] and valid [B, C].

    keep[b]: [H, C_b] positions of sample b kept by each head (every head keeps C_b). Kept entries are right-aligned
    (left padding); padding slots point at position 0.
    """
    heads = {int(k.shape[0]) for k in keep}
    if len(heads) > 1:
        raise VTPruneError(f"every sample must keep entries for the same number of heads, got {sorted(heads)}")
    length = max((int(k.shape[1]) for k in keep), default=0)
    index = torch.zeros(len(keep), heads.pop() if heads else 0, length, dtype=torch.long)
    valid = torch.zeros(len(keep), length, dtype=torch.bool)
    for b, kept in enumerate(keep):
        n = int(kept.shape[1])
        if n:
            index[b, :, length - n :] = kept.cpu()
            valid[b, length - n :] = True
    return index.to(device), valid.to(device)
