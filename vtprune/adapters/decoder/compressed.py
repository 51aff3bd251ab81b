"""The cache of the llm_attention site: per layer, compressed blocks (dropped or quantised entries) and a growing tail."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from ...core.errors import VTPruneError


@dataclass
class Block:
    """A stretch of one layer's cache: keys/values [B, H_kv, n, d] with valid [B, n], or per-sample quantised KV."""

    valid: Tensor
    keys: Tensor | None = None
    values: Tensor | None = None
    quantized: list[Any] | None = None  # per sample: QuantizedKV over its valid positions, in order

    @property
    def nbytes(self) -> int:
        if self.quantized is not None:
            return sum(q.nbytes for q in self.quantized)
        return self.keys.nbytes + self.values.nbytes

    def dense(self, like: Tensor) -> tuple[Tensor, Tensor]:
        if self.quantized is None:
            return self.keys, self.values
        batch, length = self.valid.shape
        keys = like.new_zeros(batch, like.shape[1], length, like.shape[-1])
        values = torch.zeros_like(keys)
        for b, q in enumerate(self.quantized):
            k, v = q.dequantize()
            rows = self.valid[b].nonzero().squeeze(1)
            keys[b, :, rows], values[b, :, rows] = k.to(like.dtype), v.to(like.dtype)
        return keys, values

    def select(self, index: Tensor) -> "Block":
        """The block's samples `index` (beam reorder / selection)."""
        rows = index.to(self.valid.device).reshape(-1)
        if self.quantized is not None:
            return Block(self.valid[rows], quantized=[self.quantized[int(i)] for i in rows.tolist()])
        return Block(self.valid[rows], self.keys[rows], self.values[rows])


class CompressedLayer(DynamicLayer):
    """A cache layer made of compressed blocks plus a full-precision tail that grows while decoding.

    `get_seq_length` reports the logical length (every token the layer has seen), so generate() slices re-fed inputs
    right; attention reads `dense()` and the validity `valid`. Beam search reorders / repeats / selects every block;
    assisted decoding crops the tail (decoded tokens not yet compressed).
    """

    def __init__(self, blocks: list[Block], seen: int) -> None:
        super().__init__()
        self.blocks, self.seen = blocks, seen
        self.tail: Block | None = None
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        new_valid = torch.ones(key_states.shape[0], key_states.shape[2], dtype=torch.bool, device=key_states.device)
        if self.tail is None:
            self.tail = Block(new_valid, key_states, value_states)
        else:
            self.tail = Block(
                torch.cat([self.tail.valid, new_valid], 1),
                torch.cat([self.tail.keys, key_states], 2),
                torch.cat([self.tail.values, value_states], 2),
            )
        self.seen += key_states.shape[2]
        parts = [block.dense(key_states) for block in self.all_blocks]
        return torch.cat([k for k, _ in parts], 2), torch.cat([v for _, v in parts], 2)

    @property
    def all_blocks(self) -> list[Block]:
        return self.blocks + ([self.tail] if self.tail is not None else [])

    @property
    def valid(self) -> Tensor:
        return torch.cat([block.valid for block in self.all_blocks], 1)

    @property
    def nbytes(self) -> int:
        """Bytes of stored keys and values (codes and quantisation parameters included; masks not)."""
        return sum(block.nbytes for block in self.all_blocks)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def _select(self, index: Tensor) -> None:
        self.blocks = [block.select(index) for block in self.blocks]
        self.tail = self.tail.select(index) if self.tail is not None else None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.blocks[0].valid.shape[0] if self.blocks else self.tail.valid.shape[0]
        self._select(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens (assisted decoding's rejected candidates): from the tail, then from full-precision
        blocks (a prefill that held candidates); quantised entries cannot be cut back."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        count = -tokens_to_remove
        blocks = self.all_blocks
        while count and blocks:
            block = blocks[-1]
            length = block.valid.shape[1]
            if block.quantized is not None:
                raise VTPruneError(
                    f"cannot crop {count} tokens from a quantised cache block; set the method's decode_period larger "
                    "than the tokens assisted decoding may reject, or decode without an assistant"
                )
            cut = min(count, length)
            blocks[-1] = Block(block.valid[:, : length - cut], block.keys[:, :, : length - cut],
                               block.values[:, :, : length - cut])
            if cut == length:
                blocks.pop()
            count -= cut
            self.seen -= cut
        tail_left = self.tail is not None and len(blocks) > len(self.blocks)
        self.blocks, self.tail = (blocks[:-1], blocks[-1]) if tail_left else (blocks, None)
