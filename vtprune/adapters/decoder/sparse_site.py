"""The `llm_attention` site in a transformers decoder: attention among each layer's important tokens, compressed caches.

A method at this site provides `important(ctx: AttentionContext) -> Tensor` (ascending token indices), and the
attributes `kv_mode` ("drop" | "quant" | "full") and `decode_period` (int or None); with "quant" also
`quantise_kv(keys, values, important)` returning an object with `dequantize()` and `nbytes`.

Each decoder layer's attention module is pointed (through its own copy of the config, restored on detach) at a
registered attention function, "vtprune_sparse" (registered while a session uses it). That function receives the
layer's queries and keys after RoPE and its values, with the cache already updated, exactly as SDPA would. In the
session's context, at prefill it asks the method which tokens are important per sample (`method.important`), gathers
them in position order, runs the model's own attention kernel (SDPA, eager or FlashAttention) on them with a causal
mask, and scatters the result back (zero elsewhere; a forward hook also zeroes the other rows after the output
projection when it has a bias). It then replaces the layer's cache entry by a `CompressedLayer` per the method's
`kv_mode`. While decoding, attention runs over that layer's cache with a mask built from its own validity, so layers
may hold caches of different lengths; every `decode_period` new tokens the newest block is scored with the current
query and compressed the same way. Outside the session's context (other threads) the function runs the model's own
attention unchanged, and a copy of the model made during the session gets the original configs.
"""

from __future__ import annotations

import copy
import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ... import kernels
from ...core.cut import left_padded_index
from ...core.errors import VTPruneError
from ...core.sparse import AttentionContext
from ...core.trace import SiteRecord
from ..common import cache_argument, reconstruct
from .compressed import Block, CompressedLayer

if TYPE_CHECKING:
    from .cutter import DecoderCutter

ATTENTION_NAME = "vtprune_sparse"
_CONTROLLERS: "weakref.WeakKeyDictionary[nn.Module, tuple[SparseAttention, int]]" = weakref.WeakKeyDictionary()
_USERS: list["SparseAttention"] = []  # sessions using the registered function; it is removed with the last


def _sparse_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    controller, index = _CONTROLLERS.get(module, (None, 0))
    if controller is None:
        raise VTPruneError("vtprune's sparse attention ran on a module no session controls")
    scaling = scaling if scaling is not None else module.scaling
    if not controller.adapter.active():  # another thread or context: the model's own attention
        return controller.base_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return controller.attend(module, index, query, key, value, scaling)


def _reduce_as(obj: Any, protocol: int) -> Any:
    """`obj`'s reduction, made acceptable to pickle for another object (the proxy, whose class differs)."""
    reduced = obj.__reduce_ex__(protocol)
    if isinstance(reduced, tuple) and len(reduced) > 1:
        return (reconstruct, (reduced[0], *reduced[1]), *reduced[2:])
    return reduced


def config_proxy(config: Any, attention: str) -> Any:
    """A copy of `config` whose attention implementation is `attention`; copied or pickled, it is `config` again."""
    cls = type(config)
    proxy_class = type(cls.__name__, (cls,), {
        "__deepcopy__": lambda self, memo: copy.deepcopy(config, memo),
        "__reduce_ex__": lambda self, protocol: _reduce_as(config, protocol),
    })
    proxy = copy.copy(config)
    proxy.__class__ = proxy_class
    proxy._attn_implementation_internal = attention
    return proxy


