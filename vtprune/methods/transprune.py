"""TransPrune (Li et al., 2025): progressive pruning inside the LLM by Token Transition Variation + Instruction-Guided
Attention. Follows the released code; see docs/methods/transprune.md.

Layers are 1-indexed as in the paper: "prune at layer p" happens after layer p, so the pruned sequence enters
`model.layers[p]` (0-based) — numerically the cut sits "before 0-based layer p".
- TTV of layer l (l in the accumulation band): for its attention and its MLP, per token of the whole sequence,
  m_t = ||out|| / ||in|| (module input = output of the norm before it, output before the residual add) times
  softmax_t(1 - cos(in, out)) over all real tokens of the sample; the two modules are added. Every stored layer is
  read at the kept tokens after each cut (never renormalised); at prune layer p the TTVs of the band's layers <= p
  are summed (cumulative over stages) and normalised over the image's tokens.
- IGA at prune layer p: layer p+1's (0-based p) norm, q/k and RoPE on the hidden states leaving layer p, at the current
  positions; query rows are every token after the sample's last visual token; softmax over all keys (causal), mean over
  heads, image columns, mean over rows; normalised over the image's tokens.
- score = alpha * TTV + (1 - alpha) * IGA (alpha = 0.5 ranks like the code's plain sum); each image keeps
  floor(n_original * ratio) tokens, the ratios being relative to the image's original count. An image is one block:
  an anyres image's base view, tiles and row ends are ranked together (spec §6.4).
- Budget: `keep` (visual tokens per image after the last stage, or a ratio) scales the stage ratios geometrically,
  r_i -> r_i ** alpha with alpha such that the last stage keeps exactly `keep` (`scaled_schedule`); keep=None runs
  `keep_ratios` as given (the presets), keep=1.0 keeps everything.
- Positions are renumbered after every cut (PDrop convention); each layer's cache keeps what it saw, so while decoding
  a layer after stage k continues at the original position minus the tokens dropped up to stage k.
Per image: each image is its own "image block" (the release handles one image, batch 1). Other depths than
LLaVA-1.5-7B's 32 layers: every released layer l maps to floor(l * n / 32 + 0.5), bumped to stay strictly increasing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import (
    Choice,
    KeepPlan,
    Method,
    ModelInfo,
    QueryAttention,
    SiteContext,
    TransitionStats,
    Transitions,
    Uniform,
    VisualLayout,
    VTPruneError,
    keep_count,
    register,
    scaled_schedule,
    top_k,
)

RELEASED_DEPTH = 32  # LLaVA-1.5-7B: the depth the released layers are given for
RELEASED_PRUNE = (7, 9, 12)
RELEASED_BAND_START = 7
DIRECTIONS = ("one_minus_cos", "one_minus_abs_cos")


def scaled_layers(layers: tuple[int, ...], n_layers: int) -> tuple[int, ...]:
    """1-indexed layers of a 32-layer model mapped to an n-layer one: floor(l*n/32 + 0.5), kept strictly increasing."""
    out: list[int] = []
    for layer in layers:
        scaled = max(1, math.floor(layer * n_layers / RELEASED_DEPTH + 0.5))
        out.append(max(scaled, out[-1] + 1) if out else scaled)
    return tuple(out)


def ttv_scores(ratio: Tensor, cosine: Tensor, valid: Tensor, direction: str = "one_minus_cos") -> Tensor:
    """TTV of one layer for one sample: [modules, L] norm ratios and cosines, valid [L] -> [L] (0 at padding).

    Per module m_t * exp(u_t) / sum_r exp(u_r) over the real tokens, u = 1 - cos (code) or 1 - |cos| (paper); summed
    over the modules.
    """
    u = 1.0 - (cosine.abs() if direction == "one_minus_abs_cos" else cosine).float()
    weights = torch.softmax(u.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.where(valid, ratio.float() * weights, 0.0).sum(dim=0)


def iga_scores(query_attention: Tensor, visual_positions: Tensor) -> Tensor:
    """[heads, queries, L] attention of the instruction rows -> [visual]: head mean, visual columns, row mean."""
    return query_attention.float().mean(dim=0)[:, visual_positions].mean(dim=0)


def combine(ttv: Tensor, iga: Tensor, alpha: float) -> Tensor:
    """alpha * TTV + (1 - alpha) * IGA, each normalised to sum 1 over the image's tokens (eps 1e-8)."""
    return alpha * ttv / (ttv.sum() + 1e-8) + (1.0 - alpha) * iga / (iga.sum() + 1e-8)


