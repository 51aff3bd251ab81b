"""The pruned cache layers' bookkeeping under assisted decoding's crop (vtprune/adapters/decoder/cache.py)."""

from __future__ import annotations

import torch

from vtprune.adapters.decoder.cache import PrunedLayer, Segment


def filled_layers(prompt_length: int = 10, kept: int = 6, decoded: int = 2) -> list[PrunedLayer]:
    """Two layers of one segment: `kept` of the prompt's entries, then `decoded` tokens."""
    segment = Segment(0, torch.ones(1, kept, dtype=torch.long), None, torch.zeros(1, dtype=torch.long), prompt_length)
    layers = [PrunedLayer(segment, first=True), PrunedLayer(segment, first=False)]
    for layer in layers:
        entries = torch.randn(1, 2, kept + decoded, 4)
        layer.update(entries, entries.clone())
    return layers


def test_a_crop_of_decoded_tokens_leaves_the_segment():
    layers = filled_layers()
    for layer in layers:
        layer.crop(-2)
    assert [layer.stored for layer in layers] == [6, 6]
    assert layers[0].segment.prompt_length == 10 and layers[0].segment.mask2d.shape == (1, 6)
    assert [layer.get_seq_length() for layer in layers] == [10, 10]


def test_a_crop_into_the_prompt_shortens_the_shared_segment_once():
    layers = filled_layers()
    for layer in layers:  # the prefill verified candidates as its last tokens; 3 of them are rejected, 2 decoded
        layer.crop(-5)
    segment = layers[0].segment
    assert [layer.stored for layer in layers] == [3, 3]
    assert segment.prompt_length == 7 and segment.mask2d.shape == (1, 3)  # shortened by 3, not by 3 per layer
    assert [layer.get_seq_length() for layer in layers] == [7, 7]
    assert [layer.get_mask_sizes(1) for layer in layers] == [(4, 4), (4, 4)]  # 4 prompt entries still dropped
