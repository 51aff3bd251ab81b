"""The vision tower of transformers' LLaVA-style models (CLIP, SigLIP): its encoder layers, the signals methods read
from it (recomputed from each layer's own q/k, so the tower keeps running with SDPA), and what methods may know."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter
from ..core.attention import attention_rows
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout
from ..core.profile import stage
from ..core.signals import ClsAttention, ModelInfo, PixelValues, ProjectorInput, VisionAttention, VisionKeys
from .common import expanded_items, kwarg


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
            self.values[PixelValues()] = kwarg(args, kwargs, "pixel_values", 0).detach()

    def _capture(self, index: int, requests: list[Any]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwarg(args, kwargs, "hidden_states", 0)
            with torch.no_grad(), stage("signals"):
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
            self._rows[("output", index)] = output[0] if isinstance(output, tuple) else output  # merges may need grads

        return hook

    def _on_tower_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        for request in self.cls_requests:
            rows = [self._rows[self._resolve(l, self.n_layers)] for l in request.layers]
            self.values[request] = torch.stack(rows, dim=1)  # [N, layers, heads, patches]
        if self.feature_layers and ("output", self.feature_layers[0]) in self._rows:
            outputs = [self._rows[("output", index)] for index in self.feature_layers]
            self.values[ProjectorInput()] = torch.cat(outputs, dim=-1)  # as LLaVA concatenates feature layers

    def for_layout(self, layout: VisualLayout) -> dict[Any, Any]:
        """The signals of the images of `layout`, in its order: generate() encodes a batch's images once and repeats
        each sample for beam search or several return sequences; the signals are repeated the same way."""
        encoded = {value.shape[0] for value in self.values.values()}
        if not encoded or encoded == {layout.num_images}:
            return dict(self.values)
        index = expanded_items([len(spans) for spans in layout.spans], [1] * min(encoded))  # one span per image
        if index is None or len(encoded) > 1:
            raise VTPruneError(
                f"the vision encoder saw {min(encoded)} images but the prompt holds {layout.num_images}; "
                "run the model (or generate) inside the `with` block"
            )
        rows = torch.tensor(index)
        return {request: value.index_select(0, rows.to(value.device)) for request, value in self.values.items()}
