"""PyramidDrop (Xing et al., CVPR 2025): the image tokens shrink geometrically inside the LLM. Follows the official code
(Cooperx521/PyramidDrop @ 6444f30, `llava/model/modeling_llama_pdrop.py` `pdrop_forward` / `pdrop_rank_drop`; spec:
/work/shared/methods/pyramiddrop.md; docs/methods/pyramiddrop.md).

After 1-indexed layer l_k (k = 1..S), i.e. right before 0-based layer l_k, each image keeps int(n0 * ratio_k) of its
n0 original tokens, ratio_k = lambda^k by default: the top tokens by the attention of the last prompt token, computed
with the *next* layer's (0-based l_k) norm, q/k and RoPE at the current positions, softmax over all keys in float32,
mean over heads. Kept tokens stay in order; positions are renumbered after every cut, and while decoding each layer
group continues at its own shortened length (the official per-layer position offsets).

Budget: `keep` is the average number of visual tokens per image over all decoder layers (the paper's "average
tokens", issue #22), or that average as a share of the image's tokens. lambda solves
  share = [l_1 + (l_2 - l_1) lambda + ... + (L - l_S) lambda^S] / L
(the author's equation in issue #29, without the int truncation). Alternatively give `lam` or the stage `ratios`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import (
    KeepPlan,
    Method,
    ModelInfo,
    QueryAttention,
    SiteContext,
    VTPruneError,
    check_keep,
    keep_count,
    register,
    top_k,
)

RELEASED_DEPTH = 32  # LLaVA-1.5-7B
RELEASED_LAYERS = (8, 16, 24)
RELEASED_LAMBDA = 0.5


def pdrop_scores(last_row: Tensor, image_positions: Tensor) -> Tensor:
    """[heads, L] softmax row of the last prompt token -> [n] head-mean attention at the image's positions."""
    return last_row.float().mean(dim=0)[image_positions]


def stage_counts(original: int, ratios: tuple[float, ...]) -> list[int]:
    """Tokens an image of `original` tokens keeps after each stage: int(original * ratio) (official truncation; a
    product within 1e-9 below an integer counts as that integer, so float noise in lambda^k loses no token)."""
    return [int(original * r + 1e-9) for r in ratios]


def average_share(layers: tuple[int, ...], ratios: tuple[float, ...], depth: int) -> float:
    """Average kept share over the `depth` decoder layers: layers 1..l_1 see everything, l_k+1..l_(k+1) ratio_k."""
    bounds = (0, *layers, depth)
    shares = (1.0, *ratios)
    return sum((bounds[i + 1] - bounds[i]) * shares[i] for i in range(len(shares))) / depth


def solve_lambda(share: float, layers: tuple[int, ...], depth: int) -> float:
    """The lambda in [0, 1] whose ratios lambda^k give `share` as the average over layers (bisection)."""
    if share >= 1.0:
        return 1.0
    floor = layers[0] / depth  # lambda = 0: only the layers before the first cut see the image
    if share < floor - 1e-12:
        raise VTPruneError(
            f"pyramiddrop: an average share of {share:.4f} is below {floor:.4f}, what the first {layers[0]} of "
            f"{depth} layers alone hold; cut earlier (layer_list) or keep more"
        )
    low, high = 0.0, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        if average_share(layers, tuple(mid ** (k + 1) for k in range(len(layers))), depth) < share:
            low = mid
        else:
            high = mid
    return high


