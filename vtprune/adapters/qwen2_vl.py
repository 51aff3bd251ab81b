"""Adapter for transformers' Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`), the family GUI agents such as UI-TARS belong to.

Visual tokens: every image is a run of `<|image_pad|>` tokens between `<|vision_start|>` and `<|vision_end|>`, one token
per merged patch, row-major on the grid (rows, cols) = image_grid_thw[1:] // spatial_merge_size. Several images per
prompt (the screenshots of a GUI history) are spans in prompt order; a sample's last span is its current screenshot.

Positions (M-RoPE): every token has three ids (t, h, w). Text has t = h = w; an image whose first token follows
position p - 1 gets (p, p + row, p + col), and the text after it continues at p + max(rows, cols). Under generate() a
fourth, first row carries the plain sequence index (transformers uses it for masks and packed FlashAttention only).
- "original" (FastV, kv_cache methods): every kept token keeps its (t, h, w); decoding continues where the unpruned
  prompt would.
- "renumber" (pre-LLM cuts): each kept image token keeps its ids relative to its image's start p, and everything after
  an image moves back so that it continues right after the image's largest kept id: the image's extent becomes
  1 + max over its kept tokens of max(t, h, w) - p (0 if none is kept) instead of max(rows, cols). Decoding moves back
  by the sum of the extents lost. That sum is the change of the model's rope delta: the model keeps computing positions
  (and `model.model.rope_deltas`) for the unpruned prompt, untouched, and the cutter subtracts it from every incoming
  position. In both modes the sequence-index row is renumbered to the compacted sequence.

Sites: `pre_llm`, `llm_layer`, `kv_cache`. Signals: `QueryAttention`, `PrefillKV`. The vision tower has no [CLS]
token, so methods that need `ClsAttention` (vtc-cls) are refused; videos are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, register_adapter
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout, VisualSpan
from ..core.signals import ModelInfo, PrefillKV, Transitions
from .common import (
    call_arguments,
    continues_cache,
    expanded_items,
    kwarg,
    media_in_call,
    placeholder_mask,
    qwen_model_info,
    token_runs,
    transformers_classes,
)
from .decoder import LLM_SIGNALS, DecoderCutter

if TYPE_CHECKING:
    from ..core.method import Method
    from ..core.trace import Trace


def extent_lost(rope: Tensor, layout: VisualLayout, keep: list[Tensor]) -> tuple[Tensor, Tensor]:
    """M-RoPE "renumber": [B, L] how far each token moves back, and [B] how far decoding moves back.

    rope: [3, B, L] (t, h, w) ids of the current sequence; keep[b]: the sequence positions sample b keeps.
    """
    batch, length = rope.shape[1:]
    lost = torch.zeros(batch, length, dtype=rope.dtype, device=rope.device)
    total = torch.zeros(batch, dtype=rope.dtype, device=rope.device)
    for b in range(batch):
        kept = torch.zeros(length, dtype=torch.bool, device=rope.device)
        kept[keep[b].to(rope.device)] = True
        for span in layout.spans[b]:
            if not span.length:
                continue
            ids = rope[:, b, span.start : span.end]  # [3, n]
            base = ids.min()
            kept_ids = ids[:, kept[span.start : span.end]]
            after = kept_ids.max() - base + 1 if kept_ids.numel() else torch.zeros_like(base)
            loss = ids.max() - base + 1 - after
            lost[b, span.end :] += loss
            total[b] += loss
    return lost, total


class MRopeCutter(DecoderCutter):
    """DecoderCutter for M-RoPE positions [3, B, L] or, under generate(), [4, B, L] with the sequence index first."""

    def rotary(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.lm.rotary_emb(hidden, positions[-3:])

    @staticmethod
    def expand_positions(positions: Tensor, batch: int) -> Tensor:
        if positions.dim() < 3:  # plain positions: the same for t, h and w, as the language model reads them
            positions = positions.view(1, -1, positions.shape[-1]).expand(3, -1, -1)
        return positions.expand(positions.shape[0], batch, positions.shape[-1])

    def reposition(
        self, mode: str, layout: VisualLayout, keep: list[Tensor], positions: Tensor, offset: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Offsets are kept for 4 rows (sequence index, t, h, w); the sequence index is always renumbered."""
        dropped = self.dropped(layout, keep).to(positions.device)
        if offset.dim() == 1:
            offset = offset[None].expand(4, -1)
        rope = positions[-3:]
        if mode == "renumber":
            lost, total = extent_lost(rope, layout, keep)
        else:
            lost, total = torch.zeros_like(dropped), torch.zeros_like(offset[0])
        rows = rope - lost
        if positions.shape[0] == 4:
            rows = torch.cat([(positions[0] - (dropped.cumsum(1) - dropped))[None], rows])
        return rows, offset + torch.stack([dropped.sum(1), total, total, total])


