"""A2SF (Jo & Shin, 2024): accumulative attention with a forgetting factor, at a fixed KV-cache budget.

Per layer and cache head every entry carries A_k = Σ_q α^(now − q) · P[q, k], i.e. A ← α·A + p at every new
query (α = 1 is H2O's plain accumulation). Follows the official real-drop cache (Dirac-Notation/A2SF @ a4360f1,
`H2OKVCache_LayerWise`): budget B = hh + recent per head.
- Prefill (full attention): A_k = Σ_q α^(n−1−q) P[q, k] over all prompt rows. If n > B each head keeps its top-hh
  scores among slots [0, n − recent) plus the last `recent` slots, in slot order (the official boolean-mask gather
  keeps slot order, not score order).
- Each decode step, after the forward (the query attended the B entries plus itself): A ← α·A + p on the old
  entries, the new entry starts at its own self-attention, and if the cache holds more than B entries the head evicts
  its lowest A among slots [0, L − recent) (the first minimum on ties).
Keys keep their original positions. Grouped-query models: the official code is per query head (MHA only); here the
rows of a group are reduced (`gqa_reduce`, default the mean) — or the site repeats K/V to the query heads ("expand").
`evict="visual"` (our adaptation): only visual entries compete, for B visual entries; decoding then evicts nothing.
Spec: /work/shared/methods/a2sf.md; docs: docs/methods/a2sf.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core import VTPruneError, register
from ._kv import (
    EVICT,
    Entries,
    KVPolicyMethod,
    cache_budget,
    check_budget,
    check_choice,
    complement,
    prompt_entries,
    reduce_heads,
    weighted_column_sums,
)

GQA_REDUCE = ("mean", "max")


def forgetting_weights(alpha: float, rows: int) -> Tensor:
    """[rows] α^(rows−1−q) for the last `rows` prompt rows q (the newest row weighs 1; 0^0 = 1)."""
    return torch.tensor([alpha ** (rows - 1 - q) for q in range(rows)], dtype=torch.float32)


def lowest(scores: Tensor, candidate: Tensor, count: int) -> Tensor:
    """[H_c, count] the slots of the `count` lowest scores among `candidate` [H_c, L] bool, per head, ascending slots.
    Ties: the lower slot leaves first (the official argmin's first minimum)."""
    count = min(count, int(candidate.sum(dim=1).min()))  # recent entries stay even over the budget
    masked = scores.float().masked_fill(~candidate, float("inf"))
    order = torch.sort(masked, dim=1, stable=True).indices[:, :count]
    return torch.sort(order, dim=1).values


class A2SFLayer:
    """The eviction state of one (sample, decoder layer) cache; every head selects on its own."""

    def __init__(
        self, cache_heads: int, budget: int, recent: int, alpha: float, evict: str = "all", gqa_reduce: str = "mean"
    ) -> None:
        check_budget("a2sf", budget, recent if evict == "all" else 0, "recent entries")
        self.cache_heads, self.budget, self.recent, self.alpha = cache_heads, budget, recent, alpha
        self.evict, self.gqa_reduce = evict, gqa_reduce
        self.entries: Entries | None = None
        self.scores: Tensor | None = None  # [H_c, L] A of every entry

    def prefill(self, queries: Tensor, keys: Tensor, scale: float, eligible: Tensor) -> Tensor:
        """[H_c, C] kept prompt indices per head (ascending).

        queries: [H, Q, d] post-RoPE queries of the last Q prompt rows (Q = n is exact; rows older than the weights
        one cares about may be left out, see `A2SF.prompt_rows`); keys: [H_c, n, d] post-RoPE; eligible: [n] bool.
        """
        weights = forgetting_weights(self.alpha, queries.shape[1])
        sums = weighted_column_sums(queries, keys, scale, weights)  # [H, n]
        self.scores = reduce_heads(sums, self.cache_heads, self.gqa_reduce)
        self.entries = prompt_entries(eligible.to(keys.device), self.cache_heads)
        evict = self._over_budget()
        self._drop(evict)
        return self.entries.positions.clone()

    def step(self, attention: Tensor) -> Tensor:
        """attention: [H, L] the new token's softmax over the cache, itself last -> [H_c, m] slots to evict (m <= 1)."""
        rows = reduce_heads(attention.float(), self.cache_heads, self.gqa_reduce)  # [H_c, L]
        self.entries.append(eligible=self.evict == "all")
        self.scores = torch.cat([self.alpha * self.scores + rows[:, :-1], rows[:, -1:]], dim=1)
        evict = self._over_budget()
        self._drop(evict)
        return evict

    def _over_budget(self) -> Tensor:
        """[H_c, m]: the lowest-scored eligible entries outside the recent window, m = eligible − B (or 0)."""
        entries = self.entries
        over = int(entries.eligible[0].sum()) - self.budget  # every head holds the same number of eligible entries
        if over <= 0:
            return torch.zeros(self.cache_heads, 0, dtype=torch.long, device=entries.positions.device)
        candidate = entries.eligible.clone()
        candidate[:, max(entries.length - self.recent, 0) :] = False
        return lowest(self.scores, candidate, over)

    def _drop(self, evict: Tensor) -> None:
        if evict.shape[1]:
            kept = complement(self.entries.length, evict)
            self.entries.keep(kept)
            self.scores = self.scores.gather(1, kept)


@register
@dataclass
class A2SF(KVPolicyMethod):
    """A2SF at the kv_cache site, keeping its budget while decoding (see the module docstring)."""

    name: ClassVar[str] = "a2sf"

    keep: int | float = 0.25  # B = hh + recent entries per head and layer (int) or a ratio of the prompt
    alpha: float = 0.2  # forgetting factor α in [0, 1] (official class default 0.2; 1 = H2O)
    recent: int | None = None  # protected newest entries; None: max(16, B // 8) clipped to B − 1 (vtprune's choice)
    evict: str = "all"  # "all": every token is a candidate (paper); "visual": only visual tokens (our adaptation)
    gqa_reduce: str = "mean"  # grouped-query rows of a cache head: "mean" or "max" ("expand" lives in the site)
    row_tolerance: float = 0.0  # prefill: leave out prompt rows whose weight α^(n−1−q) is below this (0: all rows)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "evict", self.evict, EVICT)
        check_choice(self.name, "gqa_reduce", self.gqa_reduce, GQA_REDUCE)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise VTPruneError(f"a2sf alpha={self.alpha!r}: the forgetting factor must lie in [0, 1] (1 = H2O)")
        recent = self.recent
        if recent is not None and (isinstance(recent, bool) or not isinstance(recent, int) or recent < 0):
            raise VTPruneError(f"a2sf recent={self.recent!r}: give an int >= 0, or None for max(16, B // 8)")
        if not 0.0 <= self.row_tolerance < 1.0:
            raise VTPruneError(f"a2sf row_tolerance={self.row_tolerance}: use a weight in [0, 1) (0 keeps every row)")

    def budget(self, prompt_len: int, visual: int, images: int) -> int:
        return cache_budget(self.name, self.keep, self.evict, prompt_len, visual, images)

    def recent_for(self, budget: int) -> int:
        return self.recent if self.recent is not None else min(max(16, budget // 8), budget - 1)

    def prompt_rows(self, prompt_len: int) -> int:
        """How many of the last prompt rows the prefill needs: all, or those weighing at least `row_tolerance`."""
        if self.row_tolerance <= 0.0:
            return prompt_len
        if self.alpha == 0.0:
            return 1
        if self.alpha == 1.0:
            return prompt_len
        return min(prompt_len, 1 + math.floor(math.log(self.row_tolerance) / math.log(self.alpha)))

    def layer_state(self, cache_heads: int, budget: int) -> A2SFLayer:
        return A2SFLayer(cache_heads, budget, self.recent_for(budget), self.alpha, self.evict, self.gqa_reduce)
