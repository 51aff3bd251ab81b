"""Shared pieces of the decode-time KV-cache policies (StreamingLLM, Scissorhands, A2SF, EMS).

A policy keeps, per sample, per decoder layer and per cache head, an ordered list of cache *entries* (slot 0 is the
oldest; a new token is appended as the last slot). A cache site drives one policy object per (sample, layer):
`prefill(...)` says which prompt tokens each head keeps, `step(...)` (after each decode forward, with the new token
already appended) says which slots to evict. Sizes: H query heads, H_c cache heads (H_c divides H; grouped-query
heads are the `repeat_kv` order: cache head g serves query heads g·G .. g·G+G-1), L entries, d head size.

Budgets count *eligible* entries: every entry with `evict="all"`, the visual ones with `evict="visual"` (text is then
never evicted). Attention here is always float32 softmax(q·kᵀ·scale), recomputed from q/k so the model itself keeps
running with SDPA / FlashAttention.

How a site drives a policy `p` (options object) for sample b, layer l (n real prompt tokens, keys post-RoPE, real
tokens only, padding removed; "slots" index that sample's entries in cache order):
    state = p.layer_state(cache_heads, p.budget(n, n_visual, n_images))      # once per (sample, layer)
    prefill, after the layer's full-prompt attention:
        StreamingLLM       kept = state.prefill(eligible)
        Scissorhands, A2SF kept = state.prefill(queries[:, -p.prompt_rows(n):], keys, scale, eligible)
        EMS                kept, update = state.prefill(queries, keys, scale, eligible)   # apply update.merges first
    each decode forward, after the attention, with the new token appended as the last slot:
        StreamingLLM       evict = state.step()
        Scissorhands, A2SF evict = state.step(decode_attention(query, keys, scale))
        EMS                update = state.step(query, keys, scale); evict = update.evict   # merges first
    then remove `evict` ([H_c, m] slots) from every head, survivors keeping their order; `state.entries.positions` is
    what each head holds (token indices). StreamingLLM with key_positions="cache" also re-rotates the survivors
    (`streamingllm.slot_shift`, `rotate_keys`) and feeds the next token at position = its cache length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import CACHE_ENTRIES, KeepPlan, Method, ModelInfo, PrefillKV, SiteContext, VTPruneError, keep_count

EVICT = ("all", "visual")


def check_choice(method: str, option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise VTPruneError(f"{method} {option}={value!r}: use one of {', '.join(map(repr, allowed))}")


def cache_budget(method: str, keep: int | float, evict: str, prompt_len: int, visual: int, images: int) -> int:
    """Eligible entries kept per head and layer. evict="all": an int is entries, a ratio is floor(ratio · prompt
    length); evict="visual": an int is visual entries per image (times the images), a ratio is of the visual tokens.
    A count may exceed what the prompt holds (nothing is evicted until the cache reaches it)."""
    if isinstance(keep, int):  # a count may exceed the prompt: the cache grows up to it while decoding
        return keep if evict == "all" else keep * images
    if evict == "all":
        return keep_count(keep, prompt_len, what=f"the {prompt_len}-token prompt", rounding="floor")
    return keep_count(keep, visual, what=f"the {visual} visual tokens of the prompt", rounding="floor")


def repeat_heads(keys: Tensor, heads: int) -> Tensor:
    """[H_c, L, d] -> [H, L, d] in `repeat_kv` order (`keys` itself when H = H_c)."""
    return keys if heads == keys.shape[0] else keys.repeat_interleave(heads // keys.shape[0], dim=0)


def decode_attention(query: Tensor, keys: Tensor, scale: float) -> Tensor:
    """[H, L] float32 softmax of the new token's query [H, d] over every cache entry [H_c, L, d] (itself included)."""
    logits = torch.einsum("hd,hld->hl", query.float(), repeat_heads(keys, query.shape[0]).float()) * scale
    return torch.softmax(logits, dim=-1)


