"""Signals read at one decoder layer during prefill, each recomputed from the layer's own norm, projections and RoPE
(never from attention weights the model returns): `QueryAttention`, `LayerKeys`, `FinalNormHidden` at the layer's
input before a cut made there; `ReceivedAttention` on the sequence the layer runs on, after that cut."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...core.attention import received_attention
from ...core.errors import VTPruneError
from ...core.layout import VisualLayout
from ...core.signals import FinalNormHidden, KeyStates, LayerKeys, QueryAttention, ReceivedAttention
from .qk import QUERY_KINDS, project, query_attention, query_rows, rotate, sample_rows

BEFORE_CUT = (QueryAttention, LayerKeys, FinalNormHidden)
AFTER_CUT = (ReceivedAttention,)
LLM_SIGNALS = frozenset(BEFORE_CUT + AFTER_CUT)  # what every decoder adapter offers through the cutter


def plan_requests(requests: list[Any], cuts: list[int], n_layers: int) -> tuple[dict[int, list], dict[int, list]]:
    """Per layer, the requests read before and after the cut there; refuses requests no cut can use."""
    before: dict[int, list] = {}
    after: dict[int, list] = {}
    last = cuts[-1] if cuts else None
    for request in requests:
        name = type(request).__name__
        if not 0 <= request.layer < n_layers:
            raise VTPruneError(f"{name} at layer {request.layer}: the model has layers 0..{n_layers - 1}")
        if isinstance(request, QueryAttention) and request.queries not in QUERY_KINDS:
            raise VTPruneError(f"QueryAttention queries={request.queries!r}: use one of {', '.join(QUERY_KINDS)}")
        if isinstance(request, ReceivedAttention) and request.queries not in ("all", "text"):
            raise VTPruneError(f"ReceivedAttention queries={request.queries!r}: use 'all' or 'text'")
        if isinstance(request, AFTER_CUT):
            if last is None or request.layer >= last:
                raise VTPruneError(
                    f"{name} at layer {request.layer}: a cut must follow it (the last cut sits before layer {last})"
                )
            after.setdefault(request.layer, []).append(request)
        elif isinstance(request, BEFORE_CUT):
            if last is not None and request.layer > last:
                raise VTPruneError(f"{name} at layer {request.layer} comes after the last cut (before layer {last})")
            before.setdefault(request.layer, []).append(request)
    return before, after


def compute(request: Any, layer: nn.Module, lm: nn.Module, hidden: Tensor, rope: tuple[Tensor, Tensor],
            mask2d: Tensor, layout: VisualLayout) -> Any:
    """The value of one request at `layer`, from the hidden states entering it [B, L, D] and their RoPE tables."""
    with torch.no_grad():
        if isinstance(request, QueryAttention):
            rows = [query_rows(layout, b, mask2d, request.queries) for b in range(hidden.shape[0])]
            return query_attention(layer, hidden, rope, mask2d, rows)
        if isinstance(request, FinalNormHidden):
            return lm.norm(hidden)
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        cos, sin = rope
        if isinstance(request, LayerKeys):
            keys = rotate(attn, project(attn, attn.k_proj, x, "k_norm"), cos, sin)  # [B, H_kv, L, d]
            return KeyStates(keys=keys, mask=mask2d.bool())
        return _received(attn, x, cos, sin, mask2d, layout, request)


def _received(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask2d: Tensor, layout: VisualLayout,
              request: ReceivedAttention) -> list[Tensor]:
    """[L] per sample: attention each key receives from the request's query rows, summed over heads and rows."""
    out = []
    for b in range(x.shape[0]):
        valid = mask2d[b].bool()
        kind = "text" if request.queries == "text" else None
        rows = query_rows(layout, b, mask2d, kind).to(valid.device) if kind else valid.nonzero()[:, 0]
        cos_b, sin_b = sample_rows(cos, b), sample_rows(sin, b)
        q = rotate(attn, project(attn, attn.q_proj, x[b : b + 1], "q_norm"), cos_b, sin_b)
        k = rotate(attn, project(attn, attn.k_proj, x[b : b + 1], "k_norm"), cos_b, sin_b)
        out.append(received_attention(q[:, :, rows], k, attn.scaling, valid[None], rows[None])[0])
    return out
