"""LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video adapters: keep-all exactness (prefill and every decoding step,
batch 2 with padding) for every method, the layout against the model's own features, frames, budgets, refusals."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.adapters.test_llava import KEEP_ALL, generate
from tests.helpers import hooks_of
from tests.helpers_video import build_tiny_llava_next, build_tiny_next_video, build_tiny_onevision, media_batch

BUILDERS = {"next": build_tiny_llava_next, "onevision": build_tiny_onevision, "next_video": build_tiny_next_video}
NOT_ON_ANYRES = {  # methods these adapters refuse, and why
    "vispruner": "reads its [CLS] attention and features by image number: no tiles, no frames yet",
    "hiprune": "the official LLaVA-NeXT path uses a layout without unpadding or row ends: no tiles, no frames",
    "tome": "merges one encoder input per image before the projector: no tiles, no frames yet",
}
# grids differ here: pool keeps every cell with a ratio
KEEP_EVERY_TOKEN = {
    **{k: v for k, v in KEEP_ALL.items() if k not in NOT_ON_ANYRES},
    "pool": dict(keep=1.0),
    "scope": dict(keep=1.0, features="projected"),  # its official features (ProjectorInput) are LLaVA-1.5 only
    "vflowopt": dict(keep=1.0),
    "visionzip": dict(keep=1.0),  # every view (tile, frame) keeps all its patches: nothing merged
}
NEEDS_CLS = {"vtc-cls", "scope", "holov", "visionzip"}  # refused on towers without [CLS] (OneVision's SigLIP)
CASES = {  # name -> (model, images per sample (height, width), frames of the videos per sample)
    "next-wide-and-tall": ("next", [[(32, 48)], [(60, 40), (64, 64)]], None),
    "next-other-sizes": ("next", [[(20, 90), (50, 50)], [(33, 31)]], None),
    "onevision-images": ("onevision", [[(40, 70)], [(60, 40), (64, 64)]], None),
    "onevision-video": ("onevision", [[], []], [[3], [3]]),
    "onevision-image-and-video": ("onevision", [[(50, 90)], []], [[2], [2]]),
    "next_video-image-and-video": ("next_video", [[(32, 48)], []], [[2], [2]]),
}


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in BUILDERS.items()}


def supports(model, name):
    return name not in NEEDS_CLS or vtprune.core.adapter_for(model)(model).info.vision_has_cls


@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_all_reproduces_dense_logits(models, case):
    kind, images, videos = CASES[case]
    model = models[kind]
    batch = media_batch(model, images, videos)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        dense_logits = model(**batch).logits
        dense_sequences, dense_steps = generate(model, batch, steps=3)
        for name in sorted(KEEP_EVERY_TOKEN):
            if not supports(model, name):
                continue
            with vtprune.make(name, **KEEP_EVERY_TOKEN[name])(model) as trace:
                logits = model(**batch).logits
                sequences, steps = generate(model, batch, steps=3)
            torch.testing.assert_close(logits[real], dense_logits[real], atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(steps, dense_steps, atol=1e-5, rtol=0, msg=name)
            assert torch.equal(sequences, dense_sequences), name
            assert all(before == after for before, after in trace.visual_tokens()), name


def projected_views(model, pixel_values):
    """[views, patches, D]: every encoder input's projected patch features, computed by hand."""
    config = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return model.model.multi_modal_projector(hidden)


