"""ZipVL (He et al., 2024): layer-adaptive important tokens, attention among them only, a compressed KV cache.

In every decoder layer at prefill (docs/methods/zipvl.md):
1. probe queries P (default: the last 5 % of the prompt plus 5 % drawn uniformly with replacement from the earlier
   positions, seeded; `probe="all"`: every token) attend over all keys: `a_j` = head-mean of the summed probe
   attention to key j;
2. the number of important tokens `p` is the fewest whose accumulated `a` reaches τ of the total mass;
3. which tokens: the top-p by the normalised score `a_j / c_j`, c_j = number of probes that see key j (or, with
   `normaliser="all_queries"`, the number of all queries that see it, as ZipCache's code does);
4. the layer's attention runs among the important tokens T only (queries, keys and values gathered in position
   order, so a plain causal kernel is exact); the other tokens' attention output is zero in that layer (inferred:
   their residual stream passes through, they are scored again in the next layer);
5. the KV cache: `kv_mode="drop"` keeps only T (paper v2), `"quant"` keeps T at `bits[0]` and the rest at `bits[1]`
   bits (paper v1; keys channel-wise and values channel-separable token-wise, as ZipCache), `"full"` keeps all.
While decoding, every `decode_period` new tokens the newest block of the cache is scored with the current query's
attention (same rule) and compressed the same way. The budget `keep` is τ; keep=1.0 keeps every token: the exactness setting. Positions never
change (a kept key keeps its RoPE position). No token is force-kept unless `keep_last=True` (the last prompt token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..core import ATTENTION_MASS, KeepPlan, Method, SiteContext, VTPruneError, register, top_k
from ..core.sparse import AttentionContext

KV_MODES = ("drop", "quant", "full")


# ------------------------------------------------------------------------------------------------ scoring
def probe_positions(n: int, probe: str, probe_frac: float, generator: torch.Generator | None = None) -> Tensor:
    """Ascending probe query indices among n tokens (duplicates kept: a position drawn twice counts twice).

    "recent+random": the last max(1, ⌊n·frac/2⌋) tokens plus ⌊n·frac/2⌋ drawn uniformly with replacement from the
    earlier ones; "all": every token.
    """
    if probe == "all":
        return torch.arange(n)
    recent = max(1, int(n * probe_frac / 2))
    earlier = n - recent
    drawn = torch.randint(0, earlier, (int(n * probe_frac / 2),), generator=generator) if earlier > 0 else None
    recent_positions = torch.arange(earlier, n)
    return torch.sort(torch.cat([drawn, recent_positions]) if drawn is not None else recent_positions).values


def probe_mass(queries: Tensor, keys: Tensor, scale: float, query_positions: Tensor | None) -> Tensor:
    """a [n]: per key, the head-mean of the attention summed over the probe queries (float32).

    queries: [H, P, d], keys: [H_kv, n, d] (grouped-query heads share their key head); query_positions: [P] index of
    each probe among the keys (causal mask), or None when every probe sees every key. Probes are processed in chunks
    so that at most ~4M scores exist at a time.
    """
    heads, probes, dim = queries.shape
    kv_heads, n = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    keys_t = keys.float().transpose(1, 2)  # [H_kv, d, n]
    key_index = torch.arange(n, device=keys.device)
    chunk = max(1, (1 << 22) // max(1, heads * n))
    mass = torch.zeros(n, dtype=torch.float32, device=keys.device)
    for start in range(0, probes, chunk):
        part = queries[:, start : start + chunk].float()
        size = part.shape[1]
        logits = torch.matmul(part.reshape(kv_heads, group * size, dim), keys_t).view(heads, size, n).mul_(scale)
        if query_positions is not None:
            later = key_index[None, :] > query_positions[start : start + chunk, None].to(keys.device)
            logits.masked_fill_(later, float("-inf"))
        mass += torch.softmax(logits, dim=-1).sum(dim=(0, 1)).div_(heads)
    return mass


def probe_counts(probes: Tensor, n: int, normaliser: str, causal: bool = True) -> Tensor:
    """c [n]: how many queries see each key — the probes at or after it ("probes"), or every query at or after it
    ("all_queries", i.e. n − j). Without a causal mask every probe sees every key."""
    if not causal:
        return torch.full((n,), float(probes.numel()))
    keys = torch.arange(n)
    if normaliser == "all_queries":
        return (n - keys).float()
    return (probes.numel() - torch.searchsorted(probes.sort().values, keys, side="left")).float()


def important_count(mass: Tensor, tau: float) -> int:
    """p = min {p : the p largest entries of `mass` sum to at least τ of its total}; τ >= 1 keeps everything."""
    n = int(mass.numel())
    if tau >= 1.0 or n == 0:
        return n
    cumulative = torch.sort(mass.double(), descending=True).values.cumsum(0)
    target = tau * cumulative[-1]
    return min(n, int(torch.searchsorted(cumulative, target.view(1), side="left")) + 1)


def select_important(mass: Tensor, counts: Tensor, tau: float, keep_last: bool = False) -> Tensor:
    """Ascending indices of T: how many from the raw mass, which from the normalised score mass / counts."""
    n = int(mass.numel())
    p = important_count(mass, tau)
    if p >= n:
        return torch.arange(n)
    scores = torch.where(counts > 0, mass.cpu() / counts.clamp(min=1), torch.zeros_like(counts))
    chosen = top_k(scores, p)
    if keep_last and not bool((chosen == n - 1).any()):
        chosen = torch.cat([chosen, torch.tensor([n - 1])])
    return chosen


# ------------------------------------------------------------------------------------------ quantisation
def quantise(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric uniform quantisation, min/max along `dim`: (codes uint8, minimum, step); x ≈ codes·step + minimum.

    Computed in float32; minimum and step are returned in x's dtype. A constant slice gets step eps (its codes are 0),
    so nothing is divided by zero.
    """
    xf = x.float()
    low, high = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    step = ((high - low) / (2**bits - 1)).clamp(min=torch.finfo(torch.float32).eps)
    codes = ((xf - low) / step).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, low.to(x.dtype), step.to(x.dtype)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """[m, C] codes of `bits` bits -> [m, ceil(C·bits/8)] bytes (8/bits codes per byte along the channels)."""
    per_byte = 8 // bits
    pad = (-codes.shape[1]) % per_byte
    codes = torch.nn.functional.pad(codes, (0, pad)).view(codes.shape[0], -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (codes << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, channels: int) -> Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)
    return codes.view(packed.shape[0], -1)[:, :channels]


