"""What a method may ask the adapter for. Adapters compute a signal only when a method requests it.

A request is a small frozen dataclass; its value is found in `SiteContext.signals[request]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .layout import VisualLayout


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
class ReceivedAttention:
    """Softmax attention each token receives at an LLM decoder layer, summed over heads and query rows, in float32.

    Computed from layer `layer`'s own norm, q/k projections and RoPE on the sequence that layer runs on (after a cut
    made before it), causal, padding excluded. `queries`: "all" (every real token) or "text" (every non-visual one).
    A later cut must follow the layer. Value: list over samples of float32 tensors [seq_len] (positions of the
    sequence at `layer`; padding gets 0).
    """

    layer: int
    queries: str = "all"


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


@dataclass(frozen=True)
class PrefillKV:
    """For the kv_cache site: one decoder layer's attention state at the end of prefill, read in the layer's own hooks
    (post-RoPE keys as the attention wrote them to the cache, query rows recomputed from the layer's q projection and
    RoPE), so the model keeps running with SDPA / FlashAttention.

    `queries`: how many of the last prompt tokens' query rows to provide (at most the shortest sample's length).
    `expand_heads`: repeat a grouped-query layer's keys/values to the query heads before its attention, so the cache
    holds one K/V head per query head and a method may select per query head (costs the GQA memory saving).
    `pre_rope_keys`: also provide the keys without RoPE (the cached keys rotated back with the layer's own RoPE).
    Value: `LayerKV`.
    """

    queries: int = 8
    expand_heads: bool = False
    pre_rope_keys: bool = False


@dataclass
class LayerKV:
    """The value of `PrefillKV` at one layer. Positions index the layer's sequence (padding included)."""

    keys: Tensor  # [B, H_c, L, d] post-RoPE keys as cached (H_c: KV heads, or query heads when expanded)
    queries: Tensor  # [B, H, Q, d] post-RoPE queries of each sample's last Q real tokens
    hidden: Tensor  # [B, L, D] the attention module's input (after the layer's input norm)
    residual: Tensor  # [B, L, D] the decoder layer's input (the residual stream)
    key_mask: Tensor  # [B, L] bool, False at padding
    keys_pre_rope: Tensor | None = None  # [B, H_c, L, d] the same keys before RoPE, if requested


@dataclass(frozen=True)
class Transitions:
    """How much each decoder layer's attention and MLP modules transform every token, measured during prefill.

    For each layer in `layers` (0-based) and module (0: self-attention, 1: MLP), the module's own input (the output of
    the norm in front of it) and its output (before the residual add) are compared per token in float32: the norm
    ratio ||out|| / ||in|| (no epsilon) and the cosine of the angle between them (eps 1e-8).
    Value: dict layer -> `TransitionStats`, holding the requested layers that have run so far in this forward.
    """

    layers: tuple[int, ...]


@dataclass
class TransitionStats:
    """The value of one layer of `Transitions`, on the sequence as that layer saw it (before later cuts)."""

    ratio: Tensor  # [B, 2, L] ||out|| / ||in|| per module and token
    cosine: Tensor  # [B, 2, L] cos(in, out)
    mask: Tensor  # [B, L] 1 at real tokens, 0 at padding
    layout: VisualLayout  # the visual tokens of that sequence (`original_ordinal` links them to later sequences)


@dataclass(frozen=True)
class VisionAttention:
    """Post-softmax self-attention of one vision encoder layer among all its tokens, mean over heads, float32.

    Recomputed from the layer's own q/k (the encoder keeps running with SDPA). Token order is the encoder's: [CLS]
    first when the tower has one (`ModelInfo.vision_has_cls`), then the patches row-major.
    Value: tensor [num_images, T, T] (rows are queries, columns keys).
    """

    layer: int


@dataclass(frozen=True)
class VisionKeys:
    """Key vectors of one vision encoder layer (its k projection, bias included), averaged over heads.

    Value: tensor [num_images, T, head_dim], tokens in the encoder's order ([CLS] first when present).
    """

    layer: int


@dataclass(frozen=True)
class ProjectorInput:
    """The vision features that feed the projector, for every encoder token ([CLS] kept even where the model drops it).

    Requesting it lets a pre_llm plan hold merges with `space="encoder"`: the adapter combines rows of this tensor
    and passes the result through the model's projector. Value: tensor [num_images, T, D_vision], encoder token order.
    """
