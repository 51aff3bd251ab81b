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


# ------------------------- the method's stage V on the OneVision adapter's own layout, against the official outputs
REFERENCE = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "reference" / "vflowopt_anyres"


def onevision_384():
    """A LLaVA-OneVision-shaped model at the release's geometry (SigLIP 384 px, 27 x 27 patches of 14, pinpoints
    (1x1)..(6x6) x 384, anyres_max_9), tiny widths: only its packing (the layout) is used."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=8, intermediate_size=16,
                                num_hidden_layers=1, num_attention_heads=2)
    text = Qwen2Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)
    pins = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=99, video_token_index=98,
                                  image_grid_pinpoints=pins, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    return LlavaOnevisionForConditionalGeneration(config).eval()


@pytest.mark.parametrize("name", ["anyres_768x576_2x2", "anyres_576x900_tall_keep50", "anyres_768x576_row_ends_pruned"])
def test_stage_v_on_the_adapter_layout_is_the_release(name):
    """The official maps placed through the OneVision adapter's layout (view / view_patch of every token) and the
    method's stage V: the release's packed map, kept set, recycled positions and features (1e-5) and order.
    (anyres_1536x1100_downsized is left out: there the layout maps a token to its nearest source patch, where the
    release resizes the map bilinearly, so the maps differ by up to 0.05; the pure `anyres_importance` follows the
    release, test_vflowopt.py.)"""
    from types import SimpleNamespace

    from vtprune.adapters.anyres import Encoded
    from vtprune.adapters.llava_onevision import LlavaOnevisionAdapter
    from vtprune.core import SiteContext
    from vtprune.core.layout import VisualLayout, VisualSpan
    from vtprune.methods.vflowopt import token_importance

    ref = torch.load(REFERENCE / f"{name}.pt")
    tiles_high, tiles_wide = ref["tiles_hw"].tolist()
    adapter = LlavaOnevisionAdapter(onevision_384())
    call = Encoded("image", [1 + tiles_high * tiles_wide], ref["image_size_hw"][None], "anyres_max_9")
    spans, start = [], 0
    for t in adapter.image_templates(call, 0)[0]:
        spans.append(VisualSpan(image=0, start=start, patch_index=t.patch_index, grid=t.grid, kind=t.kind,
                                view=t.view, view_patch=t.view_patch))
        start += t.length
    layout = VisualLayout(spans=[spans], seq_len=start)
    maps = ref["maps"].float()
    torch.testing.assert_close(token_importance(layout, 0, maps, 27), ref["packed_map"], atol=1e-7, rtol=0)
    method = vtprune.make("vflowopt", vit_keep=float(ref["vit_keep"]), cell=float(ref["cell"]), llm_keep1=1.0,
                          llm_keep2=1.0)
    method.image_importance = lambda ctx: (maps, [])
    info = SimpleNamespace(llm_layers=28, vision_has_cls=False)
    plan = method.plan(SiteContext(site="pre_llm", layout=layout, signals={}, info=info))
    kept = plan.keep[0]
    assert torch.equal(kept, ref["kept"])
    packed = ref["packed_features"]
    output = packed[kept].clone()
    rank = {slot: i for i, slot in enumerate(kept.tolist())}
    for merge in plan.merges[0]:
        output[rank[merge.slot]] = (merge.weights[:, None] * packed[merge.sources]).sum(dim=0)
    changed = (output != packed[kept]).any(dim=1).nonzero().squeeze(1)
    assert torch.equal(changed, ref["recycled"])
    torch.testing.assert_close(output[changed], ref["recycled_features"], atol=1e-5, rtol=0)
