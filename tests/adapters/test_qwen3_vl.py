"""Qwen3-VL adapter: layout of images and video frames, keep-all exactness, and generate() under a pre-LLM cut and
FastV cuts (before and after the DeepStack layers) equal to a hand-made reference: the language model's own layers run
on the hand-compacted sequence, with hand-made M-RoPE positions and the DeepStack features of the kept tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import vtprune
from tests.adapters.qwen3_builders import (
    IMAGE,
    VIDEO,
    VISION_END,
    VISION_START,
    build_qwen3_processor,
    build_tiny_qwen3,
    image_batch,
    video_batch,
)
from tests.adapters.keep_all import assert_keep_all_matches_dense, assert_refused_untouched

KEEP_ALL = [
    ("random", {"keep": 1.0}),
    ("pool", {"keep": 1.0}),
    ("fastv", {"keep": 1.0, "layer": 1}),  # before the DeepStack injection after layer 1
    ("fastv", {"keep": 1.0, "layer": 3}),  # after every injection
    ("dart", {"keep": 1.0, "layer": 2}),
    ("divprune", {"keep": 1.0}),
    ("gui-kv", {"keep": 1.0}),
    ("zipvl", {"keep": 1.0}),
    ("transprune", {"keep": 1.0, "keep_ratios": (0.5,), "prune_layers": (1,)}),
    ("cdpruner", {"keep": 1.0}),
    ("pyramiddrop", {"keep": 1.0, "layer_list": (1, 2)}),
    ("spatten", {"keep": 1.0}),
    ("streamingllm", {"keep": 1.0, "key_positions": "original"}),  # slot positions are refused with M-RoPE
    ("scissorhands", {"keep": 1.0}),
    ("a2sf", {"keep": 1.0}),
    ("ems", {"keep": 1.0}),
]
REFUSED = {  # method -> (options, the reason in its error)
    "vtc-cls": ({}, r"\[CLS\] token"),
    "visionzip": ({}, r"\[CLS\] token"),
    "vispruner": ({}, r"\[CLS\] token"),
    "scope": ({}, r"\[CLS\] token"),
    "holov": ({}, r"\[CLS\] token"),
    "vflowopt": ({"llm_layers": (1, 2)}, "VisionAttention"),
    "hiprune": ({"object_layer": 0}, "VisionAttention"),
    "tome": ({}, "VisionKeys"),
}
STEPS = 3


@pytest.fixture(scope="module")
def model():
    return build_tiny_qwen3()


@pytest.fixture(scope="module", params=["images", "videos"])
def case(request, model):
    """(batch, dense logits, dense generate sequences, dense per-step logits) for images and for videos + image."""
    processor = build_qwen3_processor()
    batch = image_batch(processor) if request.param == "images" else video_batch(processor)
    with torch.no_grad():
        logits = model(**batch).logits
        sequences, steps = generate(model, batch)
    return batch, logits, sequences, steps


def generate(model, batch, steps=STEPS):
    out = model.generate(
        **batch, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def test_every_method_runs_or_is_refused():
    assert {name for name, _ in KEEP_ALL} | set(REFUSED) == set(vtprune.available())


@pytest.mark.parametrize("name, options", KEEP_ALL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KEEP_ALL)])
def test_keep_all_reproduces_dense(model, case, name, options):
    batch, *dense = case
    trace = assert_keep_all_matches_dense(model, batch, tuple(dense), vtprune.make(name, **options), generate)
    visual = ((batch["input_ids"] == IMAGE) | (batch["input_ids"] == VIDEO)).sum(1).tolist()
    assert trace.visual_tokens() == [(n, n) for n in visual]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_methods_without_their_signals_are_refused(model, name):
    options, message = REFUSED[name]
    assert_refused_untouched(model, name, options, message)


def test_keep_all_beam_search_reproduces_dense(model, case):
    """generate() encodes each sample's media once, then repeats the rows for the beams."""
    batch = case[0]
    options = {"max_new_tokens": 2, "num_beams": 2, "do_sample": False}
    with torch.no_grad():
        dense = model.generate(**batch, **options)
        with vtprune.make("fastv", keep=1.0, layer=1)(model):
            assert torch.equal(model.generate(**batch, **options), dense)