@register
@dataclass
class TransPrune(Method):
    name: ClassVar[str] = "transprune"
    sites: ClassVar[tuple[str, ...]] = ("llm_layer",)
    positions: ClassVar[str] = "renumber"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "high": {"keep_ratios": (0.875, 0.625, 0.125)},  # released scripts: 576 -> 504 -> 360 -> 72, 1.56 TFLOPs
        "low": {"keep_ratios": (0.625, 0.1875, 0.0625)},  # inferred from 1.19 TFLOPs: 576 -> 360 -> 108 -> 36
    }

    keep: int | float | None = None  # visual tokens per image after the last stage (or a ratio); None: keep_ratios
    keep_ratios: tuple[float, ...] = (0.875, 0.625, 0.125)  # kept share of each image's ORIGINAL count, per stage
    prune_layers: tuple[int, ...] | None = None  # 1-indexed; None: (7, 9, 12) of 32 layers, scaled to the depth
    accumulate_layers: tuple[int, ...] | None = None  # 1-indexed TTV band; None: scaled 7 .. the last prune layer
    alpha: float = 0.5  # weight of TTV against IGA (1: TTV only, 0: IGA only)
    ttv_direction: str = "one_minus_cos"  # code: 1 - cos; paper: "one_minus_abs_cos" (1 - |cos|)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.keep_ratios = tuple(self.keep_ratios)
        if not self.keep_ratios or any(not 0.0 < r <= 1.0 for r in self.keep_ratios):
            raise VTPruneError(f"transprune keep_ratios={self.keep_ratios}: give ratios in (0, 1], one per stage")
        if any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:])):
            raise VTPruneError(f"transprune keep_ratios={self.keep_ratios} must not increase from stage to stage")
        if self.prune_layers is not None and len(self.prune_layers) != len(self.keep_ratios):
            raise VTPruneError(
                f"transprune has {len(self.keep_ratios)} keep_ratios but {len(self.prune_layers)} prune_layers"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise VTPruneError(f"transprune alpha={self.alpha}: use a weight in [0, 1]")
        if self.ttv_direction not in DIRECTIONS:
            raise VTPruneError(f"transprune ttv_direction={self.ttv_direction!r}: use one of {', '.join(DIRECTIONS)}")

    @classmethod
    def search_space(cls, info: ModelInfo, budget: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Tunes alpha and the TTV direction; the budget is a preset name ("high" / "low") or None (the defaults)."""
        if budget is not None and budget not in cls.presets:
            raise VTPruneError(f"transprune's budget is a preset name ({', '.join(cls.presets)}), got {budget!r}")
        fixed = dict(cls.presets[budget]) if budget is not None else {}
        return {"alpha": Uniform(0.0, 1.0), "ttv_direction": Choice(DIRECTIONS)}, fixed

    def layers(self, info: ModelInfo) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prune layers, accumulation layers), 1-indexed, for a model with info.llm_layers decoder layers."""
        n = info.llm_layers
        if self.prune_layers is None and len(self.keep_ratios) != len(RELEASED_PRUNE):
            raise VTPruneError(f"transprune has {len(self.keep_ratios)} stages; give prune_layers for them (1-indexed)")
        prune = tuple(self.prune_layers) if self.prune_layers is not None else scaled_layers(RELEASED_PRUNE, n)
        if list(prune) != sorted(set(prune)) or prune[0] < 1 or prune[-1] > n - 1:
            raise VTPruneError(
                f"transprune prune_layers {prune} (1-indexed, pruning after each) must be ascending in 1..{n - 1} "
                f"for a {n}-layer language model"
            )
        if self.accumulate_layers is not None:
            band = tuple(self.accumulate_layers)
        else:
            start = min(scaled_layers((RELEASED_BAND_START,), n)[0], prune[0])
            band = tuple(range(start, prune[-1] + 1))
        if any(not 1 <= layer <= prune[-1] for layer in band):
            raise VTPruneError(f"transprune accumulate_layers {band} must lie in 1..{prune[-1]} (the last prune layer)")
        return prune, band

    def cut_layers(self, info: ModelInfo) -> list[int]:
        return list(self.layers(info)[0])  # pruning after 1-indexed layer p = cutting before 0-based layer p

    def requests(self, info: ModelInfo) -> list[Any]:
        prune, band = self.layers(info)
        requests: list[Any] = []
        if self.alpha > 0:
            requests.append(Transitions(layers=tuple(layer - 1 for layer in band)))
        if self.alpha < 1:
            requests += [QueryAttention(layer=p, queries="after_visual") for p in prune]
        return requests

    def plan(self, ctx: SiteContext) -> KeepPlan:
        prune, band = self.layers(ctx.info)
        stage, layout = prune.index(ctx.layer), ctx.layout
        if "original_counts" not in ctx.state:  # the first cut sees every image whole
            ctx.state["original_counts"] = [
                {image: int(ordinals.numel()) for image, ordinals in image_blocks(layout, b).items()}
                for b in range(layout.batch_size)
            ]
        transitions = ctx.signals.get(Transitions(layers=tuple(layer - 1 for layer in band)), {})
        queries = ctx.signals.get(QueryAttention(layer=ctx.layer, queries="after_visual"))
        keep, scores = [], []
        for b in range(layout.batch_size):
            n = layout.num_visual(b)
            ttv = self._accumulated_ttv(transitions, layout, b) if self.alpha > 0 else torch.zeros(n)
            if self.alpha < 1:
                if n and queries[b].shape[1] == 0:
                    raise VTPruneError(
                        f"transprune's IGA needs text after the last image, and sample {b} has none; "
                        "use alpha=1.0 (TTV only) for such prompts"
                    )
                iga = iga_scores(queries[b], layout.visual_positions(b).to(queries[b].device)).cpu()
            else:
                iga = torch.zeros(n)
            sample_scores, kept = torch.zeros(n), []
            for image, ordinals in image_blocks(layout, b).items():
                sample_scores[ordinals] = combine(ttv[ordinals], iga[ordinals], self.alpha)
                count = self.stage_count(stage, ctx.state["original_counts"][b][image], image)
                kept.append(ordinals[top_k(sample_scores[ordinals], min(count, int(ordinals.numel())))])
            keep.append(torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long))
            scores.append(sample_scores)
        return KeepPlan(keep=keep, scores=scores)

    def stage_count(self, stage: int, original: int, image: int) -> int:
        """Tokens an image of `original` tokens keeps after `stage` (0-based)."""
        what = f"image {image}"
        if self.keep is None:
            return keep_count(self.keep_ratios[stage], original, what=what, rounding="floor")
        final = keep_count(self.keep, original, what=what, rounding="floor")
        if stage == len(self.keep_ratios) - 1:
            return final
        ratios = scaled_schedule(self.keep_ratios, final / original)
        return max(final, keep_count(ratios[stage], original, what=what, rounding="floor"))

    def _accumulated_ttv(self, transitions: dict[int, TransitionStats], layout: VisualLayout, sample: int) -> Tensor:
        """Sum of the TTVs of the band's layers that ran so far, read at the sample's current visual tokens."""
        current = layout.original_ordinal[sample]
        total = torch.zeros(current.numel())
        for stats in transitions.values():
            valid = stats.mask[sample].bool()
            ttv = ttv_scores(stats.ratio[sample], stats.cosine[sample], valid, self.ttv_direction).cpu()
            then = stats.layout.original_ordinal[sample]
            lookup = torch.zeros(int(then.max()) + 1 if then.numel() else 0)
            lookup[then] = ttv[stats.layout.visual_positions(sample)]
            total += lookup[current]
        return total


def image_blocks(layout: VisualLayout, sample: int) -> dict[int, Tensor]:
    """Per image of a sample (its spans together: an anyres image's base view, tiles and row ends), its ordinals."""
    blocks: dict[int, list[Tensor]] = {}
    for span, sl in layout.ordinal_slices(sample):
        blocks.setdefault(span.image, []).append(torch.arange(sl.start, sl.stop))
    return {image: torch.cat(parts) for image, parts in blocks.items()}
