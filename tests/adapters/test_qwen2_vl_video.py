"""Qwen2-VL / Qwen2.5-VL adapter on videos (mixed with images, batch of 2, left padded): one span per temporal group,
keep-all exactness for every method the family runs, a video budget pooled over its groups, and generate() under a
pre-LLM random cut, average pooling and FastV equal to a hand-made reference (the language model's own layers on the
hand-compacted sequence, with M-RoPE positions built by hand from the rule below)."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import DynamicCache

import vtprune
from tests.adapters.keep_all import assert_keep_all_matches_dense
from tests.adapters.qwen_builders import (
    IMAGE,
    KINDS,
    VIDEO,
    VISION_END,
    VISION_START,
    build_qwen_processor,
    build_tiny_qwen,
    video_batch,
)
from tests.adapters.test_qwen2_vl import KEEP_ALL, NOT_ON_QWEN
from tests.adapters.test_qwen3_vl import (
    average_pooled,
    decode_greedy,
    kept_per_item,
    left_pad,
    run_layers,
)

STEPS = 3
# Every method the family runs, with options that keep every token: the screenshot list, and spatten, which runs here
# given cut layers inside the tiny 3-layer model (its default layers need more)
VIDEO_KEEP_ALL = [*KEEP_ALL, ("spatten", {"keep": 1.0, "layers": (1, 2)})]
REFUSED = set(NOT_ON_QWEN) - {"spatten"}


@pytest.fixture(scope="module", params=KINDS)
def case(request):
    """(model, batch, dense logits, dense generate sequences, dense per-step logits)."""
    model = build_tiny_qwen(request.param)
    batch = video_batch(build_qwen_processor(request.param))
    with torch.no_grad():
        logits = model(**batch).logits
        sequences, steps = generate(model, batch)
    return model, batch, logits, sequences, steps


def generate(model, batch, steps=STEPS):
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def visual_counts(batch):
    return ((batch["input_ids"] == IMAGE) | (batch["input_ids"] == VIDEO)).sum(1)


def test_every_method_is_covered():
    assert {name for name, _ in VIDEO_KEEP_ALL} | REFUSED == set(vtprune.available())
    assert not {name for name, _ in VIDEO_KEEP_ALL} & REFUSED


@pytest.mark.parametrize("name, options", VIDEO_KEEP_ALL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VIDEO_KEEP_ALL)])
def test_keep_all_reproduces_dense(case, name, options):
    model, batch, *dense = case
    trace = assert_keep_all_matches_dense(model, batch, tuple(dense), vtprune.make(name, **options), generate)
    assert trace.visual_tokens() == [(n, n) for n in visual_counts(batch).tolist()]


def test_keep_all_beam_search_reproduces_dense(case):
    """generate() encodes each sample's images and videos once, then repeats the rows for the beams."""
    model, batch = case[:2]
    options = {"max_new_tokens": 2, "num_beams": 2, "do_sample": False}
    with torch.no_grad():
        dense = model.generate(**batch, **options)
        with vtprune.make("fastv", keep=1.0, layer=1)(model):
            assert torch.equal(model.generate(**batch, **options), dense)


def test_layout_has_a_span_per_temporal_group(case):
    model, batch = case[:2]
    with torch.no_grad(), vtprune.make("random", keep=1.0)(model) as trace:
        model(**batch)
    layout = trace.forwards[0].layout
    described = [[(s.kind, s.image, s.video, s.grid) for s in spans] for spans in layout.spans]
    assert described == [  # video_grid_thw (2, 8, 12) and (3, 8, 8): T groups of (h / 2) x (w / 2) tokens
        [("frame", 1, 0, (4, 6)), ("frame", 2, 0, (4, 6)), ("image", 0, None, (4, 6))],
        [("frame", 3, 1, (4, 4)), ("frame", 4, 1, (4, 4)), ("frame", 5, 1, (4, 4))],
    ]
    ids = batch["input_ids"]
    for b, spans in enumerate(layout.spans):
        frames = [s for s in spans if s.kind == "frame"]
        assert int(ids[b, frames[0].start - 1]) == VISION_START and int(ids[b, frames[-1].end]) == VISION_END
        assert all(a.end == c.start for a, c in itertools.pairwise(frames))  # a video's groups are one run
        for span in spans:
            token = VIDEO if span.kind == "frame" else IMAGE
            assert bool((ids[b, span.start : span.end] == token).all())