def prompt_attention(queries: Tensor, keys: Tensor, scale: float) -> Tensor:
    """[H, Q, n] float32 causal softmax of the last Q prompt rows (queries [H, Q, d]) over the keys [H_c, n, d].
    The query heads of a group share one product with their cache head (no repeated keys); every row is computed
    exactly as it would be alone (so any subset of rows gives the same values)."""
    heads, count, dim = queries.shape
    cache_heads, n = keys.shape[:2]
    grouped = queries.float().reshape(cache_heads, heads // cache_heads * count, dim)  # [H_c, G·Q, d]
    logits = torch.bmm(grouped, keys.float().transpose(1, 2)).mul_(scale).view(heads, count, n)
    future = torch.ones(count, count, dtype=torch.bool, device=keys.device).triu_(1)  # only the last Q keys can be
    logits[:, :, n - count :].masked_fill_(future, float("-inf"))  # in a row's future
    return torch.softmax(logits, dim=-1)


def weighted_column_sums(queries: Tensor, keys: Tensor, scale: float, weights: Tensor | None = None,
                         chunk: int = 128) -> Tensor:
    """[H, n] Σ_q weights[q] · P[h, q, :] over the last Q prompt rows (queries [H, Q, d], weights [Q] on the host;
    None: all 1), in row chunks so memory stays O(chunk · n) and each chunk reads only the keys its rows see; P is
    the causal float32 softmax of `prompt_attention`. Leading rows of weight 0 add exactly 0 and are skipped."""
    heads, count, _ = queries.shape
    n = keys.shape[1]
    total = torch.zeros(heads, n, dtype=torch.float32, device=keys.device)
    first = 0
    if weights is not None:
        weights = weights.float().cpu()
        first = next((q for q, w in enumerate(weights.tolist()) if w != 0), count)  # one host read
    for start in range(first, count, chunk):
        stop = min(start + chunk, count)
        seen = n - count + stop
        probs = prompt_attention(queries[:, start:stop], keys[:, :seen], scale)
        if weights is None:
            total[:, :seen] += probs.sum(dim=1)
        else:
            total[:, :seen] += torch.einsum("hqk,q->hk", probs, weights[start:stop].to(probs.device))
    return total


def reduce_heads(values: Tensor, cache_heads: int, how: str = "mean") -> Tensor:
    """[H, ...] per query head -> [H_c, ...] per cache head: the mean (or max) over each group."""
    heads = values.shape[0]
    if heads == cache_heads:
        return values
    grouped = values.view(cache_heads, heads // cache_heads, *values.shape[1:])
    return grouped.mean(dim=1) if how == "mean" else grouped.amax(dim=1)


def flat_rows(index: Tensor, length: int) -> Tensor:
    """Per-head slots [H_c, k] -> [H_c · k] rows of the heads' entries flattened to [H_c · length, ...]."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * length).reshape(-1)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [H_c, L, ...] at per-head slot indices [H_c, k] -> [H_c, k, ...] (whole rows copied: `index_select`)."""
    if x.dim() == 2:
        return x.gather(1, index)
    heads, length = x.shape[:2]
    rows = x.reshape(heads * length, *x.shape[2:]).index_select(0, flat_rows(index, length))
    return rows.view(*index.shape, *x.shape[2:])


def complement(length: int, evict: Tensor) -> Tensor:
    """[H_c, L - m] the slots each head keeps (ascending) when it evicts `evict` [H_c, m]."""
    keep = torch.ones(evict.shape[0], length, dtype=torch.bool, device=evict.device)
    keep.scatter_(1, evict, False)
    return keep.nonzero()[:, 1].view(evict.shape[0], length - evict.shape[1])


@dataclass
class Entries:
    """What a policy knows about the entries of one (sample, layer) cache, per cache head, in slot order."""

    positions: Tensor  # [H_c, L] long: each entry's index in the sample's token sequence (padding not counted)
    eligible: Tensor  # [H_c, L] bool: may be evicted (and counts toward the budget)
    next_position: int  # the index the next token takes in the sequence

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def append(self, eligible: bool) -> None:
        """The new token enters as the last slot of every head."""
        heads = self.positions.shape[0]
        new = torch.full((heads, 1), self.next_position, dtype=torch.long, device=self.positions.device)
        self.next_position += 1
        self.positions = torch.cat([self.positions, new], dim=1)
        flag = torch.full((heads, 1), eligible, dtype=torch.bool, device=self.eligible.device)
        self.eligible = torch.cat([self.eligible, flag], dim=1)

    def keep(self, slots: Tensor) -> None:
        """Keep these slots [H_c, C] (ascending per head)."""
        self.positions = self.positions.gather(1, slots)
        self.eligible = self.eligible.gather(1, slots)


def prompt_entries(eligible: Tensor, cache_heads: int) -> Entries:
    """Every prompt token [n] (eligible or not) as the entries of every head."""
    n = eligible.numel()
    positions = torch.arange(n, device=eligible.device).expand(cache_heads, n).clone()
    return Entries(positions=positions, eligible=eligible.bool().expand(cache_heads, n).clone(), next_position=n)


def check_budget(method: str, budget: int, protected: int, what: str) -> None:
    if budget <= protected:
        raise VTPruneError(
            f"{method}: a budget of {budget} cache entries must exceed the {protected} {what}; "
            f"raise keep or lower {what}"
        )


@dataclass
class EntryMerge:
    """Leavers merged into a centre of one head. Slots index the cache as it stood when the policy was called."""

    head: int
    centre: int
    sources: Tensor  # [k] slots combined, the centre first
    key_weights: Tensor  # [k] new K_centre = Σ key_weights · K[sources]
    value_weights: Tensor  # [k] new V_centre = Σ value_weights · V[sources]


@dataclass
class CacheMerge:
    """Weighted sums written into cache slots, every head at once and without reading anything back to the host:
    slot `slots[h, j]` of head h becomes Σ weight[h, e] · entry[h, source[h, e]] over the contributions e with
    column[h, e] = j (float32 sums, cast back); every other slot is unchanged. A slot kept as it is contributes itself
    with weight 1 (exact); a contribution of weight 0 adds nothing (0 · a finite entry). `merged` marks the
    contributions of real merges (several entries into one slot): what `entries` lists."""

    slots: Tensor  # [H_c, K] slots written, distinct per head
    source: Tensor  # [H_c, E] slots read
    column: Tensor  # [H_c, E] the column of `slots` each contribution adds into
    key_weights: Tensor  # [H_c, E] float32
    value_weights: Tensor  # [H_c, E] float32
    merged: Tensor  # [H_c, E] bool

    def apply(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """keys [H_c, L, d_k], values [H_c, L, d_v] -> the same with `slots` written."""
        return self._write(keys, self.key_weights), self._write(values, self.value_weights)

    def _write(self, x: Tensor, weights: Tensor) -> Tensor:
        heads, length, dim = x.shape
        rows = gather_rows(x, self.source).float() * weights[..., None]  # [H_c, E, d]
        sums = torch.zeros(heads * self.slots.shape[1], dim, dtype=torch.float32, device=x.device)
        sums.index_add_(0, flat_rows(self.column, self.slots.shape[1]), rows.view(-1, dim))  # [H_c · K, d]
        out = x.clone(memory_format=torch.contiguous_format)
        out.view(heads * length, dim).index_copy_(0, flat_rows(self.slots, length), sums.to(x.dtype))
        return out

    def entries(self) -> list[EntryMerge]:
        """The merges one by one (head, centre slot, sources in contribution order, weights): for tests and reading;
        this reads the tensors back to the host."""
        out = []
        for h in range(self.source.shape[0]):
            merged = self.merged[h].cpu()
            source, column = self.source[h].cpu()[merged], self.column[h].cpu()[merged]
            key_weights, value_weights = self.key_weights[h].cpu()[merged], self.value_weights[h].cpu()[merged]
            for j in dict.fromkeys(column.tolist()):  # in order of first contribution
                mine = column == j
                out.append(EntryMerge(h, int(self.slots[h, j]), source[mine], key_weights[mine], value_weights[mine]))
        return out


@dataclass
class KVUpdate:
    """What the cache site does to one (sample, layer) cache after a policy call: write `combine` (EMS's merges),
    then keep `kept` [H_c, C] slots (ascending per head; slots index the cache as it stood when the policy was
    called)."""

    kept: Tensor
    combine: CacheMerge | None = None

    @property
    def merges(self) -> list[EntryMerge]:
        """`combine` one merge at a time (reads back to the host; the site applies `combine` as a whole)."""
        return self.combine.entries() if self.combine is not None else []


class KVPolicyMethod(Method):
    """A registered decode-time KV-cache policy: the cache site keeps `budget` entries per head and layer after the
    prefill and after every decode step, asking the policy state (`layer_state`) which ones.

    The site (vtprune/adapters/decoder/evicting.py) calls, per sample and layer: `cache_budget(n, visual, images)`
    (None: keep everything), `layer_state(cache_heads, budget)`, `prompt_rows(n)`, `prefill_update(state, queries,
    keys, scale, eligible)` and `step_update(state, query, keys, scale)`.
    """

    sites: ClassVar[tuple[str, ...]] = ("kv_cache",)
    positions: ClassVar[str] = "original"
    budget_kind = CACHE_ENTRIES
    evicts_while_decoding: ClassVar[bool] = True  # the kv_cache site drives the policy at every step
    keep: Any = None
    evict: str = "all"

    def requests(self, info: ModelInfo) -> list[PrefillKV]:
        return [PrefillKV(queries=1)]

    def plan(self, ctx: SiteContext) -> KeepPlan:
        raise VTPruneError(
            f"{self.name} keeps its cache budget while decoding: the kv_cache site drives its policy "
            "(`prefill_update` / `step_update`), not `plan`"
        )

    def cache_budget(self, prompt_len: int, visual: int, images: int) -> int | None:
        """Eligible entries kept per head and layer, or None for keep=1.0 (everything, every step: the dense model)."""
        if isinstance(self.keep, float) and self.keep >= 1.0:
            return None
        return self.budget(prompt_len, visual, images)

    def budget(self, prompt_len: int, visual: int, images: int) -> int:
        return cache_budget(self.name, self.keep, self.evict, prompt_len, visual, images)

    def prompt_rows(self, prompt_len: int) -> int:
        return prompt_len

    def prefill_update(self, state: Any, queries: Tensor, keys: Tensor, scale: float, eligible: Tensor) -> KVUpdate:
        """queries [H, Q, d] the last Q = prompt_rows(n) prompt rows, keys [H_c, n, d] (post-RoPE), eligible [n]."""
        return KVUpdate(state.prefill(queries, keys, scale, eligible))

    def step_update(self, state: Any, query: Tensor, keys: Tensor, scale: float) -> KVUpdate:
        """query [H, d] of the new token; keys [H_c, L, d] the cache with its key last -> the slots kept."""
        length = keys.shape[1]
        return KVUpdate(complement(length, state.step(decode_attention(query, keys, scale))))
