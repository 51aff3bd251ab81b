"""Queries and keys of a transformers decoder layer, recomputed from the layer's own norm, projections and RoPE, so the
model keeps running with SDPA or FlashAttention while methods read attention rows."""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from ...core.attention import attention_rows
from ...core.layout import VisualLayout

QUERY_KINDS = ("last", "after_visual", "text")


def project(attn: nn.Module, proj: nn.Module, x: Tensor, norm_name: str) -> Tensor:
    """x [B, n, D] through `proj` (q_proj or k_proj) and the layer's q/k norm if it has one -> [B, heads, n, d]."""
    return heads_of(attn, proj(x), norm_name)


def heads_of(attn: nn.Module, states: Tensor, norm_name: str) -> Tensor:
    """A q_proj or k_proj output [B, n, heads · d] through the layer's q/k norm if it has one -> [B, heads, n, d]."""
    states = states.reshape(states.shape[0], states.shape[1], states.shape[-1] // attn.head_dim, attn.head_dim)
    norm = getattr(attn, norm_name, None)
    if norm is not None:
        states = norm(states)
    return states.transpose(1, 2)


def rotate(attn: nn.Module, states: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply the language model's own RoPE (its modeling module's `apply_rotary_pos_emb`) to q or k [B, H, n, d]."""
    modeling = sys.modules[type(attn).__module__]
    rotated, _ = modeling.apply_rotary_pos_emb(states, states[:, :1], cos, sin)  # the key slot: one head, not rotated twice
    return rotated


def sample_rows(table: Tensor, sample: int, rows: Tensor | None = None) -> Tensor:
    """One sample's slice of a RoPE table [B, L, d] (or [P, B, L, d]), at `rows` if given."""
    if table.dim() == 3:
        part = table[sample : sample + 1]
        return part if rows is None else part[:, rows]
    part = table[:, sample : sample + 1]
    return part if rows is None else part[:, :, rows]


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x [B or 1, L, D] at rows [B, q] -> [B, q, D]."""
    x = x.expand(rows.shape[0], *x.shape[1:])
    return x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))


def query_rows(layout: VisualLayout, sample: int, mask2d: Tensor, kind: str) -> Tensor:
    """Sequence positions of one sample's query tokens: "last" real token, every real token "after_visual" (after the
    sample's last visual token), or every real "text" (non-visual) token."""
    valid = mask2d[sample].bool().cpu()
    visual = torch.zeros_like(valid)
    positions = layout.visual_positions(sample)
    visual[positions] = True
    if kind == "last":
        return valid.nonzero()[-1:, 0]
    if kind == "after_visual":
        after = torch.zeros_like(valid)
        after[(int(positions.max()) if positions.numel() else -1) + 1 :] = True
        return (after & valid).nonzero()[:, 0]
    return (valid & ~visual).nonzero()[:, 0]


def query_attention(
    layer: nn.Module, hidden: Tensor, rope: tuple[Tensor, Tensor], mask2d: Tensor, rows: list[Tensor]
) -> list[Tensor]:
    """Per sample [heads, q_b, L]: softmax attention of the query tokens `rows[b]` over all keys (causal, padding
    masked) at decoder `layer`, recomputed from its input norm, q/k projections and RoPE on `hidden` [B, L, D]."""
    attn = layer.self_attn
    cos, sin = rope
    out = []
    with torch.no_grad():
        x = layer.input_layernorm(hidden)  # [B, L, D]
        for b, sample_rows_ in enumerate(rows):
            index = sample_rows_.to(hidden.device)
            q = project(attn, attn.q_proj, x[b : b + 1, index], "q_norm")  # [1, H, Q, d]
            k = project(attn, attn.k_proj, x[b : b + 1], "k_norm")  # [1, H_kv, L, d]
            q = rotate(attn, q, sample_rows(cos, b, index), sample_rows(sin, b, index))
            k = rotate(attn, k, sample_rows(cos, b), sample_rows(sin, b))
            probs = attention_rows(q, k, attn.scaling, key_mask=mask2d[b : b + 1].bool(), query_positions=index[None])
            out.append(probs[0])
    return out
