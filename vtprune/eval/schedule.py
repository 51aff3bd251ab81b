"""The schedule bound of a method: what its cuts alone cost.

The model runs the vision encoder, then its decoder layers one by one on hidden states whose length before each layer
is the length the method left there (read from its trace), cut with one `index_select` of indices fixed in advance.
No signal, no score, no hook, no re-padding: the time a method would take if deciding what to keep were free. A method
that cuts only before the language model has the free-cut bound as its schedule; one that cuts inside it (FastV,
PyramidDrop) has a schedule bound above the free cut, because the layers before its cuts see every token; a method
that leaves the prefill whole (a KV-cache site) has the dense prefill as its schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache


IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "image_sizes")
VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw")


def media_inputs(inputs: dict) -> dict:
    """The inputs of a prompt that feed the vision encoder (images and videos)."""
    return {k: v for k, v in inputs.items() if k in IMAGE_INPUTS + VIDEO_INPUTS}


def encode_media(model: Any, media: dict) -> None:
    """Run `model`'s vision encoder on a prompt's images and videos (`media_inputs`), as its forward does."""
    images = {k: v for k, v in media.items() if k in IMAGE_INPUTS}
    videos = {k: v for k, v in media.items() if k in VIDEO_INPUTS}
    if images:
        model.get_image_features(**images)
    if videos:
        model.get_video_features(**videos)


def layer_lengths(prompt: int, visual_before: int, visual_per_layer: list[int]) -> list[int]:
    """Sequence length entering each decoder layer of a batch-1 prompt: its text plus the visual tokens there."""
    return [prompt - visual_before + n for n in visual_per_layer]


def schedule_forward(
    model: Any, vision_inputs: dict, lengths: list[int], batch: int = 1
) -> Callable[[], tuple[Tensor, Any]]:
    """A function running `model`'s vision encoder, then its decoder layers at `lengths` (one per layer, never
    growing) on `batch` samples, then the LM head on the last row: the schedule bound of a method whose trace gave
    `lengths`. It returns (last-row logits [batch, 1, V], the cache) and keeps its random input in `run.hidden`
    ([batch, lengths[0], D])."""
    if any(b > a for a, b in pairwise(lengths)):
        raise ValueError(f"layer lengths must not grow: {lengths}")
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    layers = decoder.layers[: decoder.config.num_hidden_layers]
    if len(lengths) != len(layers):
        raise ValueError(f"{len(lengths)} lengths for {len(layers)} decoder layers")
    parameter = next(decoder.parameters())
    hidden0 = torch.randn(batch, lengths[0], decoder.config.hidden_size, device=parameter.device,
                          dtype=parameter.dtype)
    # rows kept before each layer that shortens the sequence: evenly spread over what the previous layer saw
    cuts = {
        i: torch.linspace(0, lengths[i - 1] - 1, lengths[i], device=parameter.device).round().long()
        for i in range(1, len(lengths))
        if lengths[i] < lengths[i - 1]
    }

    def run() -> tuple[Tensor, Any]:
        with torch.no_grad():
            encode_media(model, vision_inputs)
            hidden, cache = hidden0, DynamicCache(config=decoder.config)
            positions = torch.arange(lengths[0], device=hidden.device)[None]
            rotary = decoder.rotary_emb(hidden, position_ids=positions)
            for i, layer in enumerate(layers):
                if i in cuts:
                    hidden, positions = hidden.index_select(1, cuts[i]), positions.index_select(1, cuts[i])
                    rotary = decoder.rotary_emb(hidden, position_ids=positions)
                # no mask: SDPA runs causal, as an unpadded prefill does (padding costs the same either way)
                hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions,
                               cache=cache, use_cache=True)
            return head(decoder.norm(hidden[:, -1:])), cache

    run.hidden = hidden0
    return run
