"""LLaVA adapter: exactness, sequence and cache lengths, generation against hand-made references, positions."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import vtprune
from tests.helpers import GRID, build_tiny_llava, hooks_of

# Options that keep every visual token, per method; every method the LLaVA adapter supports must be listed.
KEEP_ALL = {
    "vtc-cls": dict(keep=1.0, start_layer=0),
    "dart": dict(keep=1.0, layer=2),
    "divprune": dict(keep=1.0),
    "vispruner": dict(keep=1.0),
    "fastv": dict(keep=1.0, layer=2),
    "random": dict(keep=1.0),
    "pool": dict(keep=GRID * GRID),
    "gui-kv": dict(keep=1.0),  # each image counts as a screenshot; the last one of a sample is the current one
    "transprune": dict(keep_ratios=(1.0, 1.0, 1.0)),
    "vflowopt": dict(vit_keep=1.0, llm_keep1=1.0, llm_keep2=1.0),  # vit_keep=1 bypasses stage V (no recycling)
    "visionzip": dict(keep=GRID * GRID, contextual=0, cls_token=False),
    "zipvl": dict(keep=1.0),
    "scope": dict(keep=1.0),
    "holov": dict(keep=1.0),
    "hiprune": dict(keep=1.0, object_layer=0),  # the tiny tower has 3 layers (official object layer: 8)
    "cdpruner": dict(keep=1.0),
    "pyramiddrop": dict(keep=1.0),
    "spatten": dict(keep=1.0, layers=(1, 2, 3)),
    "streamingllm": dict(keep=1.0),  # decode-time KV policies: keep=1.0 never evicts (tests/adapters/test_evicting.py)
    "scissorhands": dict(keep=1.0),
    "a2sf": dict(keep=1.0),
    "ems": dict(keep=1.0),
    "tome": dict(keep=1.0),
}
NOT_ON_LLAVA: set[str] = set()  # methods the LLaVA adapter refuses


def generate(model, batch, steps=4):
    out = model.generate(
        **batch, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def test_every_method_has_a_keep_all_setting():
    assert set(vtprune.available()) - NOT_ON_LLAVA == set(KEEP_ALL)


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keep_all_reproduces_dense_logits(tiny_llava, batch, name):
    with torch.no_grad():
        dense_logits = tiny_llava(**batch).logits
        dense_sequences, dense_steps = generate(tiny_llava, batch)
        with vtprune.make(name, **KEEP_ALL[name])(tiny_llava) as trace:
            logits = tiny_llava(**batch).logits
            sequences, steps = generate(tiny_llava, batch)
    real = batch["attention_mask"].bool()  # padding rows carry no prediction; a cut drops and re-creates them
    torch.testing.assert_close(logits[real], dense_logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(steps, dense_steps, atol=1e-5, rtol=0)  # prefill and every decoding step
    assert torch.equal(sequences, dense_sequences)
    assert all(before == after for before, after in trace.visual_tokens())


KEEP_FOUR = {
    "vtc-cls": dict(keep=4, start_layer=0),
    "dart": dict(keep=4, layer=2),
    "divprune": dict(keep=4),
    "vispruner": dict(keep=4),
    "fastv": dict(keep=4, layer=2),
    "random": dict(keep=4, seed=3),
    "pool": dict(keep=4),
    "transprune": dict(keep_ratios=(0.25,), prune_layers=(2,)),
    "vflowopt": dict(vit_keep=0.25, cell=4.0, llm_keep1=1.0, llm_keep2=1.0),  # 16 - 12 - 1 + 1 recycled = 4
    "visionzip": dict(keep=4),  # [CLS], 2 dominant patches, 1 contextual token
    "scope": dict(keep=4),
    "holov": dict(keep=4),  # official order within chunks
    "cdpruner": dict(keep=4),
    "pyramiddrop": dict(ratios=(0.25,), layer_list=(2,)),
    "spatten": dict(keep=4, layers=(2,)),
}  # gui-kv compresses the cache, not the sequence: see test_kv_cache_site_compresses_every_layer below
FIRST_CUT = {"fastv": 2, "transprune": 2, "dart": 2, "pyramiddrop": 2, "spatten": 2}  # decoder layer before which the sequence shortens (0: the LLM input)


@pytest.mark.parametrize("name", sorted(KEEP_FOUR))
def test_keep_k_shortens_sequence_and_cache(tiny_llava, batch, name):
    method = vtprune.make(name, **KEEP_FOUR[name])
    images = torch.tensor([1, 2])
    text = batch["attention_mask"].sum(1) - 16 * images  # text tokens (a cut keeps them, and only the padding needed)
    seen = {}

    def record_layer_input(index):
        def hook(module, args, kwargs):
            seen[index] = (args[0] if args else kwargs["hidden_states"]).shape[1]

        return hook

    layers = tiny_llava.model.language_model.layers
    with torch.no_grad(), method(tiny_llava) as trace:
        handles = [layer.register_forward_pre_hook(record_layer_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
        out = tiny_llava(**batch, use_cache=True)
        for h in handles:
            h.remove()
    kept_lengths = text + 4 * images  # text + K per image, per sample
    full = batch["input_ids"].shape[1]
    cut = FIRST_CUT.get(name, 0)
    pruned = int(kept_lengths.max())  # ragged samples are left padded to the longest, spare padding dropped
    for index in range(len(layers)):
        expected = full if index < cut else pruned
        assert seen[index] == expected
        assert out.cache.layers[index].keys.shape[-2] == expected  # physical length
        assert out.cache.get_seq_length(index) == full  # the length the cache stands for
    assert [after for _, after in trace.visual_tokens()] == [4, 8]
    assert out.logits.shape[1] == pruned


@pytest.mark.parametrize("name", sorted(set(KEEP_FOUR) - {"random"}))  # random's draws depend on the batch
def test_generate_batched_with_left_padding_equals_each_sample_alone(tiny_llava, batch, name):
    """Batch 2, left padding, several images: each sample decodes as it would alone (no padding, batch 1)."""
    method = vtprune.make(name, **KEEP_FOUR[name])
    with torch.no_grad(), method(tiny_llava) as trace:
        sequences, steps = generate(tiny_llava, batch)
        singles = []
        for b, images in ((0, slice(0, 1)), (1, slice(1, 3))):
            real = batch["attention_mask"][b].bool()
            alone = {"input_ids": batch["input_ids"][b : b + 1, real], "pixel_values": batch["pixel_values"][images]}
            singles.append(generate(tiny_llava, alone))
    for b, (single_sequences, single_steps) in enumerate(singles):
        torch.testing.assert_close(steps[b], single_steps[0], atol=1e-5, rtol=0)
        assert sequences[b, -4:].tolist() == single_sequences[0, -4:].tolist()
        kept = [s.kept.tolist() for s in trace.forwards[0].sites if s.sample == b]
        assert kept == [s.kept.tolist() for s in trace.forwards[1 + b].sites]
    assert [after for _, after in trace.visual_tokens(0)] == [4, 8]


@pytest.mark.parametrize("name", sorted(KEEP_FOUR))
def test_text_only_prompts_pass_unchanged(tiny_llava, name):
    ids = torch.tensor([[1, 5, 6, 7, 8], [0, 1, 9, 10, 11]])
    mask = (ids != 0).long()
    with torch.no_grad():
        dense = tiny_llava(input_ids=ids, attention_mask=mask).logits
        with vtprune.make(name, **KEEP_FOUR[name])(tiny_llava):
            logits = tiny_llava(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], dense[mask.bool()], atol=1e-5, rtol=0)


def test_padding_added_for_ragged_keep_counts_is_masked(tiny_llava, batch):
    """Sample 0 ends shorter than sample 1: it gets left padding that the mask hides."""
    seen = {}

    def capture(module, args, kwargs):
        seen["mask"] = kwargs["attention_mask"].clone()

    with torch.no_grad(), vtprune.make("vtc-cls", keep=4, start_layer=0)(tiny_llava):
        handle = tiny_llava.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
        tiny_llava(**batch)
        handle.remove()
    mask = seen["mask"]
    real = batch["attention_mask"].sum(1) - torch.tensor([16 - 4, 32 - 8])
    assert mask.sum(1).tolist() == real.tolist()
    assert bool(mask[:, -1].all())  # left padding: every sample ends with a real token


# --------------------------------------------------------------------------------------- hand-made references
def greedy(step, first_logits, steps):
    """Greedy decoding driver: `step(token, t)` returns the next logits [B, V]."""
    tokens = [first_logits.argmax(-1)]
    for t in range(1, steps):
        tokens.append(step(tokens[-1], t).argmax(-1))
    return torch.stack(tokens, dim=1)


def image_embeddings(model, batch):
    inner = model.model
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    features = torch.cat(list(inner.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
    mask = (batch["input_ids"] == 99)[..., None]
    return embeds.masked_scatter(mask, features)


def compact(batch, embeds, kept_per_sample):
    """Hand compaction: keep text tokens and kept image tokens, left-pad to the longest sample."""
    rows = []
    for b in range(2):
        image_positions = (batch["input_ids"][b] == 99).nonzero().squeeze(1)
        keep = torch.ones(embeds.shape[1], dtype=torch.bool)
        keep[image_positions] = False
        keep[image_positions[torch.tensor(kept_per_sample[b])]] = True
        rows.append(keep.nonzero().squeeze(1))
    length = max(len(r) for r in rows)
    return rows, length


def test_generate_with_pre_llm_cut_equals_reference(tiny_llava, batch):
    """vtc-cls: the language model on the hand-compacted sequence, positions renumbered, decoded greedily."""
    steps = 5
    with torch.no_grad():
        with vtprune.make("vtc-cls", keep=5, start_layer=1)(tiny_llava) as trace:
            pruned = tiny_llava.generate(**batch, max_new_tokens=steps, do_sample=False)[:, -steps:]
        kept = [row["kept_indices"] for row in trace.summary()]
        embeds = image_embeddings(tiny_llava, batch)
        rows, length = compact(batch, embeds, kept)
        x = torch.zeros(2, length, embeds.shape[-1])
        mask = torch.zeros(2, length, dtype=torch.long)
        positions = torch.zeros(2, length, dtype=torch.long)
        for b, keep in enumerate(rows):
            x[b, length - len(keep) :] = embeds[b, keep]
            valid = batch["attention_mask"][b, keep]
            mask[b, length - len(keep) :] = valid
            positions[b, length - len(keep) :] = (valid.cumsum(0) - 1).clamp(min=0) * valid  # contiguous, pads at 0
        lm, head = tiny_llava.model.language_model, tiny_llava.lm_head
        cache = DynamicCache(config=lm.config)
        first = head(lm(inputs_embeds=x, attention_mask=mask, position_ids=positions, cache=cache).last_hidden_state[:, -1])
        last_position = positions[:, -1]

        def step(token, t):
            nonlocal mask
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out = lm(
                inputs_embeds=tiny_llava.model.get_input_embeddings()(token[:, None]),
                attention_mask=mask,
                position_ids=(last_position + t)[:, None],
                cache=cache,
            )
            return head(out.last_hidden_state[:, -1])

        reference = greedy(step, first, steps)
    assert torch.equal(pruned, reference)


def test_generate_with_fastv_equals_reference(tiny_llava, batch):
    """FastV: layers < K on the full sequence, layers >= K on the kept tokens at their original positions."""
    steps, cut = 5, 2
    with torch.no_grad():
        with vtprune.make("fastv", keep=5, layer=cut)(tiny_llava) as trace:
            pruned = tiny_llava.generate(**batch, max_new_tokens=steps, do_sample=False)[:, -steps:]
        kept = [row["kept_indices"] for row in trace.summary()]
        embeds = image_embeddings(tiny_llava, batch)
        lm, head = tiny_llava.model.language_model, tiny_llava.lm_head
        full_mask = batch["attention_mask"].clone()
        full_positions = (full_mask.cumsum(1) - 1).clamp(min=0) * full_mask
        rows, length = compact(batch, embeds, kept)
        short_mask = torch.zeros(2, length, dtype=torch.long)
        short_positions = torch.zeros(2, length, dtype=torch.long)
        for b, keep in enumerate(rows):
            short_mask[b, length - len(keep) :] = full_mask[b, keep]
            short_positions[b, length - len(keep) :] = full_positions[b, keep]
        cache = DynamicCache(config=lm.config)

        def attention_mask(pad_mask, query_len):
            """Boolean [B, 1, q, kv] mask: causal (lower right) and padding."""
            kv = pad_mask.shape[1]
            causal = torch.ones(query_len, kv, dtype=torch.bool).tril(kv - query_len)
            return causal[None, None] & pad_mask.bool()[:, None, None, :]

        def run(x, masks, positions):
            for index, layer in enumerate(lm.layers):
                which = 0 if index < cut else 1
                x = layer(
                    x,
                    attention_mask=attention_mask(masks[which], x.shape[1]),
                    position_embeddings=lm.rotary_emb(x, positions[which]),
                    cache=cache,
                )
            return head(lm.norm(x)[:, -1])

        # prefill: the cut between layer K-1 and K compacts the hidden states
        x = embeds
        for index in range(cut):
            x = lm.layers[index](
                x,
                attention_mask=attention_mask(full_mask, x.shape[1]),
                position_embeddings=lm.rotary_emb(x, full_positions),
                cache=cache,
            )
        short = torch.zeros(2, length, x.shape[-1])
        for b, keep in enumerate(rows):
            short[b, length - len(keep) :] = x[b, keep]
        x = short
        for index in range(cut, len(lm.layers)):
            x = lm.layers[index](
                x,
                attention_mask=attention_mask(short_mask, x.shape[1]),
                position_embeddings=lm.rotary_emb(x, short_positions),
                cache=cache,
            )
        first = head(lm.norm(x)[:, -1])
        masks = [full_mask, short_mask]
        next_position = full_positions[:, -1]

        def step(token, t):
            for i in range(2):
                masks[i] = torch.cat([masks[i], torch.ones(2, 1, dtype=torch.long)], dim=1)
            position = (next_position + t)[:, None]  # original positions continue: the unpruned length
            x = tiny_llava.model.get_input_embeddings()(token[:, None])
            return run(x, masks, [position, position])

        reference = greedy(step, first, steps)
    assert torch.equal(pruned, reference)


def test_decoding_positions_continue_per_method(tiny_llava, batch):
    """Pre-LLM cuts renumber (decoding continues at the shortened length); FastV keeps the unpruned length."""
    seen = []

    def capture(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    real = batch["attention_mask"].sum(1)
    lm = tiny_llava.model.language_model
    with torch.no_grad():
        with vtprune.make("random", keep=4)(tiny_llava):
            handle = lm.register_forward_pre_hook(capture, with_kwargs=True)
            tiny_llava.generate(**batch, max_new_tokens=3, do_sample=False)
            handle.remove()
    dropped = torch.tensor([12, 24])
    assert seen[1][:, 0].tolist() == (real - dropped).tolist()
    assert seen[2][:, 0].tolist() == (real - dropped + 1).tolist()

    layer_positions = []

    def capture_layer(module, args, kwargs):
        layer_positions.append(kwargs["position_embeddings"][0].clone())

    with torch.no_grad():
        with vtprune.make("fastv", keep=4, layer=2)(tiny_llava):
            handle = lm.layers[3].register_forward_pre_hook(capture_layer, with_kwargs=True)
            tiny_llava.generate(**batch, max_new_tokens=2, do_sample=False)
            handle.remove()
    cos_expected, _ = lm.rotary_emb(torch.zeros(1), real[:, None])
    torch.testing.assert_close(layer_positions[1], cos_expected)


def test_kv_cache_site_compresses_every_layer(tiny_llava, batch):
    """The kv_cache site on LLaVA: every layer's cache holds floor(n * keep) entries per sample, the sequence and the
    prefill logits are unchanged, and generate() decodes from the compressed cache."""
    real = batch["attention_mask"].sum(1)
    with torch.no_grad():
        dense = tiny_llava(**batch).logits
        with vtprune.make("gui-kv", keep=0.5)(tiny_llava) as trace:
            out = tiny_llava(**batch, use_cache=True)
            sequences, _ = generate(tiny_llava, batch, steps=3)
    budgets = (real * 0.5).floor().long().tolist()
    assert [out.cache.layers[i].keys.shape[-2] for i in range(4)] == [max(budgets)] * 4
    kept = {(r.layer, r.sample): r.cache_positions.shape for r in trace.forwards[0].sites}
    assert kept == {(layer, b): (2, budgets[b]) for layer in range(4) for b in range(2)}
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[mask], dense[mask], atol=1e-5, rtol=0)
    assert sequences.shape == (2, batch["input_ids"].shape[1] + 3)


# ------------------------------------------------------------------------------------------ errors, restore
def test_error_inside_with_restores_the_model(tiny_llava, batch):
    hooks_before = hooks_of(tiny_llava)
    with torch.no_grad():
        expected = tiny_llava(**batch).logits
    with pytest.raises(vtprune.VTPruneError, match="more than the 16 visual tokens"):
        with vtprune.make("vtc-cls", keep=17, start_layer=0)(tiny_llava):
            tiny_llava(**batch)
    assert hooks_of(tiny_llava) == hooks_before
    with torch.no_grad():
        torch.testing.assert_close(tiny_llava(**batch).logits, expected, atol=0, rtol=0)
    fresh = build_tiny_llava(seed=0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, atol=0, rtol=0)


def test_unsupported_model_is_refused():
    with pytest.raises(vtprune.UnsupportedModelError, match="no adapter for Linear"):
        vtprune.make("vtc-cls", keep=4)(torch.nn.Linear(2, 2))


def test_inputs_embeds_find_the_images_as_input_ids_do(tiny_llava, batch):
    """Without input_ids the image tokens are found by their embedding, as transformers finds them."""
    embeds = tiny_llava.model.get_input_embeddings()(batch["input_ids"])
    without_ids = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad(), vtprune.make("random", keep=4)(tiny_llava) as trace:
        from_ids = tiny_llava(**batch).logits
        from_embeds = tiny_llava(inputs_embeds=embeds, **without_ids).logits
    assert trace.visual_tokens(0) == trace.visual_tokens(1) == [(16, 4), (32, 8)]
    torch.testing.assert_close(from_embeds, from_ids, atol=0, rtol=0)


def test_fastv_cut_outside_the_model_is_refused(tiny_llava):
    hooks_before = hooks_of(tiny_llava)
    with pytest.raises(vtprune.VTPruneError, match="layers 0..3"):
        with vtprune.make("fastv", keep=4, layer=4)(tiny_llava):
            pass
    assert hooks_of(tiny_llava) == hooks_before


def test_static_cache_generates_as_the_dynamic_cache(tiny_llava, batch):
    outputs = []
    for cache in ("static", None):
        with vtprune.make("random", keep=4)(tiny_llava), torch.no_grad():
            torch.manual_seed(0)
            outputs.append(tiny_llava.generate(**batch, max_new_tokens=2, do_sample=False, cache_implementation=cache))
    assert torch.equal(*outputs)