def test_generate_without_cache_reruns_the_prompt_each_step(model, case):
    batch, _, dense_sequences, _ = case
    with torch.no_grad(), vtprune.make("random", keep=1.0)(model):
        sequences = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, use_cache=False)
    assert torch.equal(sequences, dense_sequences)


def test_layout_has_a_span_per_image_and_per_frame(model):
    batch = video_batch(build_qwen3_processor())
    with torch.no_grad(), vtprune.make("random", keep=1.0)(model) as trace:
        model(**batch)
    layout = trace.forwards[0].layout
    described = [[(s.kind, s.image, s.video, s.grid) for s in spans] for spans in layout.spans]
    assert described == [
        [("frame", 1, 0, (4, 6)), ("frame", 2, 0, (4, 6)), ("image", 0, None, (4, 6))],
        [("frame", 3, 1, (4, 4)), ("frame", 4, 1, (4, 4)), ("frame", 5, 1, (4, 4))],
    ]
    ids = batch["input_ids"]
    for b, spans in enumerate(layout.spans):
        for span in spans:
            assert int(ids[b, span.start - 1]) == VISION_START and int(ids[b, span.end]) == VISION_END
            token = VIDEO if span.kind == "frame" else IMAGE
            assert bool((ids[b, span.start : span.end] == token).all())


def test_a_video_budget_spans_its_frames(model):
    batch = video_batch(build_qwen3_processor())
    with torch.no_grad(), vtprune.make("random", keep=5, scope="video", seed=1)(model) as trace:
        model(**batch)
    site = trace.forwards[0].sites
    kept = {b: site[b].kept.numel() for b in range(2)}
    assert kept == {0: 2 * 5 + 5, 1: 3 * 5}  # an int budget per frame, pooled over the video; the image on its own


# ----------------------------------------------------------------------------------------- hand-made reference
def kept_per_item(trace):
    """{span.image: kept patch numbers} of the (single) cut of the first forward, and the layout it cut."""
    record = trace.forwards[0]
    kept = {}
    for site in record.sites:
        for span, sl in record.layout.ordinal_slices(site.sample):
            inside = site.kept[(site.kept >= sl.start) & (site.kept < sl.stop)] - sl.start
            kept[span.image] = span.patch_index[inside].tolist()
    return kept, record.layout


