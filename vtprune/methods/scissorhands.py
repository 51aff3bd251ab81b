"""Scissorhands (Liu et al., NeurIPS 2023): persistence of importance, at a fixed KV-cache budget.

Per layer and cache head, an entry is "unimportant" at a step when the step's query gives it less than uniform
attention, a < 1 / (number of entries attended). Each entry's count I = the unimportant steps among the last w steps
it was present for. When the cache is full (B entries) the next token cannot enter until m entries leave: the m with
the largest I, never the r most recent entries; ties leave oldest first. So every query attends at most B entries and
the cache compresses once every m steps. No official code exists: this follows the paper's Algorithms 1-2 as the
spec fixes them (PAPER-DERIVED; w = 400, r = 10 as cold-compress quotes the paper, unverified).
- Prefill (our adaptation; the paper is token by token): the prompt's last min(w, n) rows are the history, row i
  sees keys 0..i with threshold 1 / (i + 1). If n >= B the cache keeps B − m entries (the compression the first
  decode token would trigger).
- Decoding: after each forward (the new token appended, L entries attended), one history column; if the cache then
  holds B entries, m leave now, which is the compression Algorithm 1 runs before the next token enters.
Keys keep their original positions. Grouped-query models (`gqa_reduce`): "mean" thresholds the group's mean
attention; "any" counts an entry unimportant only if it is so for every query head of its group.
`evict="visual"` (our adaptation): only visual entries compete; one prefill compression keeps B of them.
Spec: /work/shared/methods/scissorhands.md; docs: docs/methods/scissorhands.md.
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
    cache_budget,
    check_choice,
    complement,
    gather_rows,
    prompt_attention,
    prompt_entries,
    reduce_heads,
)

GQA_REDUCE = ("mean", "any")


def unimportant(attention: Tensor, attended: Tensor, cache_heads: int, gqa_reduce: str = "mean") -> Tensor:
    """[H_c, ..., L] bool: attention [H, ..., L] below 1 / attended ([...] entries each row saw), per cache head."""
    threshold = 1.0 / attended.float()[..., None]
    if gqa_reduce == "mean":
        return reduce_heads(attention.float(), cache_heads) < threshold
    low = attention.float() < threshold
    return low.view(cache_heads, -1, *low.shape[1:]).all(dim=1)


def most_unimportant(counts: Tensor, candidate: Tensor, count: int) -> Tensor:
    """[H_c, count] slots with the largest counts among `candidate` [H_c, L] bool (ties: the lower, older slot),
    ascending."""
    count = min(count, int(candidate.sum(dim=1).min()))  # recent entries stay even over the budget
    masked = counts.masked_fill(~candidate, -1)
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :count]
    return torch.sort(order, dim=1).values


class ScissorhandsLayer:
    """The eviction state of one (sample, decoder layer) cache; every head selects on its own."""

    def __init__(
        self,
        cache_heads: int,
        budget: int,
        drop: int,
        recent: int,
        window: int,
        evict: str = "all",
        gqa_reduce: str = "mean",
    ) -> None:
        if evict == "all" and not 1 <= drop <= budget - recent:
            raise VTPruneError(
                f"scissorhands drops {drop} entries per compression but a full cache of {budget} has only "
                f"{budget - recent} outside the {recent} recent ones; lower drop_fraction or recent, or raise keep"
            )
        self.cache_heads, self.budget, self.drop, self.recent, self.window = cache_heads, budget, drop, recent, window
        self.evict, self.gqa_reduce = evict, gqa_reduce
        self.entries: Entries | None = None
        self.low: Tensor | None = None  # [H_c, L, w] bool ring of "unimportant" records (column = step mod w)
        self.steps = 0  # history steps recorded so far (prompt rows included)

    def counts(self) -> Tensor:
        """[H_c, L] unimportant steps of every entry within the last w steps."""
        return self.low.sum(dim=-1)

    def prefill(self, queries: Tensor, keys: Tensor, scale: float, eligible: Tensor) -> Tensor:
        """[H_c, C] kept prompt indices per head (ascending).

        queries: [H, Q, d] post-RoPE queries of the last Q = min(w, n) prompt rows; keys: [H_c, n, d] post-RoPE;
        eligible: [n] bool.
        """
        n, count = keys.shape[1], queries.shape[1]
        if count != min(self.window, n):
            raise VTPruneError(f"scissorhands prefill needs the last min(w, n) = {min(self.window, n)} prompt rows")
        rows = prompt_attention(queries, keys, scale)  # [H, Q, n]
        attended = torch.arange(n - count + 1, n + 1, device=rows.device)  # row i attends i + 1 keys
        visible = torch.arange(n, device=rows.device)[None, :] < attended[:, None]  # [Q, n]
        low = unimportant(rows, attended, self.cache_heads, self.gqa_reduce) & visible  # [H_c, Q, n]
        self.low = torch.zeros(self.cache_heads, n, self.window, dtype=torch.bool, device=rows.device)
        self.low[:, :, :count] = low.transpose(1, 2)  # count <= w: steps 0..count-1 take columns 0..count-1
        self.steps = count
        self.entries = prompt_entries(eligible.to(rows.device), self.cache_heads)
        eligible_count = int(eligible.sum())
        if self.evict == "all" and eligible_count >= self.budget:
            self._drop(eligible_count - (self.budget - self.drop))
        elif self.evict == "visual" and eligible_count > self.budget:
            self._drop(eligible_count - self.budget)
        return self.entries.positions.clone()

    def step(self, attention: Tensor) -> Tensor:
        """attention: [H, L] the new token's softmax over the cache, itself last -> [H_c, m] slots to evict (0 or m)."""
        entries = self.entries
        entries.append(eligible=self.evict == "all")
        length = entries.length
        low = unimportant(attention, torch.tensor(length), self.cache_heads, self.gqa_reduce)  # [H_c, L]
        self.low = torch.cat([self.low, self.low.new_zeros(self.cache_heads, 1, self.window)], dim=1)
        self.low[:, :, self.steps % self.window] = low
        self.steps += 1
        if self.evict == "all" and int(entries.eligible[0].sum()) >= self.budget:
            return self._drop(self.drop)
        return torch.zeros(self.cache_heads, 0, dtype=torch.long, device=low.device)

    def _drop(self, count: int) -> Tensor:
        entries = self.entries
        candidate = entries.eligible.clone()
        candidate[:, max(entries.length - self.recent, 0) :] = False
        evict = most_unimportant(self.counts(), candidate, count)
        kept = complement(entries.length, evict)
        entries.keep(kept)
        self.low = gather_rows(self.low, kept)
        return evict


