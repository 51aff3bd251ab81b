"""The trace of a session: for every prefill forward, the visual layout at the input and what each cut kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .layout import VisualLayout
from .plan import KeepPlan, Merge

if TYPE_CHECKING:
    from .method import Method, SiteContext


@dataclass
class SiteRecord:
    """What one cut did to one sample. Ordinals are the sample's original visual ordinals."""

    site: str
    layer: int | None
    sample: int
    before: Tensor  # ordinals present before the cut
    kept: Tensor  # ordinals present after the cut (merged tokens sit at a kept ordinal)
    scores: Tensor | None = None  # [len(before)] the method's score of each token present before the cut
    # merged tokens: {"slot", "sources", "weights", "space"} in ordinals; for space "encoder" also "encoder_tokens"
    # (the encoder's token indices), and "sources" holds -1 for a token that is no patch (e.g. [CLS]) or whose patch
    # has no token in the layout; a merge that names its encoder input also has "view"
    merged: list[dict[str, Any]] = field(default_factory=list)
    cache_positions: Tensor | None = None  # kv_cache site: [H_c, C] positions (in the layer's sequence) each head kept
    notes: dict[str, Any] = field(default_factory=dict)  # what the method reported (KeepPlan.notes)

    @property
    def visual_before(self) -> int:
        return int(self.before.numel())

    @property
    def visual_after(self) -> int:
        return int(self.kept.numel())


@dataclass
class ForwardRecord:
    """One prefill forward: the visual layout at the language-model input and every cut made."""

    layout: VisualLayout
    sites: list[SiteRecord] = field(default_factory=list)


class Trace:
    """Records every prefill forward run inside `with method(model) as trace:`."""

    def __init__(self, method: "Method") -> None:
        self.method = method
        self.forwards: list[ForwardRecord] = []

    def summary(self) -> list[dict[str, Any]]:
        """Per forward, sample and cut: visual tokens before/after and the kept original ordinals."""
        rows = []
        for f, record in enumerate(self.forwards):
            for site in record.sites:
                rows.append(
                    {
                        "forward": f,
                        "sample": site.sample,
                        "site": site.site,
                        "layer": site.layer,
                        "visual_before": site.visual_before,
                        "visual_after": site.visual_after,
                        "kept_indices": site.kept.tolist(),
                        "merged": len(site.merged),
                    }
                )
        return rows

    def visual_tokens(self, forward: int = -1) -> list[tuple[int, int]]:
        """Per sample of a forward: (visual tokens at the LLM input, visual tokens after the last cut)."""
        record = self.forwards[forward]
        out = []
        for b in range(record.layout.batch_size):
            sites = [s for s in record.sites if s.sample == b]
            before = record.layout.num_visual(b)
            out.append((before, sites[-1].visual_after if sites else before))
        return out

    def image_view(self, image: int, forward: int = -1) -> tuple[int, Any, slice]:
        """(sample, span, ordinal slice) of the span that shows the whole image: its only span, an anyres base view
        or a thumbnail (not a tile), else its first span."""
        record = self.forwards[forward]
        found = [(b, span, sl) for b in range(record.layout.batch_size)
                 for span, sl in record.layout.ordinal_slices(b) if span.image == image]
        if not found:
            raise KeyError(f"image {image} is not in forward {forward}")
        return next((f for f in found if f[1].kind not in ("tile", "tiles")), found[0])

    def image_map(self, image: int, forward: int = -1) -> tuple[Tensor, Tensor]:
        """For one image, on the patch grid of its whole view (`image_view`): (scores, kept), from the first cut that
        scored it and the last cut.

        scores: float [rows, cols] (NaN where unscored); kept: bool [rows, cols].
        """
        return self._span_map(self.forwards[forward], *self.image_view(image, forward))

    @staticmethod
    def _span_map(record: ForwardRecord, sample: int, span, sl: slice) -> tuple[Tensor, Tensor]:
        rows, cols = span.grid
        scores = torch.full((rows * cols,), float("nan"))
        kept = torch.zeros(rows * cols, dtype=torch.bool)
        sites = [s for s in record.sites if s.sample == sample]
        patch = span.patch_index
        is_patch = patch >= 0
        scored = next((s for s in sites if s.scores is not None), None)
        if scored is not None:
            full = torch.full((record.layout.num_visual(sample),), float("nan"))
            full[scored.before] = scored.scores.float()
            scores[patch[is_patch]] = full[sl][is_patch]
        present = torch.zeros(record.layout.num_visual(sample), dtype=torch.bool)
        present[sites[-1].kept if sites else torch.arange(record.layout.num_visual(sample))] = True
        for site in sites:  # a slot whose merged value does not draw on its own token no longer shows that patch
            for merge in site.merged:
                if merge["slot"] not in merge["sources"]:
                    present[merge["slot"]] = False
        kept[patch[is_patch]] = present[sl][is_patch]
        return scores.view(rows, cols), kept.view(rows, cols)

    def __str__(self) -> str:
        lines = [f"{'fwd':>3} {'sample':>6} {'site':<10} {'layer':>5} {'before':>6} {'after':>6}"]
        for row in self.summary():
            layer = "" if row["layer"] is None else row["layer"]
            lines.append(
                f"{row['forward']:>3} {row['sample']:>6} {row['site']:<10} {layer:>5} "
                f"{row['visual_before']:>6} {row['visual_after']:>6}"
            )
        return "\n".join(lines)


