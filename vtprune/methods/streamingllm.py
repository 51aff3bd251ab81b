"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus a rolling window, at a fixed KV-cache budget.

Every layer and head keeps the first S tokens (the sinks) and the most recent B - S tokens; everything between is
dropped by position alone (no attention is read). vtprune's schedule is "prefill, then evict after every forward"
(the official perplexity protocol applied to a prompt prefilled in one call): after the prefill the cache keeps
[0, S) ∪ [n - (B - S), n); after each decode forward, which attended B + 1 entries, the entry at slot S leaves.

Positions (official pos-shift): keys are rotated at their *slot in the cache*, and the query at its own slot (the
cache length before it is appended). A cache site that stores post-RoPE keys (transformers does) re-rotates each
survivor by its slot shift after every eviction (`slot_shift`, `rotate_keys`, float32); `key_positions="original"`
instead keeps text positions (not the paper; for M-RoPE models, where slot positions would erase the image layout).

`evict="visual"` (our adaptation, "StreamingLLM-style"): text is never evicted; the window runs over the visual
tokens only (the first S and the last B - S of them are kept), a one-shot cut after the prefill.
Spec: /work/shared/methods/streamingllm.md; docs: docs/methods/streamingllm.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core import VTPruneError, register
from ._kv import (
    EVICT,
    Entries,
    KVPolicyMethod,
    KVUpdate,
    cache_budget,
    check_budget,
    check_choice,
    complement,
    prompt_entries,
)

KEY_POSITIONS = ("cache", "original")


def streaming_keep(eligible: Tensor, budget: int, sinks: int) -> Tensor:
    """[L] bool kept: every ineligible entry, the first `sinks` and the last `budget - sinks` eligible ones.

    eligible: [L] bool. Nothing is dropped while at most `budget` entries are eligible.
    """
    keep = torch.ones_like(eligible, dtype=torch.bool)
    slots = eligible.nonzero().squeeze(1)
    if slots.numel() > budget:
        keep[slots[sinks : slots.numel() - (budget - sinks)]] = False
    return keep


def make_space(length: int, incoming: int, sinks: int, window: int) -> Tensor:
    """Slots kept before `incoming` tokens are fed (the official multi-turn `evict_for_space`): all of them if
    length + incoming <= sinks + window, else [0, sinks) ∪ [length - window + incoming, length) (sinks only when
    incoming >= window)."""
    if length + incoming <= sinks + window:
        return torch.arange(length)
    start = min(max(length - window + incoming, sinks), length)
    return torch.cat([torch.arange(min(sinks, length)), torch.arange(start, length)])


def slot_shift(length: int, evict: Tensor) -> Tensor:
    """[H_c, L - m] new slot minus old slot of each surviving entry after evicting `evict` [H_c, m] of L slots."""
    kept = complement(length, evict)
    return torch.arange(kept.shape[1], device=kept.device) - kept


def rotate_keys(keys: Tensor, shift: Tensor, inv_freq: Tensor) -> Tensor:
    """Post-RoPE keys [..., L, d] moved by `shift` [..., L] positions (Llama's half-split RoPE), in float32.

    RoPE is a rotation, so R(p + Δ) k = R(Δ) R(p) k: the result equals rotating the raw key at its new position
    (attention scaling of the rotary table, if any, is already in the key and is not applied again).
    inv_freq: [d / 2] the model's rotary frequencies (`rotary_emb.inv_freq`).
    """
    angle = shift.float()[..., None] * inv_freq.float().to(keys.device)  # [..., L, d/2]
    cos, sin = torch.cat([angle.cos()] * 2, dim=-1), torch.cat([angle.sin()] * 2, dim=-1)
    x = keys.float()
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated_half * sin).to(keys.dtype)


class StreamingLLMLayer:
    """The eviction state of one (sample, decoder layer) cache. Every head keeps the same slots."""

    def __init__(self, cache_heads: int, budget: int, sinks: int, evict: str = "all") -> None:
        check_budget("streamingllm", budget, sinks, "sinks")
        self.cache_heads, self.budget, self.sinks, self.evict = cache_heads, budget, sinks, evict
        self.entries: Entries | None = None

    def prefill(self, eligible: Tensor) -> Tensor:
        """[H_c, C] kept prompt indices (ascending) of a prompt whose tokens are `eligible` [n] bool."""
        self.entries = prompt_entries(eligible, self.cache_heads)
        keep = streaming_keep(self.entries.eligible[0], self.budget, self.sinks)
        slots = keep.nonzero().squeeze(1).expand(self.cache_heads, -1)
        self.entries.keep(slots)
        return self.entries.positions.clone()

    def step(self) -> Tensor:
        """After a decode forward (the new token appended as the last slot): [H_c, m] slots to evict (m = 0 or 1)."""
        entries = self.entries
        entries.append(eligible=self.evict == "all")
        keep = streaming_keep(entries.eligible[0], self.budget, self.sinks)
        evict = (~keep).nonzero().squeeze(1).expand(self.cache_heads, -1)
        entries.keep(complement(entries.length, evict))
        return evict.clone()


@register
@dataclass
class StreamingLLM(KVPolicyMethod):
    """StreamingLLM at the kv_cache site, keeping its budget while decoding (see the module docstring)."""

    name: ClassVar[str] = "streamingllm"

    keep: int | float = 0.25  # B: entries per head and layer (int) or a ratio of the prompt (evict="visual": visual)
    sinks: int = 4  # S: the first tokens kept forever (the paper's 4 attention sinks)
    evict: str = "all"  # "all": every token is a candidate (paper); "visual": only visual tokens (our adaptation)
    key_positions: str = "cache"  # "cache": keys/query at their cache slot (paper, 1-D RoPE); "original": no shift

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "evict", self.evict, EVICT)
        check_choice(self.name, "key_positions", self.key_positions, KEY_POSITIONS)
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise VTPruneError(f"streamingllm sinks={self.sinks!r}: give the number of sink tokens, an int >= 0")

    def budget(self, prompt_len: int, visual: int, images: int) -> int:
        return cache_budget(self.name, self.keep, self.evict, prompt_len, visual, images)

    def layer_state(self, cache_heads: int, budget: int) -> StreamingLLMLayer:
        return StreamingLLMLayer(cache_heads, budget, self.sinks, self.evict)

    def prompt_rows(self, prompt_len: int) -> int:
        return 0  # evicts by position alone

    def prefill_update(self, state: StreamingLLMLayer, queries: Tensor, keys: Tensor, scale: float,
                       eligible: Tensor) -> KVUpdate:
        return KVUpdate(state.prefill(eligible))

    def step_update(self, state: StreamingLLMLayer, query: Tensor, keys: Tensor, scale: float) -> KVUpdate:
        return KVUpdate(complement(keys.shape[1], state.step()))

    def shift_keys(self, keys: Tensor, shift: Tensor, inv_freq: Tensor) -> Tensor:
        """The site's re-rotation of surviving post-RoPE keys [..., L, d] by their slot shifts [..., L]."""
        return rotate_keys(keys, shift, inv_freq)

    @property
    def cache_positions(self) -> bool:
        """Whether the site re-rotates survivors to their cache slot and feeds new tokens at slot positions."""
        return self.key_positions == "cache" and self.evict == "all"
