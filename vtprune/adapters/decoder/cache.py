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

Under a `StaticCache` (generate(..., cache_implementation="static"), the torch.compile path) an empty `StaticLayer` is
turned into a `PrunedStaticLayer` instead (a class swap: its preallocated buffers keep their addresses). It stores the
same entries at physical slots 0.. of its `max_cache_len` buffer (a StaticLayer writes at its own running count, never
at the caller's logical positions), reports the same logical length, and sizes masks over the whole buffer with the
same offset: slot i stands for logical position `dropped + i`, and the slots not written yet lie after every query.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer


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

    def drop_tail(self, count: int) -> None:
        """Forget the prompt's last `count` entries (assisted decoding rejected candidates verified in the prefill
        call: text after every visual token, which every cut kept)."""
        self.mask2d = self.mask2d[:, :-count]
        if self.positions is not None:
            self.positions = self.positions[..., :-count]
        self.prompt_length -= count


class SegmentLayer(CacheLayerMixin):
    """What a cache layer of a segment adds to a transformers layer: the segment, the logical length it stands for,
    and batch operations that move the segment's per-sample state with the entries (see the module docstring).
    A mixin placed before the transformers layer class (a CacheLayerMixin itself, so that a StaticLayer's class can
    be swapped for PrunedStaticLayer: same instance layout)."""

    segment: Segment
    first: bool  # the segment's first layer applies batch operations to the shared segment state

    @property
    def prefix(self) -> int:
        """Physical entries of the prompt."""
        return int(self.segment.mask2d.shape[1])

    @property
    def dropped(self) -> int:
        """Prompt entries the segment's cuts removed."""
        return self.segment.prompt_length - self.prefix

    @property
    @abstractmethod
    def stored(self) -> int:
        """Physical entries held now (prompt and every token since)."""

    def get_seq_length(self) -> int:
        stored = self.stored
        return stored - self.prefix + self.segment.prompt_length if stored else 0

    @abstractmethod
    def entries(self) -> tuple[Tensor, Tensor]:
        """The stored keys and values [B, H, stored, d]."""

    @abstractmethod
    def set_entries(self, keys: Tensor, values: Tensor) -> None:
        """Replace the stored entries (a compressed prompt) by `keys` / `values` [B, H, n, d]."""

    @abstractmethod
    def _move_entries(self, op: str, arg: Any) -> None:
        """Apply a beam reorder / batch repeat / selection (`op`, `arg`) to the stored entries."""

    def reset(self) -> None:
        """Empty the layer and make it the plain transformers layer again (a reused cache outside any session)."""
        plain = StaticLayer if isinstance(self, StaticLayer) else DynamicLayer
        plain.reset(self)
        self.__class__ = plain

    def _batch(self, op: str, arg: Any) -> None:
        self._move_entries(op, arg)
        if self.first:
            self.segment.batch_op(op, arg)

    def crop(self, tokens_to_remove: int) -> None:
        """Assisted decoding's crop (a negative count): the entries go from the end; a crop that reaches into the
        prompt (candidates of the prefill call) shortens the segment too."""
        super().crop(tokens_to_remove)
        into_prompt = self.prefix - self.stored
        if self.first and into_prompt > 0:
            self.segment.drop_tail(into_prompt)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch("reorder", beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch("repeat", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch("select", indices)


class PrunedLayer(SegmentLayer, DynamicLayer):
    """A DynamicLayer holding the entries its segment kept (plus every token decoded since)."""

    def __init__(self, segment: Segment, first: bool) -> None:
        DynamicLayer.__init__(self)
        self.segment, self.first = segment, first

    @property
    def stored(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.numel() else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored
        return (stored + query_length, self.dropped) if stored else (query_length, 0)

    def entries(self) -> tuple[Tensor, Tensor]:
        return self.keys, self.values

    def set_entries(self, keys: Tensor, values: Tensor) -> None:
        self.keys, self.values = keys, values

    def _move_entries(self, op: str, arg: Any) -> None:
        move = {"reorder": DynamicLayer.reorder_cache, "repeat": DynamicLayer.batch_repeat_interleave,
                "select": DynamicLayer.batch_select_indices}[op]
        move(self, arg)


class PrunedStaticLayer(SegmentLayer, StaticLayer):
    """A StaticLayer whose slots 0.. hold the entries its segment kept, then every token decoded since.

    Made from an empty StaticLayer by `pruned_layer` (class swap); `max_cache_len` stays the mask's key length."""

    @property
    def stored(self) -> int:
        return int(self.cumulative_length) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, self.dropped if self.stored else 0

    def entries(self) -> tuple[Tensor, Tensor]:
        stored = self.stored
        return self.keys[:, :, :stored], self.values[:, :, :stored]

    def set_entries(self, keys: Tensor, values: Tensor) -> None:
        count = keys.shape[-2]
        self.keys[:, :, :count].copy_(keys)
        self.values[:, :, :count].copy_(values)
        self.keys[:, :, count:].zero_()
        self.values[:, :, count:].zero_()
        self.cumulative_length.fill_(count)

    def _move_entries(self, op: str, arg: Any) -> None:
        if not self.is_initialized:
            return
        if op == "repeat":
            index = torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(arg)
        else:
            index = torch.as_tensor(arg, device=self.keys.device).reshape(-1)
        keys, values = self.keys.index_select(0, index), self.values.index_select(0, index)
        if keys.shape[0] == self.keys.shape[0]:  # beam reorder: in place, the buffers keep their addresses
            self.keys.copy_(keys)
            self.values.copy_(values)
        else:
            self.keys, self.values, self.batch_size = keys, values, keys.shape[0]


def pruned_layer(cache: Any, index: int, segment: Segment, first: bool) -> SegmentLayer | None:
    """Make layer `index` of a transformers cache a layer of `segment` before the layer writes to it: a PrunedLayer in
    place of an empty DynamicLayer, a PrunedStaticLayer made from an empty StaticLayer.

    An empty sliding-window layer (`DynamicSlidingWindowLayer`) becomes a PrunedLayer as well: it then keeps every
    entry instead of the last window, and the model's sliding-window mask (offsets taken from this layer) still limits
    each query to the window, so it attends to exactly what the sliding layer would have kept. Returns None (and changes
    nothing) for caches whose layers are none of these (quantised, offloaded, filled).
    """
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers):
        return None
    current = layers[index]
    if (type(current) is StaticLayer or isinstance(current, PrunedStaticLayer)) and current.get_seq_length() == 0:
        current.__class__ = PrunedStaticLayer
        current.segment, current.first = segment, first
        return current
    plain = type(current) in (DynamicLayer, DynamicSlidingWindowLayer) or isinstance(current, PrunedLayer)
    if not plain or current.get_seq_length() > 0:
        return None
    layer = PrunedLayer(segment, first)
    layers[index] = layer
    return layer
