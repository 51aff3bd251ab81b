"""VFlowOpt (Yang et al., ICCV 2025): an importance map from the vision encoder, progressive pruning with recycling,
hyperparameters tuned against the model itself. Follows the official code; see docs/methods/vflowopt.md.

Importance per image: I = c + alpha_v * softmax(E) over the image's patches.
- c, context relevance: head-mean attention A of one encoder layer (the one feeding the projector) among all its
  tokens ([CLS] included, it may be a global query); received attention r_j = column mean; global tokens
  G = {j : r_j > threshold * mean(r)}; c_j = mean over g in G of A[g, j], read at the patch columns. An empty G (the
  official code would give NaN) takes the tokens of maximal r, the limit of lowering the threshold; the trace notes it.
- E, patch entropy of a grayscale 256-bin histogram per patch, in bits. entropy_mode="official" reproduces the
  release (uint8 of the fp16 normalised pixels times 255, which wraps); "raw" undoes the processor's normalisation
  (`pixel_mean` / `pixel_std`, CLIP's by default) and takes the clean entropy of the image. Unused when alpha_v = 0.
Stage V (pre_llm, after the projector as in the code; positions renumbered): per image of L tokens, the
round(L(1 - vit_keep)) + int(L / cell^2) lowest-I tokens are pruned (stable: ties prune the lower index first) and
recycled cell by cell (cells of `cell` x `cell` patches, floor-based): one token per non-empty cell, the I-weighted mean
of its members, at the slot of its highest-I member (ties: the lower index), which keeps that member's I.
vit_keep = 1 bypasses stage V entirely (the release would still recycle int(L / cell^2) tokens), so keep-all is exact.
Stages L1 / L2 (llm_layer, at the input of `llm_layers`; original positions kept, gaps stay): per image, the
round(n (1 - r)) lowest-I of its n current tokens are dropped (r = llm_keep1, then llm_keep2).
Budget: the average kept share over the L layers of an LLM cut before layers l1 < l2 is
(l1 r_v + (l2 - l1) r_v r_1 + (L - l2) r_v r_1 r_2) / L; with llm_keep2=None, r_2 is derived from `budget` (clamped to
[0, 1]). Layers: the release prunes before layers 9 and 18 of Qwen2-7B's 28; spec §9 keeps (9, 18) for 32-layer
LLaVA-1.5 and re-derives r_2 for its 9/9/14 split, so models with >= 28 layers use (9, 18); shallower ones scale them
by depth (floor(l * L / 28 + 0.5), kept strictly increasing). The presets are the released LLaVA-OneVision-7B
configurations with r_2 derived from each one's own achieved budget, which reproduces the released r_2 on 28 layers.
Single-grid images (LLaVA-1.5) use the rules above. On the LLaVA-NeXT family (per-encoder-input attention;
spec §4.1, §4.4) a unit is an anyres image (base view and tiles: the map `anyres_importance` lays out, read per token through the
layout's view / view_patch, one `stage_v` over both with `anyres_cells`) or a video (each frame's map resized to the
pooled grid, `video_keep` over all frames, no recycling); a single view of a multi-image prompt keeps its top patches
without recycling. The LLM stages drop per unit. Checked against the official code's outputs (pure functions) and
through the adapters (tests/methods/test_vflowopt_next.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import (
    KeepPlan,
    Merge,
    Method,
    ModelInfo,
    PixelValues,
    SiteContext,
    Uniform,
    VisionAttention,
    VTPruneError,
    keep_all,
    keep_count,
    register,
    scaled_schedule,
    top_k,
)

RELEASED_DEPTH, RELEASED_LAYERS = 28, (9, 18)  # Qwen2-7B in LLaVA-OneVision
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NON_PATCH_IMPORTANCE = 1.0  # tokens that are no patch (e.g. row-end tokens): in effect always kept


def budget_share(vit_keep: float, llm_keep1: float, llm_keep2: float, n_layers: int, layers: tuple[int, int]) -> float:
    """Average kept share of the visual tokens over the LLM's layers (recycled tokens and the over-prune left out)."""
    l1, l2 = layers
    return (l1 * vit_keep + (l2 - l1) * vit_keep * llm_keep1 + (n_layers - l2) * vit_keep * llm_keep1 * llm_keep2) / n_layers


