"""InternVL adapter: the tile layout, keep-all exactness, the [CLS] signal against the tower's own eager attention, the
language model's prefill length, and generate() under real budgets equal to a hand-made reference (the language model
run on the hand-compacted input embeddings at InternVL's 1-D positions), on a tiny model from a config with a batch of
2 left-padded prompts holding 3-, 1- and 5-tile images."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import vtprune
from tests.adapters.hand_reference import Sample, run
from tests.adapters.internvl_builders import (
    IMAGE,
    IMG_END,
    IMG_START,
    PER_TILE,
    SIDE,
    TILES,
    build_internvl_processor,
    build_tiny_internvl,
    image_batch,
)
from tests.adapters.keep_all import assert_keep_all_matches_dense, assert_refused_untouched

KEEP_ALL = [
    ("random", {"keep": 1.0}),
    ("pool", {"keep": 1.0}),
    ("fastv", {"keep": 1.0, "layer": 2}),
    ("dart", {"keep": 1.0, "layer": 2}),
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
    ("vtc-cls", {"keep": 1.0, "start_layer": 0}),
    ("vtc-cls", {"keep": 1.0, "scope": "tile"}),
    ("scope", {"keep": 1.0, "features": "projected"}),  # the default features="encoder" needs ProjectorInput
    ("holov", {"keep": 1.0, "order": "ascending", "excess": "drop"}),  # the official order needs one span per image
]
REFUSED = {  # method -> (options, the reason in its error when the session opens)
    "visionzip": ({}, "signal VisionKeys, which the internvl adapter cannot provide"),
    "vispruner": ({}, "signal ProjectorInput, which the internvl adapter cannot provide"),
    "scope": ({}, "signal ProjectorInput, which the internvl adapter cannot provide"),
    "hiprune": ({"object_layer": 0}, "signal VisionAttention, which the internvl adapter cannot provide"),
    "vflowopt": ({"llm_layers": (1, 2)}, "signal VisionAttention, which the internvl adapter cannot provide"),
    "tome": ({}, "signal VisionKeys, which the internvl adapter cannot provide"),
}
STEPS = 3


@pytest.fixture(scope="module")
def model():
    return build_tiny_internvl()


@pytest.fixture(scope="module")
def batch():
    return image_batch(build_internvl_processor())


@pytest.fixture(scope="module")
def dense(model, batch):
    """(prefill logits, generate sequences, per-step logits) of the dense model."""
    with torch.no_grad():
        return (model(**batch).logits, *generate(model, batch))


def generate(model, batch, steps=STEPS, **options):
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **options)
    return out.sequences, torch.stack(out.logits, dim=1)


def visual_counts(batch):
    return (batch["input_ids"] == IMAGE).sum(1).tolist()


# --------------------------------------------------------------------------------------------- layout, methods
def test_the_batch_has_the_tiles_it_claims(batch):
    assert batch["pixel_values"].shape[0] == sum(TILES)
    assert visual_counts(batch) == [(TILES[0] + TILES[1]) * PER_TILE, TILES[2] * PER_TILE]


def test_layout_has_a_span_per_tile_thumbnail_last(model, batch):
    with torch.no_grad(), vtprune.make("random", keep=1.0)(model) as trace:
        model(**batch)
    layout = trace.forwards[0].layout
    described = [[(s.kind, s.image, int(s.view.unique()), s.grid) for s in spans] for spans in layout.spans]
    grid = (SIDE, SIDE)
    assert described == [
        [("tile", 0, 0, grid), ("tile", 0, 1, grid), ("thumbnail", 0, 2, grid), ("image", 1, 3, grid)],
        [("tile", 2, 4, grid), ("tile", 2, 5, grid), ("tile", 2, 6, grid), ("tile", 2, 7, grid),
         ("thumbnail", 2, 8, grid)],
    ]
    ids = batch["input_ids"]
    for b, spans in enumerate(layout.spans):
        for span in spans:  # every span is one tile's row-major tokens
            assert torch.equal(span.patch_index, torch.arange(PER_TILE)) and torch.equal(span.view_patch, span.patch_index)
            assert bool((ids[b, span.start : span.end] == IMAGE).all())
        images = {}
        for span in spans:
            images.setdefault(span.image, []).append(span)
        for tiles in images.values():  # an image's tiles follow one another between <img> and </img>
            assert int(ids[b, tiles[0].start - 1]) == IMG_START and int(ids[b, tiles[-1].end]) == IMG_END
            assert all(a.end == c.start for a, c in itertools.pairwise(tiles))


def test_every_method_runs_or_is_refused():
    assert {name for name, _ in KEEP_ALL} | set(REFUSED) == set(vtprune.available())


@pytest.mark.parametrize("name, options", KEEP_ALL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KEEP_ALL)])
def test_keep_all_reproduces_dense(model, batch, dense, name, options):
    trace = assert_keep_all_matches_dense(model, batch, dense, vtprune.make(name, **options), generate)
    assert trace.visual_tokens() == [(n, n) for n in visual_counts(batch)]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_methods_without_their_signals_are_refused(model, name):
    options, message = REFUSED[name]
    assert_refused_untouched(model, name, options, message)


def test_holov_official_order_is_refused_on_a_tiled_image(model, batch):
    """holov's official order moves tokens within an image, which spans several tiles here."""
    error = pytest.raises(vtprune.VTPruneError, match="image 0 is split into 3 spans")
    with error, torch.no_grad(), vtprune.make("holov", keep=0.5)(model):
        model(**batch)


