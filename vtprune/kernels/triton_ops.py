"""Triton compaction kernels: the same results as `torch_ops`, in fewer launches.

- `compact_sequence`: one launch gathers hidden states, positions (2-D or 3-D) and the mask.
- `compact_cache`: one launch gathers K and V of every layer. The kernel reads a table of base pointers (int64
  addresses) and copies elements as unsigned integers of the same width, so every dtype is copied bit for bit.
  Tensors are launched together when they share shape, strides and element size (always so for a transformers
  cache); a cache mixing layouts takes one launch per layout.
- `merge_tokens`: weighted segment sums in float32, one program per (segment, channel block).

Gathers copy bits, so they equal `torch_ops` bitwise (signed zeros included; on the CPU, torch's own gather rewrites
bfloat16 NaN payloads, 0x7fc0 -> 0xffff, so there only NaN positions match). `merge_tokens` agrees with `torch_ops` to
within one unit in the last place of x's dtype plus float32 rounding of the sums (see `merge_tokens`).

Kernels are wrapped with `triton.jit` at launch time, once per value of TRITON_INTERPRET: `triton.jit` decides when
it wraps a function whether it will run compiled (CUDA) or in the interpreter (CPU tensors), so a process, such as a
test session, can switch to the interpreter after this module was imported. For the same reason the kernels call
only builtins of triton.language, none of its jit-wrapped helpers (tl.cdiv, tl.zeros, tl.sum, ...): those were wrapped
when triton was imported and cannot be called from a kernel running in the other mode.
"""

import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

_ELEMENT = {1: tl.uint8, 2: tl.uint16, 4: tl.uint32, 8: tl.uint64}  # element size -> same-width integer type
_TILE = 4096  # elements copied by one program (BLOCK_T * BLOCK_D)


@functools.cache
def _jitted(fn: Callable, interpret_env: str | None) -> Callable:
    return triton.jit(fn)


def _jit(fn: Callable) -> Callable:
    return _jitted(fn, os.environ.get("TRITON_INTERPRET"))


def interpreting() -> bool:
    """True when kernels launched now run in the Triton interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return not isinstance(_jit(_compact_cache_kernel), JITFunction)


def _block_t(length: int, block_d: int) -> int:
    """Tokens per program for rows of `block_d` channels: about _TILE elements per program."""
    return min(triton.next_power_of_2(max(length, 1)), max(1, _TILE // block_d))


def _as_bytes(x: Tensor) -> Tensor:
    """Bool tensors as uint8 (same bytes), so that kernels load and store them as plain integers."""
    return x.view(torch.uint8) if x.dtype == torch.bool else x


# ------------------------------------------------------------------------------------------- compact_sequence
def _compact_sequence_kernel(
    hidden, positions, mask, index, valid, out_hidden, out_positions, out_mask,
    B, L_out, D, P,
    s_hb, s_hl, s_hd, s_pp, s_pb, s_pl, s_mb, s_ml, s_ib, s_il, s_vb, s_vl,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B * cdiv(L_out, BLOCK_T), cdiv(D, BLOCK_D)). One program: BLOCK_T output slots of one sample x BLOCK_D
    # hidden channels; programs of the first channel block also gather those slots' positions and mask.
    tiles = (L_out + BLOCK_T - 1) // BLOCK_T
    b = (tl.program_id(0) // tiles).to(tl.int64)
    t = (tl.program_id(0) % tiles) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] output slots
    in_range = t < L_out
    src = tl.load(index + b * s_ib + t * s_il, mask=in_range, other=0).to(tl.int64)  # [BLOCK_T] source tokens
    keep = in_range & (tl.load(valid + b * s_vb + t * s_vl, mask=in_range, other=0) != 0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    rows = hidden + b * s_hb + src[:, None] * s_hl + d[None, :] * s_hd  # [BLOCK_T, BLOCK_D]
    values = tl.load(rows, mask=keep[:, None] & (d[None, :] < D), other=0)
    out_rows = out_hidden + (b * L_out + t[:, None]) * D + d[None, :]
    tl.store(out_rows, values, mask=in_range[:, None] & (d[None, :] < D))
    if tl.program_id(1) == 0:
        for p in range(P):
            pos = tl.load(positions + p * s_pp + b * s_pb + src * s_pl, mask=keep, other=0)
            tl.store(out_positions + (p * B + b) * L_out + t, pos, mask=in_range)
        if HAS_MASK:
            flags = tl.load(mask + b * s_mb + src * s_ml, mask=keep, other=0)
            tl.store(out_mask + b * L_out + t, flags, mask=in_range)


def compact_sequence(
    hidden: Tensor, positions: Tensor | None, mask: Tensor | None, index: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gather hidden [B, L, D], positions [B, L] or [P, B, L] and mask [B, L] (both optional) by index/valid [B, L']
    in one launch."""
    batch, _, width = hidden.shape
    length = index.shape[1]
    pos3 = index.new_zeros(0, batch, 1) if positions is None else (
        positions if positions.dim() == 3 else positions.unsqueeze(0)
    )  # [P, B, L]
    mask_in = valid if mask is None else mask
    out_hidden = hidden.new_empty(batch, length, width)
    out_positions = pos3.new_empty(pos3.shape[0], batch, length)
    out_mask = mask_in.new_empty(batch, length)
    if batch * length:
        block_d = min(triton.next_power_of_2(max(width, 1)), 1024)
        block_t = _block_t(length, block_d)
        mask_bytes, valid_in = _as_bytes(mask_in), _as_bytes(valid)
        grid = (batch * triton.cdiv(length, block_t), triton.cdiv(max(width, 1), block_d))
        _jit(_compact_sequence_kernel)[grid](
            hidden, pos3, mask_bytes, index, valid_in, out_hidden, out_positions, _as_bytes(out_mask),
            batch, length, width, pos3.shape[0],
            *hidden.stride(), *pos3.stride(), *mask_bytes.stride(), *index.stride(), *valid_in.stride(),
            HAS_MASK=mask is not None, BLOCK_T=block_t, BLOCK_D=block_d,
        )
    if positions is None:
        out_pos = None
    else:
        out_pos = out_positions if positions.dim() == 3 else out_positions[0]
    return out_hidden, out_pos, None if mask is None else out_mask