@dataclass
class QuantizedRows:
    """One set of tokens (important or not) at one bit-width: keys channel-wise, values token-wise (scaled)."""

    rows: Tensor  # [m] token indices
    bits: int
    key_codes: Tensor  # [m, C·bits/8] uint8
    key_min: Tensor  # [C]
    key_step: Tensor  # [C]
    value_codes: Tensor  # [m, C·bits/8] uint8
    value_min: Tensor  # [m]
    value_step: Tensor  # [m]

    @property
    def nbytes(self) -> int:
        parts = (self.key_codes, self.key_min, self.key_step, self.value_codes, self.value_min, self.value_step)
        return sum(t.nbytes for t in parts)


@dataclass
class QuantizedKV:
    """The keys and values of n tokens of one sample and layer, in mixed precision."""

    n: int
    heads: int
    head_dim: int
    value_scale: Tensor  # [C]: sqrt(max |v_c|) over all n tokens
    sets: list[QuantizedRows] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.value_scale.nbytes + sum(s.nbytes for s in self.sets)

    def dequantize(self) -> tuple[Tensor, Tensor]:
        """(keys, values), each [heads, n, head_dim] in the dtype of the quantisation parameters."""
        channels = self.heads * self.head_dim
        keys = self.value_scale.new_zeros(self.n, channels)
        values = self.value_scale.new_zeros(self.n, channels)
        for s in self.sets:
            keys[s.rows] = unpack_codes(s.key_codes, s.bits, channels).to(keys.dtype) * s.key_step + s.key_min
            scaled = unpack_codes(s.value_codes, s.bits, channels).to(keys.dtype) * s.value_step[:, None]
            values[s.rows] = (scaled + s.value_min[:, None]) * self.value_scale
        shape = (self.n, self.heads, self.head_dim)
        return keys.view(shape).transpose(0, 1), values.view(shape).transpose(0, 1)


