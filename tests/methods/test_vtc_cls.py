"""VTC-CLS: scores from recomputed [CLS] rows equal eager attention; the kept set is the pure function's top-k."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.helpers import build_tiny_llava
from vtprune.core import ModelInfo, top_k
from vtprune.methods.vtc_cls import vtc_cls_scores

LLAVA15 = ModelInfo(family="llava", llm_layers=32, vision_layers=24, vision_feature_layer=22, vision_has_cls=True)


@pytest.mark.parametrize(
    "start_layer, layers",
    [(None, list(range(16, 23))), (16, list(range(16, 23))), (22, [22]), (-2, [22]), (0, list(range(23))), (-5, [19, 20, 21, 22])],
)
def test_ensemble_layers_follow_the_official_slice(start_layer, layers):
    """`attentions[start_layer:-1]` on LLaVA-1.5's 24-layer tower: never the last layer."""
    assert vtprune.make("vtc-cls", start_layer=start_layer).layers(LLAVA15) == layers


@pytest.mark.parametrize("start_layer", [23, -1])
def test_empty_ensemble_is_refused(start_layer):
    with pytest.raises(vtprune.VTPruneError, match="selects no encoder layer"):
        vtprune.make("vtc-cls", start_layer=start_layer).layers(LLAVA15)


def eager_scores(batch, start_layer):
    """The official computation: eager attention maps, [CLS] row, head mean, sum over the ensemble layers."""
    eager = build_tiny_llava(seed=0, attn="eager")
    assert eager.model.vision_tower.config._attn_implementation == "eager"
    with torch.no_grad():
        attentions = eager.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    feature_layer = len(attentions) - 2  # LLaVA's vision_feature_layer=-2
    rows = torch.stack([attentions[l][:, :, 0, 1:] for l in range(start_layer, feature_layer + 1)], dim=1)
    return vtc_cls_scores(rows)  # [images, patches]


def test_scores_equal_eager_attention_while_model_runs_sdpa(tiny_llava, batch):
    assert tiny_llava.model.vision_tower.config._attn_implementation == "sdpa"
    with torch.no_grad(), vtprune.make("vtc-cls", keep=5, start_layer=0)(tiny_llava) as trace:
        tiny_llava(**batch)
    expected = eager_scores(batch, start_layer=0)
    sites = trace.forwards[0].sites
    torch.testing.assert_close(sites[0].scores, expected[0], atol=1e-5, rtol=0)  # sample 0: image 0
    torch.testing.assert_close(sites[1].scores, expected[1:].flatten(), atol=1e-5, rtol=0)  # sample 1: images 1, 2


@pytest.mark.parametrize("keep", [1, 5, 0.25])
def test_kept_set_is_the_top_k_of_each_image(tiny_llava, batch, keep):
    with torch.no_grad(), vtprune.make("vtc-cls", keep=keep, start_layer=1)(tiny_llava) as trace:
        tiny_llava(**batch)
    expected = eager_scores(batch, start_layer=1)
    k = keep if isinstance(keep, int) else round(keep * 16)
    kept = [row["kept_indices"] for row in trace.summary()]
    assert kept[0] == top_k(expected[0], k).tolist()
    assert kept[1] == top_k(expected[1], k).tolist() + (top_k(expected[2], k) + 16).tolist()


def test_scores_sum_over_layers_of_head_means():
    cls = torch.rand(2, 3, 4, 10)  # images, layers, heads, patches
    assert torch.allclose(vtc_cls_scores(cls), cls.mean(2).sum(1))
