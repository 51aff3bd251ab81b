"""Adapter for transformers' `LlavaForConditionalGeneration` (LLaVA-1.5 layout).

Visual tokens: each `<image>` placeholder expands to the patch features of one image (24×24 = 576 for
LLaVA-1.5-7B), in row-major patch order; [CLS] is dropped unless `vision_feature_select_strategy="full"`.
Sites: `pre_llm` (compact the language model's input), `llm_layer` (cut between decoder layers), `kv_cache`
(compress each layer's cache after prefill) and `llm_attention` (attention among each layer's important tokens), see
`vtprune.adapters.decoder`. Signals: `ClsAttention`, `VisionAttention`, `VisionKeys` (recomputed from the CLIP
tower's q/k), `PixelValues`, `ProjectorInput` (the feature layer's output with [CLS]; enables pre-projector merges), and
from the language model `QueryAttention`, `Transitions`, `PrefillKV`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, register_adapter
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout, VisualSpan
from ..core.signals import (
    ClsAttention,
    ModelInfo,
    PixelValues,
    PrefillKV,
    ProjectorInput,
    QueryAttention,
    Transitions,
    VisionAttention,
    VisionKeys,
)
from .common import call_arguments, continues_cache, media_in_call, placeholder_mask, token_runs
from .decoder import LLM_SIGNALS, DecoderCutter
from .vision import VisionSignals, encoder_layers, model_info

if TYPE_CHECKING:
    from ..core.method import Method
    from ..core.trace import Trace


@register_adapter
class LlavaAdapter(Adapter):
    family = "llava"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache", "llm_attention"})
    signals = frozenset(
        {ClsAttention, QueryAttention, PixelValues, PrefillKV, Transitions, VisionAttention, VisionKeys, ProjectorInput}
        | LLM_SIGNALS
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from transformers import LlavaForConditionalGeneration

        return isinstance(model, LlavaForConditionalGeneration)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.vision_tower = model.model.vision_tower
        self.language_model = model.model.language_model
        self.image_token_id = config.image_token_id
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.with_cls = config.vision_feature_select_strategy == "full"
        feature_layer = config.vision_feature_layer
        n_vision = len(encoder_layers(self.vision_tower))
        # hidden_states[i] is the output of encoder layer i-1 (hidden_states[0]: the embeddings)
        self.feature_layers = [
            i % (n_vision + 1) - 1 for i in ([feature_layer] if isinstance(feature_layer, int) else feature_layer)
        ]
        self._info = model_info(self.family, config, self.vision_tower, self.language_model, vision_has_cls=True)
        self.cutter = DecoderCutter(self, self.language_model)
        self._layout: VisualLayout | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    def attach(self, method: "Method", trace: "Trace") -> None:
        requests = method.requests(self.info)
        if any(isinstance(r, ProjectorInput) for r in requests) and min(self.feature_layers) < 0:
            raise VTPruneError("ProjectorInput needs vision features taken from an encoder layer, not the embeddings")
        self.vision = VisionSignals(self, self.vision_tower, requests, self.feature_layers)
        self.hook(self.model.model, self._on_model)
        self.cutter.attach(method, trace, requests)
        self.on_detach(self._forget)

    def project(self, features: Tensor) -> Tensor:
        """The model's projector on vision features [n, D_vision] -> language-model inputs [n, D_llm]."""
        return self.model.model.multi_modal_projector(features)

    def _forget(self) -> None:
        self._layout = None

    # ------------------------------------------------------------------------------------------- layout
    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = call_arguments(module.forward, args, kwargs)
        if continues_cache(arguments):
            self._layout = None
            return
        present = "image" in media_in_call(arguments)  # image tokens without pixels are text to the model
        self._layout = self.layout(placeholder_mask(self.model.model, arguments, self.image_token_id, present))

    def layout(self, is_image: Tensor) -> VisualLayout:
        """Spans of image tokens ([B, L] bool) per sample; consecutive runs are split into images."""
        per_image = self.grid[0] * self.grid[1] + int(self.with_cls)
        patch_index = torch.arange(self.grid[0] * self.grid[1])
        if self.with_cls:
            patch_index = torch.cat([torch.tensor([-1]), patch_index])
        spans, image = [], 0
        for row in is_image:
            sample = []
            for start, end in token_runs(row):
                if (end - start) % per_image:
                    raise VTPruneError(
                        f"a run of {end - start} image tokens is not a whole number of images of {per_image} tokens"
                    )
                for first in range(start, end, per_image):
                    sample.append(VisualSpan(image=image, start=first, patch_index=patch_index, grid=self.grid))
                    image += 1
            spans.append(sample)
        return VisualLayout(spans=spans, seq_len=is_image.shape[1])

    def take_layout(self, batch: int, length: int) -> VisualLayout:
        layout, self._layout = self._layout, None
        if layout is None or layout.seq_len != length or layout.batch_size != batch:
            raise VTPruneError("vtprune could not match the language model input to the prompt's image tokens")
        return layout

    def vision_signals(self, layout: VisualLayout) -> dict[Any, Any]:
        return self.vision.for_layout(layout)
