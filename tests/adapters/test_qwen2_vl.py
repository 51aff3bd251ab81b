"""Qwen2-VL / Qwen2.5-VL adapter: layout, keep-all exactness, M-RoPE positions after a cut, generation references."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import vtprune
from tests.adapters.keep_all import assert_keep_all_matches_dense, assert_refused_untouched
from tests.adapters.qwen_builders import IMAGE, KINDS, VIDEO, build_qwen_processor, build_tiny_qwen, two_screenshot_batch
from tests.helpers import hooks_of

# Every method this adapter runs, with options that keep every token (a name may appear with several option sets).
KEEP_ALL = [
    ("random", dict(keep=1.0)),
    ("pool", dict(keep=1.0)),
    ("fastv", dict(keep=1.0, layer=1)),
    ("dart", dict(keep=1.0, layer=2)),
    ("divprune", dict(keep=1.0)),
    ("gui-kv", dict(keep=1.0)),
    ("gui-kv", dict(keep=1.0, gqa_reduce="expand", temporal_keys="pre_rope")),
    ("zipvl", dict(keep=1.0)),
    ("zipvl", dict(keep=1.0, kv_mode="full")),
    ("transprune", dict(keep=1.0, keep_ratios=(0.5,), prune_layers=(1,))),
    ("cdpruner", dict(keep=1.0)),
    ("pyramiddrop", dict(keep=1.0, layer_list=(1, 2))),  # the tiny model has 3 layers
    ("streamingllm", dict(keep=1.0, key_positions="original")),  # slot positions are refused with M-RoPE
    ("scissorhands", dict(keep=1.0)),
    ("a2sf", dict(keep=1.0)),
    ("ems", dict(keep=1.0)),
]
NOT_ON_QWEN = {
    "vtc-cls": "the Qwen vision tower has no [CLS] token",
    "visionzip": "the Qwen vision tower has no [CLS] token",
    "vispruner": "the Qwen vision tower has no [CLS] token",
    "scope": "its saliency is the vision tower's [CLS] attention; the Qwen tower has no [CLS] token",
    "holov": "its saliency is the vision tower's [CLS] attention; the Qwen tower has no [CLS] token",
    "vflowopt": "the adapter does not provide VisionAttention (spec §9: last full-attention block, 2x2 merger groups)",
    "spatten": "the adapter does not provide ReceivedAttention yet",
    "hiprune": "the adapter does not provide VisionAttention (official Qwen2.5-VL variant: its windowed ViT)",
    "tome": "the adapter does not provide VisionKeys (the merger's 2x2 groups would need pooled keys)",
}


@pytest.fixture(scope="module", params=KINDS)
def qwen(request):
    """(model, batch, dense logits, dense generate output) for Qwen2-VL and Qwen2.5-VL in miniature."""
    model = build_tiny_qwen(request.param)
    batch = two_screenshot_batch(build_qwen_processor(request.param))
    with torch.no_grad():
        logits = model(**batch).logits
        sequences, steps = generate(model, batch)
    return model, batch, logits, sequences, steps


def generate(model, batch, steps=3):
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def test_every_method_runs_or_is_refused():
    assert {name for name, _ in KEEP_ALL} | set(NOT_ON_QWEN) == set(vtprune.available())


@pytest.mark.parametrize("name, options", KEEP_ALL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KEEP_ALL)])
def test_keep_all_reproduces_dense_logits(qwen, name, options):
    model, batch, *dense = qwen
    trace = assert_keep_all_matches_dense(model, batch, tuple(dense), vtprune.make(name, **options), generate)
    assert trace.visual_tokens() == [(64, 64), (80, 80)]


def test_layout_has_one_span_per_screenshot(qwen):
    model, batch = qwen[:2]
    with torch.no_grad(), vtprune.make("random", keep=1.0)(model) as trace:
        model(**batch)
    layout = trace.forwards[0].layout
    ids = batch["input_ids"]
    assert [[s.grid for s in spans] for spans in layout.spans] == [[(5, 8), (4, 6)], [(5, 8), (5, 8)]]
    assert [s.image for spans in layout.spans for s in spans] == [0, 1, 2, 3]
    for b, spans in enumerate(layout.spans):
        for span in spans:
            assert int(ids[b, span.start - 1]) == 261 and int(ids[b, span.end]) == 262  # vision start / end
            assert bool((ids[b, span.start : span.end] == IMAGE).all())


@pytest.mark.parametrize("name, options, message", [
    ("vtc-cls", dict(keep=4), r"\[CLS\] token; the qwen2-vl tower has none"),
    ("visionzip", {}, r"\[CLS\] token"),
    ("scope", {}, r"\[CLS\] token"),
    ("holov", {}, r"\[CLS\] token"),
    ("vflowopt", dict(llm_layers=(1, 2)), "VisionAttention"),
])
def test_methods_without_their_signals_are_refused(qwen, name, options, message):
    assert_refused_untouched(qwen[0], name, options, message)


def test_placeholder_ids_without_media_are_text_and_embeddings_find_the_images(qwen):
    """A video placeholder with no video is text, as transformers treats it; inputs_embeds find the images by their
    embedding, as input_ids do (Qwen itself numbers positions differently without input_ids: compare like with like)."""
    model, batch = qwen[:2]
    hooks = hooks_of(model)
    ids = batch["input_ids"].clone()
    ids[:, -2] = VIDEO  # a video placeholder in the text
    keep_all = vtprune.make("random", keep=1.0)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    without_ids = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        dense = model(**dict(batch, input_ids=ids)).logits
        dense_embeds = model(inputs_embeds=embeds, **without_ids).logits
        with keep_all(model):
            torch.testing.assert_close(model(**dict(batch, input_ids=ids)).logits, dense, atol=0, rtol=0)
            torch.testing.assert_close(model(inputs_embeds=embeds, **without_ids).logits, dense_embeds, atol=0, rtol=0)
        with vtprune.make("random", keep=4)(model) as trace:
            model(**batch)
            model(inputs_embeds=embeds, **without_ids)
    assert trace.visual_tokens(0) == trace.visual_tokens(1) == [(64, 8), (80, 8)]
    assert hooks_of(model) == hooks



def packed_inputs(model, batch):
    """The padded batch's samples packed into one row, padding-free, as transformers' padding-free tests and packed
    training build it: the real tokens one after the other, and [4, 1, n] positions whose first row (the sequence
    index) restarts at 0 for every sample, followed by each token's M-RoPE (t, h, w) ids of the padded batch."""
    real = batch["attention_mask"].bool()
    rope, _ = model.model.get_rope_index(
        input_ids=batch["input_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
    )
    index = torch.cat([torch.arange(int(n)) for n in real.sum(1)])
    positions = torch.cat([index[None], rope[:, real].view(3, -1)])[:, None, :]
    return dict(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                input_ids=batch["input_ids"][real][None], position_ids=positions)


@pytest.mark.parametrize("name, options", [("pool", dict(keep=1.0)), ("fastv", dict(keep=1.0, layer=1))])
def test_packed_sequences_are_refused_and_leave_the_model_usable(qwen, name, options):
    """Several prompts packed into one row with restarting position ids and no mask: transformers keeps the prompts
    apart by masking (dense equals the padded batch), vtprune would mix them, so it refuses, even at keep-all."""
    model, batch, dense_logits = qwen[:3]
    hooks = hooks_of(model)
    packed = packed_inputs(model, batch)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        dense_packed = model(**packed, use_cache=False).logits[0]
        torch.testing.assert_close(dense_packed, dense_logits[real], atol=1e-5, rtol=0)  # what the input means
        with vtprune.make(name, **options)(model) as trace:
            for use_cache in (False, True):
                with pytest.raises(vtprune.VTPruneError, match=r"^position_ids restart within a row .* attention_mask$"):
                    model(**packed, use_cache=use_cache)
            assert trace.forwards == []  # nothing was pruned or recorded
            # the session goes on: the same prompts padded, and packed positions under an explicit mask (no packing
            # then, for transformers either), equal dense
            torch.testing.assert_close(model(**batch).logits[real], dense_logits[real], atol=1e-5, rtol=0)
            ones = torch.ones_like(packed["input_ids"])
            unpacked = model(**packed, attention_mask=ones).logits
        torch.testing.assert_close(unpacked, model(**packed, attention_mask=ones).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(**packed, use_cache=False).logits[0], dense_packed, atol=0, rtol=0)
    assert hooks_of(model) == hooks


# ------------------------------------------------------------------------------- M-RoPE positions by hand
def hand_positions(batch, kept_patches, grids):
    """The documented "renumber" rule, built token by token: text gets (c, c, c); a kept image token with patch p on a
    grid of `cols` columns gets (c, c + p // cols, c + p % cols), and after the image c moves on by 1 + its largest
    kept offset. Returns per sample the [3, n] positions of the kept real tokens, their ids and the next position."""
    out = []
    image = 0
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
        rows, kept_ids, cursor, i = [], [], 0, 0
        while i < len(ids):
            if ids[i] != IMAGE:
                rows.append([cursor] * 3)
                kept_ids.append(i)
                cursor, i = cursor + 1, i + 1
                continue
            cols = grids[image][1]
            count = grids[image][0] * cols
            offsets = [(0, p // cols, p % cols) for p in kept_patches[image]]
            rows += [[cursor + t, cursor + h, cursor + w] for t, h, w in offsets]
            kept_ids += [i + p for p in kept_patches[image]]
            cursor += 1 + max(max(o) for o in offsets) if offsets else 0
            i, image = i + count, image + 1
        out.append((torch.tensor(rows).T, kept_ids, cursor))
    return out


def kept_patches_of(trace):
    record = trace.forwards[0]
    kept = {}
    for site in record.sites:
        for span, sl in record.layout.ordinal_slices(site.sample):
            inside = site.kept[(site.kept >= sl.start) & (site.kept < sl.stop)] - sl.start
            kept[span.image] = span.patch_index[inside].tolist()
    grids = {s.image: s.grid for spans in record.layout.spans for s in spans}
    return kept, grids


def capture_language_model_positions(model):
    seen = []

    def capture(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    return seen, model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)


@pytest.mark.parametrize("keep", [5, 0.5])
def test_positions_after_a_pre_llm_cut_follow_the_rule(qwen, keep):
    model, batch = qwen[:2]
    with torch.no_grad(), vtprune.make("random", keep=keep, seed=2)(model) as trace:
        seen, handle = capture_language_model_positions(model)
        model(**batch)  # positions [3, B, L]
        generate(model, batch, steps=2)  # positions [4, B, L] (sequence index first), then [4, B, 1]
        handle.remove()
    kept, grids = kept_patches_of(trace)
    expected = hand_positions(batch, kept, grids)
    forward, prefill, decode = seen[0], seen[1], seen[2]
    length = forward.shape[-1]
    for b, (rows, _, cursor) in enumerate(expected):
        n = rows.shape[1]
        assert torch.equal(forward[:, b, length - n :], rows)
        assert torch.equal(prefill[1:, b, length - n :], rows)
        assert prefill[0, b, length - n :].tolist() == list(range(n))  # sequence index, renumbered
        assert bool((prefill[:, b, : length - n] == 0).all())  # left padding
        assert decode[1:, b, 0].tolist() == [cursor] * 3  # decoding continues right after the last kept position
        assert int(decode[0, b, 0]) == n


def test_rope_deltas_of_the_model_are_left_untouched(qwen):
    model, batch = qwen[:2]
    with torch.no_grad():
        generate(model, batch, steps=1)
        dense = model.model.rope_deltas.clone()
        with vtprune.make("random", keep=3)(model):
            generate(model, batch, steps=1)
    assert torch.equal(model.model.rope_deltas, dense)


def test_generate_with_a_pre_llm_cut_equals_reference(qwen):
    """The language model on the hand-compacted sequence at hand-made positions, decoded greedily."""
    model, batch = qwen[:2]
    steps = 4
    with torch.no_grad():
        with vtprune.make("random", keep=6, seed=5)(model) as trace:
            pruned = model.generate(**batch, max_new_tokens=steps, do_sample=False)[:, -steps:]
        kept, grids = kept_patches_of(trace)
        inner, lm = model.model, model.model.language_model
        embeds = inner.get_input_embeddings()(batch["input_ids"])
        features = torch.cat(inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        embeds = embeds.masked_scatter((batch["input_ids"] == IMAGE)[..., None], features)
        expected = hand_positions(batch, kept, grids)
        length = max(len(ids) for _, ids, _ in expected)
        x = torch.zeros(2, length, embeds.shape[-1])
        mask = torch.zeros(2, length, dtype=torch.long)
        positions = torch.zeros(3, 2, length, dtype=torch.long)
        for b, (rows, ids, _) in enumerate(expected):
            real = embeds[b][batch["attention_mask"][b].bool()]
            x[b, length - len(ids) :] = real[ids]
            mask[b, length - len(ids) :] = 1
            positions[:, b, length - len(ids) :] = rows
        cache = DynamicCache(config=lm.config)
        logits = model.lm_head(lm(inputs_embeds=x, attention_mask=mask, position_ids=positions, cache=cache).last_hidden_state[:, -1])
        tokens = [logits.argmax(-1)]
        nxt = torch.tensor([cursor for _, _, cursor in expected])
        for t in range(1, steps):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            step_positions = (nxt + t - 1).view(1, 2, 1).expand(3, 2, 1)
            out = lm(inputs_embeds=inner.get_input_embeddings()(tokens[-1][:, None]), attention_mask=mask,
                     position_ids=step_positions, cache=cache)
            tokens.append(model.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
    assert torch.equal(pruned, torch.stack(tokens, dim=1))


def test_fastv_keeps_original_positions_while_decoding(qwen):
    """After a FastV cut the later layers see the unpruned M-RoPE positions, while prefilling and decoding."""
    model, batch = qwen[:2]
    lm = model.model.language_model
    captured = {"dense": [], "fastv": []}

    def capture(which):
        def hook(module, args, kwargs):
            captured[which].append(kwargs["position_embeddings"][0].clone())

        return hook

    with torch.no_grad():
        handle = lm.layers[2].register_forward_pre_hook(capture("dense"), with_kwargs=True)
        generate(model, batch, steps=2)
        handle.remove()
        with vtprune.make("fastv", keep=4, layer=2)(model) as trace:
            handle = lm.layers[2].register_forward_pre_hook(capture("fastv"), with_kwargs=True)
            generate(model, batch, steps=2)
            handle.remove()
    record = trace.forwards[0]
    for b in range(2):
        visual = record.layout.visual_positions(b)
        keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
        keep[visual] = False
        keep[visual[record.sites[b].kept]] = True
        keep &= batch["attention_mask"][b].bool()
        n = int(keep.sum())
        torch.testing.assert_close(captured["fastv"][0][b, -n:], captured["dense"][0][b, keep], atol=0, rtol=0)
    torch.testing.assert_close(captured["fastv"][1], captured["dense"][1], atol=0, rtol=0)  # first decoding step