def hand_positions(ids, items, kept, renumber):
    """Positions of one sample's real tokens by the documented rule. Text gets (c, c, c); item tokens (image or frame,
    in prompt order) with patch p on a grid of `cols` columns get (c, c + p // cols, c + p % cols); after an item c
    moves on by max(rows, cols) ("original": every token keeps its place) or by 1 + the largest kept offset
    ("renumber"). Returns [3, n] positions of every real token (dropped ones included), the kept token indices and
    the next position."""
    rows, keep, cursor, i, item = [], [], 0, 0, 0
    while i < len(ids):
        if ids[i] not in (IMAGE, VIDEO):
            rows.append([cursor] * 3)
            keep.append(i)
            cursor, i = cursor + 1, i + 1
            continue
        image, (h, w) = items[item]
        offsets = [(0, p // w, p % w) for p in range(h * w)]
        rows += [[cursor + t, cursor + r, cursor + c] for t, r, c in offsets]
        keep += [i + p for p in kept[image]]
        if renumber:
            cursor += 1 + max(max(offsets[p]) for p in kept[image]) if kept[image] else 0
        else:
            cursor += max(h, w)
        i, item = i + h * w, item + 1
    return torch.tensor(rows).T, keep, cursor


def dense_inputs(model, batch):
    """The language model's dense input embeddings [B, L, D] and DeepStack features per level [B, L, D] (zero at
    text), from the model's own encoder methods."""
    inner = model.model
    ids = batch["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    levels = None
    for token, pixels, grid, encode in (
        (IMAGE, "pixel_values", "image_grid_thw", inner.get_image_features),
        (VIDEO, "pixel_values_videos", "video_grid_thw", inner.get_video_features),
    ):
        if pixels not in batch:
            continue
        out = encode(batch[pixels], batch[grid])
        where = (ids == token)[..., None]
        embeds = embeds.masked_scatter(where, torch.cat(out.pooler_output))
        stacks = [torch.zeros_like(embeds).masked_scatter(where, torch.cat(f)) for f in out.deepstack_features]
        levels = stacks if levels is None else [a + b for a, b in zip(levels, stacks)]
    return embeds, levels


def attention_mask4d(mask2d, past, query):
    """[B, 1, q, past + q] bool: causal over the keys a sample holds; a padding query sees itself (stays finite)."""
    keys = torch.arange(past + query)
    causal = keys[None, :] <= (past + torch.arange(query))[:, None]
    allowed = causal[None] & mask2d.bool()[:, None, :]
    allowed |= (keys[None, :] == (past + torch.arange(query))[:, None])[None]
    return allowed[:, None]


def run_layers(lm, layers, x, mask2d, positions, cache, past, deepstack=None):
    """The language model's decoder layers `layers` on x [B, q, D] at M-RoPE positions [3, B, q]; DeepStack features
    (per level [B, q, D], zero at text) are added after the layers that inject them."""
    rope = lm.rotary_emb(x, positions)
    mask = attention_mask4d(mask2d, past, x.shape[1])
    for index in layers:
        x = lm.layers[index](x, position_embeddings=rope, attention_mask=mask, cache=cache, use_cache=True)
        if deepstack is not None and index < len(deepstack):
            x = x + deepstack[index]
    return x


def left_pad(rows, length):
    out = rows[0].new_zeros(len(rows), length, *rows[0].shape[1:])
    for b, row in enumerate(rows):
        out[b, length - row.shape[0] :] = row
    return out


def reference_generate(model, batch, layout, kept, cut_layer, renumber, steps=STEPS, pooled=None,
                       pool_deepstack=True):
    """Greedy tokens [B, steps] and logits [B, steps, V] of the model with the visual tokens not in `kept` removed
    before decoder layer `cut_layer` (0: before the language model), everything built by hand."""
    lm = model.model.language_model
    embeds, deepstack = dense_inputs(model, batch)
    if pooled is not None:  # each kept token carries its cell's mean (input embeddings and DeepStack features alike)
        embeds = pooled(layout, embeds)
        deepstack = [pooled(layout, f) for f in deepstack] if pool_deepstack else deepstack
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    batch_size, n_layers = ids.shape[0], len(lm.layers)
    full, compact, nexts = [], [], []  # per sample: dense positions; (kept positions, kept indices); next position
    for b in range(batch_size):
        sample = ids[b][real[b]].tolist()
        items = [(s.image, s.grid) for s in layout.spans[b]]
        full.append(hand_positions(sample, items, kept, renumber=False)[0])
        rows, keep, cursor = hand_positions(sample, items, kept, renumber)
        compact.append((rows[:, keep], keep))
        nexts.append(cursor)
    cache = DynamicCache(config=lm.config)
    x, full_mask = embeds, real.long()
    if cut_layer > 0:  # the first layers on the whole sequence, with their DeepStack injections
        positions = left_pad([rows.T for rows in full], ids.shape[1]).permute(2, 0, 1)
        x = run_layers(lm, range(cut_layer), x, full_mask, positions, cache, 0, deepstack)
    # the kept tokens, with the DeepStack features still to inject, left-padded again
    length = max(len(k) for _, k in compact)
    x = left_pad([x[b][real[b]][k] for b, (_, k) in enumerate(compact)], length)
    levels = [left_pad([f[b][real[b]][k] for b, (_, k) in enumerate(compact)], length) for f in deepstack]
    positions = left_pad([p.T for p, _ in compact], length).permute(2, 0, 1)
    cut_mask = left_pad([torch.ones(len(k), dtype=torch.long) for _, k in compact], length)
    x = run_layers(lm, range(cut_layer, n_layers), x, cut_mask, positions, cache, 0, levels)
    return decode_greedy(model, x, full_mask, cut_mask, nexts, cut_layer, steps, cache)


def decode_greedy(model, x, full_mask, cut_mask, nexts, cut_layer, steps, cache):
    """Greedy tokens and logits [B, steps(, V)] after a hand-made prefill whose last hidden states are `x`: each
    step runs layers < cut_layer under `full_mask` and the others under `cut_mask`, at position nexts[b] + t - 1."""
    lm = model.model.language_model
    n_layers, batch_size = len(lm.layers), x.shape[0]
    logits = [model.lm_head(lm.norm(x[:, -1]))]
    tokens = [logits[-1].argmax(-1)]
    nxt = torch.tensor(nexts)
    for t in range(1, steps):
        step = model.model.get_input_embeddings()(tokens[-1][:, None])
        step_positions = (nxt + t - 1).view(1, batch_size, 1).expand(3, batch_size, 1)
        one = torch.ones(batch_size, 1, dtype=torch.long)
        if cut_layer > 0:
            full_mask = torch.cat([full_mask, one], dim=1)
            step = run_layers(lm, range(cut_layer), step, full_mask, step_positions, cache, full_mask.shape[1] - 1)
        cut_mask = torch.cat([cut_mask, one], dim=1)
        step = run_layers(lm, range(cut_layer, n_layers), step, cut_mask, step_positions, cache, cut_mask.shape[1] - 1)
        logits.append(model.lm_head(lm.norm(step[:, -1])))
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)


def language_model_lengths(model):
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return seen, handle


@pytest.mark.parametrize("method, options, cut_layer, renumber", [
    ("random", {"keep": 5, "seed": 3}, 0, True),
    ("fastv", {"keep": 4, "layer": 1}, 1, False),  # the DeepStack level injected after layer 1 follows the cut
    ("fastv", {"keep": 4, "layer": 3}, 3, False),  # every injection happened before the cut
])
def test_generate_under_a_cut_equals_the_hand_made_reference(model, case, method, options, cut_layer, renumber):
    batch = case[0]
    with torch.no_grad():
        with vtprune.make(method, **options)(model) as trace:
            seen, handle = language_model_lengths(model)
            sequences, logits = generate(model, batch)
            handle.remove()
        kept, layout = kept_per_item(trace)
        expected, expected_logits = reference_generate(model, batch, layout, kept, cut_layer, renumber)
    if cut_layer == 0:  # the prefill holds the longest sample's text and kept visual tokens (spare padding dropped)
        length = batch["attention_mask"].sum(1)
        visual = ((batch["input_ids"] == IMAGE) | (batch["input_ids"] == VIDEO)).sum(1)
        kept_count = torch.tensor([site.kept.numel() for site in trace.forwards[0].sites])
        assert seen[0] == int((length - visual + kept_count).max())
    assert all(len(kept[s.image]) < s.length for spans in layout.spans for s in spans)  # the cut dropped tokens
    assert torch.equal(sequences[:, -STEPS:], expected)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)


def test_the_reference_is_the_dense_model_when_nothing_is_dropped(model, case):
    """The hand-made pipeline itself reproduces dense generate() with every token kept (so it can fail)."""
    batch, _, dense_sequences, dense_logits = case
    with torch.no_grad(), vtprune.make("random", keep=1.0)(model) as trace:
        model(**batch)
    kept, layout = kept_per_item(trace)
    with torch.no_grad():
        for cut_layer in (0, 1):
            tokens, logits = reference_generate(model, batch, layout, kept, cut_layer, renumber=False)
            assert torch.equal(tokens, dense_sequences[:, -STEPS:])
            torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=0)


