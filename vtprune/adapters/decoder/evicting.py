"""The decode-time side of the kv_cache site: a cache that stays within a method's budget while decoding.

Methods with `evicts_while_decoding` (StreamingLLM, Scissorhands, A2SF, EMS: `methods/_kv.py: KVPolicyMethod`) keep,
per sample, decoder layer and cache head, at most `budget` eligible entries. A forward hook on each layer's attention
module runs after the attention (which saw every entry of the cache, the new token's included) at the prefill and at
every decode step. It computes the query rows the policy needs from the layer's own q projection (at the prefill
the output the model's q_proj just produced, kept by a hook on it; else recomputed) and RoPE (no eager attention: the
model keeps running with SDPA / FlashAttention), hands the policy each sample's real entries (post-RoPE keys, padding
removed), writes the policy's merges (EMS: a `CacheMerge`, every head at once) and keeps the slots it keeps. The
layer's cache is then an `EvictingLayer` (under a StaticCache an `EvictingStaticLayer`, the entries at its first slots): each sample's
entries right-aligned, left-padded to the longest sample; its own `Segment`
carries that padding mask (`mask2d`) and the tokens seen (`prompt_length`), so the cutter gives the next call a mask as
long as the layer's physical cache, and `get_seq_length()` stays the logical length generate() slices inputs by.
Until a layer first evicts or merges, it keeps the dense layout (padding included, the same tensor shapes as dense);
at keep=1.0 (no budget) the layers are left as the cutter made them: exactly dense's cache, crop and multi-token
calls included.

Positions: keys keep the positions they were written at and decoding continues at the caller's positions, except
StreamingLLM with key_positions="cache" (the paper's pos-shift): after each eviction every survivor's key is re-rotated (`method.shift_keys`)
to its slot in the cache and the segment's offset makes the next token's position its cache length.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ...core.errors import VTPruneError
from ...core.profile import stage
from ..common import cache_argument
from .cache import PrunedLayer, PrunedStaticLayer, Segment, SegmentLayer
from .qk import heads_of, project, rotate

if TYPE_CHECKING:
    from .cutter import DecoderCutter


class Evicting(SegmentLayer):
    """What a cache layer kept within a policy's budget adds to its segment layer: `states[b]` is the policy state of
    sample b (None: keep all), `seen` the tokens the layer has seen (its logical length)."""

    states: list[Any]
    seen: int

    def _become(self, segment: Segment, states: list[Any], seen: int) -> None:
        self.segment, self.first, self.states, self.seen = segment, True, states, seen

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if key_states.shape[2] != 1:
            raise VTPruneError(
                f"a decode-time KV policy takes one new token per call, got {key_states.shape[2]}: decode token by "
                "token (no assisted decoding, no multi-token continuation of its cache)"
            )
        self.seen += 1
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.seen

    def crop(self, tokens_to_remove: int) -> None:
        raise VTPruneError("a decode-time KV policy evicts every step and cannot crop its cache (assisted decoding)")

    def _batch(self, op: str, arg: Any) -> None:
        super()._batch(op, arg)
        rows = torch.arange(len(self.states)).repeat_interleave(arg) if op == "repeat" else torch.as_tensor(arg)
        self.states = [copy.deepcopy(self.states[i]) for i in rows.reshape(-1).tolist()]


class EvictingLayer(Evicting, PrunedLayer):
    """A DynamicLayer kept within a policy's budget."""

    def __init__(self, segment: Segment, states: list[Any], seen: int) -> None:
        PrunedLayer.__init__(self, segment, first=True)
        self._become(segment, states, seen)
        self.is_initialized = True


class EvictingStaticLayer(Evicting, PrunedStaticLayer):
    """A StaticLayer kept within a policy's budget: its entries at slots 0.., the rest of its buffer unused."""


class EvictingSite:
    """Drives a `KVPolicyMethod` at the prefill and at every decode step of every decoder layer."""

    def __init__(self, cutter: DecoderCutter) -> None:
        self.cutter, self.method = cutter, cutter.method
        self.cache_positions = bool(getattr(self.method, "cache_positions", False))
        self.inv_freq = None
        if self.cache_positions:
            rotary = getattr(cutter.lm, "rotary_emb", None)
            config = cutter.lm.config
            rope = getattr(config, "rope_parameters", None) or {}
            if getattr(rotary, "inv_freq", None) is None:  # no single frequency table: one RoPE per layer kind
                scheme = "a RoPE per layer kind (sliding and global layers)"
            elif "mrope_section" in rope or rope.get("rope_type", "default") != "default":
                scheme = "another position scheme (M-RoPE or scaled RoPE)"
            else:
                scheme = None
            if scheme is not None:
                raise VTPruneError(
                    f"{self.method.name} key_positions='cache' re-rotates keys with plain 1-D RoPE; this language "
                    f"model uses {scheme}: use key_positions='original'"
                )
            self.inv_freq = rotary.inv_freq
        self._projected: dict[int, tuple] = {}  # layer -> (q_proj input, output) of the prefill, until its attention hook
        for index, layer in enumerate(cutter.layers):
            if isinstance(getattr(layer.self_attn, "q_proj", None), nn.Module):
                cutter.adapter.hook(layer.self_attn.q_proj, self._keep_projection(index), pre=False)
            cutter.adapter.hook(layer.self_attn, self._after_attention(index), pre=False)

    def _keep_projection(self, index: int):
        """The prefill's queries are the layer's own q_proj output (no second projection of the prompt); the attention
        hook takes it only if q_proj saw the attention's own input."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.cutter.prefill is not None and args and isinstance(output, Tensor):
                self._projected[index] = (args[0], output.detach())

        return hook

    def _after_attention(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            seen, projected = self._projected.pop(index, (None, None))
            cache = cache_argument(kwargs)
            if cache is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            projected = projected if seen is hidden else None
            rope = kwargs["position_embeddings"]
            with torch.no_grad(), stage("cache"):  # scoring included: eviction is the policy's whole work
                if self.cutter.prefill is not None:
                    self._prefill(index, module, hidden, rope, cache, projected)
                elif self.cutter.continuation is not None and isinstance(cache.layers[index], Evicting):
                    self._step(index, module, hidden, rope, cache)
            return

        return hook

    # ------------------------------------------------------------------------------------------------ prefill
    def _prefill(
        self, index: int, attn: nn.Module, hidden: Tensor, rope: tuple, cache: Any, projected: Tensor | None
    ) -> None:
        state = self.cutter.prefill
        segment = state.segment_at(index)
        mask = segment.mask2d.bool()
        layout = state.layout
        budgets = []  # per sample: the cache budget, None where it holds the whole prompt
        for b in range(mask.shape[0]):
            visual = layout.visual_positions(b)
            budgets.append(self.method.cache_budget(int(mask[b].sum()), visual.numel(),
                                                    len({span.image for span in layout.spans[b] if span.length})))
        if all(budget is None for budget in budgets):
            return  # keep-all: the layer stays the dense model's (any cache type, shapes, padding, crop, multi-token)
        layer_types = getattr(self.cutter.lm.config, "layer_types", None)
        if layer_types is not None and layer_types[attn.layer_idx] == "sliding_attention":
            raise VTPruneError(
                f"{self.method.name} keeps a budget in full-attention cache layers; layer {attn.layer_idx} is a "
                "sliding-window layer: use keep=1.0 with this model"
            )
        layer_cache = cache.layers[attn.layer_idx]
        if not isinstance(layer_cache, SegmentLayer):
            raise VTPruneError(
                f"{self.method.name} keeps a budget in transformers' DynamicCache or StaticCache; layer {index} holds "
                f"{type(layer_cache).__name__}: use the default cache (no sliding or quantised cache)"
            )
        if layer_cache.stored != hidden.shape[1]:
            raise VTPruneError(
                f"{self.method.name} starts from an empty cache: prefill the whole prompt in one call"
            )
        if self.cache_positions and segment.positions is not None and segment.positions.dim() != 2:
            raise VTPruneError(f"{self.method.name} key_positions='cache' needs 1-D positions: use 'original'")
        cos, sin = rope
        states, kept_keys, kept_values, evicted, merged = [], [], [], [], False
        for b, budget in enumerate(budgets):
            real = mask[b].nonzero().squeeze(1)
            n = real.numel()
            visual = torch.zeros(mask.shape[1], dtype=torch.bool, device=mask.device)
            visual[layout.visual_positions(b).to(mask.device)] = True
            keys, values = layer_cache.keys[b][:, real], layer_cache.values[b][:, real]
            if budget is None:
                states.append(None)
                kept_keys.append(keys), kept_values.append(values), evicted.append(0)
                continue
            policy = self.method.layer_state(keys.shape[0], budget)
            rows = real[n - self.method.prompt_rows(n) :]
            if projected is not None:  # the rows of the model's own q_proj
                heads = heads_of(attn, projected[b : b + 1, rows], "q_norm")
            else:
                heads = project(attn, attn.q_proj, hidden[b : b + 1, rows], "q_norm")
            queries = rotate(attn, heads, cos[b : b + 1, rows], sin[b : b + 1, rows])[0]  # [H, Q, d]
            eligible = visual[real] if self.method.evict == "visual" else torch.ones(n, dtype=torch.bool)
            update = self.method.prefill_update(policy, queries, keys, attn.scaling, eligible.to(keys.device))
            merged = merged or update.combine is not None
            keys, values = self._apply(update, keys, values)
            states.append(policy)
            kept_keys.append(keys), kept_values.append(values), evicted.append(n - keys.shape[1])
        offset = segment.offset.clone()
        if self.cache_positions:  # the next token's position: its cache length (caller position - offset)
            offset = offset + torch.tensor(evicted, device=offset.device)
        own = Segment(index, mask, None, offset, segment.prompt_length)
        if isinstance(layer_cache, PrunedStaticLayer):  # the same buffers (static addresses), another class
            layer_cache.__class__ = EvictingStaticLayer
            layer_cache._become(own, states, hidden.shape[1])
            new = layer_cache
        else:
            new = EvictingLayer(own, states, hidden.shape[1])
        if merged or any(evicted):
            self._store(new, kept_keys, kept_values, segment.mask2d.dtype, layer_cache)
        else:  # within budget: the dense layout (padding included) stays until the first eviction
            if new is not layer_cache:  # a static layer keeps its own buffers
                new.set_entries(*layer_cache.entries())
            new.segment.mask2d = segment.mask2d
            new.segment.prompt_length = new.seen
        cache.layers[attn.layer_idx] = new

    # ------------------------------------------------------------------------------------------------ decoding
    def _step(self, index: int, attn: nn.Module, hidden: Tensor, rope: tuple, cache: Any) -> None:
        layer_cache: Evicting = cache.layers[attn.layer_idx]
        segment = layer_cache.segment
        valid = torch.cat([segment.mask2d.bool(), torch.ones_like(segment.mask2d[:, :1], dtype=torch.bool)], dim=1)
        cos, sin = rope
        query = rotate(attn, project(attn, attn.q_proj, hidden, "q_norm"), cos, sin)[:, :, -1]  # [B, H, d]
        kept_keys, kept_values, evicted, merged = [], [], [], False
        for b, policy in enumerate(layer_cache.states):
            real = valid[b].nonzero().squeeze(1)
            keys, values = layer_cache.keys[b][:, real], layer_cache.values[b][:, real]
            if policy is not None:
                length = keys.shape[1]
                update = self.method.step_update(policy, query[b], keys, attn.scaling)
                merged = merged or update.combine is not None
                keys, values = self._apply(update, keys, values)
                evicted.append(length - keys.shape[1])
            else:
                evicted.append(0)
            kept_keys.append(keys), kept_values.append(values)
        if self.cache_positions:
            segment.offset = segment.offset + torch.tensor(evicted, device=segment.offset.device)
        if merged or any(evicted):
            self._store(layer_cache, kept_keys, kept_values, segment.mask2d.dtype, layer_cache)
        else:  # nothing left the cache: the new token stays appended where the layer put it
            segment.mask2d = valid.to(segment.mask2d.dtype)
            segment.prompt_length = layer_cache.seen

    # ------------------------------------------------------------------------------------------------ shared
    def _apply(self, update: Any, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """One sample's keys/values [H_c, L, d] after the policy's merges and kept slots [H_c, C]."""
        if update.combine is not None:
            keys, values = update.combine.apply(keys, values)
        kept = update.kept.to(keys.device)
        heads, length = keys.shape[:2]
        rows = (kept + torch.arange(heads, device=kept.device)[:, None] * length).reshape(-1)  # whole rows per head
        new_keys = keys.reshape(heads * length, -1).index_select(0, rows).view(heads, kept.shape[1], -1)
        new_values = values.reshape(heads * length, -1).index_select(0, rows).view(heads, kept.shape[1], -1)
        if self.cache_positions and kept.shape[1] < keys.shape[1]:  # survivors move to their slot
            shift = torch.arange(kept.shape[1], device=kept.device) - kept
            new_keys = self.method.shift_keys(new_keys, shift, self.inv_freq)
        return new_keys, new_values

    @staticmethod
    def _store(layer: Evicting, keys: list[Tensor], values: list[Tensor], dtype: torch.dtype, like: Any) -> None:
        """Per sample [H_c, C_b, d] -> the layer's [B, H_c, C, d], right-aligned, and its segment's mask [B, C]."""
        length = max(k.shape[1] for k in keys)
        batch, heads, _, dim = like.keys.shape
        out_k = like.keys.new_zeros(batch, heads, length, dim)
        out_v = like.values.new_zeros(batch, heads, length, like.values.shape[-1])
        mask = torch.zeros(batch, length, dtype=dtype, device=like.keys.device)
        for b, (k, v) in enumerate(zip(keys, values)):
            c = k.shape[1]
            if c:
                out_k[b, :, length - c :], out_v[b, :, length - c :] = k, v
                mask[b, length - c :] = 1
        layer.set_entries(out_k, out_v)
        layer.segment.mask2d = mask
        layer.segment.prompt_length = layer.seen

