"""Gemma 3 adapter: the layout (one span per image and per pan-and-scan crop), keep-all exactness, the masks the
layers get after a cut (image blocks bidirectional on the compacted sequence, sliding windows counting kept tokens),
the language model's prefill length, refusals, and generate() under real budgets equal to a hand-made reference: the
language model's own layers run on each sample's hand-compacted input embeddings, with hand-built masks and Gemma 3's
1-D positions and per-kind RoPE. Tiny model from a config; batch of 2, left padded, a wide image cut by pan and scan
into the original and 2 crops plus a square image in one sample, one square image in the other."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import vtprune
from tests.adapters.gemma3_builders import (
    BOI,
    EOI,
    IMAGE,
    LAYER_TYPES,
    PER_IMAGE,
    SIDE,
    VIEWS,
    WINDOW,
    build_gemma3_processor,
    build_tiny_gemma3,
    image_batch,
)
from tests.adapters.hand_reference import Sample
from tests.adapters.keep_all import assert_keep_all_matches_dense, assert_refused_untouched

KEEP_ALL = [
    ("random", {"keep": 1.0}),
    ("pool", {"keep": 1.0}),
    ("fastv", {"keep": 1.0, "layer": 2}),  # before a sliding layer
    ("fastv", {"keep": 1.0, "layer": 3}),  # before a global layer
    ("dart", {"keep": 1.0, "layer": 2}),
    ("divprune", {"keep": 1.0}),
    ("gui-kv", {"keep": 1.0}),
    ("transprune", {"keep": 1.0, "keep_ratios": (0.5,), "prune_layers": (1,)}),
    ("cdpruner", {"keep": 1.0}),
    ("pyramiddrop", {"keep": 1.0, "layer_list": (1, 2)}),
    ("spatten", {"keep": 1.0}),
    ("streamingllm", {"keep": 1.0, "key_positions": "original"}),  # slot positions need one RoPE for all layers
    ("scissorhands", {"keep": 1.0}),
    ("a2sf", {"keep": 1.0}),
    ("ems", {"keep": 1.0}),
]
REFUSED = {  # method -> (options, the reason in its error when the session opens)
    "vtc-cls": ({}, r"\[CLS\] token"),
    "visionzip": ({}, r"\[CLS\] token"),
    "vispruner": ({}, r"\[CLS\] token"),
    "scope": ({}, r"\[CLS\] token"),
    "holov": ({}, r"\[CLS\] token"),
    "hiprune": ({"object_layer": 0}, "signal VisionAttention, which the gemma3 adapter cannot provide"),
    "vflowopt": ({"llm_layers": (1, 2)}, "signal VisionAttention, which the gemma3 adapter cannot provide"),
    "zipvl": ({}, "site 'llm_attention', which the gemma3 adapter does not offer"),
    "tome": ({}, "VisionKeys"),
}
STEPS = 3


@pytest.fixture(scope="module")
def model():
    return build_tiny_gemma3()


@pytest.fixture(scope="module")
def batch():
    return image_batch(build_gemma3_processor())


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
def test_the_batch_has_the_views_it_claims(batch):
    assert batch["pixel_values"].shape[0] == sum(VIEWS)
    assert visual_counts(batch) == [(VIEWS[0] + VIEWS[1]) * PER_IMAGE, VIEWS[2] * PER_IMAGE]
    assert torch.equal(batch["token_type_ids"].bool(), batch["input_ids"] == IMAGE)


def test_layout_has_a_span_per_image_and_crop(model, batch):
    """The original, then its crops, each its own encoder input between <start_of_image> and <end_of_image>."""
    with torch.no_grad(), vtprune.make("random", keep=1.0)(model) as trace:
        model(**batch)
    layout = trace.forwards[0].layout
    grid = (SIDE, SIDE)
    assert [[(s.kind, s.image, s.grid) for s in spans] for spans in layout.spans] == [
        [("image", 0, grid), ("image", 1, grid), ("image", 2, grid), ("image", 3, grid)], [("image", 4, grid)]
    ]
    ids = batch["input_ids"]
    for b, spans in enumerate(layout.spans):
        for span in spans:
            assert torch.equal(span.patch_index, torch.arange(PER_IMAGE))
            assert int(ids[b, span.start - 1]) == BOI and int(ids[b, span.end]) == EOI
        assert all(a.end < c.start for a, c in itertools.pairwise(spans))


def test_every_method_runs_or_is_refused():
    assert {name for name, _ in KEEP_ALL} | set(REFUSED) == set(vtprune.available())


@pytest.mark.parametrize("name, options", KEEP_ALL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KEEP_ALL)])
def test_keep_all_reproduces_dense(model, batch, dense, name, options):
    trace = assert_keep_all_matches_dense(model, batch, dense, vtprune.make(name, **options), generate)
    assert trace.visual_tokens() == [(n, n) for n in visual_counts(batch)]


def test_the_image_blocks_and_the_window_matter(model, batch, dense):
    """The comparisons above mean something: without token_type_ids (causal image tokens) the logits differ, and the
    prompts are longer than the window."""
    without = {k: v for k, v in batch.items() if k != "token_type_ids"}
    with torch.no_grad():
        causal = model(**without).logits
    real = batch["attention_mask"].bool()
    assert (causal[real] - dense[0][real]).abs().max() > 1e-2
    assert int(batch["attention_mask"].sum(1).min()) > 4 * WINDOW


def test_keep_all_without_token_type_ids_reproduces_the_causal_model(model, batch):
    """A caller who gives no token_type_ids gets causal image tokens, inside a session as outside."""
    without = {k: v for k, v in batch.items() if k != "token_type_ids"}
    with torch.no_grad():
        expected = (model(**without).logits, *generate(model, without))
    assert_keep_all_matches_dense(model, without, expected, vtprune.make("fastv", keep=1.0, layer=2), generate)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_methods_without_their_signals_or_site_are_refused(model, name):
    options, message = REFUSED[name]
    assert_refused_untouched(model, name, options, message)


def test_streamingllm_cache_positions_are_refused(model, batch):
    """key_positions="cache" re-rotates keys with one RoPE; Gemma 3 has one per layer kind."""
    with pytest.raises(vtprune.VTPruneError, match="a RoPE per layer kind .*key_positions='original'"):
        with torch.no_grad(), vtprune.make("streamingllm", keep=1.0)(model):
            model(**batch)


def test_static_cache_is_refused_in_one_line(model, batch):
    """Gemma 3's StaticCache preallocates only the window on sliding layers."""
    with pytest.raises(vtprune.VTPruneError, match="sliding window") as refusal:
        with torch.no_grad(), vtprune.make("random", keep=1.0)(model):
            generate(model, batch, cache_implementation="static")
    assert "\n" not in str(refusal.value)


