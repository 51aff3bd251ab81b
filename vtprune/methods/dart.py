"""DART (Wen et al., EMNLP 2025): keep the image tokens least duplicated by a few pivot tokens, after decoder layer K-1.
Follows the official code (spec: /work/shared/methods/dart.md; docs/methods/dart.md).

Pivots: the image tokens and the text tokens after the image whose layer-(K-1) keys (post-RoPE) have the largest L1
norm. Each pivot in turn picks the still-available image tokens whose hidden state (layer K-1's output through the
language model's final norm) has the lowest cosine similarity to its own; the image pivots and all picks are kept.
Pivots are visited in the iteration order of a Python set of their sequence positions, as the official loop does (that
order decides which pivot takes which token). Positions are counted from the sample's first real token, so a sample
selects the same tokens in a padded batch as alone.

Budget: `keep` tokens per image (int or ratio), pivots included: `keep - pivots` picks are shared among the pivots,
the first `(keep - pivots) % P` pivots (in visiting order) picking one more. The official LLaVA setting T keeps
4 + 8 * (T // 8) tokens: `keep=T + 4` for T a multiple of 8 reproduces it exactly. Several images in a sample: each
image is selected on its own, with text pivots from the tokens after the sample's last image. Non-patch tokens (row
ends) are always kept. The cut keeps every token's original position (gaps stay), as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import (
    FinalNormHidden, KeepPlan, LayerKeys, Method, ModelInfo, SiteContext, VTPruneError, budget_groups, keep_count,
    register,
)
from ..core.scope import non_patch_ordinals


def dart_select(
    hidden: Tensor, keys: Tensor, image: Tensor, text: Tensor, count: int, pivot_image: int = 4, pivot_text: int = 4
) -> tuple[Tensor, list[int]]:
    """The `count` image positions DART keeps (ascending) and the pivots in the order they picked.

    hidden: [L, D] layer K-1's output after the final norm; keys: [L, H*d] layer K-1's post-RoPE keys, heads flattened
    (head-major per token); image: [n] ascending positions of the image's candidate tokens; text: [t] positions of the
    text-pivot candidates; count: 1..n. Positions index hidden/keys and, as Python ints, set the pivots' visiting order.
    """
    hidden, keys = hidden.float(), keys.float()
    image_list, text_list = image.tolist(), text.tolist()
    norms = torch.linalg.vector_norm(keys, ord=1, dim=-1)  # [L]
    image_norms, text_norms = norms[image.to(norms.device)], norms[text.to(norms.device)]
    image_pivots = [image_list[i] for i in image_norms.topk(min(pivot_image, count)).indices.tolist()]
    text_pivots = [text_list[i] for i in text_norms.topk(min(pivot_text, len(text_list))).indices.tolist()]
    visiting = list(set(image_pivots + text_pivots))
    available = set(image_list) - set(image_pivots)
    share, extra = divmod(count - len(image_pivots), len(visiting))
    kept = set(image_pivots)
    for i, pivot in enumerate(visiting):
        picks = share + int(i < extra)
        if not picks:
            continue
        candidates = list(available)
        negated = -F.cosine_similarity(hidden[pivot], hidden[candidates], dim=-1)  # [len(candidates)]
        chosen = [candidates[j] for j in negated.topk(picks).indices.tolist()]
        kept.update(chosen)
        available.difference_update(chosen)
    return torch.tensor(sorted(kept), dtype=torch.long), visiting


@register
@dataclass
class DART(Method):
    name: ClassVar[str] = "dart"
    sites: ClassVar[tuple[str, ...]] = ("llm_layer",)
    positions: ClassVar[str] = "original"

    keep: int | float = 132  # tokens per image (int, pivots included) or ratio; 132 = the official T=128 on LLaVA-1.5
    layer: int = 2  # K: the cut sits before decoder layer K and reads layer K-1's keys and output
    pivot_image: int = 4  # image pivots per image
    pivot_text: int = 4  # text pivots (tokens after the sample's last image; fewer if the prompt has fewer)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise VTPruneError(f"dart layer={self.layer!r}: K must be an int >= 1 (layer K-1's keys choose the pivots)")
        if isinstance(self.pivot_image, bool) or not isinstance(self.pivot_image, int) or self.pivot_image < 1:
            raise VTPruneError(f"dart pivot_image={self.pivot_image!r}: give an int >= 1 (the official code uses 4)")
        if isinstance(self.pivot_text, bool) or not isinstance(self.pivot_text, int) or self.pivot_text < 0:
            raise VTPruneError(f"dart pivot_text={self.pivot_text!r}: give an int >= 0 (the official code uses 4)")

    def cut_layers(self, info: ModelInfo) -> list[int]:
        return [self.layer]

    def requests(self, info: ModelInfo) -> list[Any]:
        return [LayerKeys(layer=self.layer - 1), FinalNormHidden(layer=self.layer)]

    def plan(self, ctx: SiteContext) -> KeepPlan:
        layout = ctx.layout
        states = ctx.signals[LayerKeys(layer=self.layer - 1)]
        normed = ctx.signals[FinalNormHidden(layer=self.layer)]
        keep, pivot_notes = [], []
        for b in range(layout.batch_size):
            real = states.mask[b].cpu().nonzero().squeeze(1)  # sequence index of each real token
            local = torch.full((layout.seq_len,), -1, dtype=torch.long)
            local[real] = torch.arange(real.numel())  # position counted from the first real token
            hidden = normed[b, real.to(normed.device)]
            keys = states.keys[b][:, real.to(normed.device)].transpose(0, 1).reshape(real.numel(), -1)
            visual = layout.visual_positions(b)
            after = real[real > int(visual.max())] if visual.numel() else real[:0]
            kept, pivots = [non_patch_ordinals(layout, b)], []  # pivots: per image, its pivots' ordinals
            for ordinals, _, what in budget_groups(layout, b, "image"):
                if not ordinals.numel():
                    continue
                count = keep_count(self.keep, int(ordinals.numel()), what=what)
                image = local[visual[ordinals]]
                chosen, visiting = dart_select(hidden, keys, image, local[after], count, self.pivot_image, self.pivot_text)
                kept.append(ordinals[torch.searchsorted(image, chosen)])
                pivots.append([int(ordinals[image == p][0]) for p in visiting if bool((image == p).any())])
            keep.append(torch.sort(torch.cat(kept)).values)
            pivot_notes.append(pivots)
        return KeepPlan(keep=keep, notes={"image_pivots": pivot_notes})
