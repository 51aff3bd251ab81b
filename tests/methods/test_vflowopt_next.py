"""VFlowOpt on the LLaVA-NeXT family: stage V on anyres images (base view and tile mosaic together) and on videos
(frames' maps pooled like their features, one top share per video) through the adapters, against the rules that
tests/methods/test_vflowopt.py checks against the official code's outputs; the released presets on OneVision."""

from __future__ import annotations

import sys

import pytest
import torch

import vtprune
from tests.helpers import capture_llm_input
from tests.helpers_video import (
    IMAGE,
    build_tiny_llava_next,
    build_tiny_next_video,
    build_tiny_onevision,
    media_batch,
)
from vtprune.methods.vflowopt import (
    PRESETS,
    anyres_cells,
    anyres_importance,
    pool_frame_maps,
    relevance,
    stage_v,
    video_importance,
    video_keep,
)

STAGE_V_ONLY = dict(vit_keep=0.5, cell=2.0, threshold=1.0, llm_keep1=1.0, llm_keep2=1.0)


def eager_maps(build, model, pixels, layer, has_cls, threshold=1.0):
    """[inputs, patches] context relevance of every encoder input, from an eager copy's attention maps."""
    eager = build(attn="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attentions = eager.model.vision_tower(pixels, output_attentions=True).attentions[layer].mean(dim=1)
    return torch.stack([relevance(a, threshold, has_cls)[0] for a in attentions])


@pytest.mark.parametrize(
    "build, images, layer, has_cls, side, max_tiles",
    [
        (build_tiny_llava_next, [[(32, 48)], [(64, 64)]], 1, True, 4, None),
        (build_tiny_onevision, [[(40, 70)], [(90, 60)]], 2, False, 5, 9),  # SigLIP, anyres_max_9
    ],
)
def test_anyres_stage_v_is_the_release_rule_on_the_packed_image(build, images, layer, has_cls, side, max_tiles):
    """Per image: base map, then the tiles' maps as one unpadded mosaic with row ends at 1 (`anyres_importance`),
    one stage V over both (`anyres_cells`); the LLM receives the kept packed features, each recycled token the
    importance-weighted mean of its group at its top member's slot."""
    model = build()
    batch = media_batch(model, images)
    pixels_per_side = model.config.vision_config.image_size
    seen, trace = capture_llm_input(model, batch, vtprune.make("vflowopt", **STAGE_V_ONLY))
    modeling = sys.modules[type(model.model).__module__]
    views = [int(modeling.image_size_to_num_patches(s, model.config.image_grid_pinpoints, pixels_per_side)) for s in batch["image_sizes"]]
    pixels = torch.cat([pv[:n] for pv, n in zip(batch["pixel_values"], views)])
    maps = eager_maps(build, model, pixels, layer, has_cls)  # the layer feeding the projector
    with torch.no_grad():
        inner = model.model
        extra = {"batch_num_images": batch["batch_num_images"]} if "batch_num_images" in batch else {}
        packed = inner.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], **extra
        ).pooler_output
        embeds = inner.get_input_embeddings()(batch["input_ids"])
    sites = [s for s in trace.forwards[0].sites if s.site == "pre_llm"]
    first_view, recycled = 0, 0
    for b, size in enumerate(batch["image_sizes"].tolist()):
        tiles = modeling.get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, pixels_per_side)
        tile_maps = maps[first_view + 1 : first_view + views[b]]
        scores, mosaic = anyres_importance(maps[first_view], tile_maps, tuple(tiles), side, tuple(size), max_tiles)
        first_view += views[b]
        torch.testing.assert_close(sites[b].scores, scores, atol=1e-5, rtol=0)
        kept, groups = stage_v(scores, anyres_cells(side, mosaic), 0.5, 2.0)
        assert torch.equal(sites[b].kept, kept)
        values = packed[b][kept].clone()
        rank = {slot: i for i, slot in enumerate(kept.tolist())}
        for slot, members, weights in groups:
            values[rank[slot]] = (weights[:, None] * packed[b][members]).sum(dim=0)
        recycled += len(groups)
        real = batch["attention_mask"][b].bool()
        is_image = batch["input_ids"][b] == IMAGE
        text_before = int((real & ~is_image).nonzero()[0]), int(is_image.nonzero()[0])
        expected = torch.cat([embeds[b, text_before[0] : text_before[1]], values, embeds[b, int(is_image.nonzero()[-1]) + 1 :]])
        torch.testing.assert_close(seen["embeds"][b, -expected.shape[0] :], expected, atol=1e-5, rtol=0)
        assert int(seen["mask"][b].sum()) == expected.shape[0]
    assert recycled > 0


