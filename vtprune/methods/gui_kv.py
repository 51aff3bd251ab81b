"""GUI-KV (arXiv 2510.00536): KV-cache compression for GUI agents — SnapKV plus spatial saliency and temporal redundancy.

At the end of prefill, in every decoder layer and every head, each cached position except the last w prompt tokens
(the observation window) is scored by the attention the window pays to it, average-pooled along positions (SnapKV).
The current (last) screenshot's tokens get a bonus α·softmax(z/T) of their standardised attention-input L2 norms
(spatial saliency, added after pooling). Earlier screenshots' tokens whose post-RoPE keys are best explained by the
span of the current screenshot's first r keys (QR basis) get score 0 (temporal redundancy): the floor((1 − β)·N_prev)
smallest residuals over all earlier screenshots together, β = C/n. Each head keeps its top C − w positions plus the
window, C = floor(n·keep) for a prompt of n tokens, the same C in every layer. Keys keep their original positions.

The keys are post-RoPE, as in the official code, so the same patch in two screenshots differs by the rotation of its
position shift; `temporal_keys="pre_rope"` measures redundancy on the keys before RoPE instead (an option, not the
paper's method), where an unchanged screenshot is exactly redundant in the first layer.

Grouped-query models (`gqa_reduce`): scores are per query head; "first" keeps the selection of each KV group's first
query head (OpenCUA path), "mean"/"max" reduce the group's scores, and "expand" repeats K/V to the query heads before
the attention so the cache holds one head per query head (UI-TARS path, H/H_kv times the memory at the same budget).
See docs/methods/gui-kv.md (implemented from the paper and a specification; the official code is CC BY-NC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import CACHE_ENTRIES, KeepPlan, LayerKV, Method, ModelInfo, PrefillKV, SiteContext, VTPruneError, keep_count, keep_heads, register


def window_attention(queries: Tensor, keys: Tensor) -> Tensor:
    """[H, n - w] summed attention of the last w prompt tokens over the earlier positions.

    queries: [H, w, d] post-RoPE queries of the last w tokens; keys: [H_k, n, d] post-RoPE (H_k divides H, repeated).
    Logits / sqrt(d) in the input dtype; causal mask inside the last w×w block only (the dtype's most negative value);
    softmax in float32, cast back to the input dtype, then summed over the window rows.
    """
    heads, w, d = queries.shape
    n = keys.shape[1]
    keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)
    logits = queries @ keys.transpose(1, 2) / math.sqrt(d)  # [H, w, n]
    future = torch.ones(w, w, dtype=torch.bool, device=logits.device).triu(1)
    logits[:, :, n - w :] = logits[:, :, n - w :].masked_fill(future, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)
    return probs[:, :, : n - w].sum(dim=1)


def pool_scores(column_sums: Tensor, kernel: int = 5, pooling: str = "avgpool") -> Tensor:
    """[H, m] -> [H, m] float32: stride-1 pooling with zero padding counted in the average (count_include_pad)."""
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    return pool(column_sums[:, None, :], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0].float()


def spatial_saliency(hidden: Tensor, temperature: float = 3.5) -> Tensor:
    """[N] softmax(z / T) of the standardised L2 norms of the current screenshot's hidden states [N, D]."""
    norms = hidden.float().norm(dim=-1)
    if norms.numel() < 2:
        return torch.ones_like(norms)
    z = (norms - norms.mean()) / (norms.std() + 1e-8)  # unbiased std
    return torch.softmax(z / temperature, dim=0)


def key_residuals(current_keys: Tensor, previous_keys: Tensor, rank: int = 32) -> Tensor:
    """[H_k, N_prev] distance of each earlier key to the span of the current screenshot's first r keys.

    current_keys: [H_k, N_cur, d], previous_keys: [H_k, N_prev, d], post-RoPE, uncentred. The basis is the first
    r = min(rank, N_cur, d) columns of the thin QR factor of the d × N_cur key matrix, in float32.
    """
    basis, _ = torch.linalg.qr(current_keys.float().transpose(1, 2))  # [H_k, d, min(d, N_cur)]
    r = min(rank, current_keys.shape[1], current_keys.shape[2])
    basis = basis[:, :, :r]
    previous = previous_keys.float()
    projected = (previous @ basis) @ basis.transpose(1, 2)
    return (previous - projected).norm(dim=-1)


def gui_kv_scores(
    queries: Tensor,
    keys: Tensor,
    hidden: Tensor,
    current: Tensor,
    previous: Tensor,
    budget: int,
    *,
    kernel: int = 5,
    pooling: str = "avgpool",
    alpha: float = 2.0,
    temperature: float = 3.5,
    rank: int = 32,
    temporal: bool = True,
    temporal_keys: Tensor | None = None,
) -> Tensor:
    """[H, n - w] GUI-KV scores of one sample's positions before the window.

    queries: [H, w, d] (the last w tokens), keys: [H_k, n, d] post-RoPE, hidden: [n, D] (saliency source), current:
    [N_cur] and previous: [N_prev] indices of the current and earlier screenshots' tokens, budget: C entries kept per
    head. temporal_keys: [H_k, n, d] keys for the redundancy term if not the post-RoPE `keys` (e.g. before RoPE).
    """
    heads, w, _ = queries.shape
    n = keys.shape[1]
    scores = pool_scores(window_attention(queries, keys), kernel, pooling)
    scored = n - w
    if current.numel() == 0:
        return scores
    bonus = alpha * spatial_saliency(hidden[current], temperature)
    inside = current < scored  # window columns carry no score
    scores[:, current[inside]] += bonus[inside]
    previous = previous[previous < scored]
    if temporal and previous.numel():
        basis_keys = keys if temporal_keys is None else temporal_keys
        residual = key_residuals(basis_keys[:, current], basis_keys[:, previous], rank)  # [H_k, N_prev]
        redundant = math.floor((1.0 - budget / n) * previous.numel() + 1e-9)
        order = torch.sort(residual, dim=1, stable=True).indices[:, :redundant]  # smallest residuals first
        zero = torch.ones_like(residual, dtype=torch.bool).scatter(1, order, False)
        zero = (~zero).repeat_interleave(heads // keys.shape[0], dim=0)
        scores[:, previous] = scores[:, previous].masked_fill(zero, 0.0)
    return scores


def reduce_groups(scores: Tensor, cache_heads: int, gqa_reduce: str) -> Tensor:
    """[H, m] per query head -> [H_c, m] per cache head."""
    heads = scores.shape[0]
    if heads == cache_heads:
        return scores
    grouped = scores.view(cache_heads, heads // cache_heads, -1)
    if gqa_reduce == "first":
        return grouped[:, 0]
    if gqa_reduce == "mean":
        return grouped.mean(dim=1)
    return grouped.amax(dim=1)


def select(scores: Tensor, budget: int, window: int) -> Tensor:
    """[H_c, C] kept indices per head: the top C - w scores (ties to the lower index) and the last w positions."""
    heads, scored = scores.shape
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : budget - window]
    tail = torch.arange(scored, scored + window, device=scores.device).expand(heads, window)
    return torch.sort(torch.cat([top, tail], dim=1), dim=1).values


@register
@dataclass
class GUIKV(Method):
    name: ClassVar[str] = "gui-kv"
    sites: ClassVar[tuple[str, ...]] = ("kv_cache",)
    positions: ClassVar[str] = "original"
    budget_kind = CACHE_ENTRIES

    keep: int | float = 0.1  # cache entries kept per head and layer: a ratio b of the prompt (C = floor(n·b)) or C
    window: int = 8  # observation window w, clipped to C - 2
    kernel: int = 5  # pooling kernel (stride 1, padding kernel // 2)
    pooling: str = "avgpool"  # "avgpool" (count_include_pad) or "maxpool"
    alpha: float = 2.0  # saliency weight
    temperature: float = 3.5  # divides the z-scores before the softmax
    rank: int = 32  # columns of the QR basis of the current screenshot's keys
    temporal: bool = True  # zero the most redundant tokens of earlier screenshots
    gqa_reduce: str = "first"  # grouped-query models: "first" | "mean" | "max" | "expand"
    saliency_source: str = "attn_input"  # "attn_input" (after the input norm, as the official code) or "residual"
    temporal_keys: str = "post_rope"  # keys of the redundancy term: "post_rope" (official) or "pre_rope"

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {
            "pooling": ("avgpool", "maxpool"),
            "gqa_reduce": ("first", "mean", "max", "expand"),
            "saliency_source": ("attn_input", "residual"),
            "temporal_keys": ("post_rope", "pre_rope"),
        }
        for option, allowed in choices.items():
            if getattr(self, option) not in allowed:
                raise VTPruneError(f"gui-kv {option}={getattr(self, option)!r}: use one of {', '.join(allowed)}")
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0 or self.rank < 1:
            raise VTPruneError(
                f"gui-kv needs window >= 1, an odd kernel >= 1 and rank >= 1 "
                f"(got window={self.window}, kernel={self.kernel}, rank={self.rank})"
            )

    def requests(self, info: ModelInfo) -> list[PrefillKV]:
        return [
            PrefillKV(
                queries=self.window,
                expand_heads=self.gqa_reduce == "expand",
                pre_rope_keys=self.temporal_keys == "pre_rope",
            )
        ]

    def budget(self, n: int, sample: int) -> tuple[int, int]:
        """(C, w) for a prompt of n tokens: C = floor(n·keep) (or keep itself), w = min(window, C - 2)."""
        budget = keep_count(self.keep, n, what=f"the {n}-token prompt of sample {sample}", rounding="floor")
        if budget < 3:
            raise VTPruneError(
                f"gui-kv keep={self.keep} leaves C={budget} cache entries of the {n}-token prompt of sample {sample}; "
                "it needs C >= 3 (the window w = C - 2 must hold a token): raise keep"
            )
        return budget, min(self.window, budget - 2)

    def plan(self, ctx: SiteContext) -> KeepPlan:
        (request,) = self.requests(ctx.info)
        value: LayerKV = ctx.signals[request]
        layout = ctx.layout
        source = value.hidden if self.saliency_source == "attn_input" else value.residual
        heads, visual_scores = [], []
        for b in range(layout.batch_size):
            real = value.key_mask[b].nonzero().squeeze(1)  # [n] positions of the sample's tokens
            n = real.numel()
            cache_heads = value.keys.shape[1]
            what = f"the {n}-token prompt of sample {b}"
            if keep_count(self.keep, n, what=what, rounding="floor") == n:  # the budget holds the whole prompt
                heads.append(real.expand(cache_heads, n))
                visual_scores.append(torch.full((layout.num_visual(b),), float("nan")))
                continue
            budget, window = self.budget(n, b)
            window = min(window, value.queries.shape[2])
            index_of = torch.full((layout.seq_len,), -1, dtype=torch.long, device=real.device)
            index_of[real] = torch.arange(n, device=real.device)
            spans = [index_of[s.start : s.end] for s in layout.spans[b] if s.length]
            empty = torch.zeros(0, dtype=torch.long, device=real.device)
            scores = gui_kv_scores(
                value.queries[b, :, -window:],
                value.keys[b][:, real],
                source[b][real],
                spans[-1] if spans else empty,
                torch.cat(spans[:-1]) if len(spans) > 1 else empty,
                budget,
                kernel=self.kernel,
                pooling=self.pooling,
                alpha=self.alpha,
                temperature=self.temperature,
                rank=self.rank,
                temporal=self.temporal,
                temporal_keys=None if value.keys_pre_rope is None else value.keys_pre_rope[b][:, real],
            )
            heads.append(real[select(reduce_groups(scores, cache_heads, self.gqa_reduce), budget, window)])
            full = torch.full((n,), float("nan"), device=scores.device)
            full[: n - window] = scores.mean(dim=0)
            visual_scores.append(full[index_of[layout.visual_positions(b).to(real.device)]].cpu())
        return keep_heads(layout, heads, visual_scores)
