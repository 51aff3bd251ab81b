"""The `llm_attention` site in a transformers decoder: attention among each layer's important tokens, compressed caches.

A method at this site provides `important(ctx: AttentionContext) -> Tensor` (ascending token indices), and the
attributes `kv_mode` ("drop" | "quant" | "full") and `decode_period` (int or None); with "quant" also
`quantise_kv(keys, values, important)` returning an object with `dequantize()` and `nbytes`.

Each decoder layer's attention module is pointed (through its own shallow copy of the config, restored on detach)
at a registered attention function, "vtprune_sparse". That function receives the layer's queries and keys after RoPE
and its values, with the cache already updated, exactly as SDPA would. At prefill it asks the method which tokens are
important per sample (`method.important`), gathers them in position order, runs the model's own attention kernel
(SDPA, eager or FlashAttention) on them with a causal mask, and scatters the result back (zero elsewhere; a forward
hook also zeroes the other rows after the output projection when it has a bias). It then replaces the layer's cache
entry by a `CompressedLayer` per the method's `kv_mode`. While decoding, attention runs over that layer's cache with a
mask built from its own validity, so layers may hold caches of different lengths; every `decode_period` new tokens
the newest block is scored with the current query and compressed the same way.
"""

from __future__ import annotations

import copy
import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import kernels
from ..core.errors import VTPruneError
from ..core.session import SiteRecord
from ..core.sparse import AttentionContext

if TYPE_CHECKING:
    from ..core.method import Method
    from .hf_decoder import DecoderCutter

ATTENTION_NAME = "vtprune_sparse"
_CONTROLLERS: "weakref.WeakKeyDictionary[nn.Module, tuple[SparseAttention, int]]" = weakref.WeakKeyDictionary()


def _sparse_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    if module not in _CONTROLLERS:
        raise VTPruneError("vtprune's sparse attention ran outside a `with method(model)` block")
    controller, index = _CONTROLLERS[module]
    return controller.attend(module, index, query, key, value, scaling if scaling is not None else module.scaling)


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


class CompressedLayer(DynamicLayer):
    """A cache layer made of compressed blocks plus a full-precision tail that grows while decoding.

    `get_seq_length` reports the logical length (every token the layer has seen), so code that counts tokens from the
    cache stays right; attention reads `dense()` and the validity `valid`.
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

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise VTPruneError("a compressed cache (llm_attention site) cannot be cropped, reordered or repeated (no beams)")

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _refuse


def cache_bytes(cache: Any) -> int:
    """Bytes of keys and values held by a transformers cache (compressed layers count their codes and parameters)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            total += layer.nbytes
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.nbytes + layer.values.nbytes
    return total