def quantise_kv(keys: Tensor, values: Tensor, important: Tensor, bits: tuple[int, int] = (4, 2)) -> QuantizedKV:
    """Mixed-precision KV of one sample and layer: keys/values [heads, n, d]; important [n] bool gets bits[0].

    Channels are all heads × head_dim together. Keys: per channel min/max over the rows of each set. Values: every
    channel divided by sqrt(max |v_c|) over all rows, then per row min/max over the channels, per set.
    """
    heads, n, head_dim = keys.shape
    k = keys.transpose(0, 1).reshape(n, -1)
    v = values.transpose(0, 1).reshape(n, -1)
    scale = v.abs().amax(0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    out = QuantizedKV(n, heads, head_dim, scale)
    for chosen, width in ((important, bits[0]), (~important, bits[1])):
        rows = chosen.nonzero().squeeze(1)
        if not rows.numel():
            continue
        key_codes, key_min, key_step = quantise(k[rows], width, dim=0)
        value_codes, value_min, value_step = quantise(v[rows] / scale, width, dim=1)
        out.sets.append(
            QuantizedRows(
                rows, width, pack_codes(key_codes, width), key_min[0], key_step[0],
                pack_codes(value_codes, width), value_min[:, 0], value_step[:, 0],
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ method
@register
@dataclass
class ZipVL(Method):
    name: ClassVar[str] = "zipvl"
    sites: ClassVar[tuple[str, ...]] = ("llm_attention",)
    positions: ClassVar[str] = "original"
    budget_kind = ATTENTION_MASS

    keep: float = 0.975  # τ: attention-mass share the important tokens must hold; 0.96 is the aggressive setting
    probe: str = "recent+random"  # probe queries: "recent+random" or "all" (exact, for short inputs)
    probe_frac: float = 0.10  # share of the prompt used as probes (half recent, half random)
    normaliser: str = "probes"  # "probes" (paper) or "all_queries" (ZipCache code: n - j)
    kv_mode: str = "drop"  # "drop" (v2), "quant" (v1, mixed precision) or "full" (sparse prefill only)
    bits: tuple[int, int] = (4, 2)  # quant: bits of the important / other tokens (2, 4 or 8)
    decode_period: int | None = 100  # while decoding, compress every this many new tokens (None: never)
    keep_last: bool = False  # always count the last prompt token as important
    seed: int = 0  # random probes are drawn from a generator seeded once per forward

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.probe not in ("recent+random", "all"):
            raise VTPruneError(f"zipvl probe={self.probe!r}: use 'recent+random' or 'all'")
        if not 0.0 < self.probe_frac <= 1.0:
            raise VTPruneError(f"zipvl probe_frac={self.probe_frac}: use a share in (0, 1]")
        if self.normaliser not in ("probes", "all_queries"):
            raise VTPruneError(f"zipvl normaliser={self.normaliser!r}: use 'probes' or 'all_queries'")
        if self.kv_mode not in KV_MODES:
            raise VTPruneError(f"zipvl kv_mode={self.kv_mode!r}: use one of {', '.join(KV_MODES)}")
        if len(self.bits) != 2 or any(b not in (2, 4, 8) for b in self.bits):
            raise VTPruneError(f"zipvl bits={self.bits}: give (important, other) bit-widths from 2, 4, 8")
        if self.decode_period is not None and self.decode_period < 1:
            raise VTPruneError(f"zipvl decode_period={self.decode_period}: give a positive count or None")

    def important(self, ctx: AttentionContext) -> Tensor:
        """Ascending indices (among ctx.keys) of the important tokens T of one layer and sample."""
        n = ctx.keys.shape[1]
        if self.keep >= 1.0:
            return torch.arange(n)
        if ctx.causal:
            generator = ctx.state.get("generator")
            if generator is None:
                generator = ctx.state["generator"] = torch.Generator().manual_seed(self.seed)
            probes = probe_positions(n, self.probe, self.probe_frac, generator)
            mass = probe_mass(ctx.queries[:, probes.to(ctx.queries.device)], ctx.keys, ctx.scale, probes)
        else:
            probes = torch.arange(ctx.queries.shape[1])
            mass = probe_mass(ctx.queries, ctx.keys, ctx.scale, None)
        counts = probe_counts(probes, n, self.normaliser, causal=ctx.causal)
        return select_important(mass.cpu(), counts, self.keep, keep_last=self.keep_last and ctx.causal)

    def quantise_kv(self, keys: Tensor, values: Tensor, important: Tensor) -> QuantizedKV:
        """The mixed-precision cache of one sample and layer (kv_mode="quant"): keys/values [heads, n, d]."""
        return quantise_kv(keys, values, important, tuple(self.bits))

    def plan(self, ctx: SiteContext) -> KeepPlan:
        """ZipVL makes no token cut: it acts at the `llm_attention` site through `important`."""
        raise VTPruneError("zipvl does not cut the sequence; it runs at the llm_attention site")