def derived_llm_keep2(budget: float, vit_keep: float, llm_keep1: float, n_layers: int, layers: tuple[int, int]) -> float:
    """The r_2 that makes `budget_share` equal `budget`, clamped to [0, 1]."""
    l1, l2 = layers
    rest = (n_layers * budget - l1 * vit_keep - (l2 - l1) * vit_keep * llm_keep1) / (n_layers - l2)
    return min(1.0, max(0.0, rest / (vit_keep * llm_keep1)))


def _released(t: float, m: float, r_v: float, r_1: float, r_2: float) -> dict[str, Any]:
    share = budget_share(r_v, r_1, r_2, RELEASED_DEPTH, RELEASED_LAYERS)
    return {"threshold": t, "cell": m, "vit_keep": r_v, "llm_keep1": r_1, "llm_keep2": None, "budget": share, "alpha_v": 0.0}


PRESETS = {  # LLaVA-OneVision-qwen2-7b-ov, official repo @129eeef
    "keep10": _released(39.26492840997221, 17.386981849158786, 0.11661529508161146, 1.0, 0.6011),
    "keep25": _released(34.759552803070484, 15.580797034937687, 0.2651026358526424, 0.9833433139039235, 0.8773258179532721),
    "keep50": _released(28.683047941520474, 11.756787150848968, 0.7233201448753168, 0.748747637472693, 0.487),
}


def default_llm_layers(n_layers: int) -> tuple[int, int]:
    """(9, 18) for >= 28 layers; shallower language models scale them by depth."""
    if n_layers >= RELEASED_DEPTH:
        return RELEASED_LAYERS
    first = max(1, math.floor(RELEASED_LAYERS[0] * n_layers / RELEASED_DEPTH + 0.5))
    second = max(first + 1, math.floor(RELEASED_LAYERS[1] * n_layers / RELEASED_DEPTH + 0.5))
    return first, second


def relevance(attention: Tensor, threshold: float, has_cls: bool) -> tuple[Tensor, bool]:
    """[T, T] head-mean attention -> ([patches] context relevance c, whether the global set was empty)."""
    attention = attention.float()
    received = attention.mean(dim=0)  # r_j, column means over all query rows
    is_global = received > threshold * received.mean()
    empty = not bool(is_global.any())
    if empty:
        is_global = received == received.max()
    c = attention[is_global].mean(dim=0)
    return (c[1:] if has_cls else c), empty


