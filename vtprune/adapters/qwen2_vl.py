"""Adapter for transformers' Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`), the family GUI agents such as UI-TARS belong to: images and videos.

Visual tokens: every image is a run of `<|image_pad|>` tokens between `<|vision_start|>` and `<|vision_end|>`, one token
per merged patch, row-major on the grid (rows, cols) = image_grid_thw[1:] // spatial_merge_size. Several images per
prompt (the screenshots of a GUI history) are spans in prompt order; a sample's last span is its current screenshot.
A video of video_grid_thw (T, H, W) is one run of T * rows * cols `<|video_pad|>` tokens: T temporal groups (each
temporal_patch_size frames merged by the tower), each rows x cols tokens row-major. The layout has one span per
temporal group (kind "frame", `video` set, so `scope="video"` budgets a whole video); images are numbered 0..I-1 in
encoder order, frames I, I+1, ...

Positions (M-RoPE): every token has three ids (t, h, w). Text has t = h = w; an image whose first token follows
position p - 1 gets (p, p + row, p + col), and the text after it continues at p + max(rows, cols). A video starting at
p gives token (g, row, col) of temporal group g the ids (p + int(g * step), p + row, p + col), with step 1 (Qwen2-VL)
or tokens_per_second * second_per_grid_t (Qwen2.5-VL), and the text after the whole video continues at
p + max(rows, cols) too: t does not move the text (transformers 5.25's `get_rope_index`). Under generate() a fourth,
first row carries the plain sequence index (transformers uses it for masks and packed FlashAttention only).
- "original" (FastV, kv_cache methods): every kept token keeps its (t, h, w); decoding continues where the unpruned
  prompt would.
- "renumber" (pre-LLM cuts): each kept token keeps its ids relative to its item's start p (an image, or a whole video:
  its temporal groups share p), and everything after an item moves back so that it continues right after the item's
  largest kept spatial id: the item's extent becomes 1 + max over its kept tokens of max(h, w) - p (0 if none is
  kept) instead of max(rows, cols). Decoding moves back by the sum of the extents lost, as the prompt's last token
  does (generate() decodes from the last prompt position + 1). That sum is the change of the model's rope delta: the
  model keeps computing positions (and `model.model.rope_deltas`) for the unpruned prompt, untouched, and the cutter
  subtracts it from every incoming position. In both modes the sequence-index row is renumbered to the compacted
  sequence.

Sites: `pre_llm`, `llm_layer`, `kv_cache`, `llm_attention`. Signals: the language model's (`QueryAttention`,
`PrefillKV`, `Transitions`, ...). The vision tower has no [CLS] token, so methods that need `ClsAttention` (vtc-cls)
are refused. Also refused: images with more than one temporal patch (pass them as videos), media in a call that
continues a cache, padding-free packed sequences (position ids whose first, sequence-index row restarts within a row,
with no attention mask: `cutter.refuse_packed`).
"""

from __future__ import annotations

import functools
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
    media_in_call,
    placeholder_mask,
    qwen_model_info,
    swap_class,
    token_runs,
    transformers_classes,
)
from .decoder import LLM_SIGNALS, DecoderCutter

if TYPE_CHECKING:
    from ..core.method import Method
    from ..core.trace import Trace


def origin_groups(spans: list[VisualSpan]) -> list[list[VisualSpan]]:
    """The spans of one sample grouped by their M-RoPE origin: an image (or a Qwen3-VL frame, which timestamps keep
    apart) alone; the temporal groups of one Qwen2-VL video, frames of one video that follow each other with no token
    between, together (the model numbers the whole video from one start position)."""
    groups: list[list[VisualSpan]] = []
    for span in spans:
        last = groups[-1][-1] if groups else None
        if last is not None and span.video is not None and span.video == last.video and span.start == last.end:
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


