"""`apply_cut`: the one path through which every site applies a compiled keep plan (`vtprune.core.cut.Cut`)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..core.cut import Cut
from ..core.errors import VTPruneError
from ..core.plan import Merge
from .ops import compact_sequence, gather_sequence, merge_tokens


def apply_cut(
    cut: Cut,
    hidden: Tensor,
    positions: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    encoder_merge: Callable[[Tensor, list[list[Merge]]], Tensor] | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """hidden [B, L, D] (and positions [B, L] / [P, B, L], mask [B, L]) -> the cut sequence [B, L', ...].

    In order: merges of vision-encoder tokens written into their slots by the site's `encoder_merge` (a site without
    one refuses them), sequence-space merges (`merge_tokens`), one gather of hidden states, positions and mask
    (`compact_sequence`), then the permutation the plan's `order` asks for. Positions are gathered as given: a site
    that renumbers computes the new values on the old sequence first.
    """
    device = hidden.device
    if any(cut.encoder_merges):
        if encoder_merge is None:
            raise VTPruneError("this site cannot merge vision-encoder tokens (Merge space='encoder'); only pre_llm can")
        hidden = encoder_merge(hidden, cut.encoder_merges)
    if cut.merges is not None:
        table = cut.merges.to(device)
        hidden = merge_tokens(
            hidden, table.batch, table.slot, table.offsets, table.sources, table.weights, backend=backend
        )
    index, valid = cut.index.to(device), cut.valid.to(device)
    hidden, positions, mask = compact_sequence(hidden, positions, mask, index, valid, backend=backend)
    if cut.reorder is not None:
        reorder = cut.reorder.to(device)
        hidden = gather_sequence(hidden, reorder, torch.ones_like(reorder, dtype=torch.bool), dim=1)
    return hidden, positions, mask
