"""Compaction kernels: gather of hidden states, positions, masks and KV cache; weighted merges.

Every op runs the plain torch path; a Triton path for CUDA tensors can be registered per op with identical results.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor

from . import torch_ops
from .torch_ops import left_padded_index

_TRITON_OPS: dict[str, object] = {}


def _use_triton(x: Tensor, op: str) -> bool:
    return op in _TRITON_OPS and x.is_cuda and os.environ.get("VTPRUNE_KERNELS", "auto") != "torch"


def compact_sequence(
    hidden: Tensor, positions: Tensor, mask: Tensor, index: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gather hidden [B, L, D], positions [B, L] or [P, B, L], mask [B, L] by index/valid [B, L']."""
    if _use_triton(hidden, "compact_sequence"):
        return _TRITON_OPS["compact_sequence"](hidden, positions, mask, index, valid)
    return torch_ops.compact_sequence(hidden, positions, mask, index, valid)


def compact_cache(layers: Sequence[tuple[Tensor, Tensor]], index: Tensor, valid: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Gather every layer's keys/values [B, H, L, d] to the kept tokens."""
    if layers and _use_triton(layers[0][0], "compact_cache"):
        return _TRITON_OPS["compact_cache"](layers, index, valid)
    return torch_ops.compact_cache(layers, index, valid)


def merge_tokens(x: Tensor, batch: Tensor, slot: Tensor, offsets: Tensor, sources: Tensor, weights: Tensor) -> Tensor:
    """Weighted segment sums into slots (CSR layout); see `torch_ops.merge_tokens`."""
    if _use_triton(x, "merge_tokens"):
        return _TRITON_OPS["merge_tokens"](x, batch, slot, offsets, sources, weights)
    return torch_ops.merge_tokens(x, batch, slot, offsets, sources, weights)


gather_sequence = torch_ops.gather_sequence

__all__ = ["compact_cache", "compact_sequence", "gather_sequence", "left_padded_index", "merge_tokens"]
