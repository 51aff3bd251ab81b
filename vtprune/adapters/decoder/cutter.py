"""Cuts inside a transformers decoder language model (Llama, Qwen2, ...), shared by the family adapters.

The language model is never forked. Forward pre-hooks on the language model and on its decoder layers:
- at prefill, apply the method's `pre_llm` cut to the input embeddings and its `llm_layer` cuts between layers, each
  through `vtprune.kernels.apply_cut`; the layers from one cut to the next form a `Segment`, and each layer's cache
  entry becomes a `PrunedLayer` of its segment (see `cache.py`);
- while decoding, give every layer a mask as long as its own cache and the positions its segment asks for, read from
  the cache itself, so beam search, assisted decoding and continuing from a returned cache keep them right.
Layers after a cut get a mask and RoPE tables made once per segment and layer kind (`config.layer_types`: a
sliding-window layer its windowed mask; `rotary` is told the layer, for models with a RoPE per kind).
Under a StaticCache the layers become `PrunedStaticLayer`s (same logical lengths and mask offsets over a fixed buffer),
the 2-D padding mask is read back from the 4-D mask generate() prepares (`padding_mask`), and the llm_attention site
is refused (its compressed blocks do not fit a fixed buffer).

Positions: "renumber" gives kept tokens contiguous positions (a token moves back by the number of visual tokens dropped
before it); "original" keeps every token's position, leaving gaps. Decoding continues, per segment, at the incoming
position minus the segment's offset. Subclasses with other position schemes (M-RoPE) override `reposition`, `rotary`
and `expand_positions`. The kv_cache and llm_attention sites live in `cache_site.py` and `sparse_site.py`.

Assisted decoding verifies its first candidates in the prefill call (prompt + candidates): the prefill's signals and
method contexts then see the prompt alone (`Prefill.prompt_mask`), so cuts choose what a greedy prefill would. Refused:
a prefill with no attention mask whose position ids restart within a row (padding-free packed sequences).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import StaticLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ...core.cut import compile_cut
from ...core.errors import VTPruneError
from ...core.layout import VisualLayout
from ...core.method import SiteContext
from ...core.plan import Merge
from ...core.profile import stage
from ...core.signals import PrefillKV, ProjectorInput, Transitions, TransitionStats
from ...core.trace import ForwardRecord, site_records
from ...kernels import apply_cut
from ..common import cache_argument, kwarg, swap_class
from .cache import PrunedStaticLayer, Segment, SegmentLayer, pruned_layer
from .cache_site import CacheSite
from .labels import LabelLoss, follow_cut
from .layer_signals import AFTER_CUT, BEFORE_CUT, plan_requests
from .layer_signals import compute as compute_layer_signal
from .sparse_site import SparseAttention
from .state import Continuation, Prefill

if TYPE_CHECKING:
    from ...core.adapter import Adapter
    from ...core.method import Method
    from ...core.trace import Trace


class DecoderCutter:
    """Applies a method's `pre_llm` and `llm_layer` cuts (and its `kv_cache` / `llm_attention` sites) to one decoder
    language model."""

    def __init__(self, adapter: "Adapter", language_model: nn.Module) -> None:
        self.adapter = adapter
        self.lm = language_model
        self.layers: nn.ModuleList = language_model.layers
        self.prefill: Prefill | None = None
        self.continuation: Continuation | None = None

    # ----------------------------------------------------------------------------------------------- attaching
    def attach(self, method: "Method", trace: "Trace", requests: list[Any]) -> None:
        """Install the hooks for `method`; `requests` are its signal requests (the ones of the LM are served here)."""
        self.method, self.trace = method, trace
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
        self.before_cut, self.after_cut = plan_requests(
            [r for r in requests if isinstance(r, BEFORE_CUT + AFTER_CUT)], self.cuts, n_layers
        )
        self.transitions = self._transition_requests([r for r in requests if isinstance(r, Transitions)], n_layers)
        for layer in self.transitions:
            modules = (self.layers[layer].self_attn, self.layers[layer].mlp)
            for which, module in enumerate(modules):
                self.adapter.hook(module, self._transition_hook(layer, which), pre=False)
        self.cache_site = None
        if "kv_cache" in self.sites:
            kv_requests = [r for r in requests if isinstance(r, PrefillKV)]
            if len(kv_requests) != 1:
                raise VTPruneError(f"method {method.name!r} cuts at the kv_cache site and must request one PrefillKV")
            self.cache_site = CacheSite(self, kv_requests[0])
        self.adapter.hook(self.lm, self._on_language_model)
        self._follow_assisted_decoding()
        LabelLoss(self).attach()  # labels= in a forward: the loss over the kept sequence
        if "llm_attention" in self.sites:  # per-layer attention among the tokens the method marks important
            SparseAttention(self).attach()
        for index in range(n_layers):  # every layer's cache becomes a PrunedLayer of its segment
            self.adapter.hook(self.layers[index], self._layer_hook(index))
        self.adapter.on_detach(self._reset)

    def _transition_requests(self, requests: list[Transitions], n_layers: int) -> dict[int, list[Transitions]]:
        out: dict[int, list[Transitions]] = {}
        for request in requests:
            for layer in request.layers:
                if not 0 <= layer < n_layers or (self.cuts and layer >= self.cuts[-1]):
                    raise VTPruneError(
                        f"Transitions at layer {layer}: a cut must follow it (the model has layers 0..{n_layers - 1}, "
                        f"the last cut sits before layer {self.cuts[-1] if self.cuts else None})"
                    )
                out.setdefault(layer, []).append(request)
        return out

    def _reset(self) -> None:
        self.prefill = self.continuation = None

    def _follow_assisted_decoding(self) -> None:
        """Assisted decoding verifies its first candidates in the prefill call: the prompt and then `logits_to_keep - 1`
        candidate tokens. The prefill's signals and contexts see the prompt only (`Prefill.candidates`), so a cut
        chooses what greedy decoding's prompt-only prefill chooses; the candidates are text and pass every cut."""
        self.assisting, self.candidates = False, 0
        model = self.adapter.model
        original = getattr(type(model), "_assisted_decoding", None)
        if original is None:
            return

        def _assisted_decoding(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self.adapter.active():
                self._refuse_candidates()
            outer, self.assisting = self.assisting, self.adapter.active() or self.assisting
            try:
                return original(module, *args, **kwargs)
            finally:
                self.assisting = outer

        def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
            keep, cache = kwargs.get("logits_to_keep"), cache_argument(kwargs)
            prefill = cache is None or cache.get_seq_length() == 0
            self.candidates = keep - 1 if self.assisting and prefill and isinstance(keep, int) and keep > 1 else 0

        swap_class(model, {"_assisted_decoding": _assisted_decoding}, self.adapter)
        self.adapter.hook(model, on_call)

    def _refuse_candidates(self) -> None:
        """Before assisted decoding or prompt lookup starts: a decode-time KV policy under a budget cannot take their
        candidates (it evicts at every step, and a rejected candidate's crop cannot restore an evicted entry)."""
        method = self.method
        if getattr(method, "evicts_while_decoding", False) and method.keep != 1.0:
            raise VTPruneError(
                f"{method.name} keeps a cache budget while decoding and evicts at every step; assisted decoding and "
                "prompt lookup verify candidates and crop the cache, which cannot restore evicted entries: generate "
                f"without an assistant or prompt lookup, or use keep=1.0"
            )

    # ------------------------------------------------------------------------------------- language model input
    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise VTPruneError("vtprune expects the language model to be called with inputs_embeds")
        cache = cache_argument(kwargs)
        mask = kwargs.get("attention_mask")
        past = int(cache.get_seq_length()) if cache is not None else 0
        if is_static(cache):
            self._check_static(cache)
            mask = padding_mask(mask, cache, embeds, past)
        self.prefill = self.continuation = None
        if mask is not None and mask.dim() != 2 and not is_static(cache):
            return self._custom_mask_call(embeds, cache, past)
        if past == 0:
            return args, self._start_prefill(embeds, mask, kwargs.get("position_ids"), cache, kwargs)
        return self._start_continuation(embeds, mask, kwargs.get("position_ids"), cache, past, args, kwargs)

    def _custom_mask_call(self, embeds: Tensor, cache: Any, past: int) -> None:
        """A caller's own 4-D mask (shared prefixes, packed documents): the language model runs as dense when there is
        nothing to prune (a text-only prompt, or a cache filled outside any session); refused otherwise."""
        if past == 0:
            if not self.adapter.take_layout(*embeds.shape[:2]).visual_mask().any():
                return None
        elif not isinstance(getattr(cache, "layers", [None])[0], SegmentLayer):
            return None
        raise VTPruneError(
            "vtprune compacts the 2-D padding mask (batch, length) of a prompt with visual tokens; a prepared 4-D "
            "mask cannot follow its cuts: pass attention_mask as (batch, length)"
        )

    def _check_static(self, cache: Any) -> None:
        """Refuse, in one line, a static cache this method or this cache's layers cannot prune into."""
        name = self.method.name
        if "llm_attention" in self.sites:
            raise VTPruneError(
                f"method {name!r} (llm_attention site) replaces each layer's cache by compressed blocks, which a "
                "StaticCache cannot hold; generate without cache_implementation='static' (the default DynamicCache)"
            )
        for index, layer in enumerate(cache.layers):
            if not (type(layer) is StaticLayer or isinstance(layer, PrunedStaticLayer)):
                raise VTPruneError(
                    f"vtprune prunes into a StaticCache of full-attention StaticLayers; layer {index} is "
                    f"{type(layer).__name__} (sliding window or offloaded): use the default DynamicCache"
                )

    def _start_prefill(self, embeds: Tensor, mask: Tensor | None, positions: Tensor | None, cache: Any,
                       kwargs: dict) -> dict:
        batch, length = embeds.shape[:2]
        candidates, self.candidates = self.candidates, 0
        layout = self.adapter.take_layout(batch, length)
        if mask is None:
            refuse_packed(positions)
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        if positions is None:
            positions = torch.arange(length, device=embeds.device)
        positions = self.expand_positions(positions, batch)
        offset = torch.zeros(batch, dtype=torch.long, device=embeds.device)
        segment = Segment(0, mask, positions, offset, length)
        state = Prefill(length, layout, ForwardRecord(layout=layout), [segment], candidates=candidates)
        self.prefill = state
        self.trace.forwards.append(state.record)
        if "pre_llm" in self.sites and layout.num_images:
            ctx = self.context("pre_llm", embeds, None, self.adapter.vision_signals(layout))
            embeds, segment = self._cut(ctx, embeds, segment, start=0)
            state.segments = [segment]
        if cache is not None:  # a cache the caller made (a language model makes its own after this hook)
            pruned_layer(cache, 0, segment, first=True)
        kwargs.update(inputs_embeds=embeds, attention_mask=segment.mask2d, position_ids=segment.positions)
        return kwargs

    def _start_continuation(self, embeds: Tensor, mask: Tensor | None, positions: Tensor | None, cache: Any,
                            past: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        batch, query = embeds.shape[:2]
        first = getattr(cache, "layers", [None])[0]
        if not isinstance(first, SegmentLayer):
            return None  # a cache filled outside any session: nothing was pruned, nothing to adjust
        if mask is None:
            mask = torch.ones(batch, past + query, dtype=torch.long, device=embeds.device)
        if mask.shape[1] != past + query:
            raise VTPruneError(
                f"this call brings {query} tokens and a mask of {mask.shape[1]}, but the cache stands for {past} "
                "tokens; give the mask of the whole sequence (cache and new tokens)"
            )
        if positions is None:
            positions = torch.arange(query, device=embeds.device) + past
        self.continuation = Continuation(mask, self.expand_positions(positions, batch))
        segment = first.segment
        kwargs.update(
            attention_mask=self._continuation_mask(segment),
            position_ids=self.shift(self.continuation.positions, segment.offset),
        )
        return args, kwargs

    # ---------------------------------------------------------------------------------------- decoder layers
    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self.prefill is not None:
                return self._prefill_layer(index, module, args, kwargs)
            if self.continuation is not None:
                return args, self._continuation_layer(index, args, kwargs)
            return None

        return hook

    def _prefill_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state = self.prefill
        hidden = kwarg(args, kwargs, "hidden_states", 0)
        segment = state.segment_at(index)
        if segment.start > 0:
            kwargs = self._with_prepared(kwargs, self._prefill_prepared(segment, index, hidden, kwargs))
        for request in self.before_cut.get(index, []):
            state.signals[request] = self._layer_signal(request, module, hidden, kwargs, segment)
        if index in self.cuts:
            ctx = self.context("llm_layer", hidden, index, dict(state.signals))
            hidden, segment = self._cut(ctx, hidden, segment, start=index)
            state.segments.append(segment)
            kwargs = self._with_prepared(kwargs, self._prefill_prepared(segment, index, hidden, kwargs))
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        for request in self.after_cut.get(index, []):  # on the sequence this layer runs on
            state.signals[request] = self._layer_signal(request, module, hidden, kwargs, segment)
        cache = cache_argument(kwargs)
        if cache is not None:
            pruned_layer(cache, index, segment, first=segment.start == index)
        state.layer_input = hidden
        return args, kwargs

    def _layer_signal(self, request: Any, layer: nn.Module, hidden: Tensor, kwargs: dict, segment: Segment) -> Any:
        rope = kwargs["position_embeddings"]
        mask = self.prefill.prompt_mask(segment.mask2d)
        with stage("signals"):
            return compute_layer_signal(request, layer, self.lm, hidden, rope, mask, self.prefill.layout)

    def _continuation_layer(self, index: int, args: tuple, kwargs: dict) -> dict:
        cache = cache_argument(kwargs)
        layer_cache = cache.layers[index] if cache is not None and index < len(cache.layers) else None
        first = cache.layers[0] if cache is not None else None
        segment = getattr(layer_cache, "segment", None)
        if segment is None or segment is getattr(first, "segment", None):
            return kwargs  # same as the language model's input: its mask and positions apply
        memo, key = self.continuation.per_segment, (id(segment), self.layer_type(index))
        if key not in memo:
            hidden = kwarg(args, kwargs, "hidden_states", 0)
            positions = self.shift(self.continuation.positions, segment.offset)
            mask = self._layer_mask(hidden, self._continuation_mask(segment), cache, positions, index)
            memo[key] = (mask, self.rotary(hidden, positions, index))
        return self._with_prepared(kwargs, memo[key])

    def layer_type(self, layer: int) -> str | None:
        """The attention kind of decoder layer `layer` ("full_attention", "sliding_attention", ...; None for models
        without `layer_types`): layers of one kind in a segment share a mask and RoPE tables."""
        layer_types = getattr(self.lm.config, "layer_types", None)
        return layer_types[layer] if layer_types is not None else None

    def _prefill_prepared(self, segment: Segment, index: int, hidden: Tensor, kwargs: dict) -> tuple[Any, Any]:
        """(mask, RoPE) of layer `index` of a segment that starts after a cut, made once per segment and layer kind."""
        state, key = self.prefill, (segment.start, self.layer_type(index))
        if key not in state.prepared:
            cache = cache_argument(kwargs)  # a static cache sizes the mask to its buffer (an empty layer: no offset)
            cache = cache if is_static(cache) else None
            state.prepared[key] = (
                self._layer_mask(hidden, segment.mask2d, cache, segment.positions, index),
                self.rotary(hidden, segment.positions, index),
            )
        return state.prepared[key]

    @staticmethod
    def _with_prepared(kwargs: dict, prepared: tuple[Any, Any]) -> dict:
        """The layer's kwargs with another attention mask and RoPE tables."""
        kwargs = dict(kwargs)
        kwargs["attention_mask"], kwargs["position_embeddings"] = prepared
        if "position_ids" in kwargs:
            kwargs["position_ids"] = None
        return kwargs

    def _layer_mask(self, hidden: Tensor, mask2d: Tensor, cache: Any, positions: Tensor | None, layer: int) -> Any:
        sliding = self.layer_type(layer) == "sliding_attention"
        build = create_sliding_window_causal_mask if sliding else create_causal_mask
        return build(
            config=self.lm.config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            cache=cache,
            position_ids=positions,
            layer_idx=layer,
        )

    def _continuation_mask(self, segment: Segment) -> Tensor:
        """[B, caller's length]: zeros for the prompt entries the segment's cuts dropped, the segment's prompt mask as
        its cache stores it, then the caller's mask of everything after the prompt (see `PrunedLayer.get_mask_sizes`)."""
        caller = self.continuation.mask
        dropped = segment.prompt_length - segment.mask2d.shape[1]
        head = segment.mask2d.new_zeros(caller.shape[0], dropped)
        tail = caller[:, segment.prompt_length :].to(segment.mask2d.dtype)
        return torch.cat([head, segment.mask2d, tail], dim=1)

    def _transition_hook(self, index: int, which: int):
        """Forward hook on layer `index`'s attention (which=0) or MLP (which=1): norm ratio and cosine, in fp32."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            state = self.prefill
            if state is None:  # only during a prefill inside the session
                return
            with stage("signals"):
                x_in = kwarg(args, kwargs, "hidden_states", 0).detach().float()
                x_out = (output[0] if isinstance(output, tuple) else output).detach().float()
                ratio = x_out.norm(dim=-1) / x_in.norm(dim=-1)
                cosine = F.cosine_similarity(x_in, x_out, dim=-1, eps=1e-8)
            if which == 0:
                state.attention_transition = (ratio, cosine)
                return
            attn_ratio, attn_cosine = state.attention_transition
            stats = TransitionStats(
                ratio=torch.stack([attn_ratio, ratio], dim=1),
                cosine=torch.stack([attn_cosine, cosine], dim=1),
                mask=state.prompt_mask(state.segment_at(index).mask2d),
                layout=state.layout,
            )
            for request in self.transitions[index]:
                state.signals.setdefault(request, {})[index] = stats

        return hook

    # --------------------------------------------------------------------------------------------- the cut
    def context(self, site: str, hidden: Tensor, layer: int | None, signals: dict) -> SiteContext:
        """The method's view of a cut in the current prefill (the cut's index among this forward's cuts advances)."""
        state = self.prefill
        ctx = SiteContext(
            site=site,
            layout=state.layout,
            signals={k: dict(v) if isinstance(v, dict) else v for k, v in signals.items()},
            info=self.adapter.info,
            hidden_states=hidden,
            attention_mask=state.prompt_mask(state.segment_at(layer or 0).mask2d),
            layer=layer,
            stage=state.stage,
            state=state.method_state,
        )
        state.stage += 1
        return ctx

    def _cut(self, ctx: SiteContext, hidden: Tensor, segment: Segment, start: int) -> tuple[Tensor, Segment]:
        """Plan with the method, then apply the plan (merges, compaction, reordering). Returns the new hidden states
        and the segment of the layers from `start` on."""
        state = self.prefill
        with torch.no_grad(), stage("score"):
            plan = self.method.plan(ctx)
        if plan.sizes is not None:
            raise VTPruneError(f"method {self.method.name!r} asks for proportional attention (KeepPlan.sizes) at site "
                               f"{ctx.site!r}; only the vision-encoder site ('encoder') applies it")
        with stage("compact"):
            # text stays, and as much padding as the longest sample needs; samples are left-padded to it again
            cut = compile_cut(plan, ctx.layout, padding=segment.mask2d == 0)
            state.record.sites.extend(site_records(ctx, plan))
            positions, offset = self.reposition(
                self.method.position_mode(ctx), ctx.layout, cut.keep, segment.positions, segment.offset
            )
            hidden, positions, mask2d = apply_cut(
                cut, hidden, positions, segment.mask2d,
                encoder_merge=lambda x, merges: self._encoder_merge(ctx, x, merges),
            )
        state.layout = cut.layout
        state.source = follow_cut(state.source, cut, ctx.layout.seq_len)
        return hidden, Segment(start, mask2d, positions, offset, segment.prompt_length)

    def _encoder_merge(self, ctx: SiteContext, hidden: Tensor, merges_per_sample: list[list[Merge]]) -> Tensor:
        """Write merges of encoder tokens into their slots: projector(sum(weights * projector input rows)), the rows of
        the merge's `view` (an encoder input) or, without one, of its slot's image."""
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
            if not merges:
                continue
            positions = layout.visual_positions(b).tolist()  # host lists: one read per sample, not per merge
            image_of = torch.cat([torch.full((sl.stop - sl.start,), span.image) for span, sl in layout.ordinal_slices(b)])
            image_of = image_of.tolist()
            every = torch.cat([merge.sources.cpu() for merge in merges])
            if every.numel() and bool(((every < 0) | (every >= features.shape[1])).any()):
                raise VTPruneError(f"encoder merge sources must lie in 0..{features.shape[1] - 1}")
            for merge in merges:
                tokens = merge.sources.cpu()
                batch.append(b)
                slot.append(positions[merge.slot])
                view = image_of[merge.slot] if merge.view is None else merge.view
                if view >= features.shape[0]:
                    raise VTPruneError(f"encoder merge names encoder input {view}; the encoder saw {features.shape[0]}")
                rows.append(view * features.shape[1] + tokens)
                weights.append(merge.weights.float().cpu())
                segment.append(torch.full((tokens.numel(),), len(slot) - 1))
        flat = features.reshape(-1, features.shape[-1])
        weighted = flat[torch.cat(rows).to(flat.device)].float() * torch.cat(weights).to(flat.device)[:, None]
        sums = torch.zeros(len(slot), flat.shape[-1], dtype=torch.float32, device=flat.device)
        sums = sums.index_add(0, torch.cat(segment).to(flat.device), weighted)
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
    def rotary(self, hidden: Tensor, positions: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """The RoPE tables (cos, sin) decoder layer `layer` uses at `positions`."""
        return self.lm.rotary_emb(hidden, positions)

    @staticmethod
    def expand_positions(positions: Tensor, batch: int) -> Tensor:
        if positions.dim() == 1:
            positions = positions[None]
        if positions.shape[-2] == batch:
            return positions
        return positions.expand(*positions.shape[:-2], batch, positions.shape[-1])

    @staticmethod
    def shift(positions: Tensor, offset: Tensor) -> Tensor:
        """Incoming positions [B, q] or [P, B, q] minus the offset [B] (or [P', B]: the last P rows apply)."""
        if offset.dim() == 2:
            offset = offset[-positions.shape[0] :]
        return positions - offset[..., None]


def refuse_packed(positions: Tensor | None) -> None:
    """Refuse a prefill without attention mask whose sequence index restarts within a row: several sequences packed
    into one row (padding-free), which transformers then keeps apart by masking. vtprune cuts, scores and renumbers
    one sequence per row, so it would silently mix them. The sequence index is the 2-D `position_ids` or, for M-RoPE,
    the first of 4 rows (a 3-row M-RoPE tensor carries none; transformers packs nothing then)."""
    if positions is None or positions.dim() > 3 or (positions.dim() == 3 and positions.shape[0] != 4):
        return
    index = positions[0] if positions.dim() == 3 else positions.reshape(-1, positions.shape[-1])
    if index.shape[-1] > 1 and bool((index.diff(dim=-1) != 1).any()):
        raise VTPruneError(
            "position_ids restart within a row and no attention_mask was given (several sequences packed into one "
            "row, padding-free); vtprune prunes one sequence per row: pass each sequence as its own row, padded, "
            "with an attention_mask"
        )


def is_static(cache: Any) -> bool:
    """Whether `cache` has preallocated layers of a fixed length (transformers' StaticCache)."""
    return bool(getattr(cache, "is_compileable", False))


def padding_mask(mask: Any, cache: Any, embeds: Tensor, past: int) -> Tensor | None:
    """[B, past + q] the caller's 2-D padding mask of a call with a static cache.

    generate() turns its 2-D mask into the model's prepared 4-D mask (or a dict of them per layer type) when the cache
    is static; the mask's last query row sees every key up to that query, so it holds the 2-D mask over the keys the
    cache offers: logical positions `offset ..` (offset: the entries the first layer's cuts dropped, which the cutter
    rebuilds from its segment). None or a 2-D mask passes through.
    """
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if mask is None or (isinstance(mask, Tensor) and mask.dim() == 2):
        return mask
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        raise VTPruneError(f"vtprune needs a 2-D or 4-D tensor attention mask, got {type(mask).__name__}")
    batch, query = embeds.shape[:2]
    offset = cache.get_mask_sizes(query, 0)[1]
    last = mask[:, 0, -1, : past + query - offset]
    visible = last if last.dtype == torch.bool else last == 0  # eager masks: 0 where a key is seen
    head = torch.zeros(visible.shape[0], offset, dtype=torch.bool, device=visible.device)
    return torch.cat([head, visible], dim=1).long().expand(batch, -1)
