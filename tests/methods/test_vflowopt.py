"""VFlowOpt: importance map, stage-V recycling, LLM stages at original positions, entropy modes, budgets, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from tests.helpers import build_tiny_llava, capture_llm_input
from vtprune.core import ModelInfo
from vtprune.methods.vflowopt import (
    PRESETS,
    RELEASED_DEPTH,
    RELEASED_LAYERS,
    anyres_cells,
    anyres_importance,
    budget_share,
    default_llm_layers,
    derived_llm_keep2,
    importance,
    pack_tiles,
    patch_entropy,
    pool_frame_maps,
    quantize_pixels,
    relevance,
    stage_v,
    video_importance,
    video_keep,
)

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "vflowopt_anyres"  # see its README.md
ANYRES_CASES = ["anyres_768x576_2x2", "anyres_576x900_tall_keep50", "anyres_1536x1100_downsized", "anyres_768x576_row_ends_pruned"]
SIDE = 27  # SigLIP-384 patch grid of LLaVA-OneVision

SIGLIP = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def eager_importance(batch, threshold):
    """Context relevance from an eager run: head-mean attention of the feature layer, global rows, patch columns."""
    eager = build_tiny_llava(seed=0, attn="eager")
    with torch.no_grad():
        attentions = eager.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    maps = []
    for attention in attentions[1].mean(dim=1):  # feature layer: hidden_states[-2] = output of layer 1 of 3
        received = attention.mean(dim=0)
        rows = attention[received > threshold * received.mean()]
        maps.append(rows.mean(dim=0)[1:])
    return torch.stack(maps)  # [images, 16]


def test_recycled_token_is_the_weighted_mean_of_its_group_at_its_top_slot(tiny_llava, batch):
    method = vtprune.make("vflowopt", vit_keep=0.5, cell=2.0, threshold=1.0, llm_keep1=1.0, llm_keep2=1.0)
    seen, trace = capture_llm_input(tiny_llava, batch, method)
    with torch.no_grad():
        features = torch.stack(list(tiny_llava.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
    scores = eager_importance(batch, threshold=1.0)
    stage_v = [s for s in trace.forwards[0].sites if s.site == "pre_llm"]
    checked = 0
    for site in stage_v:
        b = site.sample
        n_images = site.before.numel() // 16
        first_image = 0 if b == 0 else 1
        importance_b = scores[first_image : first_image + n_images].flatten()
        features_b = features[first_image : first_image + n_images].flatten(0, 1)
        # pruned: round(16 * 0.5) + int(16 / 2^2) = 12 lowest per image; one group per non-empty 2x2 cell
        kept_ordinary = set(site.kept.tolist()) - {m["slot"] for m in site.merged}
        for image in range(n_images):
            local = importance_b[16 * image : 16 * image + 16]
            expected_kept = set((torch.sort(local, descending=True, stable=True).indices[:4] + 16 * image).tolist())
            assert expected_kept == {k for k in kept_ordinary if 16 * image <= k < 16 * image + 16}
        real = seen["mask"][b].bool()
        embeds = seen["embeds"][b, real]
        text_before = {0: 3, 1: 2}[b]
        for merge in site.merged:
            sources = torch.tensor(merge["sources"])
            weights = importance_b[sources] / importance_b[sources].sum()
            torch.testing.assert_close(torch.tensor(merge["weights"]), weights, atol=1e-6, rtol=0)
            assert merge["slot"] == int(sources[importance_b[sources].argmax()])  # the top member's slot
            rows, cols = (sources % 16) // 4, sources % 4
            assert len(set(zip((rows // 2).tolist(), (cols // 2).tolist()))) == 1  # one 2x2 cell
            rank = sorted(site.kept.tolist()).index(merge["slot"])  # its place among the kept tokens
            gap = 1 if b == 1 and merge["slot"] >= 16 else 0  # the text token between sample 1's images
            value = embeds[text_before + rank + gap]
            torch.testing.assert_close(value, (weights[:, None] * features_b[sources]).sum(dim=0), atol=1e-5, rtol=0)
            checked += 1
    assert checked >= 3


def test_llm_stages_drop_the_lowest_importance_and_keep_original_positions(tiny_llava, batch):
    method = vtprune.make("vflowopt", vit_keep=1.0, threshold=1.0, llm_keep1=0.5, llm_keep2=0.5)
    assert method.cut_layers(ModelInfo(family="llava", llm_layers=4)) == [1, 3]
    scores = eager_importance(batch, threshold=1.0)
    layer_cos = []

    def hook(module, args, kwargs):
        layer_cos.append(kwargs["position_embeddings"][0].clone())

    lm = tiny_llava.model.language_model
    with torch.no_grad(), method(tiny_llava) as trace:
        handle = lm.layers[3].register_forward_pre_hook(hook, with_kwargs=True)
        tiny_llava(**batch)
        handle.remove()
    sites = trace.forwards[0].sites
    for site in sites:
        assert site.visual_after == site.visual_before // 2 if site.site == "llm_layer" else site.visual_before
    sample0 = [s for s in sites if s.sample == 0]
    l2_kept = sample0[2].kept
    expected = torch.sort(torch.sort(scores[0], descending=True, stable=True).indices[:4]).values
    assert l2_kept.tolist() == expected.tolist()  # L1 then L2 keep the top half, then the top quarter, by I
    # layer 3 sees sample 0's kept image tokens at their original positions: a plain forward numbers the padded
    # sequence 0..L-1, so sample 0's 3 text tokens before the image start after its 15 padding tokens
    pad = int((~batch["attention_mask"][0].bool()).sum())
    original_positions = pad + torch.cat([torch.arange(3), 3 + l2_kept, torch.arange(19, 22)])
    cos_expected, _ = lm.rotary_emb(torch.zeros(1), original_positions[None])
    torch.testing.assert_close(layer_cos[0][0, -original_positions.numel():], cos_expected[0])


def test_vision_attention_signal_equals_eager_attention(tiny_llava, batch):
    method = vtprune.make("vflowopt", vit_keep=1.0, threshold=1.0, llm_keep1=1.0, llm_keep2=1.0)
    _, trace = capture_llm_input(tiny_llava, batch, method)
    site = trace.forwards[0].sites[0]
    torch.testing.assert_close(site.scores, eager_importance(batch, threshold=1.0)[0], atol=1e-6, rtol=0)


def test_relevance_reads_the_rows_of_the_global_tokens():
    attention = torch.full((5, 5), 0.05)
    attention[:, 2] = 0.8  # token 2 receives most of the attention
    attention[2] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    c, empty = relevance(attention, threshold=2.0, has_cls=True)
    assert not empty
    torch.testing.assert_close(c, attention[2, 1:])
    c_empty, empty = relevance(attention, threshold=100.0, has_cls=False)  # nobody passes: the maximal-r tokens
    assert empty
    torch.testing.assert_close(c_empty, attention[2])


def test_empty_global_set_is_noted_in_the_trace(tiny_llava, batch):
    method = vtprune.make("vflowopt", threshold=1000.0, vit_keep=0.5, cell=2.0, llm_keep2=1.0)
    with torch.no_grad(), method(tiny_llava) as trace:
        tiny_llava(**batch)
    assert trace.forwards[0].sites[0].notes == {"empty_global_set": [0, 1, 2]}


def test_official_levels_wrap_like_the_release():
    v = torch.arange(256, dtype=torch.float32)
    x = ((v / 255 - 0.5) / 0.5).view(1, 1, 1, 256).expand(1, 3, 1, 256)  # SigLIP-normalised
    levels = quantize_pixels(x, "official", *SIGLIP)
    assert levels[0, 0, 0].tolist() == ((2 * v + 1) % 256).long().tolist()  # spec §3.2, checked for all values
    mean, std = torch.tensor(CLIP[0])[:, None, None], torch.tensor(CLIP[1])[:, None, None]
    clip_x = ((v.view(1, 1, 256) / 255 - mean) / std)[None]
    assert torch.equal(quantize_pixels(clip_x, "raw", *CLIP)[0, :, 0], v.long().expand(3, 256))


def test_patch_entropy_in_bits():
    levels = torch.zeros(1, 3, 8, 16, dtype=torch.long)  # two 8x8 patches
    levels[:, :, :4, :8] = 200  # patch 0: two gray levels, half each
    levels[:, :, :, 8:] = torch.arange(64).view(8, 8)  # patch 1: 64 distinct levels
    entropy = patch_entropy(levels, patch=8)
    torch.testing.assert_close(entropy, torch.tensor([[1.0, 6.0]]), atol=1e-5, rtol=0)
    assert float(patch_entropy(torch.full((1, 3, 8, 8), 7), patch=8)) == pytest.approx(0.0, abs=1e-6)


def test_entropy_weight_zero_makes_entropy_irrelevant(tiny_llava, batch):
    c = torch.rand(16)
    assert torch.equal(importance(c, torch.rand(16), 0.0), c)
    assert not any(isinstance(r, vtprune.core.PixelValues) for r in vtprune.make("vflowopt").requests(ModelInfo("llava", 4)))
    runs = {}
    for mode in ("raw", "official"):
        method = vtprune.make("vflowopt", threshold=1.0, alpha_v=0.5, entropy_mode=mode, vit_keep=1.0, llm_keep2=1.0)
        with torch.no_grad(), method(tiny_llava) as trace:
            tiny_llava(**batch)
        runs[mode] = trace.forwards[0].sites[0].scores
    assert not torch.allclose(runs["raw"], runs["official"])  # the modes differ on CLIP-normalised pixels


def test_budget_equation_reproduces_the_released_configs():
    released_r2 = {"keep10": 0.6011, "keep25": 0.8773258179532721, "keep50": 0.487}
    for name, preset in PRESETS.items():
        r2 = derived_llm_keep2(preset["budget"], preset["vit_keep"], preset["llm_keep1"], RELEASED_DEPTH, RELEASED_LAYERS)
        assert r2 == pytest.approx(released_r2[name], abs=1e-9)
    assert [round(p["budget"], 4) for p in PRESETS.values()] == [0.1, 0.2507, 0.5008]
    method = vtprune.make("vflowopt", preset="keep25")  # on 32-layer LLaVA-1.5: same budget over a 9/9/14 split
    info = ModelInfo(family="llava", llm_layers=32)
    r1, r2 = method.stage_keeps(info)
    assert budget_share(method.vit_keep, r1, r2, 32, (9, 18)) == pytest.approx(PRESETS["keep25"]["budget"])


@pytest.mark.parametrize("depth, layers", [(28, (9, 18)), (32, (9, 18)), (16, (5, 10)), (4, (1, 3))])
def test_llm_layers_follow_the_depth(depth, layers):
    assert default_llm_layers(depth) == layers


def test_presets_and_bad_options():
    assert vtprune.make("vflowopt", preset="keep10").threshold == pytest.approx(39.26492840997221)
    with pytest.raises(vtprune.VTPruneError, match="neither a preset of 'vflowopt'.*keep10, keep25, keep50"):
        vtprune.make("vflowopt", preset="keep5")
    with pytest.raises(vtprune.VTPruneError, match="a budget to derive it"):
        vtprune.make("vflowopt", budget=None)
    with pytest.raises(vtprune.VTPruneError, match="entropy_mode"):
        vtprune.make("vflowopt", entropy_mode="clean")


def test_negative_importance_in_a_cell_is_refused(tiny_llava, batch):
    with pytest.raises(vtprune.VTPruneError, match="importances sum to"):
        with torch.no_grad(), vtprune.make("vflowopt", alpha_v=-1.0, threshold=1.0, vit_keep=0.5, cell=2.0, llm_keep2=1.0)(tiny_llava):
            tiny_llava(**batch)


# ------------------------------------------- anyres and video rules against the official code's outputs (README)
def load_reference(name):
    return torch.load(REFERENCE / f"{name}.pt")


def reference_importance(ref):
    tiles, size = tuple(ref["tiles_hw"].tolist()), tuple(ref["image_size_hw"].tolist())
    return anyres_importance(ref["maps"][0], ref["maps"][1:], tiles, SIDE, size, max_tiles=9)


@pytest.mark.parametrize("name", ANYRES_CASES)
def test_anyres_map_and_features_are_laid_out_like_the_release(name):
    ref = load_reference(name)
    scores, mosaic = reference_importance(ref)
    torch.testing.assert_close(scores, ref["packed_map"], atol=1e-7, rtol=0)  # base, unpadded (resized) tiles, 1.0s
    tiles, size = tuple(ref["tiles_hw"].tolist()), tuple(ref["image_size_hw"].tolist())
    local = pack_tiles(ref["features"][1:], tiles, SIDE, size, max_tiles=9)
    assert tuple(local.shape[:2]) == mosaic
    row_ends = ref["newline"].expand(mosaic[0], 1, -1)
    features = torch.cat([ref["features"][0], torch.cat([local, row_ends], dim=1).flatten(0, 1)])
    torch.testing.assert_close(features, ref["packed_features"], atol=1e-6, rtol=0)  # maps travel like features


@pytest.mark.parametrize("name", ANYRES_CASES)
def test_anyres_stage_v_keeps_and_recycles_like_the_release(name):
    ref = load_reference(name)
    scores, mosaic = reference_importance(ref)
    kept, groups = stage_v(scores, anyres_cells(SIDE, mosaic), float(ref["vit_keep"]), float(ref["cell"]))
    assert torch.equal(kept, ref["kept"])  # the kept set, in the release's (original) sequence order
    output = ref["packed_features"][kept].clone()
    rank = {slot: i for i, slot in enumerate(kept.tolist())}
    for slot, members, weights in groups:
        output[rank[slot]] = (weights[:, None] * ref["packed_features"][members]).sum(dim=0)
    changed = (output != ref["packed_features"][kept]).any(dim=1).nonzero().squeeze(1)
    assert torch.equal(changed, ref["recycled"])  # recycled tokens sit where the release puts them
    torch.testing.assert_close(output[changed], ref["recycled_features"], atol=1e-5, rtol=0)
    assert any(slot >= SIDE * SIDE for slot, _, _ in groups) and any(slot < SIDE * SIDE for slot, _, _ in groups)


def test_anyres_cells_count_the_row_end_column_and_keep_base_and_tiles_apart():
    cells = anyres_cells(3, (2, 4))  # base 3x3, then 2 rows of 4 patches + a row end
    assert cells[:9, 0].tolist() == [0] * 9 and cells[9:, 0].tolist() == [1] * 10
    assert cells[9 + 4].tolist() == [1, 0, 4]  # first row end: column w = 4
    assert cells[9 + 5].tolist() == [1, 1, 0]  # the second row starts after it
    scores = torch.tensor([0.5] * 9 + [0.1, 0.2, 0.3, 0.4, 0.05, 0.6, 0.7, 0.8, 0.9, 1.0])
    kept, groups = stage_v(scores, cells, vit_keep=0.8, cell=5.0)  # prune round(19 * 0.2) + int(19 / 25) = 4
    # pruned: the 4 lowest (the row end at 0.05, then 0.1, 0.2, 0.3); one tiles cell: rows 0-1, cols 0-4
    assert [(slot, members.tolist()) for slot, members, _ in groups] == [(11, [9, 10, 11, 13])]
    torch.testing.assert_close(groups[0][2], torch.tensor([0.1, 0.2, 0.3, 0.05]) / 0.65)
    assert kept.tolist() == [i for i in range(19) if i not in (9, 10, 13)]


def test_video_maps_pooled_like_features_and_kept_jointly_like_the_release():
    ref = load_reference("video_4frames")
    pooled = pool_frame_maps(ref["maps"], SIDE, mode="bilinear")
    scores = video_importance(pooled, newline=True)
    torch.testing.assert_close(scores, ref["packed_map"], atol=1e-7, rtol=0)
    features = ref["features"]
    channels = [pool_frame_maps(features[..., c], SIDE, mode="bilinear") for c in range(features.shape[-1])]
    features = torch.cat([torch.stack(channels, dim=-1).flatten(0, 1), ref["newline"][None]])
    torch.testing.assert_close(features, ref["packed_features"], atol=1e-6, rtol=0)
    kept = video_keep(scores, float(ref["vit_keep"]))
    assert torch.equal(kept, ref["kept"])
    assert kept[-1] == scores.numel() - 1  # the newline (importance 1) survives
    frames = torch.bucketize(kept[:-1], torch.arange(1, 5) * 196, right=True)
    assert len(set(torch.bincount(frames, minlength=4).tolist())) > 1  # one top-k over all frames, not per frame


def test_frame_pooling_modes():
    maps = torch.arange(16.0).view(1, 16)
    assert pool_frame_maps(maps, 4, mode="average").tolist() == [[2.5, 4.5, 10.5, 12.5]]
    assert pool_frame_maps(maps, 4, mode="max").tolist() == [[5.0, 7.0, 13.0, 15.0]]
    with pytest.raises(vtprune.VTPruneError, match="frame pooling"):
        pool_frame_maps(maps, 4, mode="nearest")


def test_entropy_at_384_px_uses_stride_14_patches_like_the_release():
    ref = load_reference("entropy_384px")
    image = ref["small_uint8"].repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # [2, 3, 384, 384]
    pixels = (image.float() / 255 - 0.5) / 0.5  # SigLIP-normalised, 384 = 27 * 14 + 6
    entropy = patch_entropy(quantize_pixels(pixels, "official", *SIGLIP), patch=14)
    assert entropy.shape == (2, 729)
    torch.testing.assert_close(entropy, ref["entropy_official_fp16"], atol=1e-5, rtol=0)
    raw = patch_entropy(quantize_pixels(pixels, "raw", *SIGLIP), patch=14)
    torch.testing.assert_close(raw, ref["entropy_unit_range"], atol=1e-5, rtol=0)  # the release on [0, 1] pixels
    assert float(entropy[0, 0]) == 0.0 and entropy.max() > 3  # flat corner, busy elsewhere
