"""Adapter for open_clip ViT towers: drop patch tokens inside the encoder, after a chosen block (as ToMe does for ViTs).

Accepts an open_clip `VisionTransformer`, or an open_clip model holding one as `.visual` (`CLIP`, `CustomTextCLIP`,
`CoCa`): only that tower is touched. Each image is one sample with one span of visual tokens, its patches in row-major
order on the tower's patch grid; [CLS] (token 0) is no visual token and is always kept.

Site `encoder`: after block k (the method's `encoder_blocks`) the method's merges are applied and the sequence is
compacted to [CLS] + the K kept tokens, so blocks k+1.., the final norm, the pooling and the projection run on 1 + K
tokens. `pool_type="avg"` then averages the kept tokens, and `output_tokens=True` returns only them. Every image of a
batch must keep the same number of tokens (methods with per-image budgets do).
Signals: `ClsAttention`, each block's [CLS] row recomputed from its `attn.in_proj_weight` / `in_proj_bias` (the blocks
keep calling nn.MultiheadAttention without weights); after a cut, patches no longer present get 0. `VisionKeys`, the
block's keys averaged over heads, for the tokens present at that block ([CLS] first, then the current tokens in
sequence order). `PixelValues`.
Proportional attention: when a cut's plan gives `sizes` (ToMe), every later block's attention adds log(size) of each
key to its logits, through nn.MultiheadAttention's additive float `attn_mask` (still SDPA, no weights formed).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.adapter import Adapter, register_adapter
from ..core.attention import attention_rows
from ..core.errors import UnsupportedModelError, VTPruneError
from ..core.layout import VisualLayout, VisualSpan
from ..core.method import SiteContext
from ..core.cut import compile_cut
from ..core.signals import ClsAttention, ModelInfo, PixelValues, VisionKeys
from ..core.trace import ForwardRecord, site_records
from ..kernels import apply_cut
from .common import kwarg

if TYPE_CHECKING:
    from ..core.method import Method
    from ..core.trace import Trace


def vision_transformer(model: nn.Module) -> nn.Module | None:
    """The open_clip `VisionTransformer` that is `model` or its `.visual`; None if there is none."""
    if "open_clip" not in sys.modules:  # no open_clip model can exist; importing it would only cost time
        return None
    from open_clip.transformer import VisionTransformer

    tower = model if isinstance(model, VisionTransformer) else getattr(model, "visual", None)
    return tower if isinstance(tower, VisionTransformer) else None


def cls_rows(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """[N, heads, T-1]: the [CLS] query's softmax row over all T keys, [CLS] column dropped after the softmax.

    x: [N, T, D] the attention's input (the block's `ln_1` output), batch first. Uses the packed in-projection and
    nn.MultiheadAttention's scaling, head_dim ** -0.5.
    """
    n, t, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    q_bias, k_bias = (None, None) if bias is None else (bias[:width], bias[width : 2 * width])
    query = F.linear(x[:, :1], weight[:width], q_bias).view(n, 1, heads, head_dim).transpose(1, 2)  # [N, H, 1, d]
    keys = F.linear(x, weight[width : 2 * width], k_bias).view(n, t, heads, head_dim).transpose(1, 2)  # [N, H, T, d]
    return attention_rows(query, keys, head_dim**-0.5)[:, :, 0, 1:]


def mean_keys(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """[N, T, head_dim]: the keys of x [N, T, D] (the block's `ln_1` output) from the packed in-projection, bias
    included, averaged over heads, float32."""
    n, t, width = x.shape
    heads = attn.num_heads
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[width : 2 * width]
    keys = F.linear(x, attn.in_proj_weight[width : 2 * width], bias)
    return keys.float().view(n, t, heads, width // heads).mean(dim=2)


def size_bias(sizes: Tensor, heads: int, length: int) -> Tensor:
    """[N * heads, length, T] float: log(size) of every key, the additive mask of proportional attention.
    sizes: [N, T] tokens each current token stands for ([CLS] included, size 1)."""
    n, t = sizes.shape
    return sizes.log()[:, None, None, :].expand(n, heads, length, t).reshape(n * heads, length, t)


@dataclass
class TowerForward:
    """One forward of the tower: its trace record and the tokens present as it runs."""

    record: ForwardRecord
    layout: VisualLayout  # one sample per image; [CLS] at position 0 is no visual token
    patch_index: Tensor  # [N, T-1] patch of each current non-[CLS] token
    rows: dict[int, Tensor] = field(default_factory=dict)  # block -> [N, heads, patches] [CLS] attention
    keys: dict[int, Tensor] = field(default_factory=dict)  # block -> [N, T, head_dim] head-mean keys
    sizes: Tensor | None = None  # [N, T] proportional attention: original tokens per current token; None: plain
    values: dict[Any, Any] = field(default_factory=dict)  # PixelValues
    method_state: dict[str, Any] = field(default_factory=dict)
    stage: int = 0


@register_adapter
class OpenClipAdapter(Adapter):
    family = "open_clip"
    sites = frozenset({"encoder"})
    signals = frozenset({ClsAttention, PixelValues, VisionKeys})

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return vision_transformer(model) is not None or type(model).__module__.startswith("open_clip.")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        tower = vision_transformer(model)
        if tower is None:
            found = type(getattr(model, "visual", model)).__name__
            raise UnsupportedModelError(
                f"the open_clip model's vision tower is a {found}; vtprune prunes open_clip VisionTransformer towers"
            )
        self.tower = tower
        self.blocks: nn.ModuleList = tower.transformer.resblocks
        for index, block in enumerate(self.blocks):
            attn = getattr(block, "attn", None)
            if not isinstance(attn, nn.MultiheadAttention) or not hasattr(block, "ln_1"):
                raise UnsupportedModelError(
                    f"block {index} of the open_clip tower is a {type(block).__name__}; vtprune handles the default "
                    "ResidualAttentionBlock (ln_1 + nn.MultiheadAttention), not custom attention blocks"
                )
            if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
                raise UnsupportedModelError(
                    f"block {index}'s attention has separate q/k/v widths, bias_k/bias_v or add_zero_attn, which "
                    "vtprune's [CLS] attention does not reproduce"
                )
        self.grid = tuple(tower.grid_size)
        n_blocks = len(self.blocks)
        self._info = ModelInfo(
            family=self.family,
            llm_layers=0,
            vision_layers=n_blocks,
            vision_feature_layer=n_blocks - 1,  # the last block's output is pooled into the embedding
            vision_has_cls=True,
            patch_size=tower.patch_size[0],
        )
        self.state: TowerForward | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    # ----------------------------------------------------------------------------------------------- attaching
    def attach(self, method: "Method", trace: "Trace") -> None:
        self.method, self.trace, self.state, self.tail_sizes = method, trace, None, None
        n = len(self.blocks)
        self.cuts = method.encoder_blocks(self.info)
        if not self.cuts:
            raise VTPruneError(f"method {method.name!r} cuts at the encoder site but names no encoder block to cut after")
        if self.cuts != sorted(set(self.cuts)) or not all(0 <= b < n - 1 for b in self.cuts):
            raise VTPruneError(
                f"method {method.name!r} gave encoder blocks {self.cuts}; they must be ascending, unique and in "
                f"0..{n - 2} (a cut sits between two of the {n} blocks)"
            )
        requests = method.requests(self.info)
        self.cls_requests = [r for r in requests if isinstance(r, ClsAttention)]
        self.want_pixels = any(isinstance(r, PixelValues) for r in requests)
        self.key_blocks = {r.layer % n for r in requests if isinstance(r, VisionKeys) and -n <= r.layer < n}
        self.cls_blocks = {layer % n for r in self.cls_requests for layer in r.layers if -n <= layer < n}
        wanted = set()
        layers = [(type(r).__name__, r.layer) for r in requests if isinstance(r, VisionKeys)]
        layers += [(type(r).__name__, layer) for r in self.cls_requests for layer in r.layers]
        for what, layer in layers:
            if not -n <= layer < n:
                raise VTPruneError(f"{what} at block {layer}: the tower has blocks 0..{n - 1}")
            if layer % n > self.cuts[-1]:
                raise VTPruneError(f"{what} at block {layer} comes after the last cut (after block {self.cuts[-1]})")
            wanted.add(layer % n)
        self.hook(self.tower.conv1, self._on_tower_start)  # first module of forward and forward_intermediates
        for index in range(n):  # every block: [CLS] rows, keys, and the proportional-attention mask after a cut
            self.hook(self.blocks[index].attn, self._capture(index, index in wanted))
        for index in self.cuts:
            self.hook(self.blocks[index], self._cut_hook(index), pre=False)
        self.hook(self.blocks[n - 1], self._end_of_blocks, pre=False)
        self.on_detach(self._reset)

    def _reset(self) -> None:
        self.state, self.tail_sizes = None, None

    def _end_of_blocks(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.tail_sizes = None

    @property
    def batch_first(self) -> bool:
        return getattr(self.tower.transformer, "batch_first", True)

    # -------------------------------------------------------------------------------------------------- hooks
    def _on_tower_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pixels = kwarg(args, kwargs, "input", 0)
        patches = self.grid[0] * self.grid[1]
        patch_index = torch.arange(patches)
        spans = [[VisualSpan(image=i, start=1, patch_index=patch_index, grid=self.grid)] for i in range(pixels.shape[0])]
        layout = VisualLayout(spans=spans, seq_len=1 + patches)
        self.state = TowerForward(ForwardRecord(layout=layout), layout, patch_index.expand(pixels.shape[0], -1))
        self.tail_sizes = None
        self.trace.forwards.append(self.state.record)
        if self.want_pixels:
            self.state.values[PixelValues()] = pixels.detach()

    def _capture(self, index: int, wanted: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            x = kwarg(args, kwargs, "query", 0)
            x = x if module.batch_first else x.transpose(0, 1)  # [N, T, D]
            if self.state is None and not wanted:  # after the last cut (or outside the tower): only the sizes
                sizes = self.tail_sizes
                if sizes is None or sizes.shape[1] != x.shape[1]:
                    return None
                return self._with_sizes(index, args, kwargs, sizes, module, x)
            state = self._current(f"block {index}")
            self._check_length(x, state, f"block {index}")
            if wanted:
                with torch.no_grad():
                    if index in self.cls_blocks:
                        rows = cls_rows(module, x)  # [N, H, T-1]
                        full = rows.new_zeros(*rows.shape[:2], self.grid[0] * self.grid[1])
                        index_map = state.patch_index.to(rows.device)[:, None, :].expand_as(rows)
                        state.rows[index] = full.scatter_(2, index_map, rows)
                    if index in self.key_blocks:
                        state.keys[index] = mean_keys(module, x)
            return None if state.sizes is None else self._with_sizes(index, args, kwargs, state.sizes, module, x)

        return hook

    def _with_sizes(self, index: int, args: tuple, kwargs: dict, sizes: Tensor, attn: nn.Module, x: Tensor) -> tuple:
        """The attention call's arguments with proportional attention: log(size) of every key as an additive mask."""
        if kwargs.get("attn_mask") is not None:
            raise VTPruneError(f"block {index} of the open_clip tower was given an attention mask; proportional "
                               "attention (ToMe) adds its own and cannot combine the two")
        bias = size_bias(sizes.to(x.device), attn.num_heads, x.shape[1]).to(x.dtype)
        return args, {**kwargs, "attn_mask": bias}

    def _current(self, where: str) -> TowerForward:
        if self.state is None:
            raise VTPruneError(
                f"{where} of the open_clip tower ran without the tower's patch embedding (conv1) before it; run the "
                "whole tower (model.encode_image or model.visual) inside the `with` block"
            )
        return self.state

    def _check_length(self, x: Tensor, state: TowerForward, where: str) -> None:
        if x.shape[1] != state.layout.seq_len:
            raise VTPruneError(
                f"{where} ran on {x.shape[1]} tokens per image where vtprune expected {state.layout.seq_len} "
                "([CLS] + patches); is patch dropout active (training mode), or the image a different size?"
            )

    def _signals(self, block: int) -> dict[Any, Any]:
        """The signals available at a cut after `block`: pixels and every ClsAttention request run so far."""
        state, n = self.state, len(self.blocks)
        values = dict(state.values)
        for layer in state.keys:
            values[VisionKeys(layer=layer)] = state.keys[layer]  # a request's layer is resolved at attach
        for request in self.cls_requests:
            layers = [layer % n for layer in request.layers]
            if max(layers) <= block:
                values[request] = torch.stack([state.rows[layer] for layer in layers], dim=1)  # [N, L, H, P]
        return values

    def _cut_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            x = output if self.batch_first else output.transpose(0, 1)  # [N, T, D]
            x = self._cut(index, x)
            if index == self.cuts[-1]:  # the forward's record stays in the trace; later blocks need only the sizes
                self.tail_sizes, self.state = self.state.sizes, None
            return x if self.batch_first else x.transpose(0, 1)

        return hook

    # ------------------------------------------------------------------------------------------------ the cut
    def _cut(self, block: int, x: Tensor) -> Tensor:
        """Plan with the method after `block`, merge, and compact x [N, T, D] to [CLS] + the kept tokens."""
        state = self._current(f"block {block}")
        layout = state.layout
        self._check_length(x, state, f"the cut after block {block}")
        ctx = SiteContext(
            site="encoder", layout=layout, signals=self._signals(block), info=self.info, hidden_states=x,
            layer=block, stage=state.stage, state=state.method_state,
        )
        state.stage += 1
        with torch.no_grad():
            plan = self.method.plan(ctx)
        cut = compile_cut(plan, layout)  # per image: [CLS] and the kept visual tokens, ascending
        state.record.sites.extend(site_records(ctx, plan))
        lengths = sorted({len(k) - 1 for k in cut.keep})
        if len(lengths) > 1:
            raise VTPruneError(
                f"method {self.method.name!r} kept {lengths[0]}..{lengths[-1]} tokens in different images of one batch; "
                "a cut inside the open_clip encoder needs the same count for every image"
            )
        x, _, _ = apply_cut(cut, x)
        state.sizes = None
        if plan.sizes is not None:  # [CLS] stands for itself; the plan's sizes follow the new sequence order
            sizes = torch.stack([torch.cat([torch.ones(1), s.float().cpu()]) for s in plan.sizes])
            state.sizes = sizes if bool((sizes != 1).any()) else None  # all ones: plain attention, exactly dense
        state.layout = cut.layout
        state.patch_index = torch.stack([spans[0].patch_index for spans in state.layout.spans])
        return x
