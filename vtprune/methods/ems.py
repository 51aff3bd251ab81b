"""EMS (Li et al., 2024): evict-then-merge, head-wise, with a global-local importance score, at a fixed KV-cache budget.

No official code and only the abstract could be read: this is PAPER-DERIVED and follows the spec's interpretations
I1-I12 (/work/shared/methods/ems.md), which docs/methods/ems.md lists. Per layer and cache head, every entry j has
A_j (attention received from every query so far, averaged over the query heads of the group) and C_j (how many
queries could see it: n − j for prompt token j, +1 per decode step).
- Score: s = ĝ + l̂, ĝ = g / Σg with g = A / C (removes the causal bias of plain accumulation), l̂ = l / Σl with l
  the attention the last w queries pay on the *current* cache (causal by position), both over all current entries.
- Compression, whenever the eligible entries exceed B: the last r entries stay; the top B − r others by s become
  centres (kept); the rest leave. A leaver merges into its most similar centre (cosine of post-RoPE keys, same head)
  if that similarity is at least τ (the "zero class" has similarity τ), else it is discarded. A centre c with
  members M becomes, with weights w = s over {c} ∪ M: V_c = Σ w V / Σ w, K_c = ‖K_c‖ · u / ‖u‖ with
  u = Σ w K / ‖K‖; and A_c += C_c · Σ_M A / C. Survivors keep their slot order and the centre's position.
- Prefill: scored with all prompt rows (global) and the last w (local), compressed once if n > B. Decoding: the new
  entry is appended (A = its own self-attention, C = 1), scored, then compressed: one entry leaves per step.
The policy returns which slots leave and, per head, which leavers merge into which centre with which K and V weights;
the cache site applies those weighted sums. `evict="visual"` (our adaptation): only visual entries compete, for B
visual entries (leavers can only merge into visual centres); decoding then compresses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core import VTPruneError, register
from ._kv import (
    EVICT,
    CacheMerge,
    Entries,
    EntryMerge,
    KVPolicyMethod,
    KVUpdate,
    cache_budget,
    check_budget,
    check_choice,
    complement,
    flat_rows,
    gather_rows,
    prompt_entries,
    reduce_heads,
    repeat_heads,
    weighted_column_sums,
)


@dataclass
class EMSUpdate:
    """What the site does to one (sample, layer) cache: write the merges (`combine`), then remove `evict`."""

    evict: Tensor  # [H_c, m] slots that leave (discarded or merged), ascending per head
    combine: CacheMerge | None = None  # every centre's new K and V (a centre without members keeps its own)

    @property
    def merges(self) -> list[EntryMerge]:
        """The merges one centre at a time (reads back to the host; the site applies `combine` as a whole)."""
        return self.combine.entries() if self.combine is not None else []


def local_scores(window: Tensor, window_positions: Tensor, keys: Tensor, positions: Tensor, scale: float) -> Tensor:
    """[H_c, L] Σ over the window queries [H, w, d] (at positions [w]) of their float32 softmax over the cache keys
    [H_c, L, d] at entry positions [H_c, L], causal by position, averaged over each group's query heads."""
    heads = window.shape[0]
    logits = torch.einsum("hqd,hld->hql", window.float(), repeat_heads(keys, heads).float()) * scale
    visible = repeat_heads(positions, heads)[:, None, :] <= window_positions[None, :, None]  # [H, w, L]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return reduce_heads(probs.sum(dim=1), keys.shape[0])


def global_local(accumulated: Tensor, counts: Tensor, local: Tensor) -> Tensor:
    """[H_c, L] s = ĝ + l̂: g = A / C and l, each normalised to sum 1 over the head's entries."""
    g = accumulated / counts
    return g / g.sum(dim=1, keepdim=True) + local / local.sum(dim=1, keepdim=True)