@pytest.mark.parametrize("case", ["next-wide-and-tall", "next-other-sizes", "onevision-images"])
def test_layout_maps_every_token_to_the_feature_it_carries(models, case):
    """Base, tiles and row ends: the model's packed image features equal the projected feature of the token's
    (view, view_patch), and row ends equal image_newline."""
    kind, images, _ = CASES[case]
    model = models[kind]
    batch = media_batch(model, images)
    with torch.no_grad(), vtprune.make("random", keep=1.0)(model) as trace:
        model(**batch)
        layout = trace.forwards[0].layout
        views = torch.cat([
            pv[:n] for pv, n in zip(batch["pixel_values"], [int(v) for v in views_per_image(model, batch)])
        ])
        features = projected_views(model, views)
        embeds = model.model.get_input_embeddings()(batch["input_ids"])
        packed = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
            **({"batch_num_images": batch["batch_num_images"]} if "batch_num_images" in batch else {}),
        ).pooler_output
        embeds = embeds.masked_scatter((batch["input_ids"] == 99)[..., None], torch.cat(packed))
    checked = 0
    for b, spans in enumerate(layout.spans):
        for span in spans:
            tokens = embeds[b, span.start : span.end]
            patch = span.patch_index >= 0
            torch.testing.assert_close(tokens[patch], features[span.view[patch], span.view_patch[patch]])
            torch.testing.assert_close(tokens[~patch], model.model.image_newline.expand(int((~patch).sum()), -1))
            if span.kind == "tiles":
                rows, cols = span.grid
                assert int((~patch).sum()) == rows and span.length == rows * (cols + 1)  # one row end per row
            checked += span.length
    assert checked == int((batch["input_ids"] == 99).sum())


def views_per_image(model, batch):
    adapter = vtprune.core.adapter_for(model)(model)
    return adapter.views_per_image(batch["image_sizes"], batch.get("batch_num_images"))


def test_onevision_downsized_mosaic_keeps_structure():
    """OneVision shrinks a large tile mosaic (anyres_max_1 here): the layout follows the model's token count."""
    model = build_tiny_onevision()
    model.config.vision_aspect_ratio = "anyres_max_1"
    batch = media_batch(model, [[(80, 80)], [(40, 80)]])
    with torch.no_grad(), vtprune.make("random", keep=3)(model) as trace:
        model(**batch)
    spans = trace.forwards[0].layout.spans
    tiles = [s for sample in spans for s in sample if s.kind == "tiles"]
    assert [t.grid for t in tiles] == [(5, 5), (3, 7)]  # 10×10 and 5×10 mosaics shrunk by sqrt(area / 25)
    assert all(int((t.patch_index < 0).sum()) == t.grid[0] for t in tiles)
    assert [after for _, after in trace.visual_tokens()] == [3 + 5, 3 + 3]  # 3 patches per image + row ends


@pytest.mark.parametrize("kind, per_frame, newline", [("onevision", 9, True), ("next_video", 4, False)])
def test_video_frames_are_spans_on_the_pooled_grid(models, kind, per_frame, newline):
    model = models[kind]
    batch = media_batch(model, [[], []], [[3], [3]])
    with torch.no_grad(), vtprune.make("random", keep=2)(model) as trace:
        model(**batch)
    layout = trace.forwards[0].layout
    for b, spans in enumerate(layout.spans):
        assert [s.kind for s in spans] == ["frame"] * 3 and {s.video for s in spans} == {b}
        assert [s.length for s in spans] == [per_frame] * 2 + [per_frame + newline]
        assert spans[1].start == spans[0].end and spans[2].start == spans[1].end
    assert [after for _, after in trace.visual_tokens()] == [2 * 3 + newline] * 2


def eager_cls_rows(model, pixel_values, start_layer):
    """vtc-cls scores from an eager copy's attention maps: [CLS] row, head mean, summed over the layers."""
    eager = build_tiny_next_video(attn="eager")
    eager.load_state_dict(model.state_dict())
    attentions = eager.model.vision_tower(pixel_values, output_attentions=True).attentions
    feature_layer = len(attentions) - 2
    return sum(attentions[l][:, :, 0, 1:].float().mean(1) for l in range(start_layer, feature_layer + 1))


def test_vtc_cls_per_frame_scores_are_pooled_cls_attention(models):
    """NeXT-Video: each frame's [CLS] scores pooled 2×2 like its features; keep=1 keeps each frame's best cell."""
    model = models["next_video"]
    batch = media_batch(model, [[], []], [[3], [3]])
    with torch.no_grad(), vtprune.make("vtc-cls", keep=1, start_layer=0)(model) as trace:
        model(**batch)
        frames = batch["pixel_values_videos"].flatten(0, 1)
        expected = torch.nn.functional.avg_pool2d(eager_cls_rows(model, frames, 0).view(-1, 1, 4, 4), 2).flatten(1)
    for b, site in enumerate(trace.forwards[0].sites):
        torch.testing.assert_close(site.scores, expected[3 * b : 3 * b + 3].flatten(), atol=1e-5, rtol=0)
        assert site.kept.tolist() == [4 * f + int(expected[3 * b + f].argmax()) for f in range(3)]


