"""Adapter for transformers' InternVL (`InternVLForConditionalGeneration`: the InternVL3 "-hf" layout; an InternViT
tower, pixel shuffle, an MLP projector, a Qwen2 language model).

Visual tokens. The processor cuts an image into tiles of the tower's input size and, when there are several, appends
a thumbnail (the whole image resized to one tile); the tiles are the encoder's inputs (rows of `pixel_values`), in
prompt order. Pixel shuffle folds every 2×2 block of a tile's patches into one token (downsample_ratio 0.5: token
(r, c) holds patches 2r..2r+1 × 2c..2c+1, their features concatenated), so a tile gives side × side tokens,
row-major (448 px tiles, 14 px patches: 16 × 16 = 256). In the prompt an image is one run of `<IMG_CONTEXT>` tokens
(between `<img>` and `</img>`): its tiles one after the other, the thumbnail last.

Layout: one span per tile, `image` = the image (numbered in prompt order, row-major over the batch), `kind` "tile",
"thumbnail" (the last tile of a multi-tile image: the processor's default `use_thumbnail=True`; only a name) or
"image" (an image encoded as one tile), `grid` (side, side), `patch_index` = `view_patch` = the token's number in its
tile, `view` = the tile's encoder input (prompt order). A sample's visual ordinals therefore run image by image, tile
by tile, thumbnail last, row-major in a tile: ordinal = (tiles before it in the sample) × side² + r × side + c.
Budgets: `scope="image"` (default) gives an image's tiles and thumbnail one budget; `scope="tile"` budgets every tile
on its own. Video frames reach the model as one-tile images (the processor writes each frame as its own
`<img>…</img>`); neither the model nor vtprune can tell them from images, so each frame is an image here.

Positions: 1-D RoPE as in LLaVA ("renumber" before the LLM, "original" inside it; see `decoder/cutter.py`).
Sites: `pre_llm`, `llm_layer`, `kv_cache`, `llm_attention`.

Signals: the language model's (`QueryAttention` and the other q/k-derived LLM signals, `PrefillKV`, `Transitions`),
and `ClsAttention`. InternViT prepends a learned [CLS] token that runs through every layer; the model drops it before
pixel shuffle (`vision_feature_select_strategy="default"`), as LLaVA drops CLIP's. Its row is recomputed from each
layer's own q/k (q/k norms included where the tower has them), softmax over all 1 + P keys, [CLS] column dropped, and
then pooled to tokens (our interpretation): a token's value is the sum of its four patches' attention, i.e. the share
of [CLS] attention that lands on the token. Value [tiles, layers, heads, side²], read by (`view`, `view_patch`).
Whether InternViT's [CLS] attention is a good saliency signal was not measured (no weights offline).
Not offered: `VisionAttention`, `VisionKeys` (could be pooled the same way, but the methods that read them — hiprune,
vflowopt, visionzip — do not accept a tiled layout), `ProjectorInput` (the projector reads 2×2-patch features; [CLS]
has no place there, and the methods reading it expect a [CLS] row), `PixelValues` (no method here needs it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, register_adapter
from ..core.attention import attention_rows
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout, VisualSpan
from ..core.profile import stage
from ..core.signals import (
    ClsAttention,
    ModelInfo,
    PrefillKV,
    QueryAttention,
    Transitions,
)
from .common import (
    call_arguments,
    continues_cache,
    expanded_items,
    kwarg,
    media_in_call,
    placeholder_mask,
    token_runs,
    transformers_classes,
)
from .decoder import LLM_SIGNALS, DecoderCutter

if TYPE_CHECKING:
    from ..core.method import Method
    from ..core.trace import Trace


def cls_rows(attn: nn.Module, hidden: Tensor) -> Tensor:
    """[N, heads, P]: the [CLS] query's softmax row over all 1 + P keys, [CLS] column dropped after the softmax.

    hidden: [N, 1 + P, D], the input of an InternViT attention block (after its layer norm); its own projections
    and q/k norms.
    """
    n, t, _ = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    query = attn.q_norm(attn.q_proj(hidden[:, :1])).view(n, 1, heads, head_dim).transpose(1, 2)  # [N, H, 1, d]
    keys = attn.k_norm(attn.k_proj(hidden)).view(n, t, heads, head_dim).transpose(1, 2)  # [N, H, T, d]
    return attention_rows(query, keys, attn.scale)[:, :, 0, 1:]


@register_adapter
class InternVLAdapter(Adapter):
    family = "internvl"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache", "llm_attention"})
    signals = frozenset({ClsAttention, QueryAttention, PrefillKV, Transitions}) | LLM_SIGNALS

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, transformers_classes("InternVLForConditionalGeneration"))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.inner = model.model
        self.vision_tower = self.inner.vision_tower
        self.language_model = self.inner.language_model
        self.image_token_id = config.image_token_id
        self.vision_layers = self.vision_tower.encoder.layer
        depth = len(self.vision_layers)
        if not isinstance(config.vision_feature_layer, int):
            raise VTPruneError("InternVL takes one vision_feature_layer; this config gives a list")
        # hidden_states[i] is the output of encoder layer i - 1 (hidden_states[0]: the embeddings)
        feature_layer = config.vision_feature_layer % (depth + 1) - 1
        self.token_patches = self._token_patches(config)  # [side², k] the patches each token is made of
        self.side = math.isqrt(self.token_patches.shape[0])
        vision = config.vision_config
        self._info = ModelInfo(
            family=self.family,
            llm_layers=len(self.language_model.layers),
            vision_layers=depth,
            vision_feature_layer=feature_layer,
            vision_has_cls=True,
            patch_size=vision.patch_size[0] * round(1 / config.downsample_ratio),  # pixels per side of one token
        )
        self.cutter = DecoderCutter(self, self.language_model)
        self._is_image: Tensor | None = None
        self._rows: dict[int, Tensor] = {}
        self.values: dict[Any, Tensor] = {}

    def _token_patches(self, config: Any) -> Tensor:
        """[tokens, k] long: the patches (row-major in the tile) pixel shuffle folds into each token, read off the
        model's own `pixel_shuffle` run on patch numbers."""
        vision = config.vision_config
        rows, cols = vision.image_size[0] // vision.patch_size[0], vision.image_size[1] // vision.patch_size[1]
        if rows != cols:
            raise VTPruneError(f"InternVL tiles must be square patch grids; this tower has {rows}x{cols}")
        # on the CPU even when the model is built under `torch.device("meta")` (a session attached at construction)
        numbers = torch.arange(rows * cols, dtype=torch.float64, device="cpu").view(1, rows, cols, 1)
        shuffled = self.inner.pixel_shuffle(numbers, scale_factor=config.downsample_ratio)  # [1, s, s, k]
        return shuffled.reshape(-1, shuffled.shape[-1]).round().long()

    @property
    def info(self) -> ModelInfo:
        return self._info

    def attach(self, method: Method, trace: Trace) -> None:
        requests = method.requests(self.info)
        self.cls_requests = [r for r in requests if isinstance(r, ClsAttention)]
        if self.cls_requests:
            if self._info.vision_feature_layer < 0:
                raise VTPruneError("ClsAttention needs vision features taken from an encoder layer, not the embeddings")
            layers = sorted({self._resolve(layer) for r in self.cls_requests for layer in r.layers})
            self.hook(self.vision_tower, self._on_tower_start)
            self.hook(self.vision_tower, self._on_tower_end, pre=False)
            for index in layers:
                self.hook(self.vision_layers[index].attention, self._capture(index))
        self.hook(self.inner, self._on_model)
        self.cutter.attach(method, trace, requests)
        self.on_detach(self._forget)

    def _forget(self) -> None:
        self._is_image, self._rows, self.values = None, {}, {}

    def _resolve(self, layer: int) -> int:
        depth = len(self.vision_layers)
        if not -depth <= layer < depth:
            raise VTPruneError(f"vision encoder layer {layer} does not exist (the encoder has {depth} layers)")
        return layer % depth

    # ------------------------------------------------------------------------------------------- signals
    def _on_tower_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._rows, self.values = {}, {}

    def _capture(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            with torch.no_grad(), stage("signals"):
                self._rows[index] = cls_rows(module, kwarg(args, kwargs, "hidden_states", 0))

        return hook

    def _on_tower_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        for request in self.cls_requests:
            with stage("signals"):
                rows = torch.stack([self._rows[self._resolve(layer)] for layer in request.layers], dim=1)  # [N,l,H,P]
                patches = self.token_patches.to(rows.device)
                self.values[request] = rows[..., patches].sum(dim=-1)  # [N, layers, heads, tokens]

    def vision_signals(self, layout: VisualLayout) -> dict[Any, Any]:
        """The tiles' signals in the layout's `view` order; generate() encodes a batch's tiles once and repeats each
        sample for beam search or several return sequences, so the rows are repeated the same way."""
        tiles = sum(len(spans) for spans in layout.spans)
        if any(request not in self.values for request in self.cls_requests):
            raise VTPruneError("the vision tower did not encode this prompt's tiles inside the session (encoder "
                               "outputs computed outside it?); run the model (or generate) inside the `with` block")
        out = {}
        for request, value in self.values.items():
            if value.shape[0] == tiles:
                out[request] = value
                continue
            per_tile = self.side * self.side
            index = expanded_items([len(spans) * per_tile for spans in layout.spans], [per_tile] * value.shape[0],
                                   "image tile")
            if index is None:
                raise VTPruneError(f"the vision encoder saw {value.shape[0]} tiles but the prompt holds {tiles}; "
                                   "run the model (or generate) inside the `with` block")
            out[request] = value.index_select(0, torch.tensor(index, device=value.device))
        return out

    # ------------------------------------------------------------------------------------------- layout
    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = call_arguments(module.forward, args, kwargs)
        if continues_cache(arguments):
            self._is_image = None
            return
        present = "image" in media_in_call(arguments)  # image tokens without pixels are text to the model
        self._is_image = placeholder_mask(self.inner, arguments, self.image_token_id, present)

    def take_layout(self, batch: int, length: int) -> VisualLayout:
        is_image, self._is_image = self._is_image, None
        if is_image is None or tuple(is_image.shape) != (batch, length):
            raise VTPruneError("vtprune could not match the language model input to the prompt's image tokens")
        return self.layout(is_image)

    def layout(self, is_image: Tensor) -> VisualLayout:
        """One span per tile ([B, L] bool image tokens): each run of image tokens is an image of whole tiles."""
        per_tile = self.side * self.side
        patch_index = torch.arange(per_tile)
        spans, image, view = [], 0, 0
        for row in is_image:
            sample = []
            for start, end in token_runs(row):
                if (end - start) % per_tile:
                    raise VTPruneError(
                        f"a run of {end - start} image tokens is not a whole number of tiles of {per_tile} tokens"
                    )
                tiles = (end - start) // per_tile
                for tile in range(tiles):
                    kind = "image" if tiles == 1 else "thumbnail" if tile == tiles - 1 else "tile"
                    sample.append(VisualSpan(
                        image=image, start=start + tile * per_tile, patch_index=patch_index, grid=(self.side, self.side),
                        kind=kind, view=torch.full((per_tile,), view), view_patch=patch_index,
                    ))
                    view += 1
                image += 1
            spans.append(sample)
        return VisualLayout(spans=spans, seq_len=is_image.shape[1])
