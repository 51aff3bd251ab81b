"""Cache layers shorter than the sequence they stand for, and the segments of layers that share one prompt layout.

After a cut, the layers from one cut to the next (a *segment*) hold the same prompt entries: the tokens the cut kept,
left-padded to the longest sample. A `PrunedLayer` replaces such a layer's transformers `DynamicLayer`:
- `get_seq_length()` is the *logical* length (every token the layer stands for, as if nothing were pruned), so
  generate() slices re-fed inputs right when it continues from a returned cache;
- `get_mask_sizes()` spans the *physical* entries, placed at the end of the logical range (offset = entries dropped),
  so that a query at logical position p sees exactly the stored entries before it: causality holds for several new
  tokens at once (assisted decoding, a continued prompt), and the 2-D mask is the caller's length with the dropped
  entries as zeros (see `DecoderCutter._continuation_mask`);
- beam search's reorder / repeat / select (and assisted decoding's crop) move the segment's prompt mask and position
  offsets together with the keys, so every beam keeps its own padding and positions.
The segment's per-sample state is shared by its layers: a batch operation applies to it once, when the cache passes
it to the segment's first layer (caches visit their layers in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer


@dataclass
class Segment:
    """Decoder layers `start ..` up to the next cut: they see the same prompt (and cache the same prompt entries)."""

    start: int
    mask2d: Tensor  # [B, L_s] the prompt's padding mask as these layers store it (1 real, 0 padding)
    positions: Tensor | None  # [B, L_s] or [P, B, L_s] the prompt's positions (prefill only; None for cache cuts)
    offset: Tensor  # [B] or [P, B]: subtracted from incoming positions while decoding
    prompt_length: int  # the prompt's length as the caller sees it (before any cut)

    def batch_op(self, op: str, arg: Any) -> None:
        """Apply a cache batch operation to the per-sample state ("reorder" / "select": indices; "repeat": count)."""
        for name in ("mask2d", "positions", "offset"):
            value = getattr(self, name)
            if value is None:
                continue
            dim = value.dim() - (1 if name == "offset" else 2)  # the batch dimension
            if op == "repeat":
                value = value.repeat_interleave(arg, dim=dim)
            else:
                value = value.index_select(dim, torch.as_tensor(arg, device=value.device).reshape(-1))
            setattr(self, name, value)


class PrunedLayer(DynamicLayer):
    """A DynamicLayer holding the entries its segment kept (plus every token decoded since)."""

    def __init__(self, segment: Segment, first: bool) -> None:
        super().__init__()
        self.segment, self.first = segment, first

    @property
    def prefix(self) -> int:
        """Physical entries of the prompt."""
        return int(self.segment.mask2d.shape[1])

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2] - self.prefix + self.segment.prompt_length

    @property
    def dropped(self) -> int:
        """Prompt entries the segment's cuts removed."""
        return self.segment.prompt_length - self.prefix

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_initialized or self.keys.numel() == 0:
            return query_length, 0
        return self.keys.shape[-2] + query_length, self.dropped

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.first:
            self.segment.batch_op("reorder", beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.first:
            self.segment.batch_op("repeat", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.first:
            self.segment.batch_op("select", indices)


def pruned_layer(cache: Any, index: int, segment: Segment, first: bool) -> PrunedLayer | None:
    """Put a PrunedLayer for `segment` at layer `index` of a transformers cache before the layer writes to it.

    Returns None (and changes nothing) for caches whose layers are not plain, empty DynamicLayers.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers):
        return None
    current = layers[index]
    if not (type(current) is DynamicLayer or isinstance(current, PrunedLayer)) or current.get_seq_length() > 0:
        return None
    layer = PrunedLayer(segment, first)
    layers[index] = layer
    return layer