def test_keep_all_beam_search_reproduces_dense(model, batch):
    options = {"max_new_tokens": 2, "num_beams": 2, "do_sample": False}
    with torch.no_grad():
        expected = model.generate(**batch, **options)
        with vtprune.make("fastv", keep=1.0, layer=2)(model):
            assert torch.equal(model.generate(**batch, **options), expected)


def test_keep_all_without_a_cache_reproduces_dense(model, batch):
    """generate(use_cache=False) runs every step as a prefill with token_type_ids (generate() extends them)."""
    options = {"max_new_tokens": 2, "do_sample": False, "use_cache": False}
    with torch.no_grad():
        expected = model.generate(**batch, **options)
        with vtprune.make("fastv", keep=1.0, layer=2)(model):
            assert torch.equal(model.generate(**batch, **options), expected)


def test_a_session_made_on_the_meta_device_runs_once_the_model_is_materialised(batch):
    from transformers import Gemma3ForConditionalGeneration

    config = build_tiny_gemma3().config
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(copy.deepcopy(config)).eval()
        session = vtprune.make("random", keep=4)(model)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad(), session as trace:
        model(**batch)
    assert [after for _, after in trace.visual_tokens()] == [16, 4]


# ------------------------------------------------------------------------------------------------ the masks
def hand_mask(blocks, layer_type):
    """[L, L] bool: causal OR same image block, AND (on sliding layers) key within the window before the query."""
    length = blocks.shape[0]
    query, key = torch.arange(length)[:, None], torch.arange(length)[None]
    allowed = (key <= query) | ((blocks[:, None] == blocks[None]) & (blocks[:, None] >= 0))
    if layer_type == "sliding_attention":
        allowed &= query - key < WINDOW
    return allowed


def blocks_of(types):
    """[L] long: the image block of every token (runs of token type 1 numbered 0, 1, ...; -1 at text)."""
    starts = types.bool() & ~F.pad(types.bool(), (1, 0))[:-1]
    return torch.where(types.bool(), starts.long().cumsum(0) - 1, -1)