class SparseAttention:
    """Runs a method's `llm_attention` site in every decoder layer of the cutter's language model."""

    def __init__(self, cutter: "DecoderCutter", method: "Method") -> None:
        self.cutter, self.method, self.adapter = cutter, method, cutter.adapter
        config = cutter.lm.config
        self.base = config._attn_implementation or "eager"
        if self.base not in ("sdpa", "eager") and not self.base.startswith("flash_attention"):
            raise VTPruneError(
                f"method {method.name!r} runs attention itself on top of sdpa, eager or flash_attention_*; the "
                f"language model uses {self.base!r}"
            )
        if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
            raise VTPruneError(f"method {method.name!r} does not support sliding-window attention layers")
        self._caches: dict[int, Any] = {}
        self._important: dict[int, list[Tensor]] = {}  # per layer with an output bias: rows to keep
        self._biased: set[int] = set()

    def attach(self) -> None:
        ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _sparse_attention)
        for index, layer in enumerate(self.cutter.layers):
            attn = layer.self_attn
            original = attn.config
            proxy = copy.copy(original)
            proxy._attn_implementation_internal = ATTENTION_NAME
            attn.config = proxy
            _CONTROLLERS[attn] = (self, index)
            self.adapter.on_detach(self._restore(attn, original))
            self.adapter.hook(attn, self._remember_cache(index))
            if getattr(attn.o_proj, "bias", None) is not None:
                self._biased.add(index)
                self.adapter.hook(attn, self._zero_unimportant(index), pre=False)

    @staticmethod
    def _restore(attn: nn.Module, config: Any):
        def restore() -> None:
            attn.config = config
            _CONTROLLERS.pop(attn, None)

        return restore

    def _remember_cache(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._caches[index] = kwargs.get("cache", kwargs.get("past_key_values"))

        return hook

    def _zero_unimportant(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            important = self._important.pop(index, None)
            if important is None:
                return output
            keep = torch.zeros(output[0].shape[:2], dtype=torch.bool, device=output[0].device)
            for b, rows in enumerate(important):
                keep[b, rows] = True
            return (output[0] * keep[..., None].to(output[0].dtype), *output[1:])

        return hook

    # ------------------------------------------------------------------------------------------ attention
    def dense(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None,
              scaling: float) -> Tensor:
        """The model's own attention kernel. Returns [B, q, H, d].

        allowed: boolean mask [B, 1, q, k]; None for plain causal attention without padding (q = k, or q = 1), where
        SDPA can use its causal kernel without materialising a mask.
        """
        if allowed is None and self.base == "sdpa":
            return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, None, scaling=scaling)[0]
        if allowed is None:
            q, k = query.shape[2], key.shape[2]
            causal = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
            allowed = causal[None, None].expand(query.shape[0], 1, q, k)
        if self.base == "sdpa":
            return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, allowed, scaling=scaling)[0]
        if self.base == "eager":
            mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)
            eager = sys.modules[type(module).__module__].eager_attention_forward
            return eager(module, query, key, value, mask, scaling=scaling)[0]
        # FlashAttention takes the key padding mask; the causal pattern is its own (bottom-right aligned)
        return ALL_ATTENTION_FUNCTIONS[self.base](module, query, key, value, allowed[:, 0, -1, :], scaling=scaling)[0]

    def attend(self, module: nn.Module, index: int, query: Tensor, key: Tensor, value: Tensor, scaling: float):
        state = self.cutter.state
        cache = self._caches.get(index)
        if state is None or state.call_mask is None:
            return self._prefill(module, index, query, key, value, scaling, cache), None
        layer = cache.layers[index] if cache is not None else None
        if not isinstance(layer, CompressedLayer):
            raise VTPruneError("this decoding step continues a cache that was not prefilled inside the `with` block")
        valid = layer.valid.to(query.device)  # [B, S], the new tokens included
        length, new = valid.shape[1], query.shape[2]
        if new == 1 and bool(valid.all()):
            allowed = None
        else:
            causal = torch.ones(new, length, dtype=torch.bool, device=query.device).tril(length - new)
            allowed = valid[:, None, None, :] & causal[None, None]
        out = self.dense(module, query, key, value, allowed, scaling)
        period = getattr(self.method, "decode_period", None)
        if period and self.method.kv_mode != "full" and layer.tail is not None and layer.tail.keys.shape[2] >= period:
            self._compress_tail(layer, index, query[:, :, -1:], scaling)
        return out, None

    def _prefill(self, module, index, query, key, value, scaling, cache) -> Tensor:
        state = self.cutter.state
        segment = next(s for s in reversed(state.segments) if s.start <= index) if state else None
        batch, length = query.shape[0], query.shape[2]
        valid = segment.mask2d.bool() if segment is not None else torch.ones(batch, length, dtype=torch.bool)
        important = []
        for b in range(batch):
            real = valid[b].nonzero().squeeze(1).to(query.device)
            visual = None
            if state is not None:
                is_visual = torch.zeros(length, dtype=torch.bool)
                is_visual[state.layout.visual_positions(b)] = True
                visual = is_visual[real.cpu()]
            ctx = AttentionContext(
                layer=index, sample=b, queries=query[b][:, real], keys=key[b][:, real], scale=scaling, causal=True,
                visual=visual, state=state.method_state if state is not None else {},
            )
            with torch.no_grad():
                chosen = self.method.important(ctx).to(real.device)
            important.append(real[chosen])
            if state is not None:
                self._record(state, index, b, chosen.cpu(), visual, int(real.numel()))
        gather, kept = kernels.left_padded_index(important, query.device)
        q, k, v = (kernels.gather_sequence(t, gather, kept, dim=2) for t in (query, key, value))
        size = gather.shape[1]
        allowed = None
        if not bool(kept.all()):
            causal = torch.ones(size, size, dtype=torch.bool, device=query.device).tril()
            allowed = causal[None, None] & kept[:, None, None, :]
            # padding rows see themselves, so no row is empty (no NaN); they are not scattered back
            allowed = allowed | torch.eye(size, dtype=torch.bool, device=query.device)[None, None]
        out_kept = self.dense(module, q, k, v, allowed, scaling)  # [B, size, H, d]
        out = out_kept.new_zeros(batch, length, *out_kept.shape[2:])
        for b, rows in enumerate(important):
            out[b, rows] = out_kept[b, size - rows.numel() :]
        if index in self._biased:
            self._important[index] = important
        if cache is not None:
            cache.layers[index] = self._compress_prompt(key, value, valid.to(key.device), important, gather, kept)
        return out

    def _record(self, state: Any, index: int, sample: int, chosen: Tensor, visual: Tensor, tokens: int) -> None:
        ordinals = state.layout.original_ordinal[sample]
        visual_rank = visual.long().cumsum(0) - 1  # ordinal of each visual token among the sample's real tokens
        kept = visual_rank[chosen[visual[chosen]]]
        state.record.sites.append(
            SiteRecord(
                site="llm_attention", layer=index, sample=sample, before=ordinals.clone(), kept=ordinals[kept],
                notes={"important": int(chosen.numel()), "tokens": tokens},
            )
        )

    # ------------------------------------------------------------------------------------------ caches
    def _compress_prompt(self, key, value, valid, important, gather, kept) -> CompressedLayer:
        mode = self.method.kv_mode
        if mode == "full":
            return CompressedLayer([Block(valid, key, value)], key.shape[2])
        if mode == "drop":
            keys = kernels.gather_sequence(key, gather, kept, dim=2)
            values = kernels.gather_sequence(value, gather, kept, dim=2)
            return CompressedLayer([Block(kept, keys, values)], key.shape[2])
        return CompressedLayer([self._quantised_block(key, value, valid, important)], key.shape[2])

    def _quantised_block(self, key: Tensor, value: Tensor, valid: Tensor, important: list[Tensor]) -> Block:
        quantized = []
        for b in range(key.shape[0]):
            real = valid[b].nonzero().squeeze(1)
            chosen = torch.zeros(key.shape[2], dtype=torch.bool, device=key.device)
            chosen[important[b]] = True
            quantized.append(self.method.quantise_kv(key[b][:, real], value[b][:, real], chosen[real]))
        return Block(valid, quantized=quantized)

    def _compress_tail(self, layer: CompressedLayer, index: int, query: Tensor, scaling: float) -> None:
        """Score the tail (newest tokens, all valid) with the current query and compress it like the prompt."""
        tail = layer.tail
        important = []
        for b in range(tail.keys.shape[0]):
            ctx = AttentionContext(
                layer=index, sample=b, queries=query[b], keys=tail.keys[b], scale=scaling, causal=False
            )
            with torch.no_grad():
                important.append(self.method.important(ctx).to(tail.keys.device))
        if self.method.kv_mode == "drop":
            gather, kept = kernels.left_padded_index(important, tail.keys.device)
            block = Block(
                kept,
                kernels.gather_sequence(tail.keys, gather, kept, dim=2),
                kernels.gather_sequence(tail.values, gather, kept, dim=2),
            )
        else:
            block = self._quantised_block(tail.keys, tail.values, tail.valid, important)
        layer.blocks.append(block)
        layer.tail = None