def test_vtc_cls_scope_video_moves_budget_between_frames(models):
    model = models["next_video"]
    batch = media_batch(model, [[], []], [[3], [3]])
    with torch.no_grad(), vtprune.make("vtc-cls", keep=2, start_layer=0, scope="video")(model) as trace:
        model(**batch)
    for site in trace.forwards[0].sites:
        assert site.kept.numel() == 6  # 2 per frame × 3 frames, shared by the video
        assert site.kept.tolist() == torch.sort(torch.topk(site.scores, 6).indices).values.tolist()


def test_scope_tile_keeps_the_budget_in_every_encoder_input(models):
    """FasterVLM's rule on LLaVA-NeXT: keep K in the base view and in every tile, plus every row end."""
    model = models["next"]
    batch = media_batch(model, [[(32, 48)], [(64, 64)]])
    with torch.no_grad(), vtprune.make("vtc-cls", keep=2, start_layer=0, scope="tile")(model) as trace:
        model(**batch)
    record = trace.forwards[0]
    for b, spans in enumerate(record.layout.spans):
        views = torch.cat([s.view for s in spans])
        kept = record.sites[b].kept
        per_view = torch.bincount(views[kept][views[kept] >= 0])
        assert per_view[per_view > 0].tolist() == [2] * len(views[views >= 0].unique())
        assert int((views[kept] < 0).sum()) == int((views < 0).sum())  # row ends all kept


def test_vtc_cls_is_refused_on_a_tower_without_cls(models):
    model = models["onevision"]
    hooks = hooks_of(model)
    with pytest.raises(vtprune.VTPruneError, match=r"vtc-cls needs a vision encoder with a \[CLS\] token; the llava_onevision"):
        with vtprune.make("vtc-cls", keep=4)(model):
            pass
    assert hooks_of(model) == hooks
    assert "get_image_features" not in vars(model.model)


@pytest.mark.parametrize("name", sorted(NOT_ON_ANYRES))
def test_methods_without_tiles_or_frames_are_refused(models, name):
    model = models["next"]
    batch = media_batch(model, [[(32, 48)], [(64, 64)]])
    options = {"hiprune": {"object_layer": 0}}.get(name, {})  # its default layer 8 is beyond the tiny tower
    with pytest.raises(vtprune.VTPruneError, match=f"{name} runs on single-grid images"):
        with torch.no_grad(), vtprune.make(name, **options)(model):
            model(**batch)


def test_onevision_offers_no_projector_input(models):
    """OneVision pools frames and downsizes mosaics after its projector: encoder-space merges are refused up front
    (here VisionZip on a CLIP tower, LongVA-like, which has a [CLS])."""
    model = build_tiny_onevision(tower="clip")
    hooks = hooks_of(model)
    with pytest.raises(vtprune.UnsupportedSignalError, match="method 'visionzip' needs the signal ProjectorInput"):
        with vtprune.make("visionzip", keep=4)(model):
            pass
    assert hooks_of(model) == hooks


def test_detach_removes_the_encoder_wrappers(models):
    model = models["onevision"]
    original = type(model.model)
    with vtprune.make("random", keep=2)(model):
        assert type(model.model) is not original and "get_video_features" in vars(type(model.model))
    assert type(model.model) is original
    assert "get_video_features" not in vars(model.model) and "get_image_features" not in vars(model.model)


def test_visionzip_without_encoder_merges_is_refused_on_anyres_layouts(models):
    """merge_space="projected" needs no ProjectorInput, so the adapter accepts it; the plan refuses tiles whose tokens
    it cannot build from the sequence (dominant patches that unpadding removed, every tile's [CLS])."""
    model = models["next"]
    batch = media_batch(model, [[(32, 48)], [(64, 64)]])
    method = vtprune.make("visionzip", keep=4, contextual=1, cls_token=False, merge_space="projected")
    with pytest.raises(vtprune.VTPruneError, match="use merge_space='encoder'"):
        with torch.no_grad(), method(model):
            model(**batch)