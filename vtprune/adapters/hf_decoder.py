"""Cuts inside a transformers decoder language model (Llama, Qwen2, ...), shared by the family adapters.

The language model is never forked. Forward pre-hooks on the language model and on its decoder layers:
- at prefill, apply the method's `pre_llm` cut to the input embeddings and its `llm_layer` cuts between layers;
- keep, per *segment* of layers between two cuts, the prompt's attention mask, positions and a position offset, so
  that while decoding each layer gets a mask as long as its own cache and the positions the method asked for.

Positions: "renumber" gives kept tokens contiguous positions (a token moves back by the number of visual tokens dropped
before it); "original" keeps every token's position, leaving gaps. Decoding continues, per segment, at the incoming
position minus the segment's offset (the number of tokens renumbering removed before it). Subclasses with other position
schemes (M-RoPE) override `reposition` and `rotary`.

The kv_cache site (`hf_cache.CacheSite`) compresses what each layer writes to the cache at prefill; while decoding each
compressed layer then gets a mask as long as its own cache.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .. import kernels
from ..core.attention import attention_rows, received_attention
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout
from ..core.method import SiteContext
from ..core.plan import KeepPlan, Merge
from ..core.session import ForwardRecord
from ..core.signals import PrefillKV, ProjectorInput, QueryAttention, ReceivedAttention, Transitions, TransitionStats
from .cuts import merge_planned, site_records
from .hf_attention import SparseAttention

if TYPE_CHECKING:
    from ..core.adapter import Adapter
    from ..core.method import Method
    from ..core.session import Trace


@dataclass
class Segment:
    """Decoder layers `start ..` up to the next cut, which all see the same sequence (and cache length)."""

    start: int
    mask2d: Tensor  # [B, L_s] the prompt's padding mask as this segment sees it
    positions: Tensor  # [B, L_s] (or [P, B, L_s]) prompt positions
    offset: Tensor  # [B] (or [P, B], one per position row) subtracted from incoming positions while decoding
    attention_mask: Any = None  # the layer mask for the current call
    position_embeddings: Any = None  # (cos, sin) for the current call


@dataclass
class PrefillState:
    prompt_len: int  # length of the prompt as the caller sees it (before any cut)
    segments: list[Segment]
    layout: VisualLayout  # visual tokens of the current sequence
    record: ForwardRecord
    decoded: int = 0  # tokens appended after the prompt so far
    signals: dict[Any, Any] = field(default_factory=dict)
    method_state: dict[str, Any] = field(default_factory=dict)
    stage: int = 0
    call_mask: Tensor | None = None  # incoming 2-D mask of the current continuation call
    call_positions: Tensor | None = None  # incoming positions of the current continuation call
    layer_input: Tensor | None = None  # prefill: the input of the decoder layer running now (kv_cache site)
    cache_masks: dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, C] mask of its compressed cache
    call_layer_masks: dict[Any, Any] = field(default_factory=dict)  # decoding: layer masks built for the current call
    attention_transition: tuple[Tensor, Tensor] | None = None  # (ratio, cosine) of the attention module just run


def _kwarg(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def prompt_input_ids(args: tuple, kwargs: dict, image_token_id: int) -> Tensor:
    """The input_ids of a multimodal model call (a forward pre-hook's args); refuses a call without ids and image
    tokens in a call that continues a cache."""
    input_ids = _kwarg(args, kwargs, "input_ids", 0)
    if input_ids is None:
        raise VTPruneError("vtprune needs input_ids to find the image tokens; pass input_ids, not inputs_embeds")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0 and bool((input_ids == image_token_id).any()):
        raise VTPruneError(
            "image tokens in a call that continues a cache (chunked prefill) are not supported; "
            "prefill the whole prompt in one call"
        )
    return input_ids


class DecoderCutter:
    """Applies a method's `pre_llm` and `llm_layer` cuts (and, through `CacheSite`, its `kv_cache` site) to one decoder
    language model."""

    def __init__(self, adapter: "Adapter", language_model: nn.Module) -> None:
        self.adapter = adapter
        self.lm = language_model
        self.layers: nn.ModuleList = language_model.layers
        self.state: PrefillState | None = None

    # ----------------------------------------------------------------------------------------------- attaching
    def attach(
        self,
        method: "Method",
        trace: "Trace",
        queries: list[QueryAttention],
        transitions: list[Transitions] = (),
        received: list[ReceivedAttention] = (),
    ) -> None:
        self.method, self.trace, self.state = method, trace, None
        n_layers = len(self.layers)
        self.sites = method.cut_sites(self.adapter.info)
        self.cuts = method.cut_layers(self.adapter.info) if "llm_layer" in self.sites else []
        for layer in self.cuts:
            if not 1 <= layer < n_layers:
                raise VTPruneError(
                    f"method {method.name!r} cuts before decoder layer {layer}, but the language model has layers "
                    f"0..{n_layers - 1}; a cut must sit between two layers (1..{n_layers - 1})"
                )
        if self.cuts != sorted(set(self.cuts)):
            raise VTPruneError(f"method {method.name!r} gave cut layers {self.cuts}; they must be ascending, unique")
        self.queries: dict[int, list[QueryAttention]] = {}
        for request in queries:
            if not 0 <= request.layer < n_layers:
                raise VTPruneError(f"QueryAttention at layer {request.layer}: the model has layers 0..{n_layers - 1}")
            if self.cuts and request.layer > self.cuts[-1]:
                raise VTPruneError(f"QueryAttention at layer {request.layer} comes after the last cut {self.cuts[-1]}")
            if request.queries not in ("last", "after_visual", "text"):
                raise VTPruneError(f"QueryAttention queries={request.queries!r}: use 'last', 'after_visual' or 'text'")
            self.queries.setdefault(request.layer, []).append(request)
        self.received: dict[int, list[ReceivedAttention]] = {}
        for request in received:
            if not 0 <= request.layer < n_layers or not self.cuts or request.layer >= self.cuts[-1]:
                raise VTPruneError(
                    f"ReceivedAttention at layer {request.layer}: a cut must follow it (the model has layers "
                    f"0..{n_layers - 1}, the last cut sits before layer {self.cuts[-1] if self.cuts else None})"
                )
            if request.queries not in ("all", "text"):
                raise VTPruneError(f"ReceivedAttention queries={request.queries!r}: use 'all' or 'text'")
            self.received.setdefault(request.layer, []).append(request)
        self.transitions: dict[int, list[Transitions]] = {}
        for request in transitions:
            for layer in request.layers:
                if not 0 <= layer < n_layers or (self.cuts and layer >= self.cuts[-1]):
                    raise VTPruneError(
                        f"Transitions at layer {layer}: a cut must follow it (the model has layers 0..{n_layers - 1}, "
                        f"the last cut sits before layer {self.cuts[-1] if self.cuts else None})"
                    )
                self.transitions.setdefault(layer, []).append(request)
        for layer in self.transitions:
            modules = (self.layers[layer].self_attn, self.layers[layer].mlp)
            for which, module in enumerate(modules):
                self.adapter.hook(module, self._transition_hook(layer, which), pre=False)
        self.cache_site = None
        if "kv_cache" in method.sites:
            from .hf_cache import CacheSite

            requests = [r for r in method.requests(self.adapter.info) if isinstance(r, PrefillKV)]
            if len(requests) != 1:
                raise VTPruneError(f"method {method.name!r} cuts at the kv_cache site and must request one PrefillKV")
            self.cache_site = CacheSite(self, requests[0])
        self.adapter.hook(self.lm, self._on_language_model)
        if "llm_attention" in self.sites:  # per-layer attention among the tokens the method marks important
            SparseAttention(self, method).attach()
        first_hooked = 0 if self.cache_site else min([*self.cuts, *self.queries, *self.received], default=n_layers)
        for index in range(first_hooked, n_layers):
            self.adapter.hook(self.layers[index], self._layer_hook(index))
        self.adapter.on_detach(self._reset)

    def _reset(self) -> None:
        self.state = None

    # ------------------------------------------------------------------------------------- language model input
    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise VTPruneError("vtprune expects the language model to be called with inputs_embeds")
        cache_key = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(cache_key)
        if getattr(cache, "is_compileable", False):
            raise VTPruneError(
                f"{type(cache).__name__} has a fixed length per layer; pruning needs a DynamicCache "
                "(the default of generate())"
            )
        past = cache.get_seq_length() if cache is not None else 0
        batch, length = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise VTPruneError("vtprune needs a 2-D attention mask (batch, length), not a prepared 4-D mask")
        positions = kwargs.get("position_ids")
        if past == 0:
            layout = self.adapter.take_layout(batch, length)
            if mask is None:
                mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
            if positions is None:
                positions = torch.arange(length, device=embeds.device)
            positions = self._expand_positions(positions, batch)
            segment = Segment(0, mask, positions, torch.zeros(batch, dtype=torch.long, device=embeds.device))
            state = PrefillState(length, [segment], layout, ForwardRecord(layout=layout))
            self.state = state
            self.trace.forwards.append(state.record)
            if "pre_llm" in self.sites and layout.num_images:
                ctx = self._context("pre_llm", embeds, None, self.adapter.vision_signals(layout))
                embeds, segment = self._cut(ctx, embeds, segment, start=0)
                state.segments = [segment]
            kwargs.update(inputs_embeds=embeds, attention_mask=segment.mask2d, position_ids=segment.positions)
            return args, kwargs

        state = self._continuation_state()
        query = embeds.shape[1]
        if mask is None:
            mask = torch.ones(batch, state.prompt_len + state.decoded + query, dtype=torch.long, device=embeds.device)
        if mask.shape[1] != state.prompt_len + state.decoded + query:
            raise VTPruneError(
                f"this call brings {query} tokens and a mask of {mask.shape[1]}, but the pruned cache stands for "
                f"{state.prompt_len + state.decoded} tokens; a pruned cache is shorter than the sequence (generate() "
                "cannot restart from it): continue with the new tokens only and the full attention mask, or prefill again"
            )
        if positions is None:
            positions = torch.arange(query, device=embeds.device) + state.prompt_len + state.decoded
        state.call_mask = mask
        state.call_positions = self._expand_positions(positions, batch)
        state.call_layer_masks, state.layer_input = {}, None
        state.decoded += query
        first = state.segments[0]
        kwargs.update(
            attention_mask=self._continuation_mask(state.cache_masks.get(0, first.mask2d), mask),
            position_ids=self._shift(state.call_positions, first.offset),
        )
        return args, kwargs

    def _continuation_state(self) -> PrefillState:
        if self.state is None:
            raise VTPruneError(
                "this call continues a cache that was not prefilled inside the same `with method(model)` block; "
                "run the prefill (or generate) inside it"
            )
        return self.state

    # ---------------------------------------------------------------------------------------- decoder layers
    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            state = self.state
            if state is None:
                return args, kwargs
            hidden = _kwarg(args, kwargs, "hidden_states", 0)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            segment = next(s for s in reversed(state.segments) if s.start <= index)
            prefill = state.call_mask is None
            if not prefill and segment.start == index and index > 0:
                self._prepare_continuation(segment, hidden, cache)
            if segment.start > 0:
                kwargs = self._with_segment(kwargs, segment)
            if not prefill and index in state.cache_masks:
                kwargs = dict(kwargs)
                kwargs["attention_mask"] = self._cache_layer_mask(index, hidden, cache)
            if prefill:
                for request in self.queries.get(index, []):
                    state.signals[request] = self._query_attention(module, hidden, kwargs, segment, request)
                if index in self.cuts:
                    ctx = self._context("llm_layer", hidden, index, dict(state.signals))
                    hidden, new_segment = self._cut(ctx, hidden, segment, start=index)
                    self._prepare_prefill(new_segment, hidden, cache)
                    state.segments.append(new_segment)
                    kwargs = self._with_segment(kwargs, new_segment)
                    if args:
                        args = (hidden, *args[1:])
                    else:
                        kwargs["hidden_states"] = hidden
                    segment = new_segment
                for request in self.received.get(index, []):  # on the sequence this layer runs on
                    state.signals[request] = self._received_attention(module, hidden, kwargs, segment, request)
                state.layer_input = hidden
            return args, kwargs

        return hook

    def _transition_hook(self, index: int, which: int):
        """Forward hook on layer `index`'s attention (which=0) or MLP (which=1): norm ratio and cosine, in fp32."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            state = self.state
            if state is None or state.call_mask is not None:  # only during a prefill inside the session
                return
            x_in = _kwarg(args, kwargs, "hidden_states", 0).detach().float()
            x_out = (output[0] if isinstance(output, tuple) else output).detach().float()
            ratio = x_out.norm(dim=-1) / x_in.norm(dim=-1)
            cosine = F.cosine_similarity(x_in, x_out, dim=-1, eps=1e-8)
            if which == 0:
                state.attention_transition = (ratio, cosine)
            else:
                segment = next(s for s in reversed(state.segments) if s.start <= index)
                attn_ratio, attn_cosine = state.attention_transition
                stats = TransitionStats(
                    ratio=torch.stack([attn_ratio, ratio], dim=1),
                    cosine=torch.stack([attn_cosine, cosine], dim=1),
                    mask=segment.mask2d,
                    layout=state.layout,
                )
                for request in self.transitions[index]:
                    state.signals.setdefault(request, {})[index] = stats

        return hook

    def _with_segment(self, kwargs: dict, segment: Segment) -> dict:
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = segment.attention_mask
        kwargs["position_embeddings"] = segment.position_embeddings
        if "position_ids" in kwargs:
            kwargs["position_ids"] = None
        return kwargs

    def _layer_mask(self, hidden: Tensor, mask2d: Tensor, cache: Any, positions: Tensor, layer: int) -> Any:
        layer_types = getattr(self.lm.config, "layer_types", None)
        sliding = layer_types is not None and layer_types[layer] == "sliding_attention"
        build = create_sliding_window_causal_mask if sliding else create_causal_mask
        return build(
            config=self.lm.config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            cache=cache,
            position_ids=positions,
            layer_idx=layer,
        )

    def _prepare_prefill(self, segment: Segment, hidden: Tensor, cache: Any) -> None:
        segment.position_embeddings = self.rotary(hidden, segment.positions)
        segment.attention_mask = self._layer_mask(hidden, segment.mask2d, cache, segment.positions, segment.start)

    def _prepare_continuation(self, segment: Segment, hidden: Tensor, cache: Any) -> None:
        state = self.state
        mask2d = self._continuation_mask(segment.mask2d, state.call_mask)
        positions = self._shift(state.call_positions, segment.offset)
        segment.position_embeddings = self.rotary(hidden, positions)
        segment.attention_mask = self._layer_mask(hidden, mask2d, cache, positions, segment.start)

    def _continuation_mask(self, prompt_mask: Tensor, call_mask: Tensor) -> Tensor:
        """The prompt's 2-D mask as a layer (or its cache) sees it, followed by the tokens decoded since."""
        new = call_mask[:, self.state.prompt_len :].to(prompt_mask.dtype)
        return torch.cat([prompt_mask, new], dim=1)

    def _cache_layer_mask(self, layer: int, hidden: Tensor, cache: Any) -> Any:
        """Decoding: the mask of a layer whose cache was compressed, built once per call for layers sharing one."""
        state = self.state
        prompt_mask = state.cache_masks[layer]
        layer_types = getattr(self.lm.config, "layer_types", None)
        key = (id(prompt_mask), layer_types[layer] if layer_types else None)
        if key not in state.call_layer_masks:
            mask2d = self._continuation_mask(prompt_mask, state.call_mask)
            state.call_layer_masks[key] = self._layer_mask(hidden, mask2d, cache, None, layer)
        return state.call_layer_masks[key]

    # --------------------------------------------------------------------------------------------- the cut
    def _context(self, site: str, hidden: Tensor, layer: int | None, signals: dict) -> SiteContext:
        state = self.state
        ctx = SiteContext(
            site=site,
            layout=state.layout,
            signals={k: dict(v) if isinstance(v, dict) else v for k, v in signals.items()},
            info=self.adapter.info,
            hidden_states=hidden,
            layer=layer,
            stage=state.stage,
            state=state.method_state,
        )
        state.stage += 1
        return ctx

    def _cut(self, ctx: SiteContext, hidden: Tensor, segment: Segment, start: int) -> tuple[Tensor, Segment]:
        """Plan with the method, then merge and compact the sequence. Returns the new hidden states and segment."""
        state, layout = self.state, ctx.layout
        with torch.no_grad():
            plan = self.method.plan(ctx)
        plan.validate(layout)
        state.record.sites.extend(site_records(ctx, plan))
        device = hidden.device
        if any(plan.merges):
            hidden = merge_planned(hidden, plan, layout, lambda x, merges: self._encoder_merge(ctx, x, merges))
        # keep text and kept visual tokens; padding is dropped too (the batch is left-padded again below)
        real = segment.mask2d.bool().cpu()
        keep = [positions[real[b, positions]] for b, positions in enumerate(plan.keep_positions(layout))]
        index, valid = kernels.left_padded_index(keep, device)
        positions, offset = self.reposition(self.method.position_mode(ctx), layout, keep, segment.positions, segment.offset)
        hidden, positions, mask2d = kernels.compact_sequence(hidden, positions, segment.mask2d, index, valid)
        new_length = index.shape[1]
        new_position = []
        for b in range(layout.batch_size):
            lookup = torch.zeros(layout.seq_len, dtype=torch.long)
            lookup[keep[b]] = torch.arange(keep[b].numel()) + (new_length - keep[b].numel())
            new_position.append(lookup)
        if plan.order is not None:
            hidden = self._reorder(hidden, plan, layout, new_position)
        order = [plan.sequence_order(b).cpu() for b in range(layout.batch_size)]
        state.layout = layout.after_keep(order, new_position, new_length)
        return hidden, Segment(start, mask2d, positions, offset)

    @staticmethod
    def _reorder(hidden: Tensor, plan: KeepPlan, layout: VisualLayout, new_position: list[Tensor]) -> Tensor:
        """Permute the compacted hidden states so kept slot i (ascending) holds the contents of plan.order[i]."""
        source = torch.arange(hidden.shape[1]).repeat(hidden.shape[0], 1)  # [B, L']
        for b in range(layout.batch_size):
            visual = layout.visual_positions(b)
            slots = new_position[b][visual[plan.keep[b].cpu()]]
            source[b, slots] = new_position[b][visual[plan.order[b].cpu()]]
        index = source.to(hidden.device)[..., None].expand_as(hidden)
        return torch.gather(hidden, 1, index)

    def _encoder_merge(self, ctx: SiteContext, hidden: Tensor, merges_per_sample: list[list[Merge]]) -> Tensor:
        """Write merges of encoder tokens into their slots: projector(sum(weights * projector input rows))."""
        features = ctx.signals.get(ProjectorInput())
        project = getattr(self.adapter, "project", None)
        if ctx.site != "pre_llm" or features is None or project is None:
            raise VTPruneError(
                f"method {self.method.name!r} merges encoder tokens (space='encoder'): that needs the pre_llm site, "
                "an adapter with a projector and the ProjectorInput signal requested"
            )
        layout = ctx.layout
        batch, slot, rows, weights, segment = [], [], [], [], []
        for b, merges in enumerate(merges_per_sample):
            positions = layout.visual_positions(b)
            slices = layout.ordinal_slices(b)
            image_of = torch.cat([torch.full((sl.stop - sl.start,), span.image) for span, sl in slices])
            for merge in merges:
                tokens = merge.sources.cpu()
                if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= features.shape[1]):
                    raise VTPruneError(f"encoder merge sources must lie in 0..{features.shape[1] - 1}")
                batch.append(b)
                slot.append(int(positions[merge.slot]))
                rows.append(int(image_of[merge.slot]) * features.shape[1] + tokens)
                weights.append(merge.weights.float().cpu())
                segment.append(torch.full((tokens.numel(),), len(slot) - 1))
        flat = features.reshape(-1, features.shape[-1])
        weighted = flat[torch.cat(rows).to(flat.device)].float() * torch.cat(weights).to(flat.device)[:, None]
        sums = torch.zeros(len(slot), flat.shape[-1], dtype=torch.float32, device=flat.device)
        sums.index_add_(0, torch.cat(segment).to(flat.device), weighted)
        with torch.no_grad():
            values = project(sums.to(features.dtype))  # [n, D_llm]
        hidden = hidden.clone()
        hidden[torch.tensor(batch, device=hidden.device), torch.tensor(slot, device=hidden.device)] = values.to(
            device=hidden.device, dtype=hidden.dtype
        )
        return hidden

    def reposition(
        self, mode: str, layout: VisualLayout, keep: list[Tensor], positions: Tensor, offset: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The positions tokens take after a cut (same shape as `positions`, before compaction) and the new offset.

        keep[b]: the sequence positions sample b keeps. "renumber": each token moves back by the visual tokens dropped
        before it, and decoding moves back by all dropped ones; "original": nothing moves.
        """
        if mode != "renumber":
            return positions, offset
        dropped = self.dropped(layout, keep).to(positions.device)
        return positions - (dropped.cumsum(1) - dropped), offset + dropped.sum(1)

    @staticmethod
    def dropped(layout: VisualLayout, keep: list[Tensor]) -> Tensor:
        """[B, L] long: 1 at the visual tokens a cut drops."""
        dropped = torch.zeros(layout.batch_size, layout.seq_len, dtype=torch.long)
        for b in range(layout.batch_size):
            dropped[b, layout.visual_positions(b)] = 1
            dropped[b, keep[b]] = 0
        return dropped

    # ------------------------------------------------------------------------------------------ positions
    def rotary(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.lm.rotary_emb(hidden, positions)

    @staticmethod
    def _expand_positions(positions: Tensor, batch: int) -> Tensor:
        if positions.dim() == 1:
            positions = positions[None]
        return positions.expand(*positions.shape[:-2], batch, positions.shape[-1]) if positions.shape[-2] != batch else positions

    @staticmethod
    def _shift(positions: Tensor, offset: Tensor) -> Tensor:
        """Incoming positions [B, q] or [P, B, q] minus the offset [B] (or [P', B]: the last P rows apply)."""
        if offset.dim() == 2:
            offset = offset[-positions.shape[0] :]
        return positions - offset[..., None]

    # -------------------------------------------------------------------------------- query attention signal
    def _query_rows(self, request: QueryAttention, sample: int, mask2d: Tensor) -> Tensor:
        layout = self.state.layout
        valid = mask2d[sample].bool().cpu()
        visual = torch.zeros_like(valid)
        visual[layout.visual_positions(sample)] = True
        if request.queries == "last":
            rows = valid.nonzero()[-1:, 0]
        elif request.queries == "after_visual":
            last_visual = int(layout.visual_positions(sample).max()) if visual.any() else -1
            after = torch.zeros_like(valid)
            after[last_visual + 1 :] = True
            rows = (after & valid).nonzero()[:, 0]
        else:
            rows = (valid & ~visual).nonzero()[:, 0]
        return rows

    def _query_attention(
        self, layer: nn.Module, hidden: Tensor, kwargs: dict, segment: Segment, request: QueryAttention
    ) -> list[Tensor]:
        """[heads, queries, L] per sample: softmax rows of `layer` recomputed from its q/k (with RoPE)."""
        attn = layer.self_attn
        cos, sin = kwargs["position_embeddings"]
        mask2d = segment.mask2d
        out = []
        with torch.no_grad():
            x = layer.input_layernorm(hidden)  # [B, L, D]
            for b in range(hidden.shape[0]):
                rows = self._query_rows(request, b, mask2d).to(hidden.device)
                q = self._project(attn, attn.q_proj, x[b : b + 1, rows], "q_norm")  # [1, H, Q, d]
                k = self._project(attn, attn.k_proj, x[b : b + 1], "k_norm")  # [1, H_kv, L, d]
                q = self.rotate(attn, q, cos[b : b + 1, rows] if cos.dim() == 3 else cos[:, b : b + 1, rows],
                                sin[b : b + 1, rows] if sin.dim() == 3 else sin[:, b : b + 1, rows])
                k = self.rotate(attn, k, cos[b : b + 1] if cos.dim() == 3 else cos[:, b : b + 1],
                                sin[b : b + 1] if sin.dim() == 3 else sin[:, b : b + 1])
                probs = attention_rows(q, k, attn.scaling, key_mask=mask2d[b : b + 1].bool(), query_positions=rows[None])
                out.append(probs[0])
        return out

    def _received_attention(
        self, layer: nn.Module, hidden: Tensor, kwargs: dict, segment: Segment, request: ReceivedAttention
    ) -> list[Tensor]:
        """[L] per sample: attention each key receives from the request's query rows, summed over heads and rows."""
        attn = layer.self_attn
        cos, sin = kwargs["position_embeddings"]
        out = []
        with torch.no_grad():
            x = layer.input_layernorm(hidden)
            for b in range(hidden.shape[0]):
                valid = segment.mask2d[b].bool()
                if request.queries == "all":
                    rows = valid.nonzero()[:, 0]
                else:
                    rows = self._query_rows(QueryAttention(request.layer, "text"), b, segment.mask2d).to(valid.device)
                one = slice(b, b + 1)
                cos_b, sin_b = (cos[one], sin[one]) if cos.dim() == 3 else (cos[:, one], sin[:, one])
                q = self.rotate(attn, self._project(attn, attn.q_proj, x[b : b + 1], "q_norm"), cos_b, sin_b)
                k = self.rotate(attn, self._project(attn, attn.k_proj, x[b : b + 1], "k_norm"), cos_b, sin_b)
                out.append(received_attention(q[:, :, rows], k, attn.scaling, valid[None], rows[None])[0])
        return out

    @staticmethod
    def _project(attn: nn.Module, proj: nn.Module, x: Tensor, norm_name: str) -> Tensor:
        states = proj(x)
        states = states.view(x.shape[0], x.shape[1], states.shape[-1] // attn.head_dim, attn.head_dim)
        norm = getattr(attn, norm_name, None)
        if norm is not None:
            states = norm(states)
        return states.transpose(1, 2)

    def rotate(self, attn: nn.Module, states: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Apply the language model's own RoPE to q or k [B, H, n, d]."""
        modeling = sys.modules[type(attn).__module__]
        rotated, _ = modeling.apply_rotary_pos_emb(states, states, cos, sin)
        return rotated
