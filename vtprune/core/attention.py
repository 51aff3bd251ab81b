"""Attention rows computed directly from q and k, so models keep running with SDPA or FlashAttention."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_rows(
    queries: Tensor,
    keys: Tensor,
    scale: float,
    key_mask: Tensor | None = None,
    query_positions: Tensor | None = None,
) -> Tensor:
    """Post-softmax attention of a few query rows over all keys, in float32.

    queries: [B, H, Q, d]; keys: [B, H_kv, L, d] (grouped-query keys are repeated to H heads).
    key_mask: [B, L] bool, False for keys nobody may attend (padding).
    query_positions: [B, Q] sequence index of each query; keys after it are masked (causal). None: no causal mask.
    Returns [B, H, Q, L]; masked keys get probability 0.
    """
    heads, kv_heads = queries.shape[1], keys.shape[1]
    if heads != kv_heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", queries.float(), keys.float()) * scale
    allowed = torch.ones(logits.shape[0], 1, logits.shape[2], logits.shape[3], dtype=torch.bool, device=logits.device)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()
    if query_positions is not None:
        key_index = torch.arange(keys.shape[2], device=logits.device)
        allowed = allowed & (key_index[None, None, None, :] <= query_positions[:, None, :, None])
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def received_attention(
    queries: Tensor,
    keys: Tensor,
    scale: float,
    key_mask: Tensor | None = None,
    query_positions: Tensor | None = None,
    chunk: int = 256,
) -> Tensor:
    """[B, L] float32: the attention each key receives, summed over heads and query rows (`attention_rows` of the
    same arguments), computed `chunk` query rows at a time so memory stays O(chunk · L) per head."""
    total = torch.zeros(keys.shape[0], keys.shape[2], dtype=torch.float32, device=keys.device)
    for start in range(0, queries.shape[2], chunk):
        rows = slice(start, start + chunk)
        positions = None if query_positions is None else query_positions[:, rows]
        total += attention_rows(queries[:, :, rows], keys, scale, key_mask, positions).sum(dim=(1, 2))
    return total
