"""Adapter for transformers' `LlavaNextForConditionalGeneration` (LLaVA-NeXT / 1.6, "anyres"), and the machinery its
relatives share (LLaVA-OneVision, LLaVA-NeXT-Video: their adapters subclass this one).

Layout of an anyres image: its base view (the whole image resized to one encoder input; span kind "base", the view's
patch grid), then its tile mosaic (span kind "tiles": the tiles' patches as one grid, unpadded, with a row-end
`image_newline` token after every row; row ends have patch_index -1). Both spans carry the image's index and, per
token, the encoder input it comes from (`view`) and its patch there (`view_patch`). An image encoded as a single view
(OneVision's multi-image prompts) is one span of kind "image": its patches and one newline. Which token sits where is
read off the model's own packing code, run on patch coordinates instead of features, so unpadding (and OneVision's
downsizing of large mosaics: a token then maps to its nearest source patch) is followed exactly.
A video is one span per frame (kind "frame", `video` set), on the pooled grid the model feeds the language model.
Encoder inputs are numbered as the encoder sees them: every image's views (base first, then tiles in row-major
order), then every video's frames. Images are numbered 0..I-1 and frames I, I+1, ... (the spans' `image`).
Budgets: per image by default (base view and tiles share it); see `vtprune.core.scope` for "tile" and "video".
Sites: `pre_llm`, `llm_layer`, `kv_cache`, `llm_attention`. Signals: `ClsAttention` (per encoder input; frames' rows
pooled like their features, see `per_patch_signals`; patch axis padded to the largest input), `QueryAttention`,
`ReceivedAttention`, `PixelValues` (the encoder's inputs, in encoder order), `PrefillKV`, `Transitions`. Not
offered: the encoder's full attention / keys / projector input (`VisionAttention`, `VisionKeys`, `ProjectorInput`),
whose methods (vflowopt, visionzip) index images by `span.image` and know no tiles or frames yet.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from dataclasses import dataclass
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
    QueryAttention,
    ReceivedAttention,
    Transitions,
)
from .hf_decoder import DecoderCutter
from .llava import VisionSignals, attach_language_model, model_info

if TYPE_CHECKING:
    from ..core.method import Method
    from ..core.session import Trace


@dataclass
class Encoded:
    """One call of the model's image or video encoder in the current forward."""

    modality: str  # "image" | "video"
    views: list[int]  # images: encoder inputs per image; videos: frames per video
    image_sizes: Tensor | None = None  # images: [n, 2] (height, width)
    aspect: str | None = None  # images (OneVision): the vision_aspect_ratio the call used


@dataclass
class SpanTemplate:
    """A span before its start in the sequence is known."""

    kind: str
    grid: tuple[int, int]
    patch_index: Tensor
    view: Tensor
    view_patch: Tensor
    video: int | None = None

    @property
    def length(self) -> int:
        return int(self.patch_index.numel())


class EncoderSignals(VisionSignals):
    """Vision signals over the several encoder calls of one forward (images, then videos)."""

    def __init__(self, adapter: Adapter, vision_tower: nn.Module, requests: list[Any]) -> None:
        super().__init__(adapter, vision_tower, requests)
        self.calls: list[tuple[str, dict]] = []
        self.modality = "image"

    def _on_tower_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        super()._on_tower_end(module, args, kwargs, output)
        self.calls.append((self.modality, self.values))

    def take(self) -> list[tuple[str, dict]]:
        calls, self.calls = self.calls, []
        return calls


def tower_has_cls(vision_tower: nn.Module) -> bool:
    """True for encoders with a [CLS] token (CLIP), False for SigLIP and other [CLS]-free towers."""
    embeddings = getattr(getattr(vision_tower, "vision_model", vision_tower), "embeddings", None)
    return hasattr(embeddings, "class_embedding")