@register_adapter
class QwenVLAdapter(Adapter):
    family = "qwen2-vl"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache", "llm_attention"})
    signals = frozenset({PrefillKV, Transitions}) | LLM_SIGNALS

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, transformers_classes("Qwen2VLForConditionalGeneration",
                                                        "Qwen2_5_VLForConditionalGeneration"))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.language_model = model.model.language_model
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        self.merge = config.vision_config.spatial_merge_size
        self._info = qwen_model_info(self.family, self.language_model, model.model.visual, config.vision_config)
        self.cutter = MRopeCutter(self, self.language_model)
        self._is_image: Tensor | None = None
        self._grids: Tensor | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    def attach(self, method: Method, trace: Trace) -> None:
        self.hook(self.model.model.visual, self._on_vision)
        self.hook(self.model.model, self._on_model)
        self.cutter.attach(method, trace, method.requests(self.info))
        self.on_detach(self._forget)

    def _forget(self) -> None:
        self._is_image = self._grids = None

    # ------------------------------------------------------------------------------------------- layout
    def _on_vision(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """generate() encodes the images before the prefill and passes no grid to the model: remember it here."""
        self._grids = kwarg(args, kwargs, "grid_thw", 1)

    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = call_arguments(module.forward, args, kwargs)
        if continues_cache(arguments):
            self._is_image = None
            return
        media = media_in_call(arguments)
        if "video" in media:
            raise VTPruneError("the qwen2-vl adapter prunes images (screenshots), not videos; pass images only")
        self._is_image = placeholder_mask(self.model.model, arguments, self.image_token_id, "image" in media)
        if arguments.get("image_grid_thw") is not None:
            self._grids = arguments["image_grid_thw"]

    def layout(self, is_image: Tensor, image_grid_thw: Tensor | None) -> VisualLayout:
        """One span per image, in prompt order; image i has image_grid_thw[i] // (1, merge, merge) tokens."""
        grids = [] if image_grid_thw is None else [tuple(int(x) for x in row) for row in image_grid_thw.cpu()]
        if int(is_image.sum()) and not grids:
            raise VTPruneError(
                "the prompt holds image tokens but vtprune saw no image grid: pass the processor's image_grid_thw and "
                "run the vision encoder inside the `with` block (not precomputed image features)"
            )
        tokens = [t * h * w // self.merge**2 for t, h, w in grids]
        expanded = expanded_items(is_image.sum(1).tolist(), tokens) if grids else None
        if expanded is not None:  # beam search / num_return_sequences repeated the samples after encoding
            grids = [grids[i] for i in expanded]
        spans, image = [], 0
        for row in is_image:
            sample = []
            for start, end in token_runs(row):
                while start < end:
                    if image >= len(grids):
                        raise VTPruneError(f"the prompt holds more image tokens than the {len(grids)} images given")
                    t, h, w = grids[image]
                    if t != 1:
                        raise VTPruneError(f"image {image} has {t} temporal patches; only still images are supported")
                    grid = (h // self.merge, w // self.merge)
                    count = grid[0] * grid[1]
                    if start + count > end:
                        raise VTPruneError(
                            f"a run of {end - start} image tokens does not match image {image}'s {count} tokens "
                            f"(grid {grid[0]}x{grid[1]} after the {self.merge}x{self.merge} merge)"
                        )
                    sample.append(VisualSpan(image=image, start=start, patch_index=torch.arange(count), grid=grid))
                    start += count
                    image += 1
            spans.append(sample)
        return VisualLayout(spans=spans, seq_len=is_image.shape[1])

    def take_layout(self, batch: int, length: int) -> VisualLayout:
        is_image, self._is_image = self._is_image, None
        if is_image is None or tuple(is_image.shape) != (batch, length):
            raise VTPruneError("vtprune could not match the language model input to the prompt's image tokens")
        return self.layout(is_image, self._grids)

    def vision_signals(self, layout: VisualLayout) -> dict[Any, Any]:
        return {}