def average_pooled(kept):
    """x [B, L, D] with each image's / frame's grid average-pooled (torch's adaptive_avg_pool2d) to the cells whose
    top-left patches are the kept ones, each cell's mean written at its top-left patch."""

    def pool(layout, x):
        x = x.clone()
        for b, spans in enumerate(layout.spans):
            for span in spans:
                rows, cols = span.grid
                top_left = torch.tensor(kept[span.image])
                h, w = top_left.div(cols, rounding_mode="floor").unique().numel(), (top_left % cols).unique().numel()
                grid = x[b, span.start : span.end].T.reshape(1, -1, rows, cols)
                means = torch.nn.functional.adaptive_avg_pool2d(grid, (h, w)).reshape(x.shape[-1], h * w).T
                x[b, span.start + top_left] = means
        return x

    return pool


def test_generate_under_average_pooling_equals_the_hand_made_reference(model, case):
    """A pre-LLM merge: every kept token and its DeepStack features are the means over its pooling cell."""
    batch = case[0]
    with torch.no_grad():
        with vtprune.make("pool", keep=6)(model) as trace:
            sequences, logits = generate(model, batch)
        kept, layout = kept_per_item(trace)
        assert trace.forwards[0].sites[0].merged  # the cut merged tokens
        expected, expected_logits = reference_generate(
            model, batch, layout, kept, 0, renumber=True, pooled=average_pooled(kept)
        )
        _, unpooled_deepstack = reference_generate(
            model, batch, layout, kept, 0, renumber=True, pooled=average_pooled(kept), pool_deepstack=False
        )
    assert torch.equal(sequences[:, -STEPS:], expected)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    assert (unpooled_deepstack - expected_logits).abs().max() > 1e-3  # the DeepStack merge is what this checks


