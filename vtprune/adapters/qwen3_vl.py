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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.adapter import register_adapter
from ..core.errors import VTPruneError
from ..core.signals import PrefillKV, Transitions
from .common import swap_class, transformers_classes
from .decoder import LLM_SIGNALS
from .qwen2_vl import MRopeCutter, QwenMediaAdapter

if TYPE_CHECKING:
    from ..core.layout import VisualLayout
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
class Qwen3VLAdapter(QwenMediaAdapter):
    family = "qwen3-vl"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache", "llm_attention"})
    signals = frozenset({PrefillKV, Transitions}) | LLM_SIGNALS
    cutter_class = DeepStackCutter
    cutter: DeepStackCutter

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, transformers_classes("Qwen3VLForConditionalGeneration",
                                                        "Qwen3VLMoeForConditionalGeneration"))

    def attach(self, method: Method, trace: Trace) -> None:
        swap_class(self.language_model, {"_deepstack_process": self._injection()}, self)
        super().attach(method, trace)

    def _forget(self) -> None:
        super()._forget()
        self.cutter.deepstack = None

    def _injection(self) -> Any:
        original = type(self.language_model)._deepstack_process
        cutter = self.cutter

        def _deepstack_process(lm: nn.Module, hidden: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor
                               ) -> Tensor:
            if cutter.adapter.active() and cutter.deepstack is not None:
                return cutter.deepstack.inject(hidden, visual_embeds)
            return original(lm, hidden, visual_pos_masks, visual_embeds)

        return _deepstack_process

    def take_layout(self, batch: int, length: int) -> VisualLayout:
        layout = super().take_layout(batch, length)
        stack = self.cutter.deepstack
        if stack is not None and not torch.equal(stack.mask.cpu(), layout.visual_mask()):
            raise VTPruneError("the model's DeepStack positions differ from the prompt's visual tokens")
        return layout
