"""SCOPE: the greedy equals the official function's picks (stored outputs), the signals equal eager CLIP attention and
hidden states, keep-all is exact, batch-2 generate() equals the language model on a hand-compacted sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from tests.adapters.qwen_builders import build_tiny_qwen
from tests.helpers import build_tiny_llava
from tests.methods.pre_llm_reference import (
    dense_equals_keep_all,
    generate_compacted,
    generate_with,
    image_embeddings,
)
from vtprune.methods.scope import scope_select

REFERENCE = torch.load(Path(__file__).parents[1] / "data/reference/scope/scope_official.pt")
IMAGES_OF_SAMPLE = ((0,), (1, 2))  # the `batch` fixture: sample 0 holds image 0, sample 1 images 1 and 2


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_greedy_equals_the_official_picks(case):
    ref = REFERENCE[case]
    picks = scope_select(ref["features"], ref["saliency"], ref["count"], ref["alpha"], ref["combine"])
    assert torch.equal(picks, ref["selected"])  # same tokens in the same greedy order


def test_coverage_only_case_reaches_exact_ties():
    """alpha=0 on 4 distinct feature vectors repeated 4 times: after one copy of each is chosen every gain is exactly 0
    and the official argmax falls to the lowest unchosen index."""
    ref = REFERENCE["coverage_only_saturates"]
    picks = ref["selected"][0].tolist()
    assert sorted(p % 4 for p in picks[:4]) == [0, 1, 2, 3]  # one copy of each vector first
    rest = sorted(set(range(16)) - set(picks[:4]))
    assert picks[4:] == rest[: len(picks) - 4]
    assert scope_select(ref["features"], ref["saliency"], len(picks), 0.0)[0].tolist() == picks


def eager_signals(batch):
    """Official inputs from an eager run of the same tiny model: [CLS] row of layer -2 summed over heads, layer -2's
    patch outputs (the projector's input)."""
    eager = build_tiny_llava(seed=0, attn="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    return out.attentions[-2][:, :, 0, 1:].sum(dim=1), out.hidden_states[-2][:, 1:]


def expected_kept(batch, keep, features):
    saliency, _ = eager_signals(batch)
    out = []
    for images in IMAGES_OF_SAMPLE:
        kept = []
        for i, image in enumerate(images):
            picks = scope_select(features[image][None], saliency[image][None], keep)[0]
            kept += (torch.sort(picks).values + 16 * i).tolist()
        out.append(kept)
    return out


def test_kept_sets_follow_eager_signals_while_the_model_runs_sdpa(tiny_llava, batch):
    _, encoder_features = eager_signals(batch)
    with torch.no_grad(), vtprune.make("scope", keep=5)(tiny_llava) as trace:
        tiny_llava(**batch)
    assert [row["kept_indices"] for row in trace.summary()] == expected_kept(batch, 5, encoder_features)
    saliency, _ = eager_signals(batch)
    torch.testing.assert_close(trace.forwards[0].sites[0].scores, saliency[0], atol=1e-6, rtol=0)


def test_projected_features_use_the_llm_input_embeddings(tiny_llava, batch):
    embeds = image_embeddings(tiny_llava, batch)
    ids = batch["input_ids"]
    projected = torch.stack([embeds[b, (ids[b] == 99).nonzero().squeeze(1)[i * 16 : (i + 1) * 16]]
                             for b, images in enumerate(IMAGES_OF_SAMPLE) for i in range(len(images))])
    with torch.no_grad(), vtprune.make("scope", keep=6, features="projected", alpha=0.5)(tiny_llava) as trace:
        tiny_llava(**batch)
    saliency, _ = eager_signals(batch)
    expected = []
    for images in IMAGES_OF_SAMPLE:
        kept = []
        for i, image in enumerate(images):
            picks = scope_select(projected[image][None].detach(), saliency[image][None], 6, alpha=0.5)[0]
            kept += (torch.sort(picks).values + 16 * i).tolist()
        expected.append(kept)
    assert [row["kept_indices"] for row in trace.summary()] == expected


def test_keep_all_is_exact_at_prefill_and_every_decoding_step(tiny_llava, batch):
    trace = dense_equals_keep_all(tiny_llava, batch, vtprune.make("scope", keep=1.0))
    assert trace.visual_tokens() == [(16, 16), (32, 32)]


def test_batched_generate_with_left_padding_equals_the_hand_compacted_reference(tiny_llava, batch):
    steps = 4
    tokens, logits, trace = generate_with(tiny_llava, batch, vtprune.make("scope", keep=4), steps)
    _, encoder_features = eager_signals(batch)
    kept = expected_kept(batch, 4, encoder_features)
    visual = [[[o for o in kept[b] if 16 * i <= o < 16 * (i + 1)] for i in range(len(images))]
              for b, images in enumerate(IMAGES_OF_SAMPLE)]
    ref_tokens, ref_logits = generate_compacted(tiny_llava, batch, visual, steps)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    assert trace.visual_tokens(0) == [(16, 4), (32, 8)]  # 4 per image


def test_bad_options_are_refused():
    with pytest.raises(vtprune.VTPruneError, match="combine='max'"):
        vtprune.make("scope", combine="max")
    with pytest.raises(vtprune.VTPruneError, match="features='clip'"):
        vtprune.make("scope", features="clip")
    with pytest.raises(vtprune.VTPruneError, match="alpha=-1"):
        vtprune.make("scope", alpha=-1.0)
    with pytest.raises(vtprune.VTPruneError, match="keep=0"):
        vtprune.make("scope", keep=0)
    with pytest.raises(vtprune.VTPruneError, match="scope"):
        vtprune.make("scope", scope="batch")


def test_budget_above_the_image_is_an_error(tiny_llava, batch):
    with (pytest.raises(vtprune.VTPruneError, match="keep=17 is more than the 16 visual tokens"), torch.no_grad(),
          vtprune.make("scope", keep=17)(tiny_llava)):
        tiny_llava(**batch)


def test_qwen_is_refused_without_cls():
    model = build_tiny_qwen("qwen2-vl")
    with pytest.raises(vtprune.VTPruneError, match=r"scope needs a vision encoder with a \[CLS\] token"):
        vtprune.make("scope", keep=4)(model)


@pytest.mark.parametrize("features", ["encoder", "projected"])
def test_llava_next_runs_per_tile(features):
    """Official NeXT rule: the budget is split over the encoder inputs (base view, tiles): scope="tile", with the
    official features (the projector input, which the NeXT adapter gives per encoder input) or the projected ones."""
    from tests.helpers_video import build_tiny_llava_next, media_batch

    model = build_tiny_llava_next()
    batch = media_batch(model, [[(32, 48)], [(60, 40)]])
    with torch.no_grad(), vtprune.make("scope", keep=3, features=features, scope="tile")(model) as trace:
        model(**batch)
    layout = trace.forwards[0].layout
    for b, (before, after) in enumerate(trace.visual_tokens()):
        spans = layout.spans[b]
        views = {int(v) for s in spans for v in s.view[s.patch_index >= 0]}
        extra = sum(int((s.patch_index < 0).sum()) for s in spans)  # row ends: always kept
        assert after == 3 * len(views) + extra and before > after
