"""Plain torch compaction ops: the reference path, used on every device without Triton."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def left_padded_index(keep: Sequence[Tensor], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Ragged per-sample keep lists -> a padded gather index.

    keep[b]: ascending positions of sample b to keep. Returns index [B, L'] and valid [B, L'] (bool), L' = max length;
    kept tokens are right-aligned (left padding), so the last token of every sample stays last.
    """
    length = max((int(k.numel()) for k in keep), default=0)
    index = torch.zeros(len(keep), length, dtype=torch.long, device=device)
    valid = torch.zeros(len(keep), length, dtype=torch.bool, device=device)
    for b, kept in enumerate(keep):
        n = int(kept.numel())
        if n:
            index[b, length - n :] = kept.to(device=device, dtype=torch.long)
            valid[b, length - n :] = True
    return index, valid


def left_padded_heads(keep: Sequence[Tensor], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Ragged per-sample, per-head keep lists -> a padded per-head gather index.

    keep[b]: [H, C_b] positions of sample b kept by each head (every head keeps C_b). Returns index [B, H, C] and
    valid [B, C] (bool), C = max C_b; kept entries are right-aligned (left padding), padding slots point at position 0.
    """
    heads = {int(k.shape[0]) for k in keep}
    if len(heads) > 1:
        raise ValueError(f"every sample must keep entries for the same number of heads, got {sorted(heads)}")
    length = max((int(k.shape[1]) for k in keep), default=0)
    index = torch.zeros(len(keep), heads.pop() if heads else 0, length, dtype=torch.long, device=device)
    valid = torch.zeros(len(keep), length, dtype=torch.bool, device=device)
    for b, kept in enumerate(keep):
        n = int(kept.shape[1])
        if n:
            index[b, :, length - n :] = kept.to(device=device, dtype=torch.long)
            valid[b, length - n :] = True
    return index, valid


def gather_sequence(x: Tensor, index: Tensor, valid: Tensor, dim: int = 1) -> Tensor:
    """x: batch at dim 0, sequence at `dim`. Returns x gathered along `dim` by index [B, L']; invalid slots are 0."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    # one index_select per sample, written in place: on CPU far cheaper than torch.gather with an index expanded over
    # the other dims (and than fresh intermediate tensors)
    out = x.new_empty(*[s if i != dim else index.shape[1] for i, s in enumerate(x.shape)])
    for b in range(x.shape[0]):
        torch.index_select(x[b], dim - 1, index[b], out=out[b])
    if not bool(valid.all()):
        out.masked_fill_(~valid.view(shape), 0)
    return out


def compact_sequence(
    hidden: Tensor, positions: Tensor, mask: Tensor, index: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gather hidden [B, L, D], positions [B, L] or [P, B, L] and mask [B, L] to the kept tokens."""
    hidden = gather_sequence(hidden, index, valid, dim=1)
    if positions.dim() == 3:
        positions = gather_sequence(positions.transpose(0, 1), index, valid, dim=2).transpose(0, 1)
    else:
        positions = gather_sequence(positions, index, valid, dim=1)
    mask = gather_sequence(mask, index, valid, dim=1)
    return hidden, positions, mask


def compact_cache(layers: Sequence[tuple[Tensor, Tensor]], index: Tensor, valid: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Gather each layer's keys and values [B, H, L, d] along the sequence to the kept tokens."""
    return [(gather_sequence(k, index, valid, dim=2), gather_sequence(v, index, valid, dim=2)) for k, v in layers]


def compact_cache_heads(keys: Tensor, values: Tensor, index: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Gather one layer's keys and values [B, H, L, d] per head: index [B, H, C], valid [B, C] (padding slots are 0)."""
    expanded = index[..., None].expand(*index.shape, keys.shape[-1])
    keep = valid[:, None, :, None]
    return (
        torch.gather(keys, 2, expanded).masked_fill(~keep, 0),
        torch.gather(values, 2, expanded).masked_fill(~keep, 0),
    )


def merge_tokens(
    x: Tensor, batch: Tensor, slot: Tensor, offsets: Tensor, sources: Tensor, weights: Tensor
) -> Tensor:
    """Weighted segment sums written into slots: out[batch[s], slot[s]] = sum_e weights[e] * x[batch[s], sources[e]].

    Segment s owns entries offsets[s] .. offsets[s+1]-1 of `sources`/`weights` (CSR layout). x: [B, L, D]. Computed
    in float32, stored in x's dtype. Other tokens are unchanged (x is not modified in place).
    """
    out = x.clone()
    if slot.numel() == 0:
        return out
    counts = (offsets[1:] - offsets[:-1]).to(torch.long)
    segment = torch.repeat_interleave(torch.arange(slot.numel(), device=x.device), counts)
    rows = x[batch[segment], sources].float() * weights.float()[:, None]  # [E, D]
    sums = torch.zeros(slot.numel(), x.shape[-1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, segment, rows)
    out[batch, slot] = sums.to(x.dtype)
    return out