def test_a_video_budget_spans_its_groups(case):
    model, batch = case[:2]
    with torch.no_grad(), vtprune.make("random", keep=5, scope="video", seed=1)(model) as trace:
        model(**batch)
    record = trace.forwards[0]
    kept = {b: record.sites[b].kept.numel() for b in range(2)}
    assert kept == {0: 2 * 5 + 5, 1: 3 * 5}  # an int budget per group, pooled over the video; the image on its own
    per_item = kept_per_item(trace)[0]
    assert len(per_item[0]) == 5 and sum(len(per_item[i]) for i in (1, 2)) == 10


# ----------------------------------------------------------------------------------------- hand-made reference
def items_of(layout, b, batch, model):
    """Sample b's items in prompt order: (grid, [span.image of each temporal group], t-id step between groups). An
    image is one group; a video's groups are its consecutive frame spans. The step is 1 under Qwen2-VL and
    tokens_per_second * second_per_grid_t under Qwen2.5-VL."""
    per_second = getattr(model.config.vision_config, "tokens_per_second", None)
    items = []
    for span in layout.spans[b]:
        if span.kind == "frame" and items and items[-1][3] == span.video:
            items[-1][1].append(span.image)
            continue
        step = 1.0
        if span.kind == "frame" and per_second is not None:
            step = per_second * float(batch["second_per_grid_ts"][span.video])
        items.append((span.grid, [span.image], step, span.video if span.kind == "frame" else None))
    return items


