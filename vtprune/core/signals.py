"""What a method may ask the adapter for. Adapters compute a signal only when a method requests it.

A request is a small frozen dataclass; its value is found in `SiteContext.signals[request]`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClsAttention:
    """The vision encoder's [CLS] query row over the patch keys, post-softmax over all keys ([CLS] included).

    `layers`: encoder layer indices (0-based; negative counts from the end). Recomputed from each layer's own q/k,
    so the encoder keeps running with SDPA / FlashAttention.
    Value: float32 tensor [num_images, len(layers), heads, patches].
    """

    layers: tuple[int, ...]


@dataclass(frozen=True)
class QueryAttention:
    """Softmax attention of chosen query tokens over all keys at an LLM decoder layer.

    Computed from layer `layer`'s own norm, q/k projections and RoPE, on the hidden states that enter that layer (before
    any cut made at it). `queries`: "last" (last real token of each sample), "after_visual" (every token after the
    sample's last visual token), or "text" (every non-visual, non-padding token).
    Value: list over samples of float32 tensors [heads, queries_b, seq_len]; keys are positions of the sequence as it
    is at `layer` (padding keys get zero).
    """

    layer: int
    queries: str = "last"


@dataclass(frozen=True)
class PixelValues:
    """The pixel tensor that entered the vision encoder. Value: tensor [num_images, channels, height, width]."""


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model (no module, no class)."""

    family: str
    llm_layers: int
    vision_layers: int | None = None
    vision_feature_layer: int | None = None  # 0-based encoder layer whose output feeds the projector
    vision_has_cls: bool = False
    patch_size: int | None = None