class SparseAttention:
    """Runs a method's `llm_attention` site in every decoder layer of the cutter's language model."""

    def __init__(self, cutter: "DecoderCutter") -> None:
        self.cutter, self.method, self.adapter = cutter, cutter.method, cutter.adapter
        config = cutter.lm.config
        self.base = config._attn_implementation or "eager"
        if self.base not in ("sdpa", "eager") and not self.base.startswith("flash_attention"):
            raise VTPruneError(
                f"method {self.method.name!r} runs attention itself on top of sdpa, eager or flash_attention_*; the "
                f"language model uses {self.base!r}"
            )
        if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
            raise VTPruneError(f"method {self.method.name!r} does not support sliding-window attention layers")
        self._caches: dict[int, Any] = {}
        self._important: dict[int, list[Tensor]] = {}  # per layer with an output bias: rows to keep
        self._biased: set[int] = set()

    def attach(self) -> None:
        if not _USERS:
            AttentionInterface.register(ATTENTION_NAME, _sparse_attention)
        _USERS.append(self)
        self.adapter.on_detach(self._unregister)
        for index, layer in enumerate(self.cutter.layers):
            attn = layer.self_attn
            original = attn.config
            attn.config = config_proxy(original, ATTENTION_NAME)
            _CONTROLLERS[attn] = (self, index)
            self.adapter.on_detach(self._restore(attn, original))
            self.adapter.hook(attn, self._remember_cache(index))
            if getattr(attn.o_proj, "bias", None) is not None:
                self._biased.add(index)
                self.adapter.hook(attn, self._zero_unimportant(index), pre=False)

    def _unregister(self) -> None:
        _USERS.remove(self)
        if not _USERS:
            AttentionInterface._global_mapping.pop(ATTENTION_NAME, None)

    @staticmethod
    def _restore(attn: nn.Module, config: Any):
        def restore() -> None:
            attn.config = config
            _CONTROLLERS.pop(attn, None)

        return restore

    def _remember_cache(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._caches[index] = cache_argument(kwargs)

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

    def base_attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                       scaling: float, dropout: float, **kwargs: Any) -> tuple[Tensor, Any]:
        """The model's own attention implementation, called as the model would call it."""
        if self.base == "eager":
            function = sys.modules[type(module).__module__].eager_attention_forward
        else:
            function = ALL_ATTENTION_FUNCTIONS[self.base]
        return function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

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
        cache = self._caches.get(index)
        if self.cutter.prefill is not None:
            return self._prefill(module, index, query, key, value, scaling, cache), None
        layer = cache.layers[index] if cache is not None else None
        if not isinstance(layer, CompressedLayer):
            raise VTPruneError("this call continues a cache that was not prefilled inside a `with method(model)` block")
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
        state = self.cutter.prefill
        batch, length = query.shape[0], query.shape[2]
        valid = state.segment_at(index).mask2d.bool()
        important = []
        for b in range(batch):
            real = valid[b].nonzero().squeeze(1).to(query.device)
            is_visual = torch.zeros(length, dtype=torch.bool)
            is_visual[state.layout.visual_positions(b)] = True
            visual = is_visual[real.cpu()]
            ctx = AttentionContext(
                layer=index, sample=b, queries=query[b][:, real], keys=key[b][:, real], scale=scaling, causal=True,
                visual=visual, state=state.method_state,
            )
            with torch.no_grad():
                chosen = self.method.important(ctx).to(real.device)
            important.append(real[chosen])
            self._record(state, index, b, chosen.cpu(), visual, int(real.numel()))
        gather, kept = left_padded_index(important, query.device)
        ((k, v),) = kernels.compact_cache([(key, value)], gather, kept)  # the important keys/values, position order
        q = kernels.gather_sequence(query, gather, kept, dim=2)
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
            cache.layers[index] = self._compress_prompt(key, value, valid.to(key.device), important, (k, v), kept)
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
    def _compress_prompt(self, key, value, valid, important, kept_kv, kept) -> CompressedLayer:
        mode = self.method.kv_mode
        if mode == "full":
            return CompressedLayer([Block(valid, key, value)], key.shape[2])
        if mode == "drop":
            return CompressedLayer([Block(kept, *kept_kv)], key.shape[2])
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
            gather, kept = left_padded_index(important, tail.keys.device)
            ((keys, values),) = kernels.compact_cache([(tail.keys, tail.values)], gather, kept)
            block = Block(kept, keys, values)
        else:
            block = self._quantised_block(tail.keys, tail.values, tail.valid, important)
        layer.blocks.append(block)
        layer.tail = None
