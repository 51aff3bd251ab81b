"""Applying a keep plan to a sequence, shared by the adapters: weighted merges and the trace's records of a cut."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .. import kernels
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout
from ..core.method import SiteContext
from ..core.plan import KeepPlan, Merge
from ..core.session import SiteRecord


def merge_planned(
    hidden: Tensor, plan: KeepPlan, layout: VisualLayout, encoder_merges: Callable[..., Tensor] | None = None
) -> Tensor:
    """hidden [B, L, D] with each of the plan's merged tokens written into its slot (positions from `layout`).

    Merges with space="encoder" go to `encoder_merges(hidden, merges_per_sample)`; a site without one refuses them.
    """
    by_space: dict[str, list[list[Merge]]] = {"sequence": [], "encoder": []}
    for merges in plan.merges:
        for space, chosen in by_space.items():
            chosen.append([m for m in merges if m.space == space])
    if any(by_space["encoder"]):
        if encoder_merges is None:
            raise VTPruneError("this site cannot merge vision-encoder tokens (Merge space='encoder'); only pre_llm can")
        hidden = encoder_merges(hidden, by_space["encoder"])
    if not any(by_space["sequence"]):
        return hidden
    batch, slot, sources, weights, counts = [], [], [], [], []
    for b, merges in enumerate(by_space["sequence"]):
        positions = layout.visual_positions(b)
        for merge in merges:
            batch.append(b)
            slot.append(int(positions[merge.slot]))
            sources.append(positions[merge.sources.cpu()])
            weights.append(merge.weights.float().cpu())
            counts.append(merge.sources.numel())
    device = hidden.device
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    return kernels.merge_tokens(
        hidden,
        torch.tensor(batch, device=device),
        torch.tensor(slot, device=device),
        offsets.to(device),
        torch.cat(sources).to(device),
        torch.cat(weights).to(device),
    )


def site_records(ctx: SiteContext, plan: KeepPlan) -> list[SiteRecord]:
    """One record per sample of what the cut at `ctx` kept and merged, in original visual ordinals."""
    layout, records = ctx.layout, []
    for b in range(layout.batch_size):
        original = layout.original_ordinal[b]
        merged = [merge_record(ctx, b, m) for m in (plan.merges[b] if plan.merges else [])]
        records.append(
            SiteRecord(
                site=ctx.site,
                layer=ctx.layer,
                sample=b,
                before=original.clone(),
                kept=original[plan.sequence_order(b).cpu()],
                scores=plan.scores[b] if plan.scores is not None else None,
                merged=merged,
                cache_positions=plan.heads[b].cpu() if plan.heads is not None else None,
                notes=plan.notes,
            )
        )
    return records


def merge_record(ctx: SiteContext, sample: int, merge: Merge) -> dict[str, Any]:
    """A merge in original ordinals; encoder tokens map to the ordinal of their patch (-1 when none, e.g. [CLS])."""
    layout = ctx.layout
    original = layout.original_ordinal[sample]
    sources = merge.sources.cpu()
    record = {"slot": int(original[merge.slot]), "weights": merge.weights.float().cpu().tolist(), "space": merge.space}
    if merge.space == "sequence":
        return {**record, "sources": original[sources].tolist()}
    span, sl = next((span, sl) for span, sl in layout.ordinal_slices(sample) if sl.start <= merge.slot < sl.stop)
    ordinal_of_patch = torch.full((span.grid[0] * span.grid[1],), -1, dtype=torch.long)
    is_patch = span.patch_index >= 0
    ordinal_of_patch[span.patch_index[is_patch]] = original[sl][is_patch]
    patch = sources - int(ctx.info.vision_has_cls)
    ordinals = torch.where(patch >= 0, ordinal_of_patch[patch.clamp(min=0)], torch.full_like(patch, -1))
    return {**record, "sources": ordinals.tolist(), "encoder_tokens": sources.tolist()}