# ---------------------------------------------------------------------------------------------- compact_cache
def _compact_cache_kernel(
    src_table, dst_table, index, valid,
    B, H, L_out, D,
    s_b, s_h, s_l, s_d, s_ib, s_ih, s_il, s_vb, s_vl,
    ELEMENT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (N * B * H, cdiv(L_out, BLOCK_T)) for N tensors [B, H, L, D] (every layer's K and V). One program: BLOCK_T
    # output slots x all D channels of one (tensor, sample, head). src_table/dst_table [N]: int64 base addresses.
    # index [B, H, L_out] with head stride s_ih (0 when every head keeps the same positions).
    pid = tl.program_id(0)
    tensor = pid // (B * H)
    b = ((pid // H) % B).to(tl.int64)
    h = (pid % H).to(tl.int64)
    src_ptr = tl.load(src_table + tensor).to(tl.pointer_type(ELEMENT))
    dst_ptr = tl.load(dst_table + tensor).to(tl.pointer_type(ELEMENT))
    if ALIGNED:  # every address is a multiple of 16 bytes: lets the compiler vectorise loads and stores
        src_ptr = tl.multiple_of(src_ptr, 16)
        dst_ptr = tl.multiple_of(dst_ptr, 16)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] output slots
    in_range = t < L_out
    src = tl.load(index + b * s_ib + h * s_ih + t * s_il, mask=in_range, other=0).to(tl.int64)  # [BLOCK_T]
    keep = in_range & (tl.load(valid + b * s_vb + t * s_vl, mask=in_range, other=0) != 0)
    d = tl.arange(0, BLOCK_D)
    rows = src_ptr + b * s_b + h * s_h + src[:, None] * s_l + d[None, :] * s_d  # [BLOCK_T, BLOCK_D]
    values = tl.load(rows, mask=keep[:, None] & (d[None, :] < D), other=0)
    out_rows = dst_ptr + ((b * H + h) * L_out + t[:, None]) * D + d[None, :]
    tl.store(out_rows, values, mask=in_range[:, None] & (d[None, :] < D))


def _launch_cache(sources: list[Tensor], index: Tensor, valid: Tensor) -> list[Tensor]:
    """Gather tensors [B, H, L, D] of one shape, strides and element size along L, in one launch; index [B, H, L']."""
    batch, heads, _, width = sources[0].shape
    length = index.shape[-1]
    outputs = [torch.empty(batch, heads, length, width, dtype=x.dtype, device=x.device) for x in sources]
    if batch * heads * length == 0:
        return outputs
    addresses = [x.data_ptr() for x in sources] + [y.data_ptr() for y in outputs]
    table = torch.tensor(addresses, dtype=torch.int64).to(index.device)  # [2N]: sources, then outputs
    block_d = triton.next_power_of_2(max(width, 1))
    block_t = _block_t(length, block_d)
    valid_in = _as_bytes(valid)
    grid = (len(sources) * batch * heads, triton.cdiv(length, block_t))
    _jit(_compact_cache_kernel)[grid](
        table, table[len(sources) :], index, valid_in,
        batch, heads, length, width,
        *sources[0].stride(), *index.stride(), *valid_in.stride(),
        ELEMENT=_ELEMENT[sources[0].element_size()], ALIGNED=all(a % 16 == 0 for a in addresses),
        BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return outputs


def compact_cache(layers: Sequence[tuple[Tensor, Tensor]], index: Tensor, valid: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Gather every layer's keys and values [B, H, L, d] along L by index [B, L'] (every head alike) or [B, H, L'] (per
    head); one launch per distinct (shape, strides, element size)."""
    tensors = [x for pair in layers for x in pair]  # K0, V0, K1, V1, ...
    if tensors and index.dim() == 2:  # the same positions for every head: a head stride of 0
        index = index[:, None, :].expand(index.shape[0], tensors[0].shape[1], index.shape[1])
    if interpreting() and any(x.device.type != "cpu" for x in tensors):
        raise RuntimeError("the Triton interpreter reads the pointer table on the host: use CPU tensors with it")
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(tensors):
        groups.setdefault((x.shape, x.stride(), x.element_size(), x.device), []).append(i)
    out: dict[int, Tensor] = {}
    for members in groups.values():
        out.update(zip(members, _launch_cache([tensors[i] for i in members], index, valid)))
    return [(out[2 * i], out[2 * i + 1]) for i in range(len(layers))]


# ----------------------------------------------------------------------------------------------- merge_tokens
def _merge_tokens_kernel(
    x, out, batch, slot, offsets, sources, weights,
    D, s_xb, s_xl, s_xd, s_ob, s_ol, s_od,
    BLOCK_D: tl.constexpr,
):
    # grid: (S, cdiv(D, BLOCK_D)). One program: BLOCK_D channels of segment s, summed in float32 over its entries
    # offsets[s] .. offsets[s+1]-1 in order, stored at out[batch[s], slot[s]].
    s = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    in_d = d < D
    b = tl.load(batch + s).to(tl.int64)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for e in range(tl.load(offsets + s), tl.load(offsets + s + 1)):
        token = tl.load(sources + e).to(tl.int64)
        weight = tl.load(weights + e).to(tl.float32)
        acc += weight * tl.load(x + b * s_xb + token * s_xl + d * s_xd, mask=in_d, other=0).to(tl.float32)
    target = tl.load(slot + s).to(tl.int64)
    tl.store(out + b * s_ob + target * s_ol + d * s_od, acc.to(out.dtype.element_ty), mask=in_d)


def merge_tokens(x: Tensor, batch: Tensor, slot: Tensor, offsets: Tensor, sources: Tensor, weights: Tensor) -> Tensor:
    """Weighted segment sums into slots (CSR layout), as `torch_ops.merge_tokens`; x [B, L, D] is not modified.

    Each sum runs in float32 over its entries in order (a GPU may fuse multiply and add), then rounds once to x's
    dtype. torch_ops rounds each product and sums with index_add_ (in any order on a GPU). Tolerance: the float32
    sums differ by at most about E * 2**-24 * sum|w * x| for E entries, the stored values by that plus one unit in the
    last place of x's dtype (the Triton interpreter truncates float32 -> bfloat16 instead of rounding to nearest).
    Rows that are no slot are copied bit for bit; slots must be unique.
    """
    out = x.clone()
    segments, width = slot.numel(), x.shape[-1]
    if segments and width:
        block_d = min(triton.next_power_of_2(width), 1024)
        _jit(_merge_tokens_kernel)[(segments, triton.cdiv(width, block_d))](
            x, out, batch.contiguous(), slot.contiguous(), offsets.contiguous(), sources.contiguous(),
            weights.contiguous(), width, *x.stride(), *out.stride(),
            BLOCK_D=block_d,
        )
    return out


OPS = {"compact_sequence": compact_sequence, "compact_cache": compact_cache, "merge_tokens": merge_tokens}