# ------------------------------------------------------------------------------------------------ Qwen3-VL-MoE
@pytest.fixture(scope="module")
def moe_model():
    return build_tiny_qwen3(moe=True)


@pytest.mark.parametrize("method, options, cut_layer", [
    ("random", {"keep": 1.0}, 0),
    ("random", {"keep": 5, "seed": 3}, 0),
    ("fastv", {"keep": 4, "layer": 1}, 1),
])
@pytest.mark.parametrize("media", ["images", "videos"])
def test_moe_generate_equals_the_hand_made_reference(moe_model, media, method, options, cut_layer):
    """Qwen3-VL-MoE (sparse expert MLPs) shares the adapter; keep-all is the dense model, a cut the reference."""
    processor = build_qwen3_processor()
    batch = image_batch(processor) if media == "images" else video_batch(processor)
    with torch.no_grad():
        dense, dense_logits = generate(moe_model, batch)
        with vtprune.make(method, **options)(moe_model) as trace:
            sequences, logits = generate(moe_model, batch)
        kept, layout = kept_per_item(trace)
        renumber = method != "fastv"
        expected, expected_logits = reference_generate(moe_model, batch, layout, kept, cut_layer, renumber)
    assert torch.equal(sequences[:, -STEPS:], expected)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    if options["keep"] == 1.0:
        assert torch.equal(sequences, dense) and torch.equal(logits, dense_logits)
    else:
        assert (logits - dense_logits).abs().max() > 1e-3


def static_generate(model, batch, beams=1, **options):
    out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, num_beams=beams, output_logits=True,
                         return_dict_in_generate=True, **options)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("beams", [1, 2])
def test_static_cache_keep_all_equals_dense_and_a_budget_equals_the_dynamic_cache(model, case, beams):
    """generate(cache_implementation="static"): keep=1.0 equals the dense static-cache generate for every method the
    family runs (zipvl's llm_attention site refused in one line); a real budget before the LLM, before and after the
    DeepStack layers, on the cache and while decoding equals the same method with the DynamicCache."""
    batch = case[0]
    static = dict(cache_implementation="static")
    with torch.no_grad():
        dense = static_generate(model, batch, beams, **static)
        for name, options in KEEP_ALL:
            if name == "zipvl":
                with pytest.raises(vtprune.VTPruneError, match="StaticCache") as refusal:
                    with vtprune.make(name, **options)(model):
                        static_generate(model, batch, beams, **static)
                assert "\n" not in str(refusal.value)
                continue
            with vtprune.make(name, **options)(model):
                sequences, logits = static_generate(model, batch, beams, **static)
            assert torch.equal(sequences, dense[0]), name
            torch.testing.assert_close(logits, dense[1], atol=1e-5, rtol=0, msg=name)
        budgets = [("random", {"keep": 3}), ("fastv", {"keep": 3, "layer": 1}), ("fastv", {"keep": 3, "layer": 3}),
                   ("gui-kv", {"keep": 0.5}), ("scissorhands", {"keep": 12, "recent": 2})]
        for name, options in budgets:
            with vtprune.make(name, **options)(model):
                dynamic = static_generate(model, batch, beams)
            with vtprune.make(name, **options)(model):
                sequences, logits = static_generate(model, batch, beams, **static)
            assert torch.equal(sequences, dynamic[0]), (name, options)
            torch.testing.assert_close(logits, dynamic[1], atol=1e-5, rtol=0, msg=f"{name} {options}")
            assert not torch.allclose(logits, dense[1], atol=1e-3), (name, options)  # the budget bites