def extent_lost(rope: Tensor, layout: VisualLayout, keep: list[Tensor]) -> tuple[Tensor, Tensor]:
    """M-RoPE "renumber": [B, L] how far each token moves back, and [B] how far decoding moves back.

    rope: [3, B, L] (t, h, w) ids of the current sequence; keep[b]: the sequence positions sample b keeps. An item
    (image, frame, or a whole Qwen2-VL video) starting at p spans 1 + max(h, w) - p positions: t never moves the text
    after it (a Qwen2-VL video's later temporal groups have t > p). Decoding moves back by the sum of the extents lost,
    as the prompt's last token does (generate() continues from the last prompt position + 1).
    """
    batch, length = rope.shape[1:]
    lost = torch.zeros(batch, length, dtype=rope.dtype, device=rope.device)
    total = torch.zeros(batch, dtype=rope.dtype, device=rope.device)
    for b in range(batch):
        kept = torch.zeros(length, dtype=torch.bool, device=rope.device)
        kept[keep[b].to(rope.device)] = True
        for group in origin_groups(layout.spans[b]):
            start, end = group[0].start, group[-1].end
            if start == end:
                continue
            ids = rope[1:, b, start:end]  # [2, n] (h, w)
            base = ids.min()
            kept_ids = ids[:, kept[start:end]]
            after = kept_ids.max() - base + 1 if kept_ids.numel() else torch.zeros_like(base)
            loss = ids.max() - base + 1 - after
            lost[b, end:] += loss
            total[b] += loss
    return lost, total


class MRopeCutter(DecoderCutter):
    """DecoderCutter for M-RoPE positions [3, B, L] or, under generate(), [4, B, L] with the sequence index first."""

    def rotary(self, hidden: Tensor, positions: Tensor, layer: int) -> tuple[Tensor, Tensor]:
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


