"""Idefics3 / SmolVLM adapter: the crop layout (crops, then the global image, grouped by the `<global-img>` tag),
keep-all exactness, the language model's prefill length, and generate() under real budgets equal to a hand-made
reference (the language model run on the hand-compacted input embeddings at 1-D positions), on tiny models from
configs with a batch of 2 left-padded prompts (one image; two images of 2×2 crops each)."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.adapters.idefics3_builders import (
    GLOBAL,
    IMAGE,
    KINDS,
    PER_CROP,
    SIDE,
    build_idefics3_processor,
    build_tiny_idefics3,
    image_batch,
)
from tests.adapters.keep_all import assert_keep_all_matches_dense, assert_refused_untouched
from tests.adapters.test_internvl import hand_sample, kept_ordinals, reference_greedy
from vtprune.adapters.idefics3 import image_ends

KEEP_ALL = [
    ("random", {"keep": 1.0}),
    ("pool", {"keep": 1.0}),
    ("fastv", {"keep": 1.0, "layer": 1}),
    ("dart", {"keep": 1.0, "layer": 1}),
    ("divprune", {"keep": 1.0}),
    ("gui-kv", {"keep": 1.0}),
    ("zipvl", {"keep": 1.0}),
    ("transprune", {"keep": 1.0, "keep_ratios": (0.5,), "prune_layers": (1,)}),
    ("cdpruner", {"keep": 1.0}),
    ("pyramiddrop", {"keep": 1.0, "layer_list": (1, 2)}),
    ("spatten", {"keep": 1.0}),
    ("streamingllm", {"keep": 1.0}),
    ("scissorhands", {"keep": 1.0}),
    ("a2sf", {"keep": 1.0}),
    ("ems", {"keep": 1.0}),
]
REFUSED = {  # method -> (options, the reason in its error when the session opens)
    "vtc-cls": ({}, r"\[CLS\] token; the idefics3 tower has none"),
    "visionzip": ({}, r"\[CLS\] token"),
    "vispruner": ({}, r"\[CLS\] token"),
    "scope": ({}, r"\[CLS\] token"),
    "holov": ({}, r"\[CLS\] token"),
    "hiprune": ({"object_layer": 0}, "signal VisionAttention, which the idefics3 adapter cannot provide"),
    "vflowopt": ({"llm_layers": (1, 2)}, "signal VisionAttention, which the idefics3 adapter cannot provide"),
    "tome": ({}, "VisionKeys"),
}
STEPS = 3
CROPS = [5, 5, 5]  # per image: 2×2 crops and the global image


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return build_tiny_idefics3(request.param)


@pytest.fixture(scope="module")
def batch():
    return image_batch(build_idefics3_processor())


@pytest.fixture(scope="module")
def dense(model, batch):
    with torch.no_grad():
        return (model(**batch).logits, *generate(model, batch))


def generate(model, batch, steps=STEPS, **options):
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **options)
    return out.sequences, torch.stack(out.logits, dim=1)


def visual_counts(batch):
    return (batch["input_ids"] == IMAGE).sum(1).tolist()


# --------------------------------------------------------------------------------------------- layout, methods
def test_layout_has_a_span_per_crop_grouped_into_images(model, batch):
    assert visual_counts(batch) == [CROPS[0] * PER_CROP, (CROPS[1] + CROPS[2]) * PER_CROP]
    with torch.no_grad(), vtprune.make("random", keep=1.0)(model) as trace:
        model(**batch)
    layout = trace.forwards[0].layout
    described = [[(s.kind, s.image, int(s.view.unique())) for s in spans] for spans in layout.spans]
    crops = lambda image, first: [("tile", image, first + i) for i in range(4)] + [("thumbnail", image, first + 4)]  # noqa: E731
    assert described == [crops(0, 0), crops(1, 5) + crops(2, 10)]
    ids = batch["input_ids"]
    for b, spans in enumerate(layout.spans):
        for span in spans:  # each crop is its own run of row-major tokens; a global image follows its tag
            assert span.grid == (SIDE, SIDE) and torch.equal(span.patch_index, torch.arange(PER_CROP))
            assert bool((ids[b, span.start : span.end] == IMAGE).all())
            assert (int(ids[b, span.start - 1]) == GLOBAL) == (span.kind == "thumbnail")


def test_image_ends_read_the_global_tag_and_fall_back_to_one_image_per_run():
    ids = torch.tensor([9, 7, 1, 1, 8, 1, 1, 5, 1, 1, 3, 5, 1, 1])  # tags 7, 8 (crops), 5 (global)
    runs = [(2, 4), (5, 7), (8, 10), (12, 14)]
    assert image_ends(runs, ids) == [False, False, True, True]  # a split image, then a global image alone
    assert image_ends(runs, None) == [True] * 4


def test_crops_written_back_to_back_are_one_images_crops(model):
    """transformers' own tests write an image's crops as one run of image tokens, with no tags between them."""
    from vtprune.adapters.idefics3 import Idefics3Adapter

    is_image = torch.zeros(1, 20, dtype=torch.bool)
    is_image[0, 2 : 2 + 2 * PER_CROP] = is_image[0, 12 : 12 + PER_CROP] = True
    layout = Idefics3Adapter(model).layout(is_image)
    described = [(s.kind, s.image, s.start) for s in layout.spans[0]]
    assert described == [("tile", 0, 2), ("thumbnail", 0, 6), ("image", 1, 12)]
    is_image[0, 19] = True
    with pytest.raises(vtprune.VTPruneError, match="a run of 1 image tokens is not a whole number of crops of 4"):
        Idefics3Adapter(model).layout(is_image)


def test_every_method_runs_or_is_refused():
    assert {name for name, _ in KEEP_ALL} | set(REFUSED) == set(vtprune.available())


@pytest.mark.parametrize("name, options", KEEP_ALL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KEEP_ALL)])
def test_keep_all_reproduces_dense(model, batch, dense, name, options):
    trace = assert_keep_all_matches_dense(model, batch, dense, vtprune.make(name, **options), generate)
    assert trace.visual_tokens() == [(n, n) for n in visual_counts(batch)]


def test_keep_all_beam_search_reproduces_dense(model, batch):
    options = {"max_new_tokens": 2, "num_beams": 2, "do_sample": False}
    with torch.no_grad():
        expected = model.generate(**batch, **options)
        with vtprune.make("pool", keep=1.0)(model):
            assert torch.equal(model.generate(**batch, **options), expected)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_methods_without_their_signals_are_refused(model, name):
    options, message = REFUSED[name]
    assert_refused_untouched(model, name, options, message)


# ------------------------------------------------------------------------------------------ prefill length
def test_prefill_length_is_text_plus_kept(model, batch):
    seen = []
    lm = model.model.text_model
    with torch.no_grad(), vtprune.make("random", keep=6, seed=1)(model) as trace:
        handle = lm.register_forward_pre_hook(  # after the session's own hook, which cuts the input
            lambda module, args, kwargs: seen.append((kwargs["inputs_embeds"].shape[1],
                                                      kwargs["attention_mask"].sum(1))),
            with_kwargs=True,
        )
        try:
            model(**batch)
        finally:
            handle.remove()
    (length, real), = seen
    text = batch["attention_mask"].sum(1) - torch.tensor(visual_counts(batch))
    kept = torch.tensor([after for _, after in trace.visual_tokens()])
    assert kept.tolist() == [6, 12]  # per image
    assert real.tolist() == (text + kept).tolist() and length == int((text + kept).max())


# ---------------------------------------------------------------------------------------- hand-made reference
def dense_embeddings(model, batch):
    """[B, L, D]: token embeddings with every crop's projected tokens written at the image tokens, in order."""
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        crops = model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
    return embeds.masked_scatter((ids == IMAGE)[..., None], torch.cat(crops).reshape(-1, embeds.shape[-1]))


CASES = {"random": ({"keep": 5, "seed": 3}, 0), "fastv": ({"keep": 6, "layer": 1}, 1)}  # options, cut layer


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_equals_the_hand_made_reference(model, batch, dense, name):
    options, cut = CASES[name]
    with torch.no_grad(), vtprune.make(name, **options)(model) as trace:
        sequences, steps = generate(model, batch)
    embeds = dense_embeddings(model, batch)
    kept = [kept_ordinals(trace, b) for b in range(2)]
    for b in range(2):
        everything = hand_sample(batch, b, embeds, list(range(visual_counts(batch)[b])), 0, image_id=IMAGE)
        assert reference_greedy(model, everything)[0] == dense[1][b, -STEPS:].tolist()  # the reference is right
        tokens, logits = reference_greedy(model, hand_sample(batch, b, embeds, kept[b], cut, image_id=IMAGE))
        assert sequences[b, -STEPS:].tolist() == tokens
        torch.testing.assert_close(steps[b], logits, atol=1e-4, rtol=0)
    assert all(len(k) < n for k, n in zip(kept, visual_counts(batch)))