@pytest.mark.parametrize(
    "build, layer, has_cls, side, pooling, newline",
    [(build_tiny_onevision, 2, False, 5, "bilinear", True), (build_tiny_next_video, 1, True, 4, "average", False)],
)
def test_video_stage_v_keeps_the_top_share_of_each_video_jointly(build, layer, has_cls, side, pooling, newline):
    model = build()
    batch = media_batch(model, [[], []], [[3], [3]])
    seen, trace = capture_llm_input(model, batch, vtprune.make("vflowopt", **STAGE_V_ONLY))
    maps = eager_maps(build, model, batch["pixel_values_videos"].flatten(0, 1), layer, has_cls)
    pooled = pool_frame_maps(maps, side, mode=pooling)  # as the model pools the frames' features
    sites = [s for s in trace.forwards[0].sites if s.site == "pre_llm"]
    for b in range(2):
        scores = video_importance(pooled[3 * b : 3 * b + 3], newline=newline)
        torch.testing.assert_close(sites[b].scores, scores, atol=1e-5, rtol=0)
        kept = video_keep(scores, 0.5)
        assert torch.equal(sites[b].kept, kept) and not sites[b].merged  # no recycling on videos
        per_frame = torch.bincount(kept[kept < 3 * pooled.shape[1]] // pooled.shape[1], minlength=3)
        assert int(per_frame.sum()) == round(scores.numel() * 0.5) - int(newline)
    assert [after for _, after in trace.visual_tokens()] == [sites[0].kept.numel()] * 2


def test_onevision_multi_image_views_keep_their_top_patches_and_newline():
    model = build_tiny_onevision()
    batch = media_batch(model, [[(40, 70), (30, 30)], [(50, 50)]])
    with torch.no_grad(), vtprune.make("vflowopt", **STAGE_V_ONLY)(model) as trace:
        model(**batch)
    layout, site = trace.forwards[0].layout, trace.forwards[0].sites[0]
    assert [s.kind for s in layout.spans[0]] == ["image", "image"] and not site.merged
    offset = 0
    for span in layout.spans[0]:  # 25 patches and a newline each: keep 25 - round(12.5) = 13 + the newline
        mine = site.kept[(site.kept >= offset) & (site.kept < offset + span.length)] - offset
        assert mine.numel() == 13 + 1 and int(mine[-1]) == span.length - 1
        top = torch.topk(site.scores[offset : offset + 25], 13).indices
        assert set(mine[:-1].tolist()) == set(top.tolist())
        offset += span.length


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_released_presets_run_on_onevision_images_and_videos(preset):
    model = build_tiny_onevision()
    batch = media_batch(model, [[(50, 90)], []], [[2], [2]])
    method = vtprune.make("vflowopt", preset=preset)
    assert method.vit_keep == PRESETS[preset]["vit_keep"]
    with torch.no_grad(), method(model) as trace:
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 2)
    record = trace.forwards[0]
    stage = [s for s in record.sites if s.site == "pre_llm"]
    for b, site in enumerate(stage):
        n = record.layout.num_visual(b)
        assert site.visual_after < n  # stage V pruned (recycled tokens come back on top of the kept share)
        assert site.visual_after >= n - round(n * (1 - method.vit_keep)) - int(n / method.cell**2)
