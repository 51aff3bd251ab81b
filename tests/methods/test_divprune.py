"""DivPrune: the greedy order equals the official code's on stored inputs; the kept sets follow the language model's
input embeddings; keep-all exactness; generate() with a real budget equals a hand-made reference (LLaVA, Qwen2-VL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from tests.adapters.qwen_builders import KINDS, build_qwen_processor, build_tiny_qwen, two_screenshot_batch
from tests.adapters.test_llava import image_embeddings
from tests.helpers import hooks_of
from tests.methods.references import llava_pre_llm_reference, qwen_input_embeddings, qwen_pre_llm_reference
from vtprune.methods.divprune import divprune_order

REFERENCE = torch.load(Path(__file__).parents[1] / "data/reference/divprune/reference.pt", weights_only=True)["cases"]
REGULAR = [c for c in REFERENCE if c["name"] != "degenerate_8"]


# ------------------------------------------------------------------------------------------ official outputs
@pytest.mark.parametrize("case", REGULAR, ids=[c["name"] for c in REGULAR])
def test_greedy_order_equals_the_official_code(case):
    for run in case["runs"]:
        count = int(round(run["ratio"] * case["features"].shape[0]))  # the official budget rule
        assert count == run["order"].numel()
        order = divprune_order(case["features"], count)
        assert torch.equal(order, run["order"]), (case["name"], run["ratio"])


def test_a_chosen_token_is_never_chosen_again():
    """Four vectors, each twice, all eight kept: the official greedy repeats token 3 once nothing is farther than a
    chosen token's own (zero) distance; vtprune agrees up to there and then takes the twins."""
    (case,) = [c for c in REFERENCE if c["name"] == "degenerate_8"]
    official = case["runs"][0]["order"]
    order = divprune_order(case["features"], 8)
    first_repeat = next(i for i in range(8) if int(official[i]) in official[:i].tolist())
    assert torch.equal(order[:first_repeat], official[:first_repeat])
    assert sorted(order.tolist()) == list(range(8))


# --------------------------------------------------------------------------------------------- on models
@pytest.fixture(scope="module", params=KINDS)
def qwen(request):
    return build_tiny_qwen(request.param), two_screenshot_batch(build_qwen_processor(request.param))


def expected_kept(embeds, batch, layout, keep, image_token):
    """Per sample, the kept ordinals: `divprune_order` on each image's input embeddings."""
    out = []
    for b, spans in enumerate(layout.spans):
        kept, offset = [], 0
        for span in spans:
            assert bool((batch["input_ids"][b, span.start : span.end] == image_token).all())
            count = keep if isinstance(keep, int) else round(keep * span.length)
            order = divprune_order(embeds[b, span.start : span.end], count)
            kept += (torch.sort(order).values + offset).tolist()
            offset += span.length
        out.append(kept)
    return out


@pytest.mark.parametrize("keep", [5, 0.25])
def test_kept_sets_on_llava_follow_the_projector_outputs(tiny_llava, batch, keep):
    with torch.no_grad(), vtprune.make("divprune", keep=keep)(tiny_llava) as trace:
        tiny_llava(**batch)
        embeds = image_embeddings(tiny_llava, batch)
    kept = [site.kept.tolist() for site in trace.forwards[0].sites]
    assert kept == expected_kept(embeds, batch, trace.forwards[0].layout, keep, 99)
    per_image = keep if isinstance(keep, int) else 4
    assert trace.visual_tokens() == [(16, per_image), (32, 2 * per_image)]


def test_scope_sample_runs_one_greedy_over_both_images(tiny_llava, batch):
    with torch.no_grad(), vtprune.make("divprune", keep=5, scope="sample")(tiny_llava) as trace:
        tiny_llava(**batch)
        embeds = image_embeddings(tiny_llava, batch)
    positions = (batch["input_ids"][1] == 99).nonzero().squeeze(1)
    order = divprune_order(embeds[1, positions], 10)
    assert trace.forwards[0].sites[1].kept.tolist() == torch.sort(order).values.tolist()


def test_kept_sets_on_qwen_follow_the_merger_outputs(qwen):
    model, batch = qwen
    with torch.no_grad(), vtprune.make("divprune", keep=0.3)(model) as trace:
        model(**batch)
        embeds = qwen_input_embeddings(model, batch)
    kept = [site.kept.tolist() for site in trace.forwards[0].sites]
    assert kept == expected_kept(embeds, batch, trace.forwards[0].layout, 0.3, 259)
    assert trace.visual_tokens() == [(64, 12 + 7), (80, 24)]  # round(0.3 * 40) + round(0.3 * 24); 2 * 12


def generate(model, batch, steps=3):
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def assert_keep_all_is_dense(model, batch, **options):
    with torch.no_grad():
        dense_logits = model(**batch).logits
        dense_sequences, dense_steps = generate(model, batch)
        with vtprune.make("divprune", **options)(model) as trace:
            logits = model(**batch).logits
            sequences, steps = generate(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], dense_logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(steps, dense_steps, atol=1e-5, rtol=0)  # prefill and every decoding step
    assert torch.equal(sequences, dense_sequences)
    assert all(before == after for before, after in trace.visual_tokens())


@pytest.mark.parametrize("options", [dict(keep=1.0), dict(keep=16), dict(keep=1.0, scope="sample")])
def test_keep_all_reproduces_dense_logits_on_llava(tiny_llava, batch, options):
    assert_keep_all_is_dense(tiny_llava, batch, **options)


def test_keep_all_reproduces_dense_logits_on_qwen(qwen):
    assert_keep_all_is_dense(*qwen, keep=1.0)


def test_generate_with_left_padding_equals_reference_on_llava(tiny_llava, batch):
    steps = 5
    with torch.no_grad():
        with vtprune.make("divprune", keep=5)(tiny_llava) as trace:
            pruned = tiny_llava.generate(**batch, max_new_tokens=steps, do_sample=False)[:, -steps:]
        kept = [row["kept_indices"] for row in trace.summary()]
        reference = llava_pre_llm_reference(tiny_llava, batch, kept, steps)
    assert [len(k) for k in kept] == [5, 10]
    assert torch.equal(pruned, reference)


def test_generate_with_left_padding_equals_reference_on_qwen(qwen):
    model, batch = qwen
    steps = 4
    with torch.no_grad():
        with vtprune.make("divprune", keep=6)(model) as trace:
            pruned = model.generate(**batch, max_new_tokens=steps, do_sample=False)[:, -steps:]
        reference = qwen_pre_llm_reference(model, batch, trace, steps)
    assert trace.visual_tokens(0) == [(64, 12), (80, 12)]
    assert torch.equal(pruned, reference)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("options, message", [
    (dict(scope="batch"), "scope='batch'"),
    (dict(keep=0), "keep at least one"),
    (dict(keep=1.5), "ratio must lie in"),
    (dict(keep="half"), "expected int | float"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(vtprune.VTPruneError, match=message):
        vtprune.make("divprune", **options)


def test_budget_beyond_the_image_is_refused(tiny_llava, batch):
    hooks = hooks_of(tiny_llava)
    with pytest.raises(vtprune.VTPruneError, match="more than the 16 visual tokens"):
        with torch.no_grad(), vtprune.make("divprune", keep=17)(tiny_llava):
            tiny_llava(**batch)
    assert hooks_of(tiny_llava) == hooks
