"""Compaction kernels: gather of hidden states, positions, masks and KV caches; weighted merges; `apply_cut`, the one
path through which every site applies a compiled keep plan.

Each op runs the Triton kernel of `triton_ops` on CUDA tensors when triton is installed, else the plain torch path of
`torch_ops`; both give the same results (see `triton_ops` for the one tolerance). When gradients flow through the
inputs the torch path runs (it is differentiable; the Triton kernels are not). The backend of a call: `backend=`
argument, else $VTPRUNE_KERNELS, else "auto":
- "auto": Triton for CUDA tensors, torch otherwise;
- "torch": always torch;
- "triton": always Triton; on CPU tensors this needs the Triton interpreter (TRITON_INTERPRET=1), for tests.
"""

from ..core.cut import left_padded_heads, left_padded_index
from .apply import apply_cut
from .ops import BACKENDS, compact_cache, compact_sequence, gather_sequence, merge_tokens

__all__ = [
    "BACKENDS", "apply_cut", "compact_cache", "compact_sequence", "gather_sequence", "left_padded_heads",
    "left_padded_index", "merge_tokens",
]
