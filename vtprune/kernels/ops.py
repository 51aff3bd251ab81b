"""Backend dispatch of the compaction ops (see the package docstring)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor

from . import torch_ops
from .torch_ops import _needs_grad

try:
    import triton  # noqa: F401
except ImportError:  # no triton: nothing is registered, every op runs the torch path
    triton = None

_TRITON_OPS: dict[str, object] = {}
if triton is not None:
    from . import triton_ops

    _TRITON_OPS.update(triton_ops.OPS)

BACKENDS = ("auto", "torch", "triton")


def _use_triton(x: Tensor, op: str, backend: str | None, *inputs: Tensor | None) -> bool:
    choice = backend or os.environ.get("VTPRUNE_KERNELS") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend {choice!r}: use one of {', '.join(BACKENDS)} (argument or $VTPRUNE_KERNELS)")
    if choice == "torch" or _needs_grad(x, *inputs):
        return False
    if choice == "auto":
        return op in _TRITON_OPS and x.is_cuda
    if op not in _TRITON_OPS:
        raise RuntimeError(f"kernel backend 'triton' for {op}: triton is not installed")
    if not x.is_cuda and not triton_ops.interpreting():
        raise RuntimeError(f"kernel backend 'triton' for {op} on {x.device} tensors needs TRITON_INTERPRET=1")
    return True


def compact_sequence(
    hidden: Tensor, positions: Tensor | None, mask: Tensor | None, index: Tensor, valid: Tensor,
    *, backend: str | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gather hidden [B, L, D], positions [B, L] or [P, B, L] and mask [B, L] (optional) by index/valid [B, L']."""
    if _use_triton(hidden, "compact_sequence", backend):
        return _TRITON_OPS["compact_sequence"](hidden, positions, mask, index, valid)
    return torch_ops.compact_sequence(hidden, positions, mask, index, valid)


def compact_cache(
    layers: Sequence[tuple[Tensor, Tensor]], index: Tensor, valid: Tensor, *, backend: str | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Gather every layer's keys/values [B, H, L, d] to the kept entries: index [B, L'] (the same positions in every
    head) or [B, H, L'] (per head), valid [B, L']. One launch on the Triton path."""
    tensors = [x for pair in layers for x in pair]
    if tensors and _use_triton(tensors[0], "compact_cache", backend, *tensors):
        return _TRITON_OPS["compact_cache"](layers, index, valid)
    return torch_ops.compact_cache(layers, index, valid)


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
    if _use_triton(x, "merge_tokens", backend, weights):
        return _TRITON_OPS["merge_tokens"](x, batch, slot, offsets, sources, weights)
    return torch_ops.merge_tokens(x, batch, slot, offsets, sources, weights)


gather_sequence = torch_ops.gather_sequence