@pytest.mark.parametrize("name, options", [("random", {"keep": 5, "seed": 1}), ("fastv", {"keep": 6, "layer": 2})])
def test_layers_after_a_cut_get_the_image_blocks_of_the_kept_tokens(model, batch, name, options):
    """Every layer after the cut attends with the hand-built mask of the compacted sequence: the kept tokens of one
    image (or crop) attend to each other both ways, other tokens causally, sliding layers within WINDOW kept tokens."""
    seen = {}
    layers = model.model.language_model.layers
    with torch.no_grad(), vtprune.make(name, **options)(model) as trace:
        handles = [layer.register_forward_pre_hook(  # after the session's hooks, which give the masks
            lambda module, args, kwargs, i=i: seen.__setitem__(i, kwargs["attention_mask"]), with_kwargs=True)
            for i, layer in enumerate(layers)]
        try:
            model(**batch)
        finally:
            for handle in handles:
                handle.remove()
    cut = 0 if name == "random" else options["layer"]
    for b in range(2):
        kept = kept_ordinals(trace, b)
        rows = kept_rows(batch, b, kept)
        types = batch["token_type_ids"][b][batch["attention_mask"][b].bool()][rows]
        n = rows.numel()
        for i in range(cut, len(layers)):
            mask = seen[i][b, 0, -n:, -n:]
            assert torch.equal(mask, hand_mask(blocks_of(types), LAYER_TYPES[i])), (b, i)
            assert not bool(seen[i][b, 0, -n:, : seen[i].shape[-1] - n].any())  # padding is never seen
    assert len(kept_ordinals(trace, 0)) < visual_counts(batch)[0]