def test_keep_all_beam_search_reproduces_dense(model, batch):
    """generate() encodes each sample's tiles once, then repeats the rows for the beams: the [CLS] rows follow."""
    options = {"max_new_tokens": 2, "num_beams": 2, "do_sample": False}
    with torch.no_grad():
        expected = model.generate(**batch, **options)
        with vtprune.make("vtc-cls", keep=1.0, start_layer=0)(model):
            assert torch.equal(model.generate(**batch, **options), expected)


def test_beam_rows_keep_what_their_sample_keeps(model, batch):
    """At a real budget each beam row of a sample keeps the tokens that sample keeps in a greedy run (the repeated
    rows read their own sample's [CLS] rows)."""
    with torch.no_grad(), vtprune.make("vtc-cls", keep=5, start_layer=0)(model) as trace:
        model.generate(**batch, max_new_tokens=1, do_sample=False)
        model.generate(**batch, max_new_tokens=1, num_beams=2, do_sample=False)
    greedy = {s.sample: s.kept.tolist() for s in trace.forwards[0].sites}
    beams = {s.sample: s.kept.tolist() for s in trace.forwards[1].sites}
    assert beams == {0: greedy[0], 1: greedy[0], 2: greedy[1], 3: greedy[1]}
    assert [len(k) for k in greedy.values()] == [10, 5]


def test_encoder_outputs_made_outside_the_session_are_refused_for_cls_methods(model, batch):
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "mm_encoder_outputs": encoded}
    with torch.no_grad(), vtprune.make("random", keep=4)(model) as trace:  # no vision signal needed: runs
        model(**inputs)
    assert [after for _, after in trace.visual_tokens()] == [8, 4]
    error = pytest.raises(vtprune.VTPruneError, match="did not encode this prompt's tiles inside the session")
    with error, torch.no_grad(), vtprune.make("vtc-cls", keep=4)(model):
        model(**inputs)


def test_a_session_made_on_the_meta_device_runs_once_the_model_is_materialised(batch):
    """transformers' own tests build models under `torch.device("meta")`; a session attached then must hold no meta
    tensor of its own."""
    from transformers import InternVLForConditionalGeneration

    config = build_tiny_internvl().config
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(copy.deepcopy(config)).eval()
        session = vtprune.make("vtc-cls", keep=4, start_layer=0)(model)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad(), session as trace:
        model(**batch)
    assert [after for _, after in trace.visual_tokens()] == [8, 4]


