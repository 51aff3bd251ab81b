"""Adapter for transformers' Gemma 3 (`Gemma3ForConditionalGeneration`: a SigLIP tower, an average-pooling
projector, a Gemma 3 language model with sliding-window and global layers).

Visual tokens. SigLIP encodes each image at its fixed size (896 px, 14 px patches: 64 × 64 patches); the projector
average-pools them to a square grid of tokens (`mm_tokens_per_image`, 16 × 16 = 256; the grid is read off the
pooling), row-major. In the prompt an image is one run of `<image_soft_token>`s between `<start_of_image>` and
`<end_of_image>`. Pan and scan (the processor's
`do_pan_and_scan`) adds crops of a wide or tall image: the original first, then each crop, every one its own encoder
input and its own run between its own `<start_of_image>` / `<end_of_image>`, with text around them. From the model's
inputs a crop cannot be told from an image, so every run is an image here: one span per encoder input (`image` =
`view` = its row of `pixel_values`, prompt order, row-major over the batch), grid (side, side), `kind` "image". A
budget (`scope="image"`) therefore applies to the original and to every crop on its own.

Bidirectional image attention. Gemma 3 lets the tokens of one image attend to each other in both directions
(`token_type_ids` == 1 marks them; each run of 1s is a block), on top of the causal mask: global layers OR(causal,
block), sliding layers AND(window, OR(causal, block)). The model builds these masks before its language model; inside
a session the cutter builds them on the sequence the layers run on, with the model's own mask functions
(`create_masks_for_vision_model`) and the caller's `token_type_ids` gathered like the tokens (the positions each slot
holds after the cuts): the kept tokens of an image still form one block and attend to each other both ways, while
the window of a sliding layer counts the tokens kept. Without `token_type_ids` (generate()'s decoding steps, or a
caller who gives none) the masks are causal, as in the model.

Sliding-window layers. Their cache layers become `PrunedLayer`s like the global layers' (see `decoder/cache.py`): they
keep every entry rather than the last window, and their sliding-window mask limits each query to the window, so they
attend to what transformers' sliding layer keeps; the cache of those layers then grows with the sequence. A
StaticCache (its sliding layers preallocate the window) is refused.

Positions: 1-D RoPE as in LLaVA ("renumber" before the LLM, "original" inside it), each layer with its kind's RoPE
(Gemma 3's local and global bases). Sites: `pre_llm`, `llm_layer`, `kv_cache`. Not `llm_attention`: ZipVL's
sparse attention is causal among the important tokens and would drop the image blocks and the windows.
Signals: the language model's (`QueryAttention` and the other q/k-derived signals, `PrefillKV`, `Transitions`). They
are computed causal over every key, without the window or the image blocks (our interpretation at sliding layers; the
rows of text queries, which most methods read, are causal in the model too apart from the window). SigLIP has no
[CLS] token; no vision-tower signal is offered.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.adapter import Adapter, register_adapter
from ..core.errors import VTPruneError
from ..core.layout import VisualLayout, VisualSpan
from ..core.signals import ModelInfo, PrefillKV, Transitions
from .common import (
    cache_argument,
    call_arguments,
    continues_cache,
    media_in_call,
    placeholder_mask,
    token_runs,
    transformers_classes,
)
from .decoder import LLM_SIGNALS, DecoderCutter
from .decoder.cutter import is_static
from .vision import encoder_layers

if TYPE_CHECKING:
    from ..core.method import Method
    from ..core.trace import Trace


class Gemma3Cutter(DecoderCutter):
    """DecoderCutter for Gemma 3: masks per layer kind with the image blocks, RoPE per layer kind."""

    def __init__(self, adapter: "Gemma3Adapter", language_model: nn.Module) -> None:
        super().__init__(adapter, language_model)
        self.modeling = sys.modules[type(language_model).__module__]  # the model's own mask functions
        self.token_types: Tensor | None = None  # [B, L] the prefill's token_type_ids as the caller gave them

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Gemma3Model hands its language model masks it prepared (a dict per layer kind); the cutter starts from the
        caller's 2-D padding mask instead and, at prefill, prepares the masks on the cut sequence."""
        call = self.adapter.take_call()
        if isinstance(kwargs.get("attention_mask"), dict) and not is_static(cache_argument(kwargs)):
            kwargs = dict(kwargs, attention_mask=call.get("attention_mask"))
        self.token_types = types = call.get("token_type_ids")
        embeds = kwargs.get("inputs_embeds")
        if types is not None and embeds is not None:  # (the model itself refuses types of another batch)
            # as the model reads them: missing entries at the end are text, entries past the sequence are never read
            length = embeds.shape[1]
            self.token_types = F.pad(types, (0, max(length - types.shape[1], 0)))[:, :length]
        out = super()._on_language_model(module, args, kwargs)
        if self.prefill is None or self.token_types is None or out is None:
            return out
        args, kwargs = out
        kwargs["attention_mask"] = self._masks(kwargs["inputs_embeds"], kwargs["attention_mask"],
                                               kwargs["position_ids"])
        return args, kwargs

    def _blocks(self, device: torch.device) -> Tensor:
        """[B, L'] the model's image block ids (-1 at text) of the current sequence: token_type_ids gathered through
        the cuts made so far (a padding slot a cut added is text)."""
        types = self.token_types.to(device)
        source = self.prefill.source
        if source is not None:
            source = source.to(device)
            types = types.gather(1, source.clamp(min=0)).masked_fill(source < 0, 0)
        return self.modeling.get_block_sequence_ids_for_mask(types, device=device)

    def _masks(self, hidden: Tensor, mask2d: Tensor, positions: Tensor, cache: Any = None) -> dict[str, Any]:
        """{"full_attention": ..., "sliding_attention": ...}: the model's masks with image blocks on this sequence."""
        return self.modeling.create_masks_for_vision_model(
            config=self.lm.config, inputs_embeds=hidden, attention_mask=mask2d, cache=cache, position_ids=positions,
            block_sequence_ids=self._blocks(hidden.device),
        )

    def _layer_mask(self, hidden: Tensor, mask2d: Tensor, cache: Any, positions: Tensor | None, layer: int) -> Any:
        if self.prefill is None or self.token_types is None:  # decoding: text queries, causal as in the model
            return super()._layer_mask(hidden, mask2d, cache, positions, layer)
        return self._masks(hidden, mask2d, positions, cache)[self.layer_type(layer)]

    def rotary(self, hidden: Tensor, positions: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        return self.lm.rotary_emb(hidden, positions, self.layer_type(layer))

    def _reset(self) -> None:
        super()._reset()
        self.token_types = None


@register_adapter
class Gemma3Adapter(Adapter):
    family = "gemma3"
    sites = frozenset({"pre_llm", "llm_layer", "kv_cache"})
    signals = frozenset({PrefillKV, Transitions}) | LLM_SIGNALS

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, transformers_classes("Gemma3ForConditionalGeneration"))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.inner = model.model
        self.language_model = self.inner.language_model
        self.image_token_id = config.image_token_id
        projector = self.inner.multi_modal_projector
        self.side = projector.patches_per_image // projector.kernel_size  # the side of its average pooling's output
        vision = config.vision_config
        depth = len(encoder_layers(self.inner.vision_tower))
        self._info = ModelInfo(
            family=self.family,
            llm_layers=len(self.language_model.layers),
            vision_layers=depth,
            vision_feature_layer=depth - 1,  # the projector reads the tower's last hidden state
            vision_has_cls=False,
            patch_size=vision.patch_size * projector.kernel_size,  # pixels per token side
        )
        self.cutter = Gemma3Cutter(self, self.language_model)
        self._layout: VisualLayout | None = None
        self._call: dict[str, Any] = {}

    @property
    def info(self) -> ModelInfo:
        return self._info

    def attach(self, method: Method, trace: Trace) -> None:
        self.hook(self.inner, self._on_model)
        self.cutter.attach(method, trace, method.requests(self.info))
        self.on_detach(self._forget)

    def _forget(self) -> None:
        self._layout, self._call = None, {}

    def vision_signals(self, layout: VisualLayout) -> dict[Any, Any]:
        return {}

    # ------------------------------------------------------------------------------------------- the call
    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = call_arguments(module.forward, args, kwargs)
        self._call = {key: arguments.get(key) for key in ("attention_mask", "token_type_ids")}
        if continues_cache(arguments):
            self._layout, self._call["token_type_ids"] = None, None  # decoding: no image block (as generate() does)
            return
        present = "image" in media_in_call(arguments)  # image tokens without pixels are text to the model
        self._layout = self.layout(placeholder_mask(self.inner, arguments, self.image_token_id, present))

    def take_call(self) -> dict[str, Any]:
        """The 2-D attention mask and token_type_ids of the model call now reaching the language model."""
        call, self._call = self._call, {}
        return call

    def take_layout(self, batch: int, length: int) -> VisualLayout:
        layout, self._layout = self._layout, None
        if layout is None or layout.seq_len != length or layout.batch_size != batch:
            raise VTPruneError("vtprune could not match the language model input to the prompt's image tokens")
        return layout

    def layout(self, is_image: Tensor) -> VisualLayout:
        """One span per image ([B, L] bool image tokens): a run of image tokens is one or more whole images."""
        per_image = self.side * self.side
        patch_index = torch.arange(per_image)
        spans, image = [], 0
        for row in is_image:
            sample = []
            for start, end in token_runs(row):
                if (end - start) % per_image:
                    raise VTPruneError(
                        f"a run of {end - start} image tokens is not a whole number of images of {per_image} tokens"
                    )
                for first in range(start, end, per_image):
                    sample.append(VisualSpan(image=image, start=first, patch_index=patch_index,
                                             grid=(self.side, self.side)))
                    image += 1
            spans.append(sample)
        return VisualLayout(spans=spans, seq_len=is_image.shape[1])
