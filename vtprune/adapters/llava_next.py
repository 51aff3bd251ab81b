"""Adapter for transformers' `LlavaNextForConditionalGeneration` (LLaVA-NeXT / 1.6, "anyres"), and the machinery its
relatives share (LLaVA-OneVision, LLaVA-NeXT-Video: their adapters subclass this one).

The layout of anyres images and video frames is `anyres.AnyresLayout`'s. What the encoder was given (image sizes,
views per image, videos' frames) is recorded from the model's own `get_image_features` / `get_video_features`, which
generate() calls before the prefill; they are overridden through a class swap (`common.swap_class`) for the session.
Budgets: per image by default (base view and tiles share it); see `vtprune.core.scope` for "tile" and "video".
Sites: `pre_llm`, `llm_layer`, `kv_cache`, `llm_attention`. Signals: `ClsAttention` (per encoder input; frames' rows
pooled like their features, see `per_patch_signals`; patch axis padded to the largest input), `QueryAttention`,
`PixelValues` (the encoder's inputs, in encoder order), `VisionAttention` and `VisionKeys` (per encoder input, in
encoder order, unpooled: a method maps them to tokens through `span.view` / `span.view_patch`), `PrefillKV`,
`Transitions`, `ProjectorInput` (per encoder input, [CLS] first where the tower has one). For frames, whose features
the model pools before the projector (LLaVA-NeXT-Video), `VisionKeys` and `ProjectorInput` are pooled like the
features too (`pool_features`; [CLS] stays first), so a frame's encoder tokens are [CLS] and its pooled tokens, as
`span.view_patch` numbers them; their token axis is padded to the longest input. Encoder-space merges name their
encoder input (`Merge.view`).
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, register_adapter
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout
from ..core.signals import (
    ClsAttention,
    ModelInfo,
    PixelValues,
    PrefillKV,
    ProjectorInput,
    Transitions,
    VisionAttention,
    VisionKeys,
)
from .anyres import AnyresLayout, Encoded
from .common import (
    call_arguments,
    continues_cache,
    media_in_call,
    placeholder_mask,
    swap_class,
)
from .decoder import LLM_SIGNALS, DecoderCutter
from .vision import VisionSignals, encoder_layers, model_info

if TYPE_CHECKING:
    from ..core.method import Method
    from ..core.trace import Trace


class EncoderSignals(VisionSignals):
    """Vision signals over the several encoder calls of one encoding round (images, then videos)."""

    def __init__(
        self, adapter: Adapter, vision_tower: nn.Module, requests: list[Any], feature_layers: list[int]
    ) -> None:
        super().__init__(adapter, vision_tower, requests, feature_layers)
        self.calls: list[tuple[str, dict]] = []
        self.modality = "image"

    def _on_tower_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        super()._on_tower_end(module, args, kwargs, output)
        self.calls.append((self.modality, self.values))


def tower_has_cls(vision_tower: nn.Module) -> bool:
    """True for encoders with a [CLS] token (CLIP), False for SigLIP and other [CLS]-free towers."""
    embeddings = getattr(getattr(vision_tower, "vision_model", vision_tower), "embeddings", None)
    return hasattr(embeddings, "class_embedding")


@register_adapter
class LlavaNextAdapter(AnyresLayout, Adapter):
    family = "llava_next"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache", "llm_attention"})
    signals = (
        frozenset({ClsAttention, PixelValues, PrefillKV, ProjectorInput, Transitions, VisionAttention, VisionKeys})
        | LLM_SIGNALS
    )
    model_class = "LlavaNextForConditionalGeneration"
    video_newline = False  # whether the model appends one newline token to every video
    # signals with one value per patch [inputs, ..., patches]: for frames they are pooled like the frames' features
    per_patch_signals: tuple[type, ...] = (ClsAttention,)
    # signals with one row per encoder token [inputs, tokens, C] ([CLS] first where the tower has one): frames' patch
    # rows are pooled like the features before the projector
    per_token_signals: tuple[type, ...] = (VisionKeys, ProjectorInput)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        import transformers

        return isinstance(model, getattr(transformers, cls.model_class))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.inner = model.model
        self.modeling = sys.modules[type(self.inner).__module__]
        self.vision_tower = self.inner.vision_tower
        self.language_model = self.inner.language_model
        self.image_token_id = config.image_token_id
        self.video_token_id = getattr(config, "video_token_id", None)
        self.side = config.vision_config.image_size // config.vision_config.patch_size
        has_cls = tower_has_cls(self.vision_tower)
        feature_layer = config.vision_feature_layer
        n_vision = len(encoder_layers(self.vision_tower))
        # hidden_states[i] is the output of encoder layer i-1 (hidden_states[0]: the embeddings)
        self.feature_layers = [
            i % (n_vision + 1) - 1 for i in ([feature_layer] if isinstance(feature_layer, int) else feature_layer)
        ]
        self._info = model_info(self.family, config, self.vision_tower, self.language_model, vision_has_cls=has_cls)
        self.cutter = DecoderCutter(self, self.language_model)
        self._masks: tuple[Tensor, Tensor | None] | None = None  # image / video placeholders of the current forward
        self._encoded: list[Encoded] = []  # the current encoding round
        self._consumed = False  # a forward used the round: the next encoder call starts a new one
        self._calls: list[tuple[str, dict]] = []

    @property
    def info(self) -> ModelInfo:
        return self._info

    def attach(self, method: "Method", trace: "Trace") -> None:
        requests = method.requests(self.info)
        if any(isinstance(r, ProjectorInput) for r in requests) and min(self.feature_layers) < 0:
            raise VTPruneError("ProjectorInput needs vision features taken from an encoder layer, not the embeddings")
        self.vision = EncoderSignals(self, self.vision_tower, requests, self.feature_layers)
        overrides = {"get_image_features": self._recording("get_image_features", self._record_images, "image")}
        if hasattr(self.inner, "get_video_features"):
            overrides["get_video_features"] = self._recording("get_video_features", self._record_videos, "video")
        swap_class(self.inner, overrides, self)
        self.hook(self.inner, self._on_model)
        self.cutter.attach(method, trace, requests)
        self.on_detach(self._forget)

    def _forget(self) -> None:
        self._masks, self._encoded, self._calls = None, [], []

    def _recording(self, name: str, record: Any, modality: str) -> Any:
        """An override of the model's encoder method `name` that records what it encodes (in the session's context)."""
        original = getattr(type(self.inner), name)
        adapter = self

        @functools.wraps(original)  # generate() reads the method's signature to pick its arguments
        def encode(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if adapter.active():
                if adapter._consumed:  # a new round of encoder calls: forget the last one's
                    adapter._encoded, adapter.vision.calls, adapter._consumed = [], [], False
                adapter._encoded.append(record(call_arguments(original, (model, *args), kwargs)))
                adapter.vision.modality = modality
            return original(model, *args, **kwargs)

        return encode

    # ------------------------------------------------------------------------------------ what was encoded
    def _record_images(self, arguments: dict) -> Encoded:
        sizes = arguments.get("image_sizes")
        if sizes is None:
            raise VTPruneError(f"{self.family}: image_sizes are needed to place the anyres tiles; pass them")
        sizes = torch.as_tensor(sizes).cpu()
        views = self.views_per_image(sizes, arguments.get("batch_num_images"))
        return Encoded("image", views, sizes, arguments.get("vision_aspect_ratio"))

    def _record_videos(self, arguments: dict) -> Encoded:
        videos, frames = arguments["pixel_values_videos"].shape[:2]
        return Encoded("video", [frames] * videos)

    def views_per_image(self, image_sizes: Tensor, batch_num_images: Any) -> list[int]:
        """Encoder inputs (base view + tiles) of each image, as the model counts them."""
        return [
            self.modeling.image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.model.config.image_grid_pinpoints,
                patch_size=self.model.config.vision_config.image_size,
            )
            for size in image_sizes
        ]

    def pack(self, features: list[Tensor], image_sizes: Tensor, encoded: Encoded) -> list[Tensor]:
        packed, _ = self.inner.pack_image_features(
            features,
            image_sizes,
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
            image_newline=features[0].new_full((features[0].shape[-1],), -1.0),
        )
        return packed

    def pool_tokens(self, x: Tensor) -> Tensor:
        raise VTPruneError(f"{self.family} has no video input")

    def pool_features(self, x: Tensor) -> Tensor:
        """[frames, patches, C] -> [frames, pooled, C]: frames' encoder features as the model pools them before its
        projector."""
        return self.pool_tokens(x)

    def project(self, features: Tensor) -> Tensor:
        """The model's projector on vision features [n, D_vision] -> language-model inputs [n, D_llm]."""
        return self.inner.multi_modal_projector(features)

    # ------------------------------------------------------------------------------------------- layout
    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = call_arguments(module.forward, args, kwargs)
        if continues_cache(arguments):
            self._masks = None
            return
        if arguments.get("pixel_values") is not None or arguments.get("pixel_values_videos") is not None:
            self._consumed = True  # this forward encodes its own inputs: its encoder calls start a new round
        media = media_in_call(arguments)
        is_image = placeholder_mask(self.inner, arguments, self.image_token_id, "image" in media)
        is_video = None
        if self.video_token_id is not None:
            is_video = placeholder_mask(self.inner, arguments, self.video_token_id, "video" in media)
        self._masks = (is_image, is_video)

    def take_layout(self, batch: int, length: int) -> VisualLayout:
        masks, self._masks = self._masks, None
        if masks is None or tuple(masks[0].shape) != (batch, length):
            raise VTPruneError("vtprune could not match the language model input to the prompt's image tokens")
        self._consumed = True
        self._calls = list(self.vision.calls)
        return self.layout(*masks, self._encoded)

    # ------------------------------------------------------------------------------------------- signals
    def vision_signals(self, layout: VisualLayout) -> dict[Any, Any]:
        """Signals per encoder input, in encoder order; frames' patch rows pooled like the frames' features."""
        out: dict[Any, list[Tensor]] = {}
        for modality, values in self._calls:
            for request, value in values.items():
                if isinstance(request, self.per_patch_signals) and modality == "video":
                    shape = value.shape
                    pooled = self.pool_tokens(value.reshape(shape[0], -1, shape[-1]).transpose(1, 2))  # [F, P', ...]
                    value = pooled.transpose(1, 2).reshape(*shape[:-1], -1)
                elif isinstance(request, self.per_token_signals) and modality == "video":
                    first = int(self._info.vision_has_cls)  # [CLS] row(s) stay in front, unpooled
                    pool = self.pool_features if isinstance(request, ProjectorInput) else self.pool_tokens
                    value = torch.cat([value[:, :first], pool(value[:, first:])], dim=1)
                out.setdefault(request, []).append(value)
        signals = {}
        for request, parts in out.items():
            if isinstance(request, self.per_patch_signals):
                width = max(p.shape[-1] for p in parts)
                parts = [nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts]
            elif isinstance(request, self.per_token_signals):
                tokens = max(p.shape[1] for p in parts)
                parts = [nn.functional.pad(p, (0, 0, 0, tokens - p.shape[1])) for p in parts]
            signals[request] = torch.cat(parts)
            if signals[request].shape[0] != self._views:
                raise VTPruneError(
                    f"the vision encoder saw {signals[request].shape[0]} inputs but the prompt's images and videos "
                    f"need {self._views}; run the model (or generate) inside the `with` block"
                )
        return signals