def site_records(ctx: SiteContext, plan: KeepPlan) -> list[SiteRecord]:
    """One record per sample of what the cut at `ctx` kept and merged, in original visual ordinals."""
    layout, records = ctx.layout, []
    for b in range(layout.batch_size):
        original = layout.original_ordinal[b]
        merged = merge_records(ctx, b, plan.merges[b] if plan.merges else [])
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


def merge_records(ctx: SiteContext, sample: int, merges: list[Merge]) -> list[dict[str, Any]]:
    """The merges of one sample in original ordinals (`merge_record` each), read back to the host at once."""
    if not merges:
        return []
    original = ctx.layout.original_ordinal[sample].tolist()
    parts = [_merge_sources(ctx, sample, m) for m in merges]  # (source ordinals, encoder tokens or None)
    tokens = [m.sources.cpu() for m in merges]
    weights = _split(torch.cat([m.weights.float().cpu() for m in merges]).tolist(), [m.weights.numel() for m in merges])
    ordinals = _split(torch.cat([o for o, _ in parts]).tolist(), [o.numel() for o, _ in parts])
    encoder = _split(torch.cat(tokens).tolist(), [t.numel() for t in tokens])
    out = []
    for merge, w, o, t in zip(merges, weights, ordinals, encoder):
        record = {"slot": original[merge.slot], "weights": w, "space": merge.space, "sources": o}
        if merge.space != "sequence":
            record["encoder_tokens"] = t
            if merge.view is not None:
                record["view"] = merge.view
        out.append(record)
    return out


def _split(values: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for size in sizes:
        out.append(values[start : start + size])
        start += size
    return out


def merge_record(ctx: SiteContext, sample: int, merge: Merge) -> dict[str, Any]:
    """A merge in original ordinals; encoder tokens map to the ordinal of their patch (-1 when none, e.g. [CLS])."""
    return merge_records(ctx, sample, [merge])[0]


def _merge_sources(ctx: SiteContext, sample: int, merge: Merge) -> tuple[Tensor, Tensor | None]:
    """(original ordinals of a merge's sources [m], its encoder tokens [m] or None for a sequence merge)."""
    layout = ctx.layout
    original = layout.original_ordinal[sample]
    sources = merge.sources.cpu()
    if merge.space == "sequence":
        return original[sources], None
    patch = sources - int(ctx.info.vision_has_cls)
    if merge.view is not None:  # the ordinal whose token is that patch of that encoder input (-1: none is)
        lookup = torch.full((max(int(patch.max()) if patch.numel() else 0, 0) + 1,), -1, dtype=torch.long)
        for span, sl in layout.ordinal_slices(sample):
            view = span.view if span.view is not None else torch.full_like(span.patch_index, span.image)
            view_patch = span.view_patch if span.view_patch is not None else span.patch_index
            mine = (view == merge.view) & (span.patch_index >= 0) & (view_patch < lookup.numel())
            lookup[view_patch[mine]] = original[sl][mine]
        return torch.where(patch >= 0, lookup[patch.clamp(min=0)], torch.full_like(patch, -1)), sources
    span, sl = next((span, sl) for span, sl in layout.ordinal_slices(sample) if sl.start <= merge.slot < sl.stop)
    ordinal_of_patch = torch.full((span.grid[0] * span.grid[1],), -1, dtype=torch.long)
    is_patch = span.patch_index >= 0
    ordinal_of_patch[span.patch_index[is_patch]] = original[sl][is_patch]
    return torch.where(patch >= 0, ordinal_of_patch[patch.clamp(min=0)], torch.full_like(patch, -1)), sources