def hand_positions(ids, items, kept, renumber):
    """Positions of one sample's real tokens by the rule: text gets (c, c, c); token (g, p) of an item (temporal group
    g, patch p on a grid of `cols` columns) gets (c + int(g * step), c + p // cols, c + p % cols); after the item c
    moves on by max(rows, cols) ("original") or 1 + the largest kept max(p // cols, p % cols) ("renumber"; 0 if nothing
    is kept). generate() decodes from the prompt's last position + 1 (transformers 5.25: even where a Qwen2.5-VL video's t
    ids go further). Returns [3, n] positions of every real token, the kept token indices and the decoding start."""
    rows, keep, cursor, i, item = [], [], 0, 0, 0
    while i < len(ids):
        if ids[i] not in (IMAGE, VIDEO):
            rows.append([cursor] * 3)
            keep.append(i)
            cursor, i = cursor + 1, i + 1
            continue
        (h, w), groups, step, _ = items[item]
        spatial = []
        for g, image in enumerate(groups):
            rows += [[cursor + int(g * step), cursor + p // w, cursor + p % w] for p in range(h * w)]
            keep += [i + g * h * w + p for p in kept[image]]
            spatial += [max(p // w, p % w) for p in kept[image]]
        if renumber:
            cursor += 1 + max(spatial) if spatial else 0
        else:
            cursor += max(h, w)
        i, item = i + len(groups) * h * w, item + 1
    rows = torch.tensor(rows).T
    start = 1 + int(rows[:, keep[-1]].max())
    return rows, keep, start


def dense_embeds(model, batch):
    """The language model's dense input embeddings [B, L, D], from the model's own encoder methods."""
    inner, ids = model.model, batch["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    image = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    video = inner.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output
    embeds = embeds.masked_scatter((ids == IMAGE)[..., None], torch.cat(image))
    return embeds.masked_scatter((ids == VIDEO)[..., None], torch.cat(video))


def reference_generate(model, batch, layout, kept, cut_layer, renumber, pooled=None, steps=STEPS):
    """Greedy tokens [B, steps] and logits [B, steps, V] with the visual tokens not in `kept` removed before decoder
    layer `cut_layer` (0: before the language model), everything built by hand."""
    lm = model.model.language_model
    embeds = dense_embeds(model, batch)
    if pooled is not None:  # each kept token carries its cell's mean
        embeds = pooled(layout, embeds)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    batch_size, n_layers = ids.shape[0], len(lm.layers)
    full, compact, starts = [], [], []
    for b in range(batch_size):
        sample = ids[b][real[b]].tolist()
        items = items_of(layout, b, batch, model)
        full.append(hand_positions(sample, items, kept, renumber=False)[0])
        rows, keep, start = hand_positions(sample, items, kept, renumber)
        compact.append((rows[:, keep], keep))
        starts.append(start)
    cache = DynamicCache(config=lm.config)
    x, full_mask = embeds, real.long()
    if cut_layer > 0:  # the first layers on the whole sequence
        positions = left_pad([rows.T for rows in full], ids.shape[1]).permute(2, 0, 1)
        x = run_layers(lm, range(cut_layer), x, full_mask, positions, cache, 0)
    length = max(len(k) for _, k in compact)
    x = left_pad([x[b][real[b]][k] for b, (_, k) in enumerate(compact)], length)
    positions = left_pad([p.T for p, _ in compact], length).permute(2, 0, 1)
    cut_mask = left_pad([torch.ones(len(k), dtype=torch.long) for _, k in compact], length)
    x = run_layers(lm, range(cut_layer, n_layers), x, cut_mask, positions, cache, 0)
    return decode_greedy(model, x, full_mask, cut_mask, starts, cut_layer, steps, cache)


def test_the_hand_positions_are_the_models(case):
    """The hand rule with nothing dropped is the model's own rope index (t steps of Qwen2.5-VL included), and the
    reference pipeline reproduces dense generate() (so it can fail)."""
    model, batch, _, dense_sequences, dense_steps = case
    with torch.no_grad(), vtprune.make("random", keep=1.0)(model) as trace:
        model(**batch)
    kept, layout = kept_per_item(trace)
    inputs = {k: batch[k] for k in ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                                    "attention_mask", "second_per_grid_ts") if k in batch}
    model_positions, _ = model.model.get_rope_index(**inputs)
    real = batch["attention_mask"].bool()
    for b in range(2):
        rows, _, _ = hand_positions(batch["input_ids"][b][real[b]].tolist(), items_of(layout, b, batch, model), kept,
                                    renumber=False)
        assert torch.equal(model_positions[:, b, real[b]], rows)
    if "second_per_grid_ts" in batch:  # Qwen2.5-VL: sample 1's largest id is a video t id, not the last text's
        last = model_positions[:, 1].amax(0)
        assert int(batch["input_ids"][1, int(last.argmax())]) == VIDEO
    with torch.no_grad():
        for cut_layer in (0, 1):
            tokens, logits = reference_generate(model, batch, layout, kept, cut_layer, renumber=False)
            assert torch.equal(tokens, dense_sequences[:, -STEPS:])
            torch.testing.assert_close(logits, dense_steps, atol=1e-5, rtol=0)


def language_model_lengths(model):
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return seen, handle


@pytest.mark.parametrize("method, options, cut_layer, renumber", [
    ("random", {"keep": 5, "seed": 3}, 0, True),
    ("random", {"keep": 0.3, "scope": "video", "seed": 4}, 0, True),  # whole groups may go
    ("fastv", {"keep": 4, "layer": 1}, 1, False),
])
def test_generate_under_a_cut_equals_the_hand_made_reference(case, method, options, cut_layer, renumber):
    model, batch, _, _, dense_steps = case
    with torch.no_grad():
        with vtprune.make(method, **options)(model) as trace:
            seen, handle = language_model_lengths(model)
            sequences, logits = generate(model, batch)
            handle.remove()
        kept, layout = kept_per_item(trace)
        expected, expected_logits = reference_generate(model, batch, layout, kept, cut_layer, renumber)
    if cut_layer == 0:  # the prefill holds the longest sample's text and kept visual tokens (spare padding dropped)
        kept_count = torch.tensor([site.kept.numel() for site in trace.forwards[0].sites])
        assert seen[0] == int((batch["attention_mask"].sum(1) - visual_counts(batch) + kept_count).max())
    assert sum(len(k) for k in kept.values()) < int(visual_counts(batch).sum())  # the cut dropped tokens
    assert torch.equal(sequences[:, -STEPS:], expected)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    assert (logits - dense_steps).abs().max() > 1e-3  # the cut changed the outputs


def test_generate_under_average_pooling_equals_the_hand_made_reference(case):
    """A pre-LLM merge: every kept token is the mean over its pooling cell, within its temporal group."""
    model, batch = case[:2]
    with torch.no_grad():
        with vtprune.make("pool", keep=6)(model) as trace:
            sequences, logits = generate(model, batch)
        kept, layout = kept_per_item(trace)
        assert trace.forwards[0].sites[0].merged  # the cut merged tokens
        expected, expected_logits = reference_generate(model, batch, layout, kept, 0, renumber=True,
                                                       pooled=average_pooled(kept))
    assert torch.equal(sequences[:, -STEPS:], expected)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