def route(keys: Tensor, centres: Tensor, leavers: Tensor, tau: float, chunk: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """(centre column [H_c, m], joins [H_c, m] bool) of every leaver: the centre (a column of `centres` [H_c, K]) whose
    key is most cosine-similar to the leaver's (keys [H_c, L, d], leavers [H_c, m] slots), joined when that cosine is
    at least `tau` (else the zero class: discarded). Leavers are routed in chunks of about `chunk` similarities."""
    heads, count = leavers.shape
    if not centres.shape[1] or not count:  # no centre to join (or no leaver)
        zeros = torch.zeros(heads, count, dtype=torch.long, device=keys.device)
        return zeros, zeros.bool()
    unit = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    centre_units = gather_rows(unit, centres).transpose(1, 2)  # [H_c, d, K]
    step = max(1, chunk // (heads * centres.shape[1]))
    best, index = [], []
    for start in range(0, count, step):
        b, i = torch.bmm(gather_rows(unit, leavers[:, start : start + step]), centre_units).max(dim=2)
        best.append(b), index.append(i)
    return torch.cat(index, dim=1), torch.cat(best, dim=1) >= tau


def merge_all(keys: Tensor, scores: Tensor, centres: Tensor, leavers: Tensor, index: Tensor, joined: Tensor
              ) -> CacheMerge:
    """The merges of every centre of every head at once (I8), as weights on the raw keys and values: the centres
    [H_c, K] and the leavers [H_c, m] (slots of keys [H_c, L, d] scored `scores` [H_c, L]) that join centre column
    `index` where `joined`. With w = s over {c} ∪ M: V = Σ w V / Σ w; K = ‖K_c‖ · u / ‖u‖, u = Σ w K / ‖K‖. A centre
    without members keeps its entry (weight 1 on itself); a discarded leaver adds weight 0 to its nearest centre."""
    if not centres.shape[1]:  # nothing to merge into: leavers are discarded
        none = centres.new_zeros(centres.shape)
        return CacheMerge(centres, none, none, none.float(), none.float(), none.bool())
    raw = keys.float()
    norms = raw.norm(dim=-1)  # [H_c, L]
    centre_scores, leaver_scores = scores.gather(1, centres), scores.gather(1, leavers)
    member_scores = leaver_scores.masked_fill(~joined, 0.0)
    total = centre_scores.scatter_add(1, index, member_scores)  # Σ w over {c} ∪ M
    members = torch.zeros_like(centre_scores).scatter_add_(1, index, joined.float())  # [H_c, K]
    directions = scores[..., None] * raw / norms[..., None]  # w K / ‖K‖ [H_c, L, d]
    heads, count, dim = *centres.shape, raw.shape[-1]
    u = gather_rows(directions, centres).view(heads * count, dim).index_add_(
        0, flat_rows(index, count), (gather_rows(directions, leavers) * joined[..., None]).view(-1, dim)
    ).view(heads, count, dim)
    u_norm = u.norm(dim=-1)
    centre_norms = norms.gather(1, centres)
    has = members > 0
    centre_key = torch.where(has, centre_norms * centre_scores / (centre_norms * u_norm), 1.0)
    centre_value = torch.where(has, centre_scores / total, 1.0)
    leaver_key = (centre_norms.gather(1, index) * leaver_scores / (norms.gather(1, leavers) * u_norm.gather(1, index)))
    leaver_value = leaver_scores / total.gather(1, index)
    columns = torch.arange(centres.shape[1], device=centres.device).expand_as(centres)
    return CacheMerge(
        slots=centres,
        source=torch.cat([centres, leavers], dim=1),
        column=torch.cat([columns, index], dim=1),
        key_weights=torch.cat([centre_key, leaver_key.masked_fill(~joined, 0.0)], dim=1),
        value_weights=torch.cat([centre_value, leaver_value.masked_fill(~joined, 0.0)], dim=1),
        merged=torch.cat([has, joined], dim=1),
    )


class EMSLayer:
    """The compression state of one (sample, decoder layer) cache; every head compresses on its own."""

    def __init__(
        self, cache_heads: int, budget: int, recent: int, window: int, tau: float, evict: str = "all"
    ) -> None:
        check_budget("ems", budget, recent if evict == "all" else 0, "recent entries")
        self.cache_heads, self.budget, self.recent, self.window, self.tau = cache_heads, budget, recent, window, tau
        self.evict = evict
        self.entries: Entries | None = None
        self.accumulated: Tensor | None = None  # [H_c, L] A
        self.counts: Tensor | None = None  # [H_c, L] C
        self.queries: Tensor | None = None  # [H, w', d] the last w queries
        self.query_positions: Tensor | None = None  # [w']

    def prefill(self, queries: Tensor, keys: Tensor, scale: float, eligible: Tensor) -> tuple[Tensor, EMSUpdate]:
        """(kept prompt indices [H_c, C], the update to apply to the prompt's cache first).

        queries: [H, n, d] post-RoPE queries of every prompt token; keys: [H_c, n, d] post-RoPE; eligible: [n] bool.
        """
        n = keys.shape[1]
        if queries.shape[1] != n:
            raise VTPruneError(f"ems prefill needs the queries of all {n} prompt tokens (its global score sums them)")
        sums = weighted_column_sums(queries, keys, scale)  # [H, n]
        self.accumulated = reduce_heads(sums, self.cache_heads)
        self.counts = (n - torch.arange(n, device=keys.device, dtype=torch.float32)).expand(self.cache_heads, n).clone()
        count = min(self.window, n)
        self.queries = queries[:, n - count :].float()
        self.query_positions = torch.arange(n - count, n, device=keys.device)
        self.entries = prompt_entries(eligible.to(keys.device), self.cache_heads)
        update = self._compress(keys, scale)
        return self.entries.positions.clone(), update

    def step(self, query: Tensor, keys: Tensor, scale: float) -> EMSUpdate:
        """query: [H, d] the new token's post-RoPE query; keys: [H_c, L, d] the cache with its key appended last."""
        entries = self.entries
        entries.append(eligible=self.evict == "all")
        logits = torch.einsum("hd,hld->hl", query.float(), repeat_heads(keys, query.shape[0]).float()) * scale
        row = reduce_heads(torch.softmax(logits, dim=-1), self.cache_heads)  # [H_c, L]
        self.accumulated = torch.cat([self.accumulated + row[:, :-1], row[:, -1:]], dim=1)
        self.counts = torch.cat([self.counts + 1, torch.ones_like(self.counts[:, :1])], dim=1)
        position = entries.positions[0, -1:]
        self.queries = torch.cat([self.queries, query.float()[:, None]], dim=1)[:, -self.window :]
        self.query_positions = torch.cat([self.query_positions, position])[-self.window :]
        return self._compress(keys, scale)

    def _compress(self, keys: Tensor, scale: float) -> EMSUpdate:
        entries = self.entries
        heads, length = self.cache_heads, entries.length
        eligible_count = int(entries.eligible[0].sum())
        if eligible_count <= self.budget:
            return EMSUpdate(evict=torch.zeros(heads, 0, dtype=torch.long, device=keys.device))
        local = local_scores(self.queries, self.query_positions, keys, entries.positions, scale)
        scores = global_local(self.accumulated, self.counts, local)  # [H_c, L]
        protected = torch.zeros(heads, length, dtype=torch.bool, device=keys.device)
        protected[:, max(length - self.recent, 0) :] = True
        candidate = entries.eligible & ~protected
        centres = max(self.budget - int((entries.eligible[0] & protected[0]).sum()), 0)  # recent entries stay anyway
        top = torch.topk(scores.masked_fill(~candidate, float("-inf")), centres, dim=1, sorted=True).indices
        is_centre = torch.zeros_like(candidate).scatter(1, top, True)
        leaving = candidate & ~is_centre
        evict = leaving.nonzero()[:, 1].view(heads, -1)
        index, joined = route(keys, top, evict, self.tau)
        combine = merge_all(keys, scores, top, evict, index, joined)
        # I10: A_c += C_c · Σ_M A / C (a centre without members adds 0)
        gain = torch.zeros_like(top, dtype=torch.float32).scatter_add_(
            1, index, (gather_rows(self.accumulated, evict) / gather_rows(self.counts, evict)).masked_fill(~joined, 0.0)
        )
        centre_counts = gather_rows(self.counts, top)
        self.accumulated = self.accumulated.scatter(1, top, gather_rows(self.accumulated, top) + centre_counts * gain)
        kept = complement(length, evict)
        entries.keep(kept)
        self.accumulated = gather_rows(self.accumulated, kept)
        self.counts = gather_rows(self.counts, kept)
        return EMSUpdate(evict=evict, combine=combine)


@register
@dataclass
class EMS(KVPolicyMethod):
    """EMS at the kv_cache site, keeping its budget while decoding (see the module docstring)."""

    name: ClassVar[str] = "ems"

    keep: int | float = 0.25  # B: entries per head and layer (int) or a ratio of the prompt (evict="visual": visual)
    recent: int = 8  # r: newest entries always kept (never centres or leavers)
    window: int = 8  # w: queries of the local score
    tau: float = 0.5  # merge threshold: cosine of keys at or above it merges, below it discards
    evict: str = "all"  # "all": every token is a candidate (paper); "visual": only visual tokens (our adaptation)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "evict", self.evict, EVICT)
        for option, low in (("recent", 0), ("window", 1)):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise VTPruneError(f"ems {option}={value!r}: give an int >= {low}")
        if not -1.0 <= self.tau <= 1.0:
            raise VTPruneError(f"ems tau={self.tau}: the merge threshold is a cosine in [-1, 1] (above 1 never merges)")

    def budget(self, prompt_len: int, visual: int, images: int) -> int:
        return cache_budget(self.name, self.keep, self.evict, prompt_len, visual, images)

    def layer_state(self, cache_heads: int, budget: int) -> EMSLayer:
        return EMSLayer(cache_heads, budget, self.recent, self.window, self.tau, self.evict)

    def prefill_update(self, state: EMSLayer, queries: Tensor, keys: Tensor, scale: float, eligible: Tensor) -> KVUpdate:
        kept, update = state.prefill(queries, keys, scale, eligible)
        return KVUpdate(kept, update.combine)

    def step_update(self, state: EMSLayer, query: Tensor, keys: Tensor, scale: float) -> KVUpdate:
        update = state.step(query, keys, scale)
        return KVUpdate(complement(keys.shape[1], update.evict), update.combine)
