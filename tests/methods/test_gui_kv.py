"""GUI-KV: the scoring maths against hand computations, and the compressed cache on a tiny Qwen2.5-VL (head_dim 64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import vtprune
from tests.adapters.qwen_builders import build_qwen_processor, build_tiny_qwen, two_screenshot_batch
from vtprune.agents import Screen, draw_screen
from vtprune.methods.gui_kv import (
    gui_kv_scores,
    key_residuals,
    pool_scores,
    reduce_groups,
    select,
    spatial_saliency,
    window_attention,
)


# ------------------------------------------------------------------------------------------ the maths
def test_window_attention_masks_only_inside_the_window():
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(2, 3, 8, generator=g), torch.randn(1, 10, 8, generator=g)
    sums = window_attention(queries, keys)
    expected = torch.zeros(2, 7)
    for h in range(2):
        for i in range(3):  # window token i sits at position 7 + i and sees keys 0 .. 7 + i
            logits = torch.tensor([float(queries[h, i] @ keys[0, j]) / math.sqrt(8) for j in range(8 + i)])
            expected[h] += torch.softmax(logits, dim=0)[:7]
    torch.testing.assert_close(sums, expected, atol=1e-6, rtol=0)


def test_pooling_counts_the_zero_padding():
    pooled = pool_scores(torch.ones(1, 6))
    torch.testing.assert_close(pooled, torch.tensor([[3 / 5, 4 / 5, 1, 1, 4 / 5, 3 / 5]]))
    assert pool_scores(torch.tensor([[0.0, 5.0, 1.0]]), pooling="maxpool").tolist() == [[5.0, 5.0, 5.0]]


def test_saliency_uses_unbiased_std_and_divides_by_the_temperature():
    hidden = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    norms = hidden.norm(dim=-1).numpy().astype(np.float64)
    z = (norms - norms.mean()) / (norms.std(ddof=1) + 1e-8) / 3.5
    expected = np.exp(z) / np.exp(z).sum()
    torch.testing.assert_close(spatial_saliency(hidden, 3.5), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_redundancy_basis_is_the_span_of_the_first_r_current_keys():
    g = torch.Generator().manual_seed(2)
    current = torch.randn(1, 10, 16, generator=g)
    inside = (current[0, :4].T @ torch.randn(4, generator=g))[None, None]  # a mix of the first 4 current keys
    later = current[:, 9:10]  # the 10th current key: outside the span of the first 4
    residual = key_residuals(current, torch.cat([inside, later], dim=1), rank=4)
    assert float(residual[0, 0]) < 1e-5 and float(residual[0, 1]) > 0.1
    assert float(key_residuals(current, later, rank=32)[0, 0]) < 1e-5  # rank capped at N_cur: every current key


def test_scores_combine_snapkv_saliency_and_temporal_zeroing():
    g = torch.Generator().manual_seed(3)
    n, w, budget = 30, 4, 12
    queries, keys, hidden = torch.randn(2, w, 16, generator=g), torch.randn(1, n, 16, generator=g), torch.randn(n, 8, generator=g)
    previous, current = torch.arange(2, 12), torch.arange(14, 24)
    scores = gui_kv_scores(queries, keys, hidden, current, previous, budget, alpha=2.0, temperature=3.5, rank=32)
    snap = pool_scores(window_attention(queries, keys))
    bonus = 2.0 * spatial_saliency(hidden[current], 3.5)
    torch.testing.assert_close(scores[:, current], snap[:, current] + bonus, atol=1e-6, rtol=0)
    text = torch.tensor([0, 1, 12, 13, 24, 25])
    torch.testing.assert_close(scores[:, text], snap[:, text], atol=0, rtol=0)
    zeroed = math.floor((1 - budget / n) * previous.numel())  # 6 of the 10 earlier-screenshot tokens
    residual = key_residuals(keys[:, current], keys[:, previous])[0]
    redundant = previous[torch.sort(residual).indices[:zeroed]]
    assert bool((scores[:, redundant] == 0).all())
    survivors = previous[torch.sort(residual).indices[zeroed:]]
    torch.testing.assert_close(scores[:, survivors], snap[:, survivors], atol=0, rtol=0)
    no_temporal = gui_kv_scores(queries, keys, hidden, current, previous, budget, temporal=False)
    torch.testing.assert_close(no_temporal[:, previous], snap[:, previous], atol=0, rtol=0)


def test_selection_keeps_the_window_and_the_top_scores_per_head():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [0.7, 0.1, 0.6, 0.0, 0.5]])
    assert select(scores, budget=4, window=2).tolist() == [[1, 3, 5, 6], [0, 2, 5, 6]]


def test_gqa_reductions():
    scores = torch.tensor([[1.0, 4.0], [3.0, 0.0], [5.0, 5.0], [1.0, 7.0]])  # 4 query heads, 2 KV groups
    assert reduce_groups(scores, 2, "first").tolist() == [[1.0, 4.0], [5.0, 5.0]]
    assert reduce_groups(scores, 2, "mean").tolist() == [[2.0, 2.0], [3.0, 6.0]]
    assert reduce_groups(scores, 2, "max").tolist() == [[3.0, 4.0], [5.0, 7.0]]
    assert reduce_groups(scores, 4, "first") is scores  # expanded cache: one selection per query head


@pytest.mark.parametrize(
    "options, message",
    [(dict(gqa_reduce="sum"), "gqa_reduce"), (dict(kernel=4), "odd kernel"), (dict(temporal_keys="raw"), "temporal_keys")],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(vtprune.VTPruneError, match=message):
        vtprune.make("gui-kv", **options)


# --------------------------------------------------------------------------------- on a tiny Qwen2.5-VL
@pytest.fixture(scope="module")
def model():
    return build_tiny_qwen("qwen2.5-vl", layers=3, heads=2, kv_heads=1, head_dim=64)


@pytest.fixture(scope="module")
def processor():
    return build_qwen_processor("qwen2.5-vl")


@pytest.fixture(scope="module")
def batch(processor):
    return two_screenshot_batch(processor)


def test_the_signal_matches_eager_attention_and_hidden_states(model, batch):
    """LayerKV from the hooks: the window attention computed from its queries and keys equals the eager model's
    attention rows; `residual` is the layer input and `hidden` the attention input."""
    seen = {}

    class Spy(vtprune.core.method_class("gui-kv")):
        def plan(self, ctx):
            seen[ctx.layer] = ctx.signals[self.requests(ctx.info)[0]]
            return super().plan(ctx)

    eager = build_tiny_qwen("qwen2.5-vl", layers=3, heads=2, kv_heads=1, head_dim=64, attn="eager")
    with torch.no_grad():
        reference = eager(**batch, output_attentions=True, output_hidden_states=True)
        with Spy(keep=0.5)(model):
            model(**batch, use_cache=True)
    for layer, value in seen.items():
        for b in range(2):
            real = batch["attention_mask"][b].bool()
            rows = window_attention(value.queries[b], value.keys[b][:, real])  # [H, n - 8]
            eager_rows = reference.attentions[layer][b][:, -8:, real][:, :, :-8].sum(1)
            torch.testing.assert_close(rows, eager_rows, atol=1e-5, rtol=0)
            torch.testing.assert_close(value.residual[b, real], reference.hidden_states[layer][b, real], atol=1e-5, rtol=0)
        norm = model.model.language_model.layers[layer].input_layernorm
        torch.testing.assert_close(value.hidden, norm(value.residual), atol=1e-6, rtol=0)


def test_cache_holds_the_budget_per_head_and_layer_and_keeps_the_window(model, batch):
    real = batch["attention_mask"].sum(1)  # prompt lengths n_b (ragged, left padded)
    with torch.no_grad():
        dense = model(**batch).logits
        with vtprune.make("gui-kv", keep=0.25)(model) as trace:
            out = model(**batch, use_cache=True)
    budgets = [math.floor(int(n) * 0.25) for n in real]
    for layer in out.cache.layers:
        assert tuple(layer.keys.shape[:3]) == (2, 1, max(budgets))
    length = batch["input_ids"].shape[1]
    records = [r for r in trace.forwards[0].sites if r.site == "kv_cache"]
    assert sorted({r.layer for r in records}) == [0, 1, 2]
    for record in records:
        kept = record.cache_positions
        assert tuple(kept.shape) == (1, budgets[record.sample])
        window = set(range(length - min(8, budgets[record.sample] - 2), length))
        assert window <= set(kept[0].tolist())  # the observation window is always kept
        assert bool(batch["attention_mask"][record.sample, kept].bool().all())  # never padding
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[mask], dense[mask], atol=1e-5, rtol=0)  # prefill used the full cache


def test_decoding_continues_from_the_compressed_cache(model, batch):
    """Greedy decoding equals, per sample, the language model decoding from a dense prefill cache gathered by hand to
    the kept entries, at the unpruned positions."""
    steps = 4
    with torch.no_grad():
        with vtprune.make("gui-kv", keep=0.3)(model) as trace:
            out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
        pruned_logits = torch.stack(out.logits, dim=1)
        records = [r for r in trace.forwards[0].sites if r.site == "kv_cache"]
        lm = model.model.language_model
        length = batch["input_ids"].shape[1]
        for b in range(2):
            keep = batch["attention_mask"][b].bool()
            single = {k: v[b : b + 1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in batch.items()}
            images = slice(0, 2) if b == 0 else slice(2, 4)
            patches = batch["image_grid_thw"].prod(-1).tolist()
            start = sum(patches[: images.start])
            single["pixel_values"] = batch["pixel_values"][start : start + sum(patches[images])]
            single["image_grid_thw"] = batch["image_grid_thw"][images]
            single = {k: v[:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in single.items()}
            dense = model(**single, use_cache=True)
            n = int(keep.sum())
            cache = DynamicCache(config=lm.config)
            for record in (r for r in records if r.sample == b):
                index = (record.cache_positions - (length - n))[None, :, :, None].expand(-1, -1, -1, 64)
                layer = dense.cache.layers[record.layer]
                cache.update(layer.keys.gather(2, index), layer.values.gather(2, index), record.layer)
            positions, _ = model.model.get_rope_index(single["input_ids"], single["mm_token_type_ids"], single["image_grid_thw"])
            token = dense.logits[:, -1].argmax(-1)
            reference = [dense.logits[:, -1]]
            mask = torch.ones(1, cache.get_seq_length(), dtype=torch.long)
            for t in range(1, steps):
                mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
                position = positions[:, :, -1:] + t
                step = lm(inputs_embeds=model.get_input_embeddings()(token[:, None]), attention_mask=mask, position_ids=position, cache=cache)
                reference.append(model.lm_head(step.last_hidden_state[:, -1]))
                token = reference[-1].argmax(-1)
            torch.testing.assert_close(pruned_logits[b], torch.cat(reference), atol=1e-4, rtol=0)


def test_an_unchanged_screenshot_goes_first(model, processor):
    """History [other, A, A]: the earlier copy of the current screenshot is the most redundant, so all its tokens are
    zeroed before any token of the other screenshot, and none stays in any head's cache (keys before RoPE: with the
    official post-RoPE keys the two copies differ by the rotation of their position shift)."""
    a = draw_screen(Screen(size=(48, 32)))  # 24 tokens: the rank-32 basis spans all current keys
    other = draw_screen(Screen(size=(48, 32), field_text="xyz", selected=2, dialog="Apply?", title="Other"))
    shot = "<|vision_start|><|image_pad|><|vision_end|>"
    text = f"<|im_start|>user\ngo{shot}then{shot}now{shot}next?<|im_end|>\n<|im_start|>assistant\n"
    inputs = dict(processor(images=[other, a, a], text=[text], return_tensors="pt"))
    keep = 0.2
    with torch.no_grad(), vtprune.make("gui-kv", keep=keep, temporal_keys="pre_rope")(model) as trace:
        model(**inputs, use_cache=True)
    spans = trace.forwards[0].layout.spans[0]
    n = inputs["input_ids"].shape[1]
    zeroed = math.floor((1 - math.floor(n * keep) / n) * 48)  # floor((1 - β) N_prev)
    assert 24 <= zeroed < 48
    for record in trace.forwards[0].sites:
        scores = record.scores  # head-mean scores of the 72 visual tokens: previous screenshots first
        assert bool((scores[24:48] == 0).all())  # every token of the earlier copy zeroed
        assert int((scores[:24] == 0).sum()) == zeroed - 24  # then the least novel tokens of the other screenshot
        kept = record.cache_positions
        assert not bool(((kept >= spans[1].start) & (kept < spans[1].end)).any())


@pytest.mark.parametrize("reduce, heads", [("first", 1), ("mean", 1), ("max", 1), ("expand", 2)])
def test_gqa_modes_set_the_cached_heads(model, batch, reduce, heads):
    with torch.no_grad(), vtprune.make("gui-kv", keep=0.3, gqa_reduce=reduce)(model) as trace:
        out = model(**batch, use_cache=True)
    assert {layer.keys.shape[1] for layer in out.cache.layers} == {heads}
    assert {r.cache_positions.shape[0] for r in trace.forwards[0].sites} == {heads}
    attn = model.model.language_model.layers[0].self_attn
    assert attn.num_key_value_groups == 2  # restored after "expand"


def test_budgets_too_small_or_too_large_are_refused(model, batch):
    with pytest.raises(vtprune.VTPruneError, match="needs C >= 3"):
        with vtprune.make("gui-kv", keep=0.01)(model):
            model(**batch, use_cache=True)
    with pytest.raises(vtprune.VTPruneError, match="keep=999 is more than"):
        with vtprune.make("gui-kv", keep=999)(model):
            model(**batch, use_cache=True)


def test_a_call_sized_by_the_compressed_cache_is_refused(model, batch):
    """The cache is shorter than the sequence it stands for (get_seq_length() is the length it stands for): a mask
    sized from the physical cache is a clear error."""
    with torch.no_grad(), vtprune.make("gui-kv", keep=0.3)(model):
        out = model(**batch, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        physical = out.cache.layers[0].keys.shape[-2]
        assert out.cache.get_seq_length() == batch["input_ids"].shape[1]
        assert physical < batch["input_ids"].shape[1]
        with pytest.raises(vtprune.VTPruneError, match="stands for 136 tokens"):
            model(input_ids=token, attention_mask=torch.ones(2, physical + 1, dtype=torch.long), cache=out.cache,
                  position_ids=torch.zeros(3, 2, 1, dtype=torch.long))