@register
@dataclass
class Scissorhands(KVPolicyMethod):
    """Scissorhands at the kv_cache site, keeping its budget while decoding (see the module docstring)."""

    name: ClassVar[str] = "scissorhands"

    keep: int | float = 0.25  # B: entries per head and layer (int) or a ratio of the prompt (evict="visual": visual)
    window: int = 400  # w: history steps (cold-compress quoting the paper; unverified)
    recent: int = 10  # r: newest entries never dropped (cold-compress quoting the paper; unverified)
    drop_fraction: float = 0.5  # m = max(1, floor(B · fraction)) entries leave per compression
    evict: str = "all"  # "all": every token is a candidate (paper); "visual": only visual tokens (our adaptation)
    gqa_reduce: str = "mean"  # grouped-query heads: "mean" (threshold the group mean) or "any" (low for every head)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "evict", self.evict, EVICT)
        check_choice(self.name, "gqa_reduce", self.gqa_reduce, GQA_REDUCE)
        for option in ("window", "recent"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if option == "window" else 0):
                raise VTPruneError(f"scissorhands {option}={value!r}: give an int >= {1 if option == 'window' else 0}")
        if not 0.0 < self.drop_fraction < 1.0:
            raise VTPruneError(
                f"scissorhands drop_fraction={self.drop_fraction}: use a fraction of the budget in (0, 1)"
            )

    def budget(self, prompt_len: int, visual: int, images: int) -> int:
        return cache_budget(self.name, self.keep, self.evict, prompt_len, visual, images)

    def drop_for(self, budget: int) -> int:
        return max(1, int(budget * self.drop_fraction))

    def prompt_rows(self, prompt_len: int) -> int:
        return min(self.window, prompt_len)

    def layer_state(self, cache_heads: int, budget: int) -> ScissorhandsLayer:
        return ScissorhandsLayer(
            cache_heads, budget, self.drop_for(budget), self.recent, self.window, self.evict, self.gqa_reduce
        )
