"""Plain torch compaction ops: the reference path, used on every device without Triton and whenever gradients flow.

Without gradients the gathers write into preallocated outputs (`index_select(out=...)`, far cheaper on the CPU than
`torch.gather` with an expanded index); with gradients they use differentiable indexing, so gradients flow back to
the kept tokens (and, through `merge_tokens`, to every merged source with its weight).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gather_sequence(x: Tensor, index: Tensor, valid: Tensor, dim: int = 1) -> Tensor:
    """x: batch at dim 0, sequence at `dim`. Returns x gathered along `dim` by index [B, L']; invalid slots are 0."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    if _needs_grad(x):
        out = torch.stack([torch.index_select(x[b], dim - 1, index[b]) for b in range(x.shape[0])])
        return out if bool(valid.all()) else out.masked_fill(~valid.view(shape), 0)
    out = x.new_empty(*[s if i != dim else index.shape[1] for i, s in enumerate(x.shape)])
    for b in range(x.shape[0]):
        torch.index_select(x[b], dim - 1, index[b], out=out[b])
    if not bool(valid.all()):
        out.masked_fill_(~valid.view(shape), 0)
    return out


def compact_sequence(
    hidden: Tensor, positions: Tensor | None, mask: Tensor | None, index: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gather hidden [B, L, D], positions [B, L] or [P, B, L] and mask [B, L] (both optional) to the kept tokens."""
    hidden = gather_sequence(hidden, index, valid, dim=1)
    if positions is not None and positions.dim() == 3:
        positions = gather_sequence(positions.transpose(0, 1), index, valid, dim=2).transpose(0, 1)
    elif positions is not None:
        positions = gather_sequence(positions, index, valid, dim=1)
    if mask is not None:
        mask = gather_sequence(mask, index, valid, dim=1)
    return hidden, positions, mask


def compact_cache(layers: Sequence[tuple[Tensor, Tensor]], index: Tensor, valid: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Gather each layer's keys and values [B, H, L, d] along the sequence: index [B, L'] (every head keeps the same
    positions) or [B, H, L'] (per head); valid [B, L'] (padding slots are 0)."""
    if index.dim() == 2:
        return [(gather_sequence(k, index, valid, dim=2), gather_sequence(v, index, valid, dim=2)) for k, v in layers]
    keep = valid[:, None, :, None]
    out = []
    for keys, values in layers:
        expanded = index[..., None].expand(*index.shape, keys.shape[-1])
        out.append((
            torch.gather(keys, 2, expanded).masked_fill(~keep, 0),
            torch.gather(values, 2, expanded).masked_fill(~keep, 0),
        ))
    return out


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
    sums = sums.index_add(0, segment, rows)
    out[batch, slot] = sums.to(x.dtype)
    return out
