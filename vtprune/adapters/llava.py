"""Adapter for transformers' `LlavaForConditionalGeneration` (LLaVA-1.5 layout).

Visual tokens: each `<image>` placeholder expands to the patch features of one image (24×24 = 576 for
LLaVA-1.5-7B), in row-major patch order; [CLS] is dropped unless `vision_feature_select_strategy="full"`.
Sites: `pre_llm` (compact the language model's input), `llm_layer` (cut between decoder layers) and `kv_cache`
(compress each layer's cache after prefill). Signals: `ClsAttention` (recomputed from the CLIP tower's q/k),
`QueryAttention`, `PixelValues`, `PrefillKV`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, register_adapter
from ..core.attention import attention_rows
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout, VisualSpan
from ..core.signals import ClsAttention, ModelInfo, PixelValues, PrefillKV, QueryAttention
from .hf_decoder import DecoderCutter, _kwarg, prompt_input_ids

if TYPE_CHECKING:
    from ..core.method import Method
    from ..core.session import Trace


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a transformers vision tower (CLIP, SigLIP, ...)."""
    for path in ("vision_model.encoder.layers", "encoder.layers"):
        module: Any = vision_tower
        try:
            for name in path.split("."):
                module = getattr(module, name)
            return module
        except AttributeError:
            continue
    raise VTPruneError(f"cannot find the encoder layers of the vision tower {type(vision_tower).__name__}")


def cls_rows(attn: nn.Module, hidden: Tensor) -> Tensor:
    """[N, heads, T-1]: the [CLS] query's softmax row over all T keys, [CLS] column dropped after the softmax.

    hidden: [N, T, D], the input of a CLIP attention block (after its layer norm). Uses the block's own projections.
    """
    n, t, _ = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    cls_query = attn.q_proj(hidden[:, :1]).view(n, 1, heads, head_dim).transpose(1, 2)  # [N, H, 1, d]
    keys = attn.k_proj(hidden).view(n, t, heads, head_dim).transpose(1, 2)  # [N, H, T, d]
    return attention_rows(cls_query, keys, attn.scale)[:, :, 0, 1:]


class VisionSignals:
    """Captures the vision encoder's signals (per image) while it runs; reused until it runs again."""

    def __init__(self, adapter: Adapter, vision_tower: nn.Module, requests: list[Any]) -> None:
        self.adapter, self.values, self._rows = adapter, {}, {}
        layers = encoder_layers(vision_tower)
        self.cls_requests = [r for r in requests if isinstance(r, ClsAttention)]
        self.want_pixels = any(isinstance(r, PixelValues) for r in requests)
        wanted = sorted({self._resolve(l, len(layers)) for r in self.cls_requests for l in r.layers})
        adapter.hook(vision_tower, self._on_tower_start)
        adapter.hook(vision_tower, self._on_tower_end, pre=False)
        for index in wanted:
            adapter.hook(layers[index].self_attn, self._capture(index))
        self.n_layers = len(layers)

    @staticmethod
    def _resolve(layer: int, n_layers: int) -> int:
        if not -n_layers <= layer < n_layers:
            raise VTPruneError(f"vision encoder layer {layer} does not exist (the encoder has {n_layers} layers)")
        return layer % n_layers

    def _on_tower_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.values, self._rows = {}, {}
        if self.want_pixels:
            self.values[PixelValues()] = _kwarg(args, kwargs, "pixel_values", 0).detach()

    def _capture(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            with torch.no_grad():
                self._rows[index] = cls_rows(module, _kwarg(args, kwargs, "hidden_states", 0))

        return hook

    def _on_tower_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        for request in self.cls_requests:
            rows = [self._rows[self._resolve(l, self.n_layers)] for l in request.layers]
            self.values[request] = torch.stack(rows, dim=1)  # [N, layers, heads, patches]

    def for_layout(self, layout: VisualLayout) -> dict[Any, Any]:
        for request, value in self.values.items():
            if value.shape[0] != layout.num_images:
                raise VTPruneError(
                    f"the vision encoder saw {value.shape[0]} images but the prompt holds {layout.num_images}; "
                    "run the model (or generate) inside the `with` block, without num_return_sequences > 1"
                )
        return dict(self.values)


@register_adapter
class LlavaAdapter(Adapter):
    family = "llava"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache"})
    signals = frozenset({ClsAttention, QueryAttention, PixelValues, PrefillKV})

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
        feature_layer = feature_layer if isinstance(feature_layer, int) else feature_layer[-1]
        n_vision = len(encoder_layers(self.vision_tower))
        self._info = ModelInfo(
            family=self.family,
            llm_layers=len(self.language_model.layers),
            vision_layers=n_vision,
            vision_feature_layer=feature_layer % (n_vision + 1) - 1,  # hidden_states[i] is the output of layer i-1
            vision_has_cls=True,
            patch_size=vision.patch_size,
        )
        self.cutter = DecoderCutter(self, self.language_model)
        self._layout: VisualLayout | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    def attach(self, method: "Method", trace: "Trace") -> None:
        requests = method.requests(self.info)
        self.vision = VisionSignals(self, self.vision_tower, requests)
        self.hook(self.model.model, self._on_model)
        self.cutter.attach(method, trace, [r for r in requests if isinstance(r, QueryAttention)])
        self.on_detach(self._forget)

    def _forget(self) -> None:
        self._layout = None

    # ------------------------------------------------------------------------------------------- layout
    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._layout = self.layout(prompt_input_ids(args, kwargs, self.image_token_id))

    def layout(self, input_ids: Tensor) -> VisualLayout:
        """Spans of `<image>` tokens per sample; consecutive runs are split into images of `tokens_per_image`."""
        per_image = self.grid[0] * self.grid[1] + int(self.with_cls)
        patch_index = torch.arange(self.grid[0] * self.grid[1])
        if self.with_cls:
            patch_index = torch.cat([torch.tensor([-1]), patch_index])
        is_image = (input_ids == self.image_token_id).cpu()
        spans, image = [], 0
        for row in is_image:
            sample = []
            positions = row.nonzero().squeeze(1)
            if positions.numel():
                breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1
                for run in torch.tensor_split(positions, breaks):
                    if run.numel() % per_image:
                        raise VTPruneError(
                            f"a run of {run.numel()} image tokens is not a whole number of images of {per_image} tokens"
                        )
                    for start in range(int(run[0]), int(run[-1]) + 1, per_image):
                        sample.append(VisualSpan(image=image, start=start, patch_index=patch_index, grid=self.grid))
                        image += 1
            spans.append(sample)
        return VisualLayout(spans=spans, seq_len=input_ids.shape[1])

    def take_layout(self, batch: int, length: int) -> VisualLayout:
        layout, self._layout = self._layout, None
        if layout is None or layout.seq_len != length or layout.batch_size != batch:
            raise VTPruneError("vtprune could not match the language model input to the prompt's image tokens")
        return layout

    def vision_signals(self, layout: VisualLayout) -> dict[Any, Any]:
        return self.vision.for_layout(layout)
