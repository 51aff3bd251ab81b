"""The `llm_attention` site: a method picks, per decoder layer and sample, the tokens attention runs among."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class AttentionContext:
    """One decoder layer's attention for one sample, without padding, as the method sees it.

    At prefill (`causal=True`) queries and keys are the sample's tokens in order (query i sees keys 0..i). While
    decoding (`causal=False`) the queries are the newest tokens and see every key given (a block of recent cache
    entries to compress).
    """

    layer: int
    sample: int
    queries: Tensor  # [heads, q, d] after RoPE
    keys: Tensor  # [kv_heads, n, d] after RoPE
    scale: float
    causal: bool
    visual: Tensor | None = None  # [n] bool: visual tokens (prefill only)
    state: dict[str, Any] = field(default_factory=dict)  # scratch space shared by the calls of one forward