# -------------------------------------------------------------------------------------- lengths and the cache
@pytest.mark.parametrize("name, options", [("random", {"keep": 5, "seed": 2}), ("pool", {"keep": 4})])
def test_prefill_length_is_text_plus_kept(model, batch, name, options):
    seen = []
    lm = model.model.language_model
    with torch.no_grad(), vtprune.make(name, **options)(model) as trace:
        handle = lm.register_forward_pre_hook(  # after the session's own hook, which cuts the input
            lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
        try:
            out = model(**batch, use_cache=True)
        finally:
            handle.remove()
    text = batch["attention_mask"].sum(1) - torch.tensor(visual_counts(batch))
    kept = torch.tensor([after for _, after in trace.visual_tokens()])
    assert kept.tolist() == {"random": [4 * 5, 5], "pool": [4 * 4, 4]}[name]  # per image (original and crops)
    for layer in out.cache.layers:  # sliding layers included: every layer holds the cut prompt
        assert layer.keys.shape[-2] == seen[0] == int((text + kept).max())
        assert layer.segment.mask2d.sum(1).tolist() == (text + kept).tolist()


def test_kv_cache_site_compresses_every_layer(model, batch, dense):
    real = batch["attention_mask"].sum(1)
    with torch.no_grad(), vtprune.make("gui-kv", keep=0.5)(model):
        out = model(**batch, use_cache=True)
    budgets = (real // 2).tolist()
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [max(budgets)] * len(LAYER_TYPES)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[mask], dense[0][mask], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- hand-made reference
def dense_embeddings(model, batch):
    """[B, L, D]: token embeddings (Gemma's scaled embedding) with every view's projected tokens at the image tokens."""
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        views = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output  # [N, 16, D]
    return embeds.masked_scatter((ids == IMAGE)[..., None], views.reshape(-1, views.shape[-1]))


def pooled_views(batch, embeds, cells):
    """embeds with each view's grid average-pooled to cells × cells by torch, each mean at its cell's first token;
    returns them and, per sample, the visual ordinals kept."""
    out, kept = embeds.clone(), []
    step = SIDE // cells
    corners = [r * step * SIDE + c * step for r in range(cells) for c in range(cells)]
    for b in range(embeds.shape[0]):
        where = (batch["input_ids"][b] == IMAGE).nonzero().squeeze(1)
        sample = []
        for first in range(0, where.numel(), PER_IMAGE):
            view = where[first : first + PER_IMAGE]
            grid = embeds[b, view].T.reshape(1, -1, SIDE, SIDE)
            means = F.adaptive_avg_pool2d(grid, cells).reshape(embeds.shape[-1], -1).T  # [cells², D]
            out[b, view[corners]] = means
            sample += [first + c for c in corners]
        kept.append(sample)
    return out, kept


def kept_rows(batch, b, kept):
    """Sample b's real-token indices kept: its text and the visual ordinals `kept`."""
    ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
    image = (ids == IMAGE).nonzero().squeeze(1)
    keep = ids != IMAGE
    keep[image[torch.as_tensor(kept, dtype=torch.long)]] = True
    return keep.nonzero().squeeze(1)


def hand_sample(batch, b, embeds, kept, cut):
    """Sample b's real tokens and its kept visual ordinals; a cut before decoder layer `cut` (0: the LLM input,
    positions renumbered 0..m-1; else the dense positions kept, decoding continuing at n)."""
    real = batch["attention_mask"][b].bool()
    rows = kept_rows(batch, b, kept)
    n, m = int(real.sum()), rows.numel()
    full = torch.arange(n)[None]
    short, next_short = (torch.arange(m)[None], torch.tensor([m])) if cut == 0 else (full[:, rows], torch.tensor([n]))
    return Sample(embeds[b][real], full, rows, short, torch.tensor([n]), next_short, cut)


def run(model, s: Sample, types, new_tokens, blocks=True):
    """[m + t, V] logits of the kept prompt and the t tokens given after it (batch 1, no cache), each layer with its
    kind's RoPE and the hand mask of the sequence it runs on (`blocks=False`: causal image tokens)."""
    lm = model.model.language_model
    t, n = len(new_tokens), s.embeds.shape[0]
    steps = torch.arange(t)
    new = model.model.get_input_embeddings()(torch.tensor(new_tokens, dtype=torch.long)).reshape(t, s.embeds.shape[-1])
    x = torch.cat([s.embeds, new])[None]
    types = torch.cat([types, torch.zeros(t, dtype=types.dtype)]) if blocks else torch.zeros(n + t, dtype=torch.long)
    full_positions = torch.cat([s.positions, s.next_full[:, None] + steps], dim=1)
    short_positions = torch.cat([s.short_positions, s.next_short[:, None] + steps], dim=1)
    short_rows = torch.cat([s.rows, n + steps])
    if s.cut == 0:
        x, types = x[:, short_rows], types[short_rows]
    for index, layer in enumerate(lm.layers):
        if index == s.cut and s.cut > 0:
            x, types = x[:, short_rows], types[short_rows]
        positions = full_positions if index < s.cut else short_positions
        mask = hand_mask(blocks_of(types), LAYER_TYPES[index])[None, None]
        x = layer(x, attention_mask=mask, position_embeddings=lm.rotary_emb(x, positions, LAYER_TYPES[index]))
    return model.lm_head(lm.norm(x))[0]


def reference_greedy(model, sample, types, steps=STEPS, blocks=True):
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(run(model, sample, types, tokens, blocks)[-1])
            tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


def kept_ordinals(trace, b):
    return [s for s in trace.forwards[0].sites if s.sample == b][-1].kept.tolist()


def sample_types(batch, b):
    return batch["token_type_ids"][b][batch["attention_mask"][b].bool()]


def test_reference_without_a_cut_reproduces_dense(model, batch, dense):
    embeds = dense_embeddings(model, batch)
    for b in range(2):
        everything = list(range(visual_counts(batch)[b]))
        sample = hand_sample(batch, b, embeds, everything, cut=0)
        tokens, logits = reference_greedy(model, sample, sample_types(batch, b))
        assert dense[1][b, -STEPS:].tolist() == tokens
        torch.testing.assert_close(dense[2][b], logits, atol=1e-5, rtol=0)


CASES = {  # name -> (options, decoder layer the cut sits before)
    "random": ({"keep": 5, "seed": 3}, 0),
    "pool": ({"keep": 4}, 0),
    "divprune": ({"keep": 6}, 0),
    "fastv-sliding": ({"keep": 6, "layer": 2}, 2),
    "fastv-global": ({"keep": 6, "layer": 3}, 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generate_equals_the_hand_made_reference(model, batch, case):
    """Batched, left-padded generate() under a real budget equals, per sample, the language model run on that sample
    alone with its kept tokens compacted by hand (pool: each view pooled 4×4 -> 2×2 by torch, at the cells' first
    tokens), renumbered before the LLM or at their own positions inside it, the kept image tokens one bidirectional
    block per image, sliding windows over the compacted sequence."""
    options, cut = CASES[case]
    name = case.split("-")[0]
    with torch.no_grad(), vtprune.make(name, **options)(model) as trace:
        sequences, steps = generate(model, batch)
    embeds = dense_embeddings(model, batch)
    if name == "pool":
        embeds, kept = pooled_views(batch, embeds, cells=2)
        assert [kept_ordinals(trace, b) for b in range(2)] == kept
    else:
        kept = [kept_ordinals(trace, b) for b in range(2)]
    for b in range(2):
        sample = hand_sample(batch, b, embeds, kept[b], cut)
        tokens, logits = reference_greedy(model, sample, sample_types(batch, b))
        assert sequences[b, -STEPS:].tolist() == tokens
        torch.testing.assert_close(steps[b], logits, atol=1e-4, rtol=0)
        if b == 0:  # the blocks are not decoration: a causal reference does not match
            _, causal = reference_greedy(model, sample, sample_types(batch, b), blocks=False)
            assert (causal - logits).abs().max() > 1e-3
    assert [after for _, after in trace.visual_tokens(0)] == [len(kept[0]), len(kept[1])]
    assert len(kept[0]) < visual_counts(batch)[0] and len(kept[1]) < visual_counts(batch)[1]