def quantize_pixels(pixels: Tensor, mode: str, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """[N, C, H, W] normalised pixels -> integer levels 0..255 per channel (long).

    official: trunc(fp16(x) * 255) wrapped modulo 256, as `uint8(x * 255)` does in the release; raw: the image's own
    8-bit values, undoing the normalisation x = (v / 255 - mean) / std.
    """
    if mode == "official":
        return (pixels.half() * 255).float().trunc().long() % 256
    mean_t = torch.tensor(mean, device=pixels.device)[None, :, None, None]
    std_t = torch.tensor(std, device=pixels.device)[None, :, None, None]
    return torch.round((pixels.float() * std_t + mean_t) * 255).clamp(0, 255).long()


def patch_entropy(levels: Tensor, patch: int) -> Tensor:
    """[N, 3, H, W] levels 0..255 -> [N, patches] entropy (bits) of each patch's gray-level histogram, row-major.

    Patches are cut with stride `patch` from the top-left corner, as the release does; a remainder narrower than a
    patch at the right or bottom is ignored (SigLIP at 384 px: 27 patches of 14 and 6 px left over).
    """
    n, channels, height, width = levels.shape
    rows, cols = height // patch, width // patch
    if channels != 3 or rows == 0 or cols == 0:
        raise VTPruneError(f"patch entropy needs RGB pixels at least {patch}x{patch}, got {tuple(levels.shape)}")
    levels = levels[:, :, : rows * patch, : cols * patch].float()
    gray = torch.round(0.3333 * levels[:, 0] + 0.3333 * levels[:, 1] + 0.3333 * levels[:, 2]).long().clamp(0, 255)
    pixels = gray.view(n, rows, patch, cols, patch).permute(0, 1, 3, 2, 4).reshape(n, rows * cols, patch * patch)
    counts = torch.zeros(n, rows * cols, 256, device=levels.device).scatter_add_(2, pixels, torch.ones_like(pixels, dtype=torch.float))
    p = counts / (patch * patch)
    return -(p * torch.log2(p + 1e-10)).sum(dim=-1)


def importance(relevance_map: Tensor, entropy: Tensor | None, alpha_v: float) -> Tensor:
    """I = c + alpha_v * softmax(E) over each image's patches (last dim); E unused when alpha_v = 0."""
    if alpha_v == 0 or entropy is None:
        return relevance_map.float()
    return relevance_map.float() + alpha_v * torch.softmax(entropy.float(), dim=-1)


def lowest(scores: Tensor, count: int) -> Tensor:
    """Indices of the `count` lowest scores (stable: among ties the lower index comes first)."""
    return torch.sort(scores.float(), stable=True).indices[:count]


def grid_cells(patch: Tensor, cols: int) -> Tensor:
    """[n] patch numbers on a grid `cols` wide (-1: no patch) -> [n, 3] (region, row, col); region -1: no cell."""
    region = torch.where(patch >= 0, 0, -1)
    return torch.stack([region, patch.clamp(min=0) // cols, patch.clamp(min=0) % cols], dim=1)


def recycle(scores: Tensor, pruned: Tensor, cells: Tensor, cell: float) -> list[tuple[int, Tensor, Tensor]]:
    """Groups of pruned tokens by grid cell: [(representative, members ascending, weights)], cells in raster order.

    scores: [n] importance; pruned: [p] indices into it; cells: [n, 3] (region, row, col) of every token, region -1
    for tokens in no cell. Tokens group when region, floor(row / cell) and floor(col / cell) agree. A group's weights
    are I / sum(I) over it; the representative is its highest-I member (ties: the lower index).
    """
    pruned = torch.sort(pruned).values
    pruned = pruned[cells[pruned, 0] >= 0]
    where = cells[pruned]
    keys = torch.stack([where[:, 0], torch.floor(where[:, 1].float() / cell).long(),
                        torch.floor(where[:, 2].float() / cell).long()], dim=1)
    groups = []
    for key in torch.unique(keys, dim=0):  # sorted: by region, then raster order of the cells
        members = pruned[(keys == key).all(dim=1)]
        weight = scores[members].float()
        total = weight.sum()
        if not total > 0:
            raise VTPruneError(
                f"vflowopt recycling: a cell's importances sum to {float(total):.3g}; its weights are undefined "
                "(alpha_v < 0 can make importances negative)"
            )
        groups.append((int(members[int(weight.argmax())]), members, weight / total))
    return groups


def stage_v(
    scores: Tensor, cells: Tensor, vit_keep: float, cell: float
) -> tuple[Tensor, list[tuple[int, Tensor, Tensor]]]:
    """Stage V on one image's L tokens: ([K] kept indices ascending, recycled groups as in `recycle`).

    The round(L (1 - vit_keep)) + int(L / cell^2) lowest-I tokens are pruned (ties: the lower index first); each
    non-empty cell of pruned tokens comes back as one token at its representative's slot.
    """
    n = scores.numel()
    pruned = lowest(scores, min(n, round(n * (1 - vit_keep)) + int(n / cell**2)))
    stays = torch.ones(n, dtype=torch.bool)
    stays[pruned] = False
    groups = recycle(scores, pruned, cells, cell)
    for slot, _, _ in groups:
        stays[slot] = True
    return stays.nonzero().squeeze(1), groups


# ------------------------------------------------------------- anyres images (LLaVA-NeXT / OneVision), videos
def unpad_slices(height: int, width: int, image_size: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of a (height, width) tile mosaic that show an image of `image_size` (h, w); the rest is the
    tiles' letterbox padding. LLaVA's rule: the shown extent is int(original * scale) (transformers rounds it to 7
    digits first, against float noise; the release does not), and (current - shown) // 2 is cut from both sides, so
    an odd difference keeps one padding row or column."""
    image_h, image_w = image_size
    if image_w / image_h > width / height:  # padded above and below
        shown = int(round(image_h * (width / image_w), 7))
        pad = (height - shown) // 2
        return slice(pad, height - pad), slice(0, width)
    shown = int(round(image_w * (height / image_h), 7))
    pad = (width - shown) // 2
    return slice(0, height), slice(pad, width - pad)


def resized_shape(height: int, width: int, side: int, max_tiles: int | None) -> tuple[int, int]:
    """OneVision's anyres_max_N: an unpadded mosaic with ratio = sqrt(h w / (N side^2)) > 1.1 is resized to
    (int(h // ratio), int(w // ratio)). max_tiles None (LLaVA-NeXT): never resized."""
    if max_tiles is None:
        return height, width
    ratio = math.sqrt(height * width / (max_tiles * side**2))
    return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)


def pack_tiles(values: Tensor, tiles: tuple[int, int], side: int, image_size: tuple[int, int],
               max_tiles: int | None = None) -> Tensor:
    """Per-tile values as the model packs the tiles' features: [T, side*side, C] (tiles row-major, T = tiles[0] *
    tiles[1]) -> [h, w, C]: one mosaic, unpadded (`unpad_slices`), bilinearly resized when `resized_shape` says so."""
    rows, cols = tiles
    channels = values.shape[-1]
    mosaic = values.reshape(rows, cols, side, side, channels).permute(0, 2, 1, 3, 4)
    mosaic = mosaic.reshape(rows * side, cols * side, channels)
    row_slice, col_slice = unpad_slices(rows * side, cols * side, image_size)
    mosaic = mosaic[row_slice, col_slice]
    target = resized_shape(mosaic.shape[0], mosaic.shape[1], side, max_tiles)
    if target != tuple(mosaic.shape[:2]):
        mosaic = F.interpolate(mosaic.permute(2, 0, 1)[None], list(target), mode="bilinear")[0].permute(1, 2, 0)
    return mosaic


def anyres_importance(base: Tensor, tile_maps: Tensor, tiles: tuple[int, int], side: int,
                      image_size: tuple[int, int], max_tiles: int | None = None) -> tuple[Tensor, tuple[int, int]]:
    """An anyres image's map in sequence order: base [side*side], then the tiles' mosaic (`pack_tiles` of tile_maps
    [T, side*side]) row by row, each row followed by its row-end token (importance 1).
    Returns ([side*side + h (w + 1)] importance, (h, w) of the mosaic)."""
    local = pack_tiles(tile_maps.float()[..., None], tiles, side, image_size, max_tiles)[..., 0]
    height, width = local.shape
    row_ends = torch.full((height, 1), NON_PATCH_IMPORTANCE)
    return torch.cat([base.float(), torch.cat([local, row_ends], dim=1).flatten()]), (height, width)


def anyres_cells(side: int, mosaic: tuple[int, int]) -> Tensor:
    """[side*side + h (w + 1), 3] (region, row, col) of an anyres image's tokens for recycling: region 0 is the base
    grid (side wide), region 1 the tiles' mosaic, whose width counts the row-end column (row ends sit at col w)."""
    height, width = mosaic
    base = torch.arange(side * side)
    local = torch.arange(height * (width + 1))
    return torch.cat([
        torch.stack([torch.zeros_like(base), base // side, base % side], dim=1),
        torch.stack([torch.ones_like(local), local // (width + 1), local % (width + 1)], dim=1),
    ])


def pool_frame_maps(maps: Tensor, side: int, mode: str = "bilinear", stride: int = 2) -> Tensor:
    """[F, side*side] per-frame maps -> [F, pooled] pooled like the frames' features: "bilinear" (LLaVA-OneVision:
    resized to ceil(side / stride) per side), "average" or "max" (stride x stride pooling, LLaVA-NeXT-Video)."""
    grid = maps.float().reshape(-1, 1, side, side)
    if mode == "bilinear":
        size = [math.ceil(side / stride)] * 2
        pooled = F.interpolate(grid, size=size, mode="bilinear")
    elif mode == "average":
        pooled = F.avg_pool2d(grid, stride)
    elif mode == "max":
        pooled = F.max_pool2d(grid, stride)
    else:
        raise VTPruneError(f"frame pooling {mode!r}: use 'bilinear', 'average' or 'max'")
    return pooled.flatten(1)


def video_importance(pooled: Tensor, newline: bool) -> Tensor:
    """[F, P] pooled frame maps -> the video's map in sequence order: frames one after another, then (newline=True,
    LLaVA-OneVision) the video's single row-end token with importance 1."""
    flat = pooled.float().flatten()
    return torch.cat([flat, torch.tensor([NON_PATCH_IMPORTANCE])]) if newline else flat


def video_keep(scores: Tensor, vit_keep: float) -> Tensor:
    """Stage V on a video ([L] map over all its frames): the L - round(L (1 - vit_keep)) highest, jointly over the
    frames, ascending (ties: the lower index); nothing recycled."""
    n = scores.numel()
    return top_k(scores, n - round(n * (1 - vit_keep)))


@register
@dataclass
class VFlowOpt(Method):
    name: ClassVar[str] = "vflowopt"
    sites: ClassVar[tuple[str, ...]] = ("pre_llm", "llm_layer")
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    keep: int | float | None = None  # visual tokens per image after the last stage (or a ratio); None: as released
    vit_keep: float = PRESETS["keep25"]["vit_keep"]  # r_v: stage-V keep ratio; 1.0 bypasses stage V
    llm_keep1: float = PRESETS["keep25"]["llm_keep1"]  # r_1: share kept at the first LLM cut
    llm_keep2: float | None = None  # r_2: share kept at the second LLM cut; None: derived from `budget`
    budget: float | None = PRESETS["keep25"]["budget"]  # average kept share over the LLM's layers (for r_2)
    threshold: float = PRESETS["keep25"]["threshold"]  # t: global tokens receive > t times the mean attention
    cell: float = PRESETS["keep25"]["cell"]  # m: recycling cell size, in patches
    alpha_v: float = 0.0  # weight of the patch-entropy prior
    entropy_mode: str = "raw"  # "raw" (clean entropy of the image) or "official" (the release's wrapped levels)
    pixel_mean: tuple[float, ...] = CLIP_MEAN  # the processor's normalisation, for entropy_mode="raw"
    pixel_std: tuple[float, ...] = CLIP_STD
    vision_layer: int | None = None  # encoder layer of the attention; None: the one feeding the projector
    llm_layers: tuple[int, int] | None = None  # 0-based layers whose input is pruned; None: `default_llm_layers`

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None and not (math.isfinite(self.budget) and 0.0 < self.budget <= 1.0):
            raise VTPruneError(f"vflowopt budget={self.budget}: the average kept share must lie in (0, 1]")
        for name in ("vit_keep", "llm_keep1"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise VTPruneError(f"vflowopt {name}={getattr(self, name)}: a keep ratio must lie in (0, 1]")
        if self.llm_keep2 is not None and not 0.0 <= self.llm_keep2 <= 1.0:
            raise VTPruneError(f"vflowopt llm_keep2={self.llm_keep2}: a keep ratio must lie in [0, 1]")
        if self.llm_keep2 is None and self.budget is None:
            raise VTPruneError("vflowopt needs llm_keep2, or a budget to derive it from")
        if self.cell <= 0:
            raise VTPruneError(f"vflowopt cell={self.cell}: the recycling cell size must be positive")
        if self.entropy_mode not in ("raw", "official"):
            raise VTPruneError(f"vflowopt entropy_mode={self.entropy_mode!r}: use 'raw' or 'official'")

    @classmethod
    def search_space(cls, info: ModelInfo, budget: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The shipped optimiser's box, reset for the budget T (default 0.25): r_v in [T, 1.5 T] and r_1 in
        [0.8 / 1.5, 1] (as shipped for T = 0.25), t in [0, 50], m in [3, 24], alpha_v in [-1, 1]; r_2 derived."""
        share = 0.25 if budget is None else float(budget)
        if not 0.0 < share <= 1.0:
            raise VTPruneError(f"vflowopt budget={budget}: give the average kept share in (0, 1]")
        space = {
            "vit_keep": Uniform(share, min(1.0, 1.5 * share)),
            "llm_keep1": Uniform(0.8 / 1.5, 1.0),
            "threshold": Uniform(0.0, 50.0),
            "cell": Uniform(3.0, 24.0),
            "alpha_v": Uniform(-1.0, 1.0),
        }
        return space, {"budget": share, "llm_keep2": None}

    def layers(self, info: ModelInfo) -> tuple[int, int]:
        layers = tuple(self.llm_layers) if self.llm_layers is not None else default_llm_layers(info.llm_layers)
        if not 1 <= layers[0] < layers[1] <= info.llm_layers - 1:
            raise VTPruneError(
                f"vflowopt llm_layers {layers}: need two ascending cut layers in 1..{info.llm_layers - 1}"
            )
        return layers

    def stage_keeps(self, info: ModelInfo) -> tuple[float, float]:
        """(r_1, r_2) for this model."""
        if self.llm_keep2 is not None:
            return self.llm_keep1, self.llm_keep2
        r_2 = derived_llm_keep2(self.budget, self.vit_keep, self.llm_keep1, info.llm_layers, self.layers(info))
        if r_2 <= 0.0:
            raise VTPruneError(
                f"vflowopt budget={self.budget} is below what vit_keep={self.vit_keep} and llm_keep1={self.llm_keep1} "
                "already keep before the second LLM cut, so that cut would keep no visual token; raise budget, lower "
                "vit_keep, or give keep=N (tokens per image)"
            )
        return self.llm_keep1, r_2

    def image_schedule(self, info: ModelInfo, n: int, image: int) -> tuple[float, float, float, int | None]:
        """(r_v, r_1, r_2, tokens after the last stage or None) for an image of n tokens.

        With `keep`, the cumulative shares (r_v, r_v r_1, r_v r_1 r_2) are scaled geometrically so the last equals
        keep / n (`scaled_schedule`), and the last stage keeps exactly `keep` tokens; keep=1.0 keeps everything."""
        r_1, r_2 = self.stage_keeps(info)
        if self.keep is None:
            return self.vit_keep, r_1, r_2, None
        final = keep_count(self.keep, n, what=f"image {image}")
        shares = scaled_schedule((self.vit_keep, self.vit_keep * r_1, self.vit_keep * r_1 * r_2), final / n)
        return shares[0], shares[1] / shares[0], shares[2] / shares[1], final

    def cut_layers(self, info: ModelInfo) -> list[int]:
        return list(self.layers(info))

    def position_mode(self, ctx: SiteContext) -> str:
        return "renumber" if ctx.site == "pre_llm" else "original"

    def vision_request(self, info: ModelInfo) -> VisionAttention:
        return VisionAttention(layer=info.vision_feature_layer if self.vision_layer is None else self.vision_layer)

    def requests(self, info: ModelInfo) -> list[Any]:
        self.layers(info)
        return [self.vision_request(info)] + ([PixelValues()] if self.alpha_v != 0 else [])

    def plan(self, ctx: SiteContext) -> KeepPlan:
        if ctx.site == "pre_llm":
            return self._stage_v(ctx)
        if "importance" not in ctx.state:  # no image in the batch: stage V never ran, nothing to prune
            return keep_all(ctx.layout)
        last = ctx.layer == self.layers(ctx.info)[1]
        layout, keep, scores = ctx.layout, [], []
        for b in range(layout.batch_size):
            current = ctx.state["importance"][b][layout.original_ordinal[b]]
            kept = []
            for key, ordinals in units(layout, b):
                _, r_1, r_2, final = ctx.state["schedules"][b][key]
                n = ordinals.numel()
                dropped = n - min(n, final) if last and final is not None else round(n * (1 - (r_2 if last else r_1)))
                stays = torch.ones(n, dtype=torch.bool)
                stays[lowest(current[ordinals], dropped)] = False
                kept.append(ordinals[stays])
            keep.append(torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long))
            scores.append(current)
        return KeepPlan(keep=keep, scores=scores)

    def image_importance(self, ctx: SiteContext) -> tuple[Tensor, list[int]]:
        """[num_images, patches] importance map, and the images whose global set was empty."""
        attention = ctx.signals[self.vision_request(ctx.info)]
        maps, empty = [], []
        for image in range(attention.shape[0]):
            c, was_empty = relevance(attention[image], self.threshold, ctx.info.vision_has_cls)
            maps.append(c)
            if was_empty:
                empty.append(image)
        entropy = None
        if self.alpha_v != 0:
            levels = quantize_pixels(ctx.signals[PixelValues()], self.entropy_mode, self.pixel_mean, self.pixel_std)
            entropy = patch_entropy(levels, ctx.info.patch_size).cpu()
        return importance(torch.stack(maps).cpu(), entropy, self.alpha_v), empty

    def _stage_v(self, ctx: SiteContext) -> KeepPlan:
        layout = ctx.layout
        maps, empty = self.image_importance(ctx)
        side = math.isqrt(maps.shape[1])
        per_sample = [token_importance(layout, b, maps, side) for b in range(layout.batch_size)]
        ctx.state["importance"] = per_sample  # indexed by the LLM input's visual ordinals (original ordinals)
        ctx.state["schedules"] = [
            {key: self.image_schedule(ctx.info, ordinals.numel(), key[1]) for key, ordinals in units(layout, b)}
            for b in range(layout.batch_size)
        ]
        notes = {"empty_global_set": empty} if empty else {}
        keep, merges = [], []
        for b in range(layout.batch_size):
            kept, sample_merges = [], []
            spans_of = {}
            for span, sl in layout.ordinal_slices(b):
                spans_of.setdefault(unit_key(span), []).append(span)
            for key, ordinals in units(layout, b):
                r_v = ctx.state["schedules"][b][key][0]
                spans, scores = spans_of[key], per_sample[b][ordinals]
                if r_v >= 1.0:  # stage V bypassed: the image stays whole (keep-all exactness)
                    kept.append(ordinals)
                    continue
                if key[0] == "video" or (spans[0].kind == "image" and spans[0].view is not None):
                    kept.append(ordinals[top_patches(scores, spans, r_v)])  # spec §4.4: no recycling
                    continue
                if spans[0].kind == "image":  # one grid (LLaVA-1.5)
                    cells = grid_cells(spans[0].patch_index, spans[0].grid[1])
                elif [s.kind for s in spans] == ["base", "tiles"]:
                    cells = anyres_cells(spans[0].grid[0], spans[1].grid)
                else:
                    raise VTPruneError(f"vflowopt: image {key[1]} has spans {[s.kind for s in spans]}")
                kept_local, groups = stage_v(scores, cells, r_v, self.cell)
                for slot, members, weights in groups:
                    sample_merges.append(Merge(slot=int(ordinals[slot]), sources=ordinals[members], weights=weights))
                kept.append(ordinals[kept_local])
            keep.append(torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long))
            merges.append(sample_merges)
        return KeepPlan(keep=keep, scores=per_sample, merges=merges, notes=notes)


def unit_key(span: Any) -> tuple[str, int]:
    """What shares one stage-V selection: an image (an anyres image's base view and tiles together) or a video."""
    return ("video", span.video) if span.video is not None else ("image", span.image)


def units(layout: Any, sample: int) -> list[tuple[tuple[str, int], Tensor]]:
    """(unit key, its visual ordinals ascending) of every image or video of `sample`, in sequence order."""
    groups: dict[tuple[str, int], list[Tensor]] = {}
    for span, sl in layout.ordinal_slices(sample):
        groups.setdefault(unit_key(span), []).append(torch.arange(sl.start, sl.stop))
    return [(key, torch.cat(parts)) for key, parts in groups.items()]


def token_importance(layout: Any, sample: int, maps: Tensor, side: int) -> Tensor:
    """[n_visual] importance of every visual token of `sample` from the per-encoder-input maps [inputs, side*side]:
    a single-grid image reads its own map (`span.image`); a base view or tile token the map of its encoder input at
    its patch (`span.view`, `span.view_patch`: the release's unpadded mosaic; a OneVision mosaic that the model
    downsizes takes its nearest source patch, where the release resizes the map bilinearly); a frame its map resized
    to the frame's pooled grid like its features (`pool_frame_maps`); tokens that are no patch 1."""
    parts = []
    for span, _ in layout.ordinal_slices(sample):
        patch = span.patch_index
        if span.kind == "frame":
            frame = int(span.view[patch >= 0][0]) if bool((patch >= 0).any()) else 0
            pooled = F.interpolate(maps[frame].float().view(1, 1, side, side), size=list(span.grid), mode="bilinear")
            values = pooled.flatten()[patch.clamp(min=0)]
        elif span.view is None:
            values = maps[span.image][patch.clamp(min=0)]
        else:
            values = maps[span.view.clamp(min=0), span.view_patch.clamp(min=0)]
        parts.append(torch.where(patch >= 0, values.float(), NON_PATCH_IMPORTANCE))
    return torch.cat(parts) if parts else torch.zeros(0)


def top_patches(scores: Tensor, spans: list[Any], vit_keep: float) -> Tensor:
    """Stage V without recycling (spec §4.4): indices into `scores` (one unit's tokens) of the top share, ascending.
    A video is kept jointly over its frames, its newline included (`video_keep`); a single-view image of a
    multi-image prompt keeps its top patches and its newline."""
    if spans[0].video is not None:
        return video_keep(scores, vit_keep)
    patch = torch.cat([s.patch_index for s in spans]) >= 0
    patches = patch.nonzero().squeeze(1)
    count = patches.numel() - round(patches.numel() * (1 - vit_keep))
    return torch.sort(torch.cat([(~patch).nonzero().squeeze(1), patches[top_k(scores[patches], count)]])).values
