"""Adapter for transformers' Qwen3-VL (`Qwen3VLForConditionalGeneration`, and the MoE variant
`Qwen3VLMoeForConditionalGeneration`, whose language model differs only in its MLPs): images and videos.

Visual tokens: an image is a run of `<|image_pad|>` tokens between `<|vision_start|>` and `<|vision_end|>`, one token
per merged patch, row-major on the grid (rows, cols) = grid_thw[1:] // spatial_merge_size. A video of T temporal
patches is T frames, each its own run of `<|video_pad|>` tokens, preceded by a `<t seconds>` timestamp in text. The
layout has one span per image and one per frame (kind "frame", `video` set, so `scope="video"` budgets a whole video);
images are numbered 0..I-1 in encoder order, frames I, I+1, ...

Positions (M-RoPE, interleaved layout): every frame is placed like an image, (p, p + row, p + col) after position
p - 1, and the text after it continues at p + max(rows, cols); time is carried by the timestamp tokens, so the
Qwen2-VL rules apply unchanged per span (see `qwen2_vl.py`: "original" keeps every kept token's ids, "renumber" moves
what follows a span back by the extent its dropped tokens free; decoding follows).

DeepStack: the vision tower's intermediate features (one [visual tokens, D] tensor per DeepStack level) are added to
the visual tokens' hidden states after decoder layers 0..levels-1. vtprune lays these features out on the sequence
(zero at text) and cuts them with the hidden states, through the same `apply_cut` (same gathers, same merges): after a
cut before the LLM, or before any decoder layer whose injection is still to come, each kept (or merged) visual token
still receives its own DeepStack features, at its new place. The injection itself is the model's, redone on the
current sequence (`_deepstack_process` is overridden inside the session). A cut at or after layer `levels` needs
nothing: every injection happened on the full sequence.

Sites: `pre_llm`, `llm_layer`, `kv_cache`, `llm_attention`. Signals: `QueryAttention`, `PrefillKV`, `Transitions` (the
language model's). The vision tower has no [CLS] token and offers no attention signal here, so methods that need
`ClsAttention` / `VisionAttention` are refused. Beam search and several return
sequences (media encoded once, then repeated per row) are followed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
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
from .decoder import LLM_SIGNALS
from .qwen2_vl import MRopeCutter

if TYPE_CHECKING:
    from ..core.method import Method, SiteContext
    from ..core.trace import Trace
    from .decoder import Segment

@dataclass
class DeepStack:
    """The DeepStack features of the current prefill, laid out on the current sequence."""

    originals: list[Tensor]  # the model's tensors, one per level (identify the level being injected)
    features: Tensor | None  # [B, L, levels * D], hidden dtype: level i's feature at columns i*D.., zero at text
    mask: Tensor  # [B, L] bool: the visual tokens that receive features

    @classmethod
    def from_call(cls, kwargs: dict, hidden: Tensor) -> DeepStack | None:
        embeds, mask = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        if not embeds or mask is None:
            return None
        mask = mask.to(hidden.device).bool()
        features = hidden.new_zeros(*mask.shape, len(embeds) * hidden.shape[-1])
        features[mask] = torch.cat([e.to(hidden.device, hidden.dtype) for e in embeds], dim=-1)
        return cls(list(embeds), features, mask)

    @property
    def levels(self) -> int:
        return len(self.originals)

    def inject(self, hidden: Tensor, level_embeds: Tensor) -> Tensor:
        """The model's injection (hidden[mask] += level features) on the current sequence."""
        level = next((i for i, e in enumerate(self.originals) if e is level_embeds), None)
        if level is None or self.features is None:
            raise VTPruneError("vtprune did not see these DeepStack features at the language model's input")
        width = hidden.shape[-1]
        values = self.features[..., level * width : (level + 1) * width][self.mask]
        hidden = hidden.clone()
        hidden[self.mask, :] = hidden[self.mask, :] + values.to(hidden.dtype)
        if level == self.levels - 1:
            self.features = None  # every level injected
        return hidden


class DeepStackCutter(MRopeCutter):
    """M-RoPE cuts that carry the DeepStack features along with the hidden states they will be added to."""

    deepstack: DeepStack | None = None

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        embeds = kwargs.get("inputs_embeds")
        self.deepstack = DeepStack.from_call(kwargs, embeds) if embeds is not None else None
        return super()._on_language_model(module, args, kwargs)

    def _cut(self, ctx: SiteContext, hidden: Tensor, segment: Segment, start: int) -> tuple[Tensor, Segment]:
        stack = self.deepstack
        if stack is None or stack.features is None or start >= stack.levels:  # no injection left after this cut
            return super()._cut(ctx, hidden, segment, start)
        width = hidden.shape[-1]
        wide, segment = super()._cut(ctx, torch.cat([hidden, stack.features], dim=-1), segment, start)
        stack.features = wide[..., width:]
        stack.mask = self.prefill.layout.visual_mask(hidden.device)
        return wide[..., :width], segment


@register_adapter
class Qwen3VLAdapter(Adapter):
    family = "qwen3-vl"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache", "llm_attention"})
    signals = frozenset({PrefillKV, Transitions}) | LLM_SIGNALS

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, transformers_classes("Qwen3VLForConditionalGeneration",
                                                        "Qwen3VLMoeForConditionalGeneration"))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.inner = model.model
        self.language_model = self.inner.language_model
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        self.merge = config.vision_config.spatial_merge_size
        self._info = qwen_model_info(self.family, self.language_model, self.inner.visual, config.vision_config)
        self.cutter = DeepStackCutter(self, self.language_model)
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
        swap_class(self.language_model, {"_deepstack_process": self._injection()}, self)
        self.hook(self.inner, self._on_model)
        self.cutter.attach(method, trace, method.requests(self.info))
        self.on_detach(self._forget)

    def _forget(self) -> None:
        self._masks, self._grids, self._encoded = None, {}, {}
        self.cutter.deepstack = None

    def _recording(self, name: str, modality: str) -> Any:
        """An override of the model's encoder method `name` that records the grids it encodes (generate() encodes the
        media before the prefill and passes the model no grid)."""
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

    def _injection(self) -> Any:
        original = type(self.language_model)._deepstack_process
        cutter = self.cutter

        def _deepstack_process(lm: nn.Module, hidden: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor
                               ) -> Tensor:
            if cutter.adapter.active() and cutter.deepstack is not None:
                return cutter.deepstack.inject(hidden, visual_embeds)
            return original(lm, hidden, visual_pos_masks, visual_embeds)

        return _deepstack_process

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
        frames in order)."""
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
        layout = self.layout(is_image, is_video, self._grids.get("image"), self._grids.get("video"))
        stack = self.cutter.deepstack
        if stack is not None and not torch.equal(stack.mask.cpu(), layout.visual_mask()):
            raise VTPruneError("the model's DeepStack positions differ from the prompt's visual tokens")
        return layout

    def vision_signals(self, layout: VisualLayout) -> dict[Any, Any]:
        return {}
