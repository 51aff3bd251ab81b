"""Compaction kernels: gather of hidden states, positions, masks and KV cache; weighted merges.

Each op runs the Triton kernel of `triton_ops` on CUDA tensors when triton is installed, else the plain torch path of
`torch_ops`; both give the same results (see `triton_ops` for the one tolerance). The backend of a call:
`backend=` argument, else $VTPRUNE_KERNELS, else "auto":
- "auto": Triton for CUDA tensors, torch otherwise;
- "torch": always torch;
- "triton": always Triton; on CPU tensors this needs the Triton interpreter (TRITON_INTERPRET=1), for tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor

from . import torch_ops
from .torch_ops import left_padded_heads, left_padded_index

try:
    import triton  # noqa: F401
except ImportError:  # no triton: nothing is registered, every op runs the torch path
    triton = None

_TRITON_OPS: dict[str, object] = {}
if triton is not None:
    from . import triton_ops

    _TRITON_OPS.update(triton_ops.OPS)

BACKENDS = ("auto", "torch", "triton")


def _use_triton(x: Tensor, op: str, backend: str | None) -> bool:
    choice = backend or os.environ.get("VTPRUNE_KERNELS") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend {choice!r}: use one of {', '.join(BACKENDS)} (argument or $VTPRUNE_KERNELS)")
    if choice == "torch":
        return False
    if choice == "auto":
        return op in _TRITON_OPS and x.is_cuda
    if op not in _TRITON_OPS:
        raise RuntimeError(f"kernel backend 'triton' for {op}: triton is not installed")
    if not x.is_cuda and not triton_ops.interpreting():
        raise RuntimeError(f"kernel backend 'triton' for {op} on {x.device} tensors needs TRITON_INTERPRET=1")
    return True


def compact_sequence(
    hidden: Tensor, positions: Tensor, mask: Tensor, index: Tensor, valid: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Gather hidden [B, L, D], positions [B, L] or [P, B, L], mask [B, L] by index/valid [B, L']."""
    if _use_triton(hidden, "compact_sequence", backend):
        return _TRITON_OPS["compact_sequence"](hidden, positions, mask, index, valid)
    return torch_ops.compact_sequence(hidden, positions, mask, index, valid)


def compact_cache(
    layers: Sequence[tuple[Tensor, Tensor]], index: Tensor, valid: Tensor, *, backend: str | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Gather every layer's keys/values [B, H, L, d] to the kept tokens."""
    if layers and _use_triton(layers[0][0], "compact_cache", backend):
        return _TRITON_OPS["compact_cache"](layers, index, valid)
    return torch_ops.compact_cache(layers, index, valid)


def compact_cache_heads(keys: Tensor, values: Tensor, index: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Gather one layer's keys/values [B, H, L, d] with a different selection per head: index [B, H, C], valid [B, C].

    Torch path only (one gather per tensor); no Triton kernel yet."""
    return torch_ops.compact_cache_heads(keys, values, index, valid)


def merge_tokens(
    x: Tensor,
    batch: Tensor,
    slot: Tensor,
    offsets: Tensor,
    sources: Tensor,
    weights: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """Weighted segment sums into slots (CSR layout); see `torch_ops.merge_tokens`."""
    if _use_triton(x, "merge_tokens", backend):
        return _TRITON_OPS["merge_tokens"](x, batch, slot, offsets, sources, weights)
    return torch_ops.merge_tokens(x, batch, slot, offsets, sources, weights)


gather_sequence = torch_ops.gather_sequence

__all__ = [
    "BACKENDS", "compact_cache", "compact_cache_heads", "compact_sequence", "gather_sequence", "left_padded_heads",
    "left_padded_index", "merge_tokens",
]
