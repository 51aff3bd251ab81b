"""Adapter for transformers' `LlavaForConditionalGeneration` (LLaVA-1.5 layout).

Visual tokens: each `<image>` placeholder expands to the patch features of one image (24×24 = 576 for
LLaVA-1.5-7B), in row-major patch order; [CLS] is dropped unless `vision_feature_select_strategy="full"`.
Sites: `pre_llm` (compact the language model's input), `llm_layer` (cut between decoder layers), `kv_cache`
(compress each layer's cache after prefill) and `llm_attention` (attention among each layer's important tokens, see
`hf_attention`). Signals: `ClsAttention`, `VisionAttention`, `VisionKeys` (recomputed from the CLIP tower's q/k),
`PixelValues`, `ProjectorInput` (the feature layer's output with [CLS]; enables pre-projector merges), and from the
language model `QueryAttention`, `ReceivedAttention`, `Transitions`, `PrefillKV`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, register_adapter
from ..core.attention import attention_rows
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout, VisualSpan
from ..core.signals import (
    ClsAttention,
    ModelInfo,
    PixelValues,
    PrefillKV,
    ProjectorInput,
    QueryAttention,
    ReceivedAttention,
    Transitions,
    VisionAttention,
    VisionKeys,
)
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


def full_attention(attn: nn.Module, hidden: Tensor) -> Tensor:
    """[N, T, T]: softmax attention among all T tokens, mean over heads, float32 (from the block's own q/k)."""
    n, t, _ = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    queries = attn.q_proj(hidden).view(n, t, heads, head_dim).transpose(1, 2)
    keys = attn.k_proj(hidden).view(n, t, heads, head_dim).transpose(1, 2)
    return attention_rows(queries, keys, attn.scale).mean(dim=1)


def mean_keys(attn: nn.Module, hidden: Tensor) -> Tensor:
    """[N, T, head_dim]: the block's key vectors (bias included), averaged over heads, float32."""
    n, t, _ = hidden.shape
    return attn.k_proj(hidden).float().view(n, t, attn.num_heads, attn.head_dim).mean(dim=2)


def model_info(
    family: str, config: Any, vision_tower: nn.Module, language_model: nn.Module, vision_has_cls: bool
) -> ModelInfo:
    """What methods may know about a LLaVA-style model: vision tower, projector, decoder language model."""
    feature_layer = config.vision_feature_layer
    feature_layer = feature_layer if isinstance(feature_layer, int) else feature_layer[-1]
    n_vision = len(encoder_layers(vision_tower))
    return ModelInfo(
        family=family,
        llm_layers=len(language_model.layers),
        vision_layers=n_vision,
        vision_feature_layer=feature_layer % (n_vision + 1) - 1,  # hidden_states[i] is the output of layer i-1
        vision_has_cls=vision_has_cls,
        patch_size=config.vision_config.patch_size,
    )


def attach_language_model(cutter: DecoderCutter, method: "Method", trace: "Trace", requests: list[Any]) -> None:
    """Attach the decoder cuts, with the language-model signals among `requests`."""
    cutter.attach(
        method,
        trace,
        [r for r in requests if isinstance(r, QueryAttention)],
        [r for r in requests if isinstance(r, Transitions)],
        [r for r in requests if isinstance(r, ReceivedAttention)],
    )


class VisionSignals:
    """Captures the vision encoder's signals (per image) while it runs; reused until it runs again."""

    def __init__(
        self, adapter: Adapter, vision_tower: nn.Module, requests: list[Any], feature_layers: list[int] | None = None
    ) -> None:
        """`feature_layers`: the encoder layers whose outputs feed the projector (needed for `ProjectorInput`)."""
        self.adapter, self.values, self._rows = adapter, {}, {}
        layers = encoder_layers(vision_tower)
        self.n_layers = len(layers)
        self.cls_requests = [r for r in requests if isinstance(r, ClsAttention)]
        self.want_pixels = any(isinstance(r, PixelValues) for r in requests)
        per_layer: dict[int, list[Any]] = {}  # encoder layer -> requests computed from its attention input
        for request in requests:
            if isinstance(request, ClsAttention):
                for layer in request.layers:
                    per_layer.setdefault(self._resolve(layer, len(layers)), []).append(request)
            elif isinstance(request, (VisionAttention, VisionKeys)):
                per_layer.setdefault(self._resolve(request.layer, len(layers)), []).append(request)
        adapter.hook(vision_tower, self._on_tower_start)
        adapter.hook(vision_tower, self._on_tower_end, pre=False)
        for index, layer_requests in sorted(per_layer.items()):
            adapter.hook(layers[index].self_attn, self._capture(index, layer_requests))
        self.feature_layers = feature_layers or []
        if any(isinstance(r, ProjectorInput) for r in requests):
            if not self.feature_layers:
                raise VTPruneError("ProjectorInput needs the encoder layers that feed the projector")
            for index in self.feature_layers:
                adapter.hook(layers[index], self._capture_output(index), pre=False)

    @staticmethod
    def _resolve(layer: int, n_layers: int) -> int:
        if not -n_layers <= layer < n_layers:
            raise VTPruneError(f"vision encoder layer {layer} does not exist (the encoder has {n_layers} layers)")
        return layer % n_layers

    def _on_tower_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.values, self._rows = {}, {}
        if self.want_pixels:
            self.values[PixelValues()] = _kwarg(args, kwargs, "pixel_values", 0).detach()

    def _capture(self, index: int, requests: list[Any]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = _kwarg(args, kwargs, "hidden_states", 0)
            with torch.no_grad():
                if any(isinstance(r, ClsAttention) for r in requests):
                    self._rows[index] = cls_rows(module, hidden)
                for request in requests:
                    if isinstance(request, VisionAttention):
                        self.values[request] = full_attention(module, hidden)
                    elif isinstance(request, VisionKeys):
                        self.values[request] = mean_keys(module, hidden)

        return hook

    def _capture_output(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._rows[("output", index)] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def _on_tower_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        for request in self.cls_requests:
            rows = [self._rows[self._resolve(l, self.n_layers)] for l in request.layers]
            self.values[request] = torch.stack(rows, dim=1)  # [N, layers, heads, patches]
        if self.feature_layers and ("output", self.feature_layers[0]) in self._rows:
            outputs = [self._rows[("output", index)] for index in self.feature_layers]
            self.values[ProjectorInput()] = torch.cat(outputs, dim=-1)  # as LLaVA concatenates feature layers

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
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache", "llm_attention"})
    signals = frozenset(
        {
            ClsAttention, QueryAttention, PixelValues, PrefillKV, Transitions, VisionAttention, VisionKeys,
            ProjectorInput, ReceivedAttention,
        }
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
        attach_language_model(self.cutter, method, trace, requests)
        self.on_detach(self._forget)

    def project(self, features: Tensor) -> Tensor:
        """The model's projector on vision features [n, D_vision] -> language-model inputs [n, D_llm]."""
        return self.model.model.multi_modal_projector(features)

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