class QwenMediaAdapter(Adapter):
    """What the Qwen-VL adapters share: images and videos found by their placeholder tokens, the grids recorded from
    the model's encoder methods (generate() encodes the media before the prefill and passes the model no grid), one
    span per image and per frame (a Qwen2-VL temporal group, a Qwen3-VL frame). Subclasses set `cutter_class`."""

    cutter_class: type[MRopeCutter]

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.inner = model.model
        self.language_model = self.inner.language_model
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        self.merge = config.vision_config.spatial_merge_size
        self._info = qwen_model_info(self.family, self.language_model, self.inner.visual, config.vision_config)
        self.cutter = self.cutter_class(self, self.language_model)
        self._masks: tuple[Tensor, Tensor] | None = None  # image / video placeholders of the current prefill
        self._grids: dict[str, Tensor | None] = {}  # grids of the current prefill
        self._encoded: dict[str, Tensor] = {}  # the last grids encoded per modality (generate() passes none)
        self._encoding = False  # inside a recorded encoder call

    @property
    def info(self) -> ModelInfo:
        return self._info

    def attach(self, method: Method, trace: Trace) -> None:
        overrides = {
            "get_image_features": self._recording("get_image_features", "image"),
            "get_video_features": self._recording("get_video_features", "video"),
        }
        swap_class(self.inner, overrides, self)
        self.hook(self.inner, self._on_model)
        self.cutter.attach(method, trace, method.requests(self.info))
        self.on_detach(self._forget)

    def _forget(self) -> None:
        self._masks, self._grids, self._encoded = None, {}, {}

    def _recording(self, name: str, modality: str) -> Any:
        """An override of the model's encoder method `name` that records the grids it encodes."""
        original = getattr(type(self.inner), name)
        adapter = self

        @functools.wraps(original)  # generate() reads the method's signature to pick its arguments
        def encode(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if not adapter.active() or adapter._encoding:  # Qwen3-VL encodes videos through get_image_features
                return original(model, *args, **kwargs)
            arguments = call_arguments(original, (model, *args), kwargs)
            grid = arguments.get("video_grid_thw" if modality == "video" else "image_grid_thw")
            if grid is not None:
                adapter._encoded[modality] = grid
            adapter._encoding = True
            try:
                return original(model, *args, **kwargs)
            finally:
                adapter._encoding = False

        return encode

    # ------------------------------------------------------------------------------------------- layout
    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = call_arguments(module.forward, args, kwargs)
        if continues_cache(arguments):
            self._masks = None
            return
        media = media_in_call(arguments)
        is_image = placeholder_mask(self.inner, arguments, self.image_token_id, "image" in media)
        is_video = placeholder_mask(self.inner, arguments, self.video_token_id, "video" in media)
        self._masks = (is_image, is_video)
        self._grids = {
            m: arguments.get(f"{m}_grid_thw") if arguments.get(f"{m}_grid_thw") is not None else self._encoded.get(m)
            for m in ("image", "video")
        }

    def layout(self, is_image: Tensor, is_video: Tensor, image_grid: Tensor | None, video_grid: Tensor | None
               ) -> VisualLayout:
        """One span per image and per video frame, in prompt order (image grids in order, then every video's T
        frames in order). A run of placeholders may hold several items back to back (a Qwen2-VL video's T temporal
        groups are one run)."""
        images = self._repeated(self._items(image_grid, "image"), is_image, "image")
        videos = self._repeated(self._items(video_grid, "video", frames=True), is_video, "video")
        frames = [(v, grid) for v, (t, grid) in enumerate(videos) for _ in range(t)]
        image, frame, spans = 0, 0, []
        for b in range(is_image.shape[0]):
            runs = sorted([(s, e, "image") for s, e in token_runs(is_image[b])]
                          + [(s, e, "video") for s, e in token_runs(is_video[b])])
            sample = []
            for start, end, modality in runs:
                while start < end:
                    if modality == "image":
                        if image >= len(images):
                            raise VTPruneError(
                                f"the prompt holds more image tokens than the {len(images)} images given"
                            )
                        grid, span = images[image][1], {"image": image}
                        image += 1
                    else:
                        if frame >= len(frames):
                            raise VTPruneError(
                                f"the prompt holds more video tokens than the {len(frames)} frames given"
                            )
                        video, grid = frames[frame]
                        span = {"image": len(images) + frame, "kind": "frame", "video": video}
                        frame += 1
                    count = grid[0] * grid[1]
                    if start + count > end:
                        raise VTPruneError(
                            f"a run of {end - start} {modality} tokens does not match the next {modality}'s {count} "
                            f"tokens (grid {grid[0]}x{grid[1]} after the {self.merge}x{self.merge} merge)"
                        )
                    sample.append(VisualSpan(start=start, patch_index=torch.arange(count), grid=grid, **span))
                    start += count
            spans.append(sample)
        return VisualLayout(spans=spans, seq_len=is_image.shape[1])

    @staticmethod
    def _repeated(items: list[tuple[int, tuple[int, int]]], mask: Tensor, what: str) -> list:
        """The items behind the prompt's rows when generate() repeated each sample (beam search, several return
        sequences) after encoding its media once."""
        index = expanded_items(mask.sum(1).tolist(), [t * h * w for t, (h, w) in items], what)
        return items if index is None else [items[i] for i in index]

    def _items(self, grids: Tensor | None, what: str, frames: bool = False) -> list[tuple[int, tuple[int, int]]]:
        """(temporal patches, (rows, cols) of merged tokens) of each image or video."""
        rows = [] if grids is None else [tuple(int(x) for x in row) for row in grids.cpu()]
        items = [(t, (h // self.merge, w // self.merge)) for t, h, w in rows]
        if not frames and any(t != 1 for t, _ in items):
            raise VTPruneError(f"an image has more than one temporal patch ({rows}); pass moving images as videos")
        return items

    def take_layout(self, batch: int, length: int) -> VisualLayout:
        masks, self._masks = self._masks, None
        if masks is None or tuple(masks[0].shape) != (batch, length):
            raise VTPruneError("vtprune could not match the language model input to the prompt's visual tokens")
        is_image, is_video = masks
        for modality, mask in (("image", is_image), ("video", is_video)):
            if int(mask.sum()) and self._grids.get(modality) is None:
                raise VTPruneError(
                    f"the prompt holds {modality} tokens but vtprune saw no {modality} grid: pass the processor's "
                    f"{modality}_grid_thw and run the vision encoder inside the `with` block"
                )
        return self.layout(is_image, is_video, self._grids.get("image"), self._grids.get("video"))

    def vision_signals(self, layout: VisualLayout) -> dict[Any, Any]:
        return {}


@register_adapter
class QwenVLAdapter(QwenMediaAdapter):
    family = "qwen2-vl"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache", "llm_attention"})
    signals = frozenset({PrefillKV, Transitions}) | LLM_SIGNALS
    cutter_class = MRopeCutter

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, transformers_classes("Qwen2VLForConditionalGeneration",
                                                        "Qwen2_5_VLForConditionalGeneration"))