def scaled_layers(layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """1-indexed layers of a 32-layer model mapped to `depth` layers: floor(l * depth / 32 + 0.5), kept increasing."""
    out: list[int] = []
    for layer in layers:
        scaled = max(1, math.floor(layer * depth / RELEASED_DEPTH + 0.5))
        out.append(max(scaled, out[-1] + 1) if out else scaled)
    return tuple(out)


@register
@dataclass
class PyramidDrop(Method):
    name: ClassVar[str] = "pyramiddrop"
    sites: ClassVar[tuple[str, ...]] = ("llm_layer",)
    positions: ClassVar[str] = "renumber"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "released": {"layer_list": (8, 16, 24), "lam": 0.5},  # every released eval script: 576 -> 288 -> 144 -> 72
        "avg64": {"layer_list": (2, 8, 16), "lam": 0.19},  # the author's setting for 64 average tokens (issue #29)
        "avg128": {"layer_list": (2, 8, 16), "lam": 0.42},  # derived with the same equation (not the author's)
        "avg192": {"layer_list": (2, 8, 16), "lam": 0.56},  # derived with the same equation (not the author's)
    }

    keep: int | float | None = None  # average visual tokens per image over the layers (int) or that share (float)
    lam: float | None = None  # lambda: stage k keeps lambda^k; None (with no keep, no ratios): the released 0.5
    ratios: tuple[float, ...] | None = None  # kept share of each image's ORIGINAL count after each stage
    layer_list: tuple[int, ...] | None = None  # 1-indexed: drop after these layers; None: (8, 16, 24) of 32, scaled

    def __post_init__(self) -> None:
        given = [name for name in ("keep", "lam", "ratios") if getattr(self, name) is not None]
        if len(given) > 1:
            raise VTPruneError(f"pyramiddrop takes one of keep, lam, ratios; got {' and '.join(given)}")
        if self.keep is not None:
            check_keep(self.keep)
        if self.lam is not None and not 0.0 < self.lam <= 1.0:
            raise VTPruneError(f"pyramiddrop lam={self.lam}: use a ratio in (0, 1] (released: 0.5)")
        if self.ratios is not None:
            self.ratios = tuple(self.ratios)
            if not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
                raise VTPruneError(f"pyramiddrop ratios={self.ratios}: give shares in [0, 1], one per stage")
            if any(b > a for a, b in zip(self.ratios, self.ratios[1:])):
                raise VTPruneError(f"pyramiddrop ratios={self.ratios} must not increase from stage to stage")
        if self.layer_list is not None:
            self.layer_list = tuple(self.layer_list)
            if self.ratios is not None and len(self.ratios) != len(self.layer_list):
                raise VTPruneError(f"pyramiddrop has {len(self.ratios)} ratios but {len(self.layer_list)} layers")

    def layers(self, info: ModelInfo) -> tuple[int, ...]:
        """1-indexed layers after which tokens drop, for a model with info.llm_layers decoder layers."""
        n = info.llm_layers
        if self.layer_list is None:
            if self.ratios is not None and len(self.ratios) != len(RELEASED_LAYERS):
                raise VTPruneError(f"pyramiddrop has {len(self.ratios)} ratios; give layer_list for them (1-indexed)")
            layers = scaled_layers(RELEASED_LAYERS, n)
        else:
            layers = self.layer_list
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] > n - 1:
            raise VTPruneError(
                f"pyramiddrop layer_list {layers} (1-indexed, dropping after each) must be ascending in 1..{n - 1} "
                f"for a {n}-layer language model"
            )
        return tuple(layers)

    def stage_ratios(self, info: ModelInfo, original: int) -> tuple[float, ...]:
        """Cumulative kept shares after each stage, for an image of `original` tokens."""
        layers = self.layers(info)
        if self.ratios is not None:
            return self.ratios
        if self.keep is None:
            lam = RELEASED_LAMBDA if self.lam is None else self.lam
        else:
            share = self.keep if isinstance(self.keep, float) else keep_count(self.keep, original) / original
            lam = solve_lambda(share, layers, info.llm_layers)
        return tuple(lam ** (k + 1) for k in range(len(layers)))

    def cut_layers(self, info: ModelInfo) -> list[int]:
        return list(self.layers(info))  # dropping after 1-indexed layer l = cutting before 0-based layer l

    def requests(self, info: ModelInfo) -> list[Any]:
        return [QueryAttention(layer=layer, queries="last") for layer in self.layers(info)]

    def plan(self, ctx: SiteContext) -> KeepPlan:
        layout, stage = ctx.layout, self.layers(ctx.info).index(ctx.layer)
        if "original_counts" not in ctx.state:  # the first cut sees every image whole
            ctx.state["original_counts"] = [[span.length for span in spans] for spans in layout.spans]
        rows = ctx.signals[QueryAttention(layer=ctx.layer, queries="last")]
        keep, scores = [], []
        for b in range(layout.batch_size):
            sample_scores = pdrop_scores(rows[b][:, -1], layout.visual_positions(b).to(rows[b].device)).cpu()
            kept = []
            for i, (span, sl) in enumerate(layout.ordinal_slices(b)):
                original = ctx.state["original_counts"][b][i]
                count = stage_counts(original, self.stage_ratios(ctx.info, original))[stage] if original else 0
                kept.append(top_k(sample_scores[sl], min(count, span.length)) + sl.start)
            keep.append(torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long))
            scores.append(sample_scores)
        return KeepPlan(keep=keep, scores=scores)
