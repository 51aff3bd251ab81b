"""Applying a keep plan to a sequence, shared by the adapters: weighted merges and the trace's records of a cut."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..core.layout import VisualLayout
from ..core.method import SiteContext
from ..core.plan import KeepPlan
from ..core.session import SiteRecord


def merge_planned(hidden: Tensor, plan: KeepPlan, layout: VisualLayout) -> Tensor:
    """hidden [B, L, D] with each of the plan's merged tokens written into its slot (positions from `layout`)."""
    batch, slot, sources, weights, counts = [], [], [], [], []
    for b, merges in enumerate(plan.merges):
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
        merged = [
            {
                "slot": int(original[m.slot]),
                "sources": original[m.sources.cpu()].tolist(),
                "weights": m.weights.float().cpu().tolist(),
            }
            for m in (plan.merges[b] if plan.merges else [])
        ]
        records.append(
            SiteRecord(
                site=ctx.site,
                layer=ctx.layer,
                sample=b,
                before=original.clone(),
                kept=original[plan.keep[b].cpu()],
                scores=plan.scores[b] if plan.scores is not None else None,
                merged=merged,
                cache_positions=plan.heads[b].cpu() if plan.heads is not None else None,
            )
        )
    return records