# ----------------------------------------------------------------------------------------------- [CLS] signal
def eager_cls_attention(model, pixel_values):
    """[tiles, layers, heads, side²]: the tower's own eager attention probabilities of [CLS] over the patches, summed
    over each token's 2×2 block of patches."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = tower(pixel_values=pixel_values, output_attentions=True).attentions
    rows = torch.stack([a[:, :, 0, 1:] for a in attentions], dim=1)  # [N, layers, H, P]
    n, layers, heads, patches = rows.shape
    side = int(patches**0.5)
    blocks = F.avg_pool2d(rows.reshape(n * layers, heads, side, side), 2) * 4  # sum of each 2×2 block
    return blocks.reshape(n, layers, heads, -1)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cls_scores_are_the_towers_attention_pooled_to_tokens(batch, qk_norm):
    """vtc-cls's scores (head-mean [CLS] attention summed over layers 0..feature layer) per visual token equal the
    eager attention of the tower, each token's four patches summed; q/k norms (InternViT-6B towers) included."""
    model = build_tiny_internvl(qk_norm=qk_norm)
    with torch.no_grad(), vtprune.make("vtc-cls", keep=1.0, start_layer=0)(model) as trace:
        model(**batch)
    hand = eager_cls_attention(model, batch["pixel_values"]).mean(dim=2).sum(dim=1)  # [tiles, side²]
    first = [0, TILES[0] + TILES[1]]  # the first tile of each sample
    for site in trace.forwards[0].sites:
        tiles = hand[first[site.sample] :][: visual_counts(batch)[site.sample] // PER_TILE]
        torch.testing.assert_close(site.scores, tiles.reshape(-1), atol=1e-6, rtol=0)
    assert hand.std() > 1e-3  # the rows are not uniform: the comparison means something


# -------------------------------------------------------------------------------------- lengths and the cache
def language_model_inputs(model, batch, method):
    """(inputs_embeds length, real tokens per sample) the language model receives at prefill, and the trace."""
    seen = []
    lm = model.model.language_model
    with torch.no_grad(), method(model) as trace:
        handle = lm.register_forward_pre_hook(  # after the session's own hook, which cuts the input
            lambda module, args, kwargs: seen.append((kwargs["inputs_embeds"].shape[1],
                                                      kwargs["attention_mask"].sum(1))),
            with_kwargs=True,
        )
        try:
            model(**batch)
        finally:
            handle.remove()
    return seen[0], trace


@pytest.mark.parametrize("name, options", [("random", {"keep": 5, "seed": 2}), ("pool", {"keep": 4}),
                                           ("vtc-cls", {"keep": 0.25, "scope": "tile"})])
def test_prefill_length_is_text_plus_kept(model, batch, name, options):
    (length, real), trace = language_model_inputs(model, batch, vtprune.make(name, **options))
    text = batch["attention_mask"].sum(1) - torch.tensor(visual_counts(batch))
    kept = torch.tensor([after for _, after in trace.visual_tokens()])
    expected = {"random": [10, 5], "pool": [4 * 4, 4 * 5], "vtc-cls": [4 * 4, 4 * 5]}[name]  # per image / per tile
    assert kept.tolist() == expected
    assert real.tolist() == (text + kept).tolist()
    assert length == int((text + kept).max())


def test_kv_cache_site_compresses_every_layer(model, batch, dense):
    """gui-kv at keep=0.5: every layer's cache holds floor(n / 2) entries per sample, the prefill logits are dense."""
    real = batch["attention_mask"].sum(1)
    with torch.no_grad(), vtprune.make("gui-kv", keep=0.5)(model):
        out = model(**batch, use_cache=True)
    budgets = (real // 2).tolist()
    layers = model.model.language_model.layers
    assert [out.cache.layers[i].keys.shape[-2] for i in range(len(layers))] == [max(budgets)] * len(layers)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[mask], dense[0][mask], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- hand-made reference
def dense_embeddings(model, batch):
    """[B, L, D]: token embeddings with every tile's projected tokens written at the image tokens, in order."""
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        tiles = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output  # [tiles, side², D]
    return embeds.masked_scatter((ids == IMAGE)[..., None], tiles.reshape(-1, tiles.shape[-1]))


def pooled_tiles(batch, embeds, cells):
    """embeds with each tile's tokens average-pooled to cells × cells (torch's adaptive pooling), each cell's mean
    written at the cell's first (top-left) token; returns them and, per sample, the visual ordinals kept."""
    out, kept = embeds.clone(), []
    step = SIDE // cells
    corners = [r * step * SIDE + c * step for r in range(cells) for c in range(cells)]
    for b in range(embeds.shape[0]):
        where = (batch["input_ids"][b] == IMAGE).nonzero().squeeze(1)
        sample = []
        for first in range(0, where.numel(), PER_TILE):
            tile = where[first : first + PER_TILE]
            grid = embeds[b, tile].T.reshape(1, -1, SIDE, SIDE)
            means = F.adaptive_avg_pool2d(grid, cells).reshape(embeds.shape[-1], -1).T  # [cells², D]
            out[b, tile[corners]] = means
            sample += [first + c for c in corners]
        kept.append(sample)
    return out, kept


def hand_sample(batch, b, embeds, kept, cut, image_id=IMAGE):
    """Sample b's real tokens, its kept visual ordinals `kept` (ascending), a cut before decoder layer `cut` (0: the
    LLM input, positions renumbered 0..m-1; else the dense positions kept, decoding continuing at n). 1-D positions
    (LLaVA-style models); `image_id`: the model's image token."""
    real = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b][real]
    image = (ids == image_id).nonzero().squeeze(1)
    keep = ids != image_id
    keep[image[torch.as_tensor(kept, dtype=torch.long)]] = True
    rows = keep.nonzero().squeeze(1)
    n, m = ids.numel(), rows.numel()
    full = torch.arange(n)[None]
    short, next_short = (torch.arange(m)[None], torch.tensor([m])) if cut == 0 else (full[:, rows], torch.tensor([n]))
    return Sample(embeds[b][real], full, rows, short, torch.tensor([n]), next_short, cut)


def reference_greedy(model, sample, steps=STEPS):
    """Greedy tokens and each step's logits [steps, V] of the language model on the hand-made sample (no cache)."""
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(run(model, sample, tokens)[-1])
            tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


def kept_ordinals(trace, b):
    return [s for s in trace.forwards[0].sites if s.sample == b][-1].kept.tolist()


def test_reference_without_a_cut_reproduces_dense(model, batch, dense):
    embeds = dense_embeddings(model, batch)
    for b in range(2):
        everything = list(range(visual_counts(batch)[b]))
        tokens, logits = reference_greedy(model, hand_sample(batch, b, embeds, everything, cut=0))
        assert dense[1][b, -STEPS:].tolist() == tokens
        torch.testing.assert_close(dense[2][b], logits, atol=1e-5, rtol=0)


CASES = {  # name -> (options, decoder layer the cut sits before)
    "random": ({"keep": 5, "seed": 3}, 0),
    "pool": ({"keep": 4}, 0),
    "vtc-cls": ({"keep": 6, "start_layer": 0}, 0),
    "fastv": ({"keep": 6, "layer": 2}, 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_equals_the_hand_made_reference(model, batch, name):
    """Batched, left-padded generate() under a real budget equals, per sample, the language model run on that sample
    alone with its kept tokens compacted by hand (pool: each tile pooled 4×4 -> 2×2 by torch, at the cells' first
    tokens), renumbered before the LLM or at their own positions inside it."""
    options, cut = CASES[name]
    with torch.no_grad(), vtprune.make(name, **options)(model) as trace:
        sequences, steps = generate(model, batch)
    embeds = dense_embeddings(model, batch)
    if name == "pool":
        embeds, kept = pooled_tiles(batch, embeds, cells=2)
        assert [kept_ordinals(trace, b) for b in range(2)] == kept
    else:
        kept = [kept_ordinals(trace, b) for b in range(2)]
    for b in range(2):
        tokens, logits = reference_greedy(model, hand_sample(batch, b, embeds, kept[b], cut))
        assert sequences[b, -STEPS:].tolist() == tokens
        torch.testing.assert_close(steps[b], logits, atol=1e-4, rtol=0)
    assert [after for _, after in trace.visual_tokens(0)] == [len(kept[0]), len(kept[1])]
    assert len(kept[0]) < visual_counts(batch)[0] and len(kept[1]) < visual_counts(batch)[1]
