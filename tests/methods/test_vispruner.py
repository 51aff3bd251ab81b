"""VisPruner: the kept and important sets equal the official code's on stored inputs; on the tiny LLaVA they follow
the eager [CLS] attention and the pre-projector features; keep-all exactness; generate() equals a hand-made reference;
towers without [CLS] or adapters without pre-projector features are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from tests.adapters.qwen_builders import build_tiny_qwen
from tests.helpers import build_tiny_llava, hooks_of
from tests.helpers_video import build_tiny_llava_next
from tests.methods.references import llava_pre_llm_reference
from vtprune.methods.vispruner import vispruner_select

REFERENCE = torch.load(Path(__file__).parents[1] / "data/reference/vispruner/reference.pt", weights_only=True)["cases"]


# ------------------------------------------------------------------------------------------ official outputs
@pytest.mark.parametrize("case", REFERENCE, ids=[c["name"] for c in REFERENCE])
def test_kept_and_important_sets_equal_the_official_code(case):
    """Batch of 2 images, 576 patches, 4 heads; "grid": spread-out features, "cluster": near-tied similarities."""
    for run in case["runs"]:
        count, ratio = run["visual_token_num"], run["important_ratio"]
        kept, important = vispruner_select(case["attentions"], case["features"], count, ratio)
        assert torch.equal(kept, run["mask"]), (case["name"], count, ratio)
        assert torch.equal(important, run["important"]), (case["name"], count, ratio)
        assert kept.sum(1).tolist() == [count, count]


@pytest.mark.parametrize("count, ratio", [(58, 0.5), (100, 0.75), (3, 0.0)])
def test_odd_residual_counts_keep_exactly_the_budget(count, ratio):
    """The official code fails to index when 576 - int(count * ratio) is odd; vtprune keeps every surviving A token."""
    case = REFERENCE[0]
    kept, important = vispruner_select(case["attentions"], case["features"], count, ratio)
    assert kept.sum(1).tolist() == [count, count]
    top = case["attentions"].mean(1).argsort(dim=-1, descending=True)[:, : int(count * ratio)]
    assert torch.equal(important, torch.zeros_like(important).scatter_(1, top, True))
    assert bool((kept | ~important).all())


# ------------------------------------------------------------------------------------------------ on LLaVA
def eager_selection(batch, count, ratio):
    """Per image, the official inputs from an eager run of the same tiny model: the feature layer's [CLS] attention
    row over the patches (per head) and hidden_states[-2] without [CLS]; then the pure selection."""
    eager = build_tiny_llava(seed=0, attn="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    feature_layer = len(out.attentions) - 2  # vision_feature_layer=-2: hidden_states[-2] is that layer's output
    attention = out.attentions[feature_layer][:, :, 0, 1:]
    features = out.hidden_states[-2][:, 1:]
    return vispruner_select(attention, features, count, ratio), attention.mean(1)


@pytest.mark.parametrize("keep, ratio", [(5, 0.5), (8, 0.25), (0.5, 0.75)])
def test_kept_sets_on_llava_follow_the_eager_encoder(tiny_llava, batch, keep, ratio):
    with torch.no_grad(), vtprune.make("vispruner", keep=keep, important_ratio=ratio)(tiny_llava) as trace:
        tiny_llava(**batch)
    count = keep if isinstance(keep, int) else round(keep * 16)
    (kept, important), scores = eager_selection(batch, count, ratio)
    sites = trace.forwards[0].sites
    assert sites[0].kept.tolist() == kept[0].nonzero().squeeze(1).tolist()
    assert sites[1].kept.tolist() == torch.cat([kept[1], kept[2]]).nonzero().squeeze(1).tolist()
    assert sites[0].notes["important"] == [important[0].nonzero().squeeze(1).tolist(),
                                           torch.cat([important[1], important[2]]).nonzero().squeeze(1).tolist()]
    torch.testing.assert_close(sites[1].scores, scores[1:].flatten(), atol=1e-6, rtol=0)
    assert trace.visual_tokens() == [(16, count), (32, 2 * count)]


def generate(model, batch, steps=3):
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("options", [dict(keep=1.0), dict(keep=16, important_ratio=0.0), dict(keep=16, important_ratio=1.0)])
def test_keep_all_reproduces_dense_logits(tiny_llava, batch, options):
    with torch.no_grad():
        dense_logits = tiny_llava(**batch).logits
        dense_sequences, dense_steps = generate(tiny_llava, batch)
        with vtprune.make("vispruner", **options)(tiny_llava) as trace:
            logits = tiny_llava(**batch).logits
            sequences, steps = generate(tiny_llava, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], dense_logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(steps, dense_steps, atol=1e-5, rtol=0)  # prefill and every decoding step
    assert torch.equal(sequences, dense_sequences)
    assert all(before == after for before, after in trace.visual_tokens())


def test_generate_with_left_padding_equals_reference(tiny_llava, batch):
    steps = 5
    with torch.no_grad():
        with vtprune.make("vispruner", keep=5)(tiny_llava) as trace:
            pruned = tiny_llava.generate(**batch, max_new_tokens=steps, do_sample=False)[:, -steps:]
        kept = [row["kept_indices"] for row in trace.summary()]
        reference = llava_pre_llm_reference(tiny_llava, batch, kept, steps)
    assert [len(k) for k in kept] == [5, 10]
    assert torch.equal(pruned, reference)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("options, message", [
    (dict(important_ratio=1.5), "important_ratio=1.5"),
    (dict(important_ratio=-0.1), "important_ratio=-0.1"),
    (dict(important_ratio="half"), "important_ratio='half'"),
    (dict(keep=0), "keep at least one"),
    (dict(keep=1.5), "ratio must lie in"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(vtprune.VTPruneError, match=message):
        vtprune.make("vispruner", **options)


def test_budget_beyond_the_image_is_refused(tiny_llava, batch):
    hooks = hooks_of(tiny_llava)
    with pytest.raises(vtprune.VTPruneError, match="more than the 16 visual tokens"):
        with torch.no_grad(), vtprune.make("vispruner", keep=17)(tiny_llava):
            tiny_llava(**batch)
    assert hooks_of(tiny_llava) == hooks


def test_models_without_its_signals_are_refused():
    model = build_tiny_qwen("qwen2-vl")
    hooks = hooks_of(model)
    with pytest.raises(vtprune.VTPruneError, match=r"\[CLS\] token; the qwen2-vl tower has none"):
        vtprune.make("vispruner", keep=4)(model)
    assert hooks_of(model) == hooks


def test_anyres_tiles_are_refused_by_the_plan():
    """The LLaVA-NeXT adapter gives ProjectorInput per encoder input, but vispruner reads it by image number."""
    from tests.helpers_video import media_batch

    model = build_tiny_llava_next()
    batch = media_batch(model, [[(32, 48)], [(64, 64)]])
    with pytest.raises(vtprune.VTPruneError, match="vispruner runs on single-grid images"):
        with torch.no_grad(), vtprune.make("vispruner", keep=4)(model):
            model(**batch)
