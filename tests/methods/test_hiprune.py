"""HiPrune: the kept sets equal the official code's on stored inputs; on the tiny LLaVA they follow the eager encoder
attention while the model runs SDPA; keep-all exactness; batch-2 generate() equals a hand-made reference; refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from tests.helpers import build_tiny_llava, hooks_of
from tests.methods.pre_llm_reference import dense_equals_keep_all
from tests.methods.references import llava_pre_llm_reference
from vtprune.methods.hiprune import global_attention, hiprune_select

REFERENCE = torch.load(Path(__file__).parents[1] / "data/reference/hiprune/reference.pt", weights_only=True)


# ------------------------------------------------------------------------------------------ official outputs
def reference_maps(case):
    """[images, layers (object, deep), T, T] head-mean maps, rebuilt as the driver built the official inputs."""
    q, k, bias = case["q"], case["k"], case["logit_bias"]
    maps = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias[:, :, None, None, :], dim=-1)
    return maps.mean(dim=2)  # mean over heads, as the vision adapter's VisionAttention


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_kept_sets_equal_the_official_code(name):
    """24 x 24 grid + [CLS], 2 images; "edges" puts anchors at corners and row ends (clamped / wrapping neighbours)."""
    maps = reference_maps(REFERENCE[name])
    object_scores, deep_scores = global_attention(maps[:, 0], True), global_attention(maps[:, 1], True)
    for key, run in REFERENCE[name]["runs"].items():
        kept, local = hiprune_select(object_scores, deep_scores, 24, run["keep"], run["alpha"])
        assert torch.equal(kept, run["mask"]), (name, key)
        assert kept.sum(1).tolist() == [run["keep"]] * 2
        assert bool((kept | ~local).all())  # local tokens are kept


def test_too_many_neighbours_for_the_budget_fail_in_one_line():
    """keep=3, alpha=1: one anchor with up to 4 neighbours; the official code fails with an index error there."""
    maps = reference_maps(REFERENCE["random"])
    scores = global_attention(maps[:, 0], True)
    with pytest.raises(vtprune.VTPruneError, match=r"hiprune keep=3 with alpha=1.0: the anchors and their neighbours"):
        hiprune_select(scores, scores, 24, 3, 1.0)


# ------------------------------------------------------------------------------------------------ on LLaVA
def eager_selection(batch, count, alpha, object_layer):
    """Per image, the official inputs from an eager run of the same tiny model (3 layers, 4 x 4 grid): head-mean
    attention of `object_layer` and of the feature layer (attentions[-2]); then the pure selection."""
    eager = build_tiny_llava(seed=0, attn="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(batch["pixel_values"], output_attentions=True)
    object_scores = global_attention(out.attentions[object_layer].mean(dim=1), True)
    deep_scores = global_attention(out.attentions[-2].mean(dim=1), True)
    (kept, local) = hiprune_select(object_scores, deep_scores, 4, count, alpha)
    return kept, local, deep_scores


def per_sample(mask):
    """Image 0 is sample 0; images 1 and 2 are sample 1: kept visual ordinals per sample."""
    return [mask[0].nonzero().squeeze(1).tolist(), torch.cat([mask[1], mask[2]]).nonzero().squeeze(1).tolist()]


@pytest.mark.parametrize("keep, alpha, object_layer", [(6, 1.0, 0), (10, 0.5, 0), (0.75, 1.0, 2), (5, 0.1, 1)])
def test_kept_sets_on_llava_follow_the_eager_encoder(tiny_llava, batch, keep, alpha, object_layer):
    method = vtprune.make("hiprune", keep=keep, alpha=alpha, object_layer=object_layer)
    with torch.no_grad(), method(tiny_llava) as trace:
        tiny_llava(**batch)
    count = keep if isinstance(keep, int) else round(keep * 16)
    kept, local, scores = eager_selection(batch, count, alpha, object_layer)
    assert [row["kept_indices"] for row in trace.summary()] == per_sample(kept)
    site = trace.forwards[0].sites[0]
    assert site.notes["local"] == per_sample(local)
    assert trace.visual_tokens() == [(16, count), (32, 2 * count)]
    torch.testing.assert_close(site.scores, scores[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_keep_all_is_exact_at_prefill_and_every_decoding_step(tiny_llava, batch, alpha):
    trace = dense_equals_keep_all(tiny_llava, batch, vtprune.make("hiprune", keep=1.0, alpha=alpha, object_layer=0))
    assert trace.visual_tokens() == [(16, 16), (32, 32)]


def test_batched_generate_with_left_padding_equals_the_hand_made_reference(tiny_llava, batch):
    steps = 5
    with torch.no_grad():
        with vtprune.make("hiprune", keep=7, alpha=0.8, object_layer=0)(tiny_llava) as trace:
            pruned = tiny_llava.generate(**batch, max_new_tokens=steps, do_sample=False)[:, -steps:]
        kept = [row["kept_indices"] for row in trace.summary()]
        reference = llava_pre_llm_reference(tiny_llava, batch, kept, steps)
    expected, _, _ = eager_selection(batch, 7, 0.8, 0)
    assert kept == per_sample(expected)
    assert torch.equal(pruned, reference)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("options, message", [
    ({"alpha": 1.5}, r"hiprune alpha=1.5: give a share in \[0, 1\]"),
    ({"alpha": -0.1}, r"hiprune alpha=-0.1"),
    ({"alpha": "low"}, "alpha='low'"),
    ({"object_layer": None}, "object_layer=None"),
    ({"keep": 0}, "keep at least one"),
    ({"keep": 3, "alpha": 1.0}, "hiprune keep=3 with alpha=1.0: 1 anchor"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(vtprune.VTPruneError, match=message):
        vtprune.make("hiprune", **options)


def test_ratio_budgets_too_small_for_the_neighbours_are_refused(tiny_llava, batch):
    hooks = hooks_of(tiny_llava)
    method = vtprune.make("hiprune", keep=0.5, alpha=1.0, object_layer=0)
    with (pytest.raises(vtprune.VTPruneError, match="hiprune keep=8 with alpha=1.0: 2 anchor"), torch.no_grad(),
          method(tiny_llava)):
        tiny_llava(**batch)
    assert hooks_of(tiny_llava) == hooks


def test_missing_encoder_layer_is_refused(tiny_llava, batch):
    """The official object layer (0-based 8) does not exist in the 3-layer tiny tower."""
    hooks = hooks_of(tiny_llava)
    with (pytest.raises(vtprune.VTPruneError, match="vision encoder layer 8 does not exist"), torch.no_grad(),
          vtprune.make("hiprune", keep=4)(tiny_llava)):
        tiny_llava(**batch)
    assert hooks_of(tiny_llava) == hooks


def test_anyres_tiles_are_refused_by_the_plan():
    from tests.helpers_video import build_tiny_llava_next, media_batch

    model = build_tiny_llava_next()
    batch = media_batch(model, [[(32, 48)], [(64, 64)]])
    with (pytest.raises(vtprune.VTPruneError, match="hiprune runs on single-grid images"), torch.no_grad(),
          vtprune.make("hiprune", keep=4, object_layer=0)(model)):
        model(**batch)
