"""The kv_cache site inside a transformers decoder LM: compress what each layer writes to its cache at prefill.

A forward hook on every layer's attention module runs after the prefill attention, which used the full keys and
values (so the prefill output is unchanged). The method sees the layer's post-RoPE keys as the attention cached them,
the last query rows (recomputed from the layer's own q projection and RoPE) and the attention input, and returns per
sample and per cache head the sequence positions to keep. The layer's cache keeps those entries (one
`kernels.compact_cache` call): each sample's C_b entries right-aligned, left-padded to the longest sample with masked
slots, as a `PrunedLayer` whose segment carries that padding mask, so decoding gives the layer a mask as long as its
own cache (under a StaticCache: a `PrunedStaticLayer` holding them at slots 0..). Keys carry the RoPE of their original
positions: decoding continues at the unpruned positions.

Assisted decoding's prefill call also holds the assistant's first candidates (last in every row): the method plans
over the prompt alone, every head keeps the candidates, and their attention rows are recomputed over the compressed
cache (`candidates_attend_compressed`), as greedy decoding's steps would see it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import kernels
from ...core.cut import left_padded_heads
from ...core.errors import VTPruneError
from ...core.profile import stage
from ...core.signals import LayerKV, PrefillKV
from ...core.trace import site_records
from ..common import cache_argument, kwarg, swap_class
from .cache import Segment, SegmentLayer
from .evicting import EvictingSite
from .qk import gather_rows, project, rotate

if TYPE_CHECKING:
    from .cutter import DecoderCutter


class CacheSite:
    """Compresses every decoder layer's cache right after its prefill attention, as the method plans."""

    def __init__(self, cutter: "DecoderCutter", request: PrefillKV) -> None:
        if request.queries < 1:
            raise VTPruneError(f"PrefillKV(queries={request.queries}): ask for at least one query row")
        self.cutter, self.request = cutter, request
        if getattr(cutter.method, "evicts_while_decoding", False):  # a budget kept while decoding: evicting.py
            self.evicting = EvictingSite(cutter)
            return
        adapter = cutter.adapter
        for index, layer in enumerate(cutter.layers):
            attn = layer.self_attn
            adapter.hook(attn, self._after_attention(index), pre=False)
            if request.expand_heads and getattr(attn, "num_key_value_groups", 1) > 1:
                self._expand_heads(attn)

    def _expand_heads(self, attn: nn.Module) -> None:
        """Repeat the layer's K/V heads to its query heads (as `repeat_kv` orders them) for prefill and decoding.

        The k/v projections' outputs are repeated by hooks, and the module reports one query head per K/V head while
        the session is active in the calling context (a class swap with a property, undone on detach)."""
        groups, head_dim = attn.num_key_value_groups, attn.head_dim

        def repeat(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            batch, length, _ = output.shape
            return output.view(batch, length, -1, head_dim).repeat_interleave(groups, dim=2).reshape(batch, length, -1)

        adapter = self.cutter.adapter
        adapter.hook(attn.k_proj, repeat, pre=False)
        adapter.hook(attn.v_proj, repeat, pre=False)

        def groups_now(module: nn.Module) -> int:
            return 1 if adapter.active() else module.__dict__["num_key_value_groups"]

        swap_class(attn, {"num_key_value_groups": property(groups_now)}, adapter)

    def _after_attention(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            state = self.cutter.prefill
            cache = cache_argument(kwargs)
            if state is None or cache is None:
                return None  # only the prefill of a cached forward is compressed
            hidden = kwarg(args, kwargs, "hidden_states", 0)
            with torch.no_grad():
                return self._compress(index, module, hidden, kwargs["position_embeddings"], cache, output)

        return hook

    def _layer_cache(self, cache: Any, layer_idx: int, length: int) -> SegmentLayer:
        layers = getattr(cache, "layers", None)
        layer_cache = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
        if not isinstance(layer_cache, SegmentLayer):
            raise VTPruneError(
                f"the kv_cache site compresses transformers' DynamicCache or StaticCache (full-attention layers); "
                f"layer {layer_idx} holds {type(layer_cache).__name__} — use the default cache (no sliding cache)"
            )
        if layer_cache.stored != length:
            raise VTPruneError(
                "the kv_cache site compresses a cache filled by one prefill call; this cache held earlier tokens "
                "(chunked prefill or a continued cache) — prefill the whole prompt in one call"
            )
        return layer_cache

    def _compress(self, index: int, attn: nn.Module, hidden: Tensor, position_embeddings: tuple, cache: Any,
                  output: Any) -> Any:
        """Compress layer `index`'s cache; returns the attention output to use (None: unchanged)."""
        cutter, state = self.cutter, self.cutter.prefill
        segment = state.segment_at(index)
        layer_cache = self._layer_cache(cache, attn.layer_idx, hidden.shape[1])
        with stage("signals"):
            key_mask = state.prompt_mask(segment.mask2d).bool()  # the method plans over the prompt alone
            count = min(self.request.queries, int(key_mask.sum(1).min()))
            rows = torch.stack([m.nonzero()[-count:, 0] for m in key_mask])  # [B, q] each sample's last real tokens
            queries = project(attn, attn.q_proj, gather_rows(hidden, rows), "q_norm")  # [B, H, q, d]
            cos, sin = position_embeddings
            if cos.dim() != 3:
                raise VTPruneError(f"the kv_cache site expects RoPE tables [B, L, d], got {tuple(cos.shape)}")
            queries = rotate(attn, queries, gather_rows(cos, rows), gather_rows(sin, rows))
            keys, values = layer_cache.entries()
            value = LayerKV(
                keys=keys,
                queries=queries,
                hidden=hidden,
                residual=state.layer_input if state.layer_input is not None else hidden,
                key_mask=key_mask,
                keys_pre_rope=rotate(attn, keys, cos, -sin) if self.request.pre_rope_keys else None,
            )
        ctx = cutter.context("kv_cache", hidden, index, {self.request: value})
        with stage("score"):
            plan = cutter.method.plan(ctx)
        plan.validate(ctx.layout)
        plan.heads = validate_heads(plan.heads, key_mask, keys.shape[1], cutter.method.name, index)
        state.record.sites.extend(site_records(ctx, plan))
        with stage("cache"):
            heads = plan.heads
            if state.candidates:  # assisted decoding's candidates follow the prompt: every head keeps them
                tail = torch.arange(hidden.shape[1] - state.candidates, hidden.shape[1], device=hidden.device)
                heads = [torch.cat([h, tail.expand(h.shape[0], -1)], dim=1) for h in heads]
            gather, valid = left_padded_heads(heads, hidden.device)
            ((keys, values),) = kernels.compact_cache([(keys, values)], gather, valid)
            layer_cache.set_entries(keys, values)
        self._give_segment(layer_cache, index, valid.to(segment.mask2d.dtype), segment, cache)
        if state.candidates:
            return candidates_attend_compressed(attn, hidden, position_embeddings, keys, values, valid, output,
                                                state.candidates)
        return None

    @staticmethod
    def _give_segment(layer_cache: SegmentLayer, index: int, mask: Tensor, parent: Segment, cache: Any) -> None:
        """The compressed layer's own segment; consecutive layers that keep the same padding share one."""
        previous = cache.layers[index - 1] if index > 0 else None
        if isinstance(previous, SegmentLayer) and previous.segment.positions is None:
            if previous.segment.mask2d.shape == mask.shape and torch.equal(previous.segment.mask2d, mask):
                layer_cache.segment, layer_cache.first = previous.segment, False
                return
        layer_cache.segment = Segment(index, mask, None, parent.offset, parent.prompt_length)
        layer_cache.first = True


def candidates_attend_compressed(attn: nn.Module, hidden: Tensor, position_embeddings: tuple, keys: Tensor,
                                 values: Tensor, valid: Tensor, output: Any, count: int) -> Any:
    """The attention output with its last `count` rows (assisted decoding's candidates) recomputed against the
    compressed cache, as greedy decoding computes them step by step after the prefill: each candidate attends the
    kept prompt entries and the candidates up to itself. keys/values [B, H_c, S, d] (the candidates last), valid
    [B, S]. Plain softmax attention at the module's `scaling` (the layers whose cache the kv_cache site accepts)."""
    if getattr(getattr(attn, "config", None), "attn_logit_softcapping", None):
        raise VTPruneError("assisted decoding with a kv_cache method needs attention without logit soft-capping; "
                           "decode without an assistant model")
    cos, sin = position_embeddings
    queries = rotate(attn, project(attn, attn.q_proj, hidden[:, -count:], "q_norm"),
                     cos[:, -count:], sin[:, -count:])  # [B, H, count, d]
    groups = queries.shape[1] // keys.shape[1]
    allowed = valid[:, None, None, :].expand(-1, 1, count, -1).clone()  # [B, 1, count, S]
    allowed[..., -count:] = torch.ones(count, count, dtype=torch.bool, device=valid.device).tril()
    rows = F.scaled_dot_product_attention(queries, keys.repeat_interleave(groups, dim=1),
                                          values.repeat_interleave(groups, dim=1), attn_mask=allowed,
                                          scale=attn.scaling)  # [B, H, count, d]
    rows = attn.o_proj(rows.transpose(1, 2).reshape(hidden.shape[0], count, -1).to(hidden.dtype))
    attended = output[0].clone()
    attended[:, -count:] = rows
    return (attended, *output[1:])


def validate_heads(heads: list[Tensor] | None, key_mask: Tensor, cache_heads: int, name: str, layer: int) -> list[Tensor]:
    """Per sample [H_c, C_b] positions, sorted per head; refuses plans that break the kv_cache contract."""
    if heads is None or len(heads) != key_mask.shape[0]:
        raise VTPruneError(f"method {name!r} must give, at the kv_cache site, per-head positions for every sample")
    out = []
    for b, positions in enumerate(heads):
        if positions.dim() != 2 or positions.shape[0] != cache_heads:
            raise VTPruneError(
                f"method {name!r} gave kept positions of shape {tuple(positions.shape)} for sample {b} at layer "
                f"{layer}; the cache has {cache_heads} heads: expected [{cache_heads}, C]"
            )
        positions = torch.sort(positions.to(key_mask.device), dim=1).values
        real = key_mask[b]
        outside = (positions < 0) | (positions >= real.numel())
        if bool(outside.any()) or not bool(real[positions.clamp(0, real.numel() - 1)].all()):
            raise VTPruneError(f"method {name!r} keeps padding or positions outside the sequence (sample {b})")
        if positions.shape[1] > 1 and not bool((positions[:, 1:] > positions[:, :-1]).all()):
            raise VTPruneError(f"method {name!r} keeps a position twice in one head (sample {b}, layer {layer})")
        out.append(positions)
    return out
