"""VisionZip: the language model receives exactly the official token sequence, merged before the projector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vtprune
from tests.helpers import build_tiny_llava, capture_llm_input
from vtprune.methods.visionzip import anyres_sequence, select_view

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "visionzip_anyres"  # see its README.md


def official_tokens(batch, dominant, contextual):
    """Per image, the official VisionZip output computed from an eager run, then projected: [images, D + C, D_llm]."""
    eager = build_tiny_llava(seed=0, attn="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
        layer = 1  # LLaVA's vision_feature_layer=-2 of a 3-layer tower: the output of layer 1
        attention, features = out.attentions[layer], out.hidden_states[layer + 1]  # [N, H, 17, 17], [N, 17, D]
        block = eager.model.vision_tower.encoder.layers[layer]
        keys = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[layer]))
        keys = keys.view(*keys.shape[:2], 2, -1).mean(dim=2)  # head mean
        images = []
        for a, x, k in zip(attention, features, keys):
            top = torch.topk(a[:, 0, 1:].sum(dim=0), dominant - 1).indices + 1
            chosen = torch.zeros(17, dtype=torch.bool)
            chosen[0], chosen[top] = True, True
            dominant_tokens = x[chosen]  # [CLS] first, then raster order
            remaining = (~chosen).nonzero().squeeze(1)
            step = max(1, len(remaining) // contextual)
            target_local = torch.arange(0, len(remaining), step)[:contextual]
            is_target = torch.zeros(len(remaining), dtype=torch.bool)
            is_target[target_local] = True
            normed = F.normalize(k[remaining], dim=-1)
            assign = (normed[~is_target] @ normed[is_target].T).argmax(dim=1)
            merged = []
            for j, t in enumerate(remaining[is_target]):
                members = x[remaining[~is_target][assign == j]]
                merged.append(x[t] + (members.mean(dim=0) if len(members) else 0))
            images.append(eager.model.multi_modal_projector(torch.cat([dominant_tokens, torch.stack(merged)])))
    return torch.stack(images)


def test_language_model_receives_the_official_sequence(tiny_llava, batch):
    seen, trace = capture_llm_input(tiny_llava, batch, vtprune.make("visionzip", keep=7, contextual=2))
    expected = official_tokens(batch, dominant=5, contextual=2)  # [3 images, 7, D]
    sample1 = seen["embeds"][1, seen["mask"][1].bool()]  # [BOS, 5, image 1 (7), 10, image 2 (7), 7, 11]
    torch.testing.assert_close(sample1[2:9], expected[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(sample1[10:17], expected[2], atol=1e-5, rtol=0)
    real = seen["mask"][0].bool()
    torch.testing.assert_close(seen["embeds"][0, real][3:10], expected[0], atol=1e-5, rtol=0)
    site = trace.forwards[0].sites[0]
    cls = [m for m in site.merged if m["encoder_tokens"] == [0]]
    assert len(cls) == 1 and cls[0]["sources"] == [-1]  # [CLS], no patch, carried by a merged patch's slot
    contextual = [m for m in site.merged if m["encoder_tokens"] != [0]]
    assert len(contextual) == 2 and all(m["slot"] == m["sources"][0] and m["weights"][0] == 1.0 for m in contextual)
    assert sum(len(m["sources"]) for m in contextual) == 16 - 4  # every non-dominant patch feeds a contextual token
    _, kept_map = trace.image_map(0)
    assert int(kept_map.sum()) == 4 + 2  # dominant patches and targets; the [CLS] carrier slot is no patch of it


def test_projected_merge_is_an_explicit_approximation(tiny_llava, batch):
    exact, _ = capture_llm_input(tiny_llava, batch, vtprune.make("visionzip", keep=6, contextual=2, cls_token=False))
    approx, _ = capture_llm_input(
        tiny_llava, batch, vtprune.make("visionzip", keep=6, contextual=2, cls_token=False, merge_space="projected")
    )
    real = exact["mask"][1].bool()  # sample 1's real tokens: [BOS, 5, image 1 (6), ...]
    same = torch.isclose(exact["embeds"][1, real], approx["embeds"][1, real], atol=1e-6).all(dim=-1)[2:8]
    assert same.tolist() == [True] * 4 + [False] * 2  # dominant tokens agree, merged ones differ (non-linear MLP)
    with pytest.raises(vtprune.VTPruneError, match="cannot carry \\[CLS\\]"):
        vtprune.make("visionzip", merge_space="projected")


def test_paper_split_and_budget_errors(tiny_llava, batch):
    assert [round(k * 10 / 64) for k in (64, 128, 192)] == [10, 20, 30]
    _, trace = capture_llm_input(tiny_llava, batch, vtprune.make("visionzip", keep=12))  # round(12 * 10/64) = 2 contextual
    assert sum(m["encoder_tokens"] != [0] for m in trace.forwards[0].sites[0].merged) == 2
    with pytest.raises(vtprune.VTPruneError, match="more than the 16 visual tokens"):
        capture_llm_input(tiny_llava, batch, vtprune.make("visionzip", keep=17))
    with pytest.raises(vtprune.VTPruneError, match="leaves no room"):
        capture_llm_input(tiny_llava, batch, vtprune.make("visionzip", keep=2, contextual=2))


# ----------------------------------------- LLaVA-NeXT anyres against the official code's outputs (see the README)
@pytest.mark.parametrize("name", ["next_2x2_d54_c10", "next_2wide_1high_d30_c6"])
def test_anyres_sequence_is_the_official_one(name):
    ref = torch.load(REFERENCE / f"{name}.pt")
    dominant, contextual = int(ref["dominant"]), int(ref["contextual"])
    tiles_wide, tiles_high = ref["tiles_wh"].tolist()
    selections = [
        select_view(attention.sum(dim=0), keys, dominant - 1, contextual)  # [CLS] is one of the dominant tokens
        for attention, keys in zip(ref["cls_attention"], ref["metric"])
    ]
    for (top, _, _), official in zip(selections, ref["keep_indices"]):
        assert torch.equal(top + 1, torch.sort(official[1:]).values)  # the dominant set of every view
    tokens = anyres_sequence(selections, (tiles_high, tiles_wide), side=24)
    values = torch.stack([(w[:, None] * ref["hidden"][view, sources]).sum(dim=0) for view, sources, w in tokens])
    assert values.shape == ref["output"].shape  # base: D + C; tiles: their dominant patches, [CLS]s, contextuals
    torch.testing.assert_close(values, ref["output"], atol=1e-5, rtol=0)  # values and their order
    base = dominant + contextual
    torch.testing.assert_close(values[:base], ref["per_view_output"][0], atol=1e-5, rtol=0)
    tiles = tiles_high * tiles_wide
    tile_views = [view for view, _, _ in tokens[base : base + tiles * (dominant - 1)]]
    assert tile_views != sorted(tile_views)  # the tiles' dominant patches interleave: mosaic raster order
    assert [view for view, _, _ in tokens[base + tiles * (dominant - 1) :][:tiles]] == list(range(1, tiles + 1))


def test_anyres_sequence_checks_the_tile_grid():
    selection = (torch.tensor([0]), torch.tensor([1]), [torch.tensor([2, 3])])
    with pytest.raises(vtprune.VTPruneError, match="3 tiles for a 2 x 2 tile grid"):
        anyres_sequence([selection] * 4, (2, 2), side=2)


# ------------------------------------- the method's plan on a LLaVA-NeXT layout, against the same official outputs
def anyres_layout(tiles_wide, tiles_high, side, cut_rows=0):
    """One sample, one anyres image as LLaVA-NeXT lays it out: the base view (view 0), then the tile mosaic row by row
    with a row end after every row; `cut_rows` mosaic rows removed at the top and at the bottom (unpadding)."""
    from vtprune.core.layout import VisualLayout, VisualSpan

    base = torch.arange(side * side)
    rows = range(cut_rows, tiles_high * side - cut_rows)
    width = tiles_wide * side
    view, view_patch, patch_index = [], [], []
    for i, r in enumerate(rows):
        for c in range(width):
            view.append(1 + (r // side) * tiles_wide + c // side)
            view_patch.append((r % side) * side + c % side)
            patch_index.append(i * width + c)
        view.append(-1), view_patch.append(-1), patch_index.append(-1)
    spans = [
        VisualSpan(image=0, start=1, patch_index=base, grid=(side, side), kind="base",
                   view=torch.zeros_like(base), view_patch=base.clone()),
        VisualSpan(image=0, start=1 + side * side, patch_index=torch.tensor(patch_index), grid=(len(rows), width),
                   kind="tiles", view=torch.tensor(view), view_patch=torch.tensor(view_patch)),
    ]
    return VisualLayout(spans=[spans], seq_len=2 + side * side + len(patch_index))


def run_plan(ref, layout):
    """The method's plan on the reference inputs, applied by hand: the LLM's image tokens [K, 8] (merges summed
    over the views' encoder rows, other kept slots their own patch), in the plan's order."""
    from types import SimpleNamespace

    from vtprune.core import ClsAttention, SiteContext, VisionKeys

    method = vtprune.make("visionzip", keep=int(ref["dominant"]) + int(ref["contextual"]),
                          contextual=int(ref["contextual"]), layer=0)
    info = SimpleNamespace(vision_has_cls=True, vision_feature_layer=0, family="llava_next")
    signals = {ClsAttention(layers=(0,)): ref["cls_attention"][:, None], VisionKeys(layer=0): ref["metric"]}
    ctx = SiteContext(site="pre_llm", layout=layout, signals=signals, info=info)
    plan = method.plan(ctx)
    plan.validate(layout)
    view = torch.cat([s.view for s in layout.spans[0]])
    patch = torch.cat([s.view_patch for s in layout.spans[0]])
    merged = {m.slot: m for m in plan.merges[0]}
    values = []
    for slot in plan.order[0].tolist():
        if slot in merged:
            m = merged[slot]
            values.append((m.weights[:, None] * ref["hidden"][m.view, m.sources]).sum(dim=0))
        else:
            assert patch[slot] >= 0  # a kept token that no merge writes is a patch, never a row end
            values.append(ref["hidden"][view[slot], patch[slot] + 1])
    return torch.stack(values), plan


@pytest.mark.parametrize("name", ["next_2x2_d54_c10", "next_2wide_1high_d30_c6"])
@pytest.mark.parametrize("cut_rows", [0, 5])
def test_plan_on_a_next_layout_gives_the_official_sequence(name, cut_rows):
    """Every view compressed on its own, the official order, no row ends; with unpadding (cut_rows) the dominant
    patches the layout lost come back through encoder merges, so the sequence is the same (no unpadding, as released)."""
    ref = torch.load(REFERENCE / f"{name}.pt")
    tiles_wide, tiles_high = ref["tiles_wh"].tolist()
    layout = anyres_layout(tiles_wide, tiles_high, 24, cut_rows)
    values, plan = run_plan(ref, layout)
    torch.testing.assert_close(values, ref["output"], atol=1e-5, rtol=0)
    merged = plan.merges[0]
    assert all(m.space == "encoder" and m.view is not None for m in merged)
    cls_merges = [m for m in merged if m.sources.tolist() == [0]]
    assert sorted(m.view for m in cls_merges) == list(range(1 + tiles_wide * tiles_high))  # every view's [CLS]
    lost = [m for m in merged if m.sources.numel() == 1 and m.sources.tolist() != [0]]
    assert bool(lost) == (cut_rows > 0)  # only unpadded-away dominant patches need a merge of one patch
