"""Adapter for transformers' Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`,
`SmolVLMForConditionalGeneration`: a SigLIP tower, pixel shuffle, a linear projector, a Llama language model).

Visual tokens. With image splitting (the processors' default) an image is cut into rows × cols crops of the tower's
input size, followed by a global image (the whole image resized to one crop); an image that fits one crop is the
global image alone. Each crop is one encoder input; pixel shuffle (`scale_factor` s) folds every s × s block of a
crop's patches into one token, row-major (`Idefics3Connector.pixel_shuffle`: token (r, c) holds patches
s·r..s·r+s-1 × s·c..s·c+s-1), so a crop gives side × side tokens (Idefics3-8B: 364 px, 14 px patches, s = 2: 13 × 13;
SmolVLM: 512 px, 16 px patches, s = 4: 8 × 8). In the prompt every crop is its own run of `<image>` tokens, after a
`<row_i_col_j>` tag, and the global image's run follows a `<global-img>` tag: a run after that tag ends an image.

Layout: one span per crop, `image` = the image (prompt order, row-major over the batch), `kind` "tile" (a crop),
"thumbnail" (the global image of a split image) or "image" (an image that is its global image alone), `grid` (side,
side), `patch_index` = `view_patch` = the token's number in its crop, `view` = the crop's encoder input. The
`<global-img>` tag's id is read from the prompt (the token before each sample's last run); a call with
`inputs_embeds` and no `input_ids` has no tags, so there each run is budgeted as an image of its own. Crops written
back to back with no tag between them (transformers' own model tests do so) are one run: one image's crops.
Budgets: `scope="image"` (default) gives an image's crops and global image one budget; `scope="tile"` budgets each.

Positions: 1-D RoPE as in LLaVA ("renumber" before the LLM, "original" inside it; see `decoder/cutter.py`).
Sites: `pre_llm`, `llm_layer`, `kv_cache`, `llm_attention`. Signals: the language model's only. SigLIP has no [CLS]
token, so the [CLS]-scored methods are refused, as are those reading the tower's attention or keys (not offered).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, register_adapter
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout, VisualSpan
from ..core.signals import ModelInfo, PrefillKV, QueryAttention, Transitions
from .common import call_arguments, continues_cache, media_in_call, placeholder_mask, token_runs, transformers_classes
from .decoder import LLM_SIGNALS, DecoderCutter

if TYPE_CHECKING:
    from ..core.method import Method
    from ..core.trace import Trace


@register_adapter
class Idefics3Adapter(Adapter):
    family = "idefics3"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache", "llm_attention"})
    signals = frozenset({QueryAttention, PrefillKV, Transitions}) | LLM_SIGNALS

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, transformers_classes("Idefics3ForConditionalGeneration",
                                                      "SmolVLMForConditionalGeneration"))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        vision = config.vision_config
        self.inner = model.model
        self.language_model = self.inner.text_model
        self.image_token_id = config.image_token_id
        patches = vision.image_size // vision.patch_size
        if patches % config.scale_factor:
            raise VTPruneError(f"a crop of {patches} x {patches} patches does not fold into {config.scale_factor} x "
                               f"{config.scale_factor} blocks")
        self.side = patches // config.scale_factor
        depth = vision.num_hidden_layers
        self._info = ModelInfo(
            family=self.family,
            llm_layers=len(self.language_model.layers),
            vision_layers=depth,
            vision_feature_layer=depth - 1,  # the connector reads the tower's last layer (after its final norm)
            vision_has_cls=False,
            patch_size=vision.patch_size * config.scale_factor,  # pixels per side of one token
        )
        self.cutter = DecoderCutter(self, self.language_model)
        self._pending: tuple[Tensor, Tensor | None] | None = None  # (is_image [B, L], input_ids) of the last call

    @property
    def info(self) -> ModelInfo:
        return self._info

    def attach(self, method: Method, trace: Trace) -> None:
        requests = method.requests(self.info)
        self.hook(self.inner, self._on_model)
        self.cutter.attach(method, trace, requests)
        self.on_detach(self._forget)

    def _forget(self) -> None:
        self._pending = None

    def vision_signals(self, layout: VisualLayout) -> dict[Any, Any]:
        return {}  # no tower signals offered (see the module docstring)

    # ------------------------------------------------------------------------------------------- layout
    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = call_arguments(module.forward, args, kwargs)
        if continues_cache(arguments):
            self._pending = None
            return
        present = "image" in media_in_call(arguments)  # image tokens without pixels are text to the model
        ids = arguments.get("input_ids")
        self._pending = placeholder_mask(self.inner, arguments, self.image_token_id, present), \
            None if ids is None else ids.cpu()

    def take_layout(self, batch: int, length: int) -> VisualLayout:
        pending, self._pending = self._pending, None
        if pending is None or tuple(pending[0].shape) != (batch, length):
            raise VTPruneError("vtprune could not match the language model input to the prompt's image tokens")
        return self.layout(*pending)

    def layout(self, is_image: Tensor, input_ids: Tensor | None = None) -> VisualLayout:
        """One span per crop ([B, L] bool image tokens, the prompt's ids when given): see the module docstring. A run
        of several crops' tokens back to back (no tags between them) is one image's crops."""
        per_crop = self.side * self.side
        patch_index = torch.arange(per_crop)
        spans, image, view = [], 0, 0
        for b, row in enumerate(is_image):
            runs = token_runs(row)
            for start, end in runs:
                if (end - start) % per_crop:
                    raise VTPruneError(f"a run of {end - start} image tokens is not a whole number of crops of "
                                       f"{per_crop} tokens")
            ends = image_ends(runs, None if input_ids is None else input_ids[b])
            crops = [(first, ends[i] and first + per_crop == end) for i, (start, end) in enumerate(runs)
                     for first in range(start, end, per_crop)]  # (start, whether it ends its image)
            sample, alone = [], True  # alone: no crop of this image came before
            for start, last in crops:
                kind = ("image" if alone else "thumbnail") if last else "tile"
                sample.append(VisualSpan(
                    image=image, start=start, patch_index=patch_index, grid=(self.side, self.side), kind=kind,
                    view=torch.full((per_crop,), view), view_patch=patch_index,
                ))
                view += 1
                image, alone = (image + 1, True) if last else (image, False)
            spans.append(sample)
        return VisualLayout(spans=spans, seq_len=is_image.shape[1])


def image_ends(runs: list[tuple[int, int]], ids: Tensor | None) -> list[bool]:
    """Per run of image tokens: whether it ends an image, i.e. follows the `<global-img>` tag, whose id is the token
    before the sample's last run. Without ids every run is an image of its own."""
    if ids is None or not runs:
        return [True] * len(runs)
    tag = int(ids[runs[-1][0] - 1])
    return [int(ids[start - 1]) == tag for start, _ in runs]
