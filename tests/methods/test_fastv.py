"""FastV: last-token attention of layer K-1 (recomputed from q/k with RoPE) equals eager attention; per-sample top-k."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.helpers import build_tiny_llava
from vtprune.core import top_k
from vtprune.methods.fastv import fastv_scores


def eager_last_row(batch, layer):
    """Layer `layer`'s attention of the last token, from an eager run of the same model."""
    eager = build_tiny_llava(seed=0, attn="eager")
    with torch.no_grad():
        out = eager(**batch, output_attentions=True)
    return out.attentions[layer][:, :, -1]  # [B, heads, L]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_kept_set_uses_layer_before_the_cut(tiny_llava, batch, cut):
    with torch.no_grad(), vtprune.make("fastv", keep=3, layer=cut)(tiny_llava) as trace:
        tiny_llava(**batch)
    rows = eager_last_row(batch, cut - 1)
    for b, site in enumerate(trace.forwards[0].sites):
        image_positions = (batch["input_ids"][b] == 99).nonzero().squeeze(1)
        expected = fastv_scores(rows[b], image_positions)
        torch.testing.assert_close(site.scores, expected, atol=1e-5, rtol=0)
        chosen = torch.cat([top_k(expected[s : s + 16], 3) + s for s in range(0, len(expected), 16)])
        assert site.kept.tolist() == chosen.tolist()


def test_scope_sample_ranks_all_images_of_a_sample_together(tiny_llava, batch):
    with torch.no_grad(), vtprune.make("fastv", keep=3, layer=2, scope="sample")(tiny_llava) as trace:
        tiny_llava(**batch)
    sample1 = trace.forwards[0].sites[1]
    assert sample1.visual_after == 6  # 3 per image, chosen over both images jointly
    assert sample1.kept.tolist() == top_k(sample1.scores, 6).tolist()


def test_invalid_options_are_refused():
    with pytest.raises(vtprune.VTPruneError, match="K must be >= 1"):
        vtprune.make("fastv", layer=0)
    with pytest.raises(vtprune.VTPruneError, match="scope"):
        vtprune.make("fastv", scope="batch")