def _arguments(fn: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    return inspect.signature(fn).bind_partial(*args, **kwargs).arguments


@register_adapter
class LlavaNextAdapter(Adapter):
    family = "llava_next"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache", "llm_attention"})
    signals = frozenset({ClsAttention, QueryAttention, PixelValues, PrefillKV, Transitions, ReceivedAttention})
    model_class = "LlavaNextForConditionalGeneration"
    video_newline = False  # whether the model appends one newline token to every video
    # signals with one value per patch [inputs, ..., patches]: for frames they are pooled like the frames' features
    per_patch_signals: tuple[type, ...] = (ClsAttention,)

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
        self._info = model_info(self.family, config, self.vision_tower, self.language_model, vision_has_cls=has_cls)
        self.cutter = DecoderCutter(self, self.language_model)
        self._input_ids: Tensor | None = None
        self._encoded: list[Encoded] = []
        self._calls: list[tuple[str, dict]] = []

    @property
    def info(self) -> ModelInfo:
        return self._info

    def attach(self, method: "Method", trace: "Trace") -> None:
        requests = method.requests(self.info)
        self.vision = EncoderSignals(self, self.vision_tower, requests)
        self._wrap("get_image_features", self._record_images, "image")
        if hasattr(self.inner, "get_video_features"):
            self._wrap("get_video_features", self._record_videos, "video")
        self.hook(self.inner, self._on_model)
        attach_language_model(self.cutter, method, trace, requests)
        self.on_detach(self._forget)

    def _forget(self) -> None:
        self._input_ids, self._encoded, self._calls = None, [], []

    def _wrap(self, name: str, record: Any, modality: str) -> None:
        """Wrap the model's own encoder method (an instance attribute, removed on detach) to see what it encodes."""
        original = getattr(self.inner, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._encoded.append(record(_arguments(original, args, kwargs)))
            self.vision.modality = modality
            return original(*args, **kwargs)

        setattr(self.inner, name, wrapper)
        self.on_detach(lambda: delattr(self.inner, name))

    # ------------------------------------------------------------------------------------ what was encoded
    def _record_images(self, arguments: dict) -> Encoded:
        sizes = arguments["image_sizes"]
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
        """The model's own packing of per-view features [views, patches, C] into each image's token sequence."""
        packed, _ = self.inner.pack_image_features(
            features,
            image_sizes,
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
            image_newline=features[0].new_full((features[0].shape[-1],), -1.0),
        )
        return packed

    def pool_tokens(self, x: Tensor) -> Tensor:
        """[frames, patches, C] -> [frames, pooled, C]: the model's pooling of video frames (none here)."""
        raise VTPruneError(f"{self.family} has no video input")

    # ------------------------------------------------------------------------------------------- layout
    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = _arguments(module.forward, args, kwargs)
        input_ids = arguments.get("input_ids")
        if input_ids is None:
            raise VTPruneError("vtprune needs input_ids to find the image tokens; pass input_ids, not inputs_embeds")
        cache = arguments.get("cache", arguments.get("past_key_values"))
        encodes = arguments.get("pixel_values") is not None or arguments.get("pixel_values_videos") is not None
        if cache is not None and cache.get_seq_length() > 0 and (encodes or arguments.get("mm_encoder_outputs")):
            raise VTPruneError(
                "images or videos in a call that continues a cache (chunked prefill) are not supported; "
                "prefill the whole prompt in one call"
            )
        if encodes:
            self._encoded = []  # this forward encodes its own inputs: forget any earlier encoder call
            self.vision.take()
        self._input_ids = input_ids

    def take_layout(self, batch: int, length: int) -> VisualLayout:
        input_ids, encoded = self._input_ids, self._encoded
        self._input_ids, self._encoded, self._calls = None, [], self.vision.take()
        if input_ids is None or tuple(input_ids.shape) != (batch, length):
            raise VTPruneError("vtprune could not match the language model input to the prompt's image tokens")
        return self.layout(input_ids, encoded)

    def layout(self, input_ids: Tensor, encoded: list[Encoded]) -> VisualLayout:
        """Spans of every image and video frame of the prompt, from the token ids and what the encoder was given."""
        images = [e for e in encoded if e.modality == "image"]
        videos = [e for e in encoded if e.modality == "video"]
        image_templates, view = [], 0
        for call in images:
            for templates in self.image_templates(call, view):
                image_templates.append(templates)
            view += sum(call.views)
        n_images = len(image_templates)
        video_templates, frame = [], 0
        for call in videos:
            for frames in call.views:
                video_templates.append(self.video_templates(len(video_templates), frames, view, n_images + frame))
                view += frames
                frame += frames
        spans: list[list[VisualSpan]] = [[] for _ in range(input_ids.shape[0])]
        self._place(spans, input_ids == self.image_token_id, image_templates, first_image=0, what="image")
        if self.video_token_id is not None:
            self._place(spans, input_ids == self.video_token_id, video_templates, first_image=None, what="video")
        elif video_templates:
            raise VTPruneError(f"{self.family} has no video token")
        for sample in spans:
            sample.sort(key=lambda s: s.start)
        self._views = view
        return VisualLayout(spans=spans, seq_len=input_ids.shape[1])

    @staticmethod
    def _place(
        spans: list[list[VisualSpan]], is_token: Tensor, items: list[list], first_image: int | None, what: str
    ) -> None:
        """Give every item's spans their place: items take the placeholder tokens in order (row-major over samples)."""
        positions = is_token.cpu().nonzero()  # [N, 2] (sample, position), row-major
        needed = sum(t.length for templates in items for _, t in templates)
        if needed != positions.shape[0]:
            raise VTPruneError(
                f"the prompt holds {positions.shape[0]} {what} tokens but the encoded {what}s need {needed}; "
                f"run the model (or generate) inside the `with` block, without num_return_sequences > 1"
            )
        offset = 0
        for index, templates in enumerate(items):
            total = sum(t.length for _, t in templates)
            chunk = positions[offset : offset + total]
            sample, start = int(chunk[0, 0]), int(chunk[0, 1])
            if not (bool((chunk[:, 0] == sample).all()) and int(chunk[-1, 1]) - start == total - 1):
                raise VTPruneError(f"the tokens of {what} {index} are not one contiguous run in one sample")
            for image, template in templates:
                spans[sample].append(
                    VisualSpan(
                        image=image if first_image is None else first_image + index,
                        start=start,
                        patch_index=template.patch_index,
                        grid=template.grid,
                        kind=template.kind,
                        view=template.view,
                        view_patch=template.view_patch,
                        video=template.video,
                    )
                )
                start += template.length
            offset += total

    def image_templates(self, call: Encoded, first_view: int) -> list[list[tuple[int | None, SpanTemplate]]]:
        """Per image of one encoder call: its spans, found by packing patch coordinates like features."""
        side, patches = self.side, self.side * self.side
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        features, shapes = [], []
        for size, views in zip(call.image_sizes, call.views):
            if views > 1:
                tiles_high, tiles_wide = self.modeling.get_anyres_image_grid_shape(
                    size.tolist(), self.model.config.image_grid_pinpoints, self.model.config.vision_config.image_size
                )
            else:
                tiles_high, tiles_wide = 1, 1
            coords = [torch.stack([torch.zeros(patches), rows.flatten(), cols.flatten()], dim=-1)]  # base: kind 0
            for tile in range(views - 1):
                r, c = divmod(tile, tiles_wide)
                tile_rows, tile_cols = (r * side + rows).flatten(), (c * side + cols).flatten()
                coords.append(torch.stack([torch.ones(patches), tile_rows, tile_cols], -1))
            features.append(torch.stack(coords).double())  # [views, patches, 3]
            shapes.append((tiles_high, tiles_wide))
        packed = self.pack(features, call.image_sizes, call) if features else []
        out, view = [], first_view
        for tokens, views, (tiles_high, tiles_wide) in zip(packed, call.views, shapes):
            base = torch.arange(patches)
            if views == 1:  # base view and one newline
                index = torch.cat([base, torch.tensor([-1])])
                view_of = torch.where(index >= 0, view, -1)
                out.append([(None, SpanTemplate("image", (side, side), index, view_of, index.clone()))])
            else:
                mosaic = tokens[patches:]
                newline = mosaic[:, 0] < -0.5
                height = int(newline.sum())
                width = (mosaic.shape[0] - height) // height
                r = mosaic[:, 1].round().long().clamp(0, tiles_high * side - 1)
                c = mosaic[:, 2].round().long().clamp(0, tiles_wide * side - 1)
                tile_view = view + 1 + (r // side) * tiles_wide + c // side
                patch_index = torch.full((mosaic.shape[0],), -1, dtype=torch.long)
                patch_index[~newline] = torch.arange(height * width)
                out.append([
                    (None, SpanTemplate("base", (side, side), base, torch.full((patches,), view), base.clone())),
                    (None, SpanTemplate(
                        "tiles", (height, width), patch_index,
                        torch.where(newline, -1, tile_view), torch.where(newline, -1, (r % side) * side + c % side),
                    )),
                ])
            view += views
        return out

    def pooled_grid(self) -> tuple[int, int]:
        pooled = self.pool_tokens(torch.zeros(1, self.side * self.side, 1)).shape[1]
        side = math.isqrt(pooled)
        return side, pooled // side

    def video_templates(
        self, video: int, frames: int, first_view: int, first_image: int
    ) -> list[tuple[int, SpanTemplate]]:
        """One span per frame on the pooled grid; with `video_newline`, the last frame's span ends with the newline."""
        grid = self.pooled_grid()
        index = torch.arange(grid[0] * grid[1])
        out = []
        for frame in range(frames):
            patch_index = index
            if self.video_newline and frame == frames - 1:
                patch_index = torch.cat([index, torch.tensor([-1])])
            view = torch.where(patch_index >= 0, first_view + frame, -1)
            template = SpanTemplate("frame", grid, patch_index, view, patch_index.clone(), video)
            out.append((first_image + frame, template))
        return out

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
                out.setdefault(request, []).append(value)
        signals = {}
        for request, parts in out.items():
            if isinstance(request, self.per_patch_signals):
                width = max(p.shape[-1] for p in parts)
                parts = [nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts]
            signals[request] = torch.cat(parts)
            if signals[request].shape[0] != self._views:
                raise VTPruneError(
                    f"the vision encoder saw {signals[request].shape[0]} inputs but the prompt's images and videos "
                    f"need {self._views}; run the model (or generate) inside the `with` block"
                )
        return signals
