"""PyramidDrop: scores and kept sets equal the official rank-and-drop (stored outputs); batch-2 generate() equals a
per-sample layer-by-layer reference (drops, renumbered positions, per-layer decode positions); budget mapping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import vtprune
from tests.adapters.qwen_builders import (
    build_qwen_processor,
    build_tiny_qwen,
    two_screenshot_batch,
)
from tests.helpers import IMAGE_TOKEN
from tests.methods.pre_llm_reference import dense_equals_keep_all, generate_with
from vtprune.core import ModelInfo, attention_rows, top_k
from vtprune.methods.pyramiddrop import (
    average_share,
    pdrop_scores,
    solve_lambda,
    stage_counts,
)

REFERENCE = torch.load(Path(__file__).parents[1] / "data/reference/pyramiddrop/pyramiddrop_official.pt")
STEPS = 4


def rope(x, positions, theta):
    """Llama RoPE (rotate-half form) on x [H, L, d] at positions [L]."""
    d = x.shape[-1]
    freqs = torch.outer(positions.float(), 1.0 / theta ** (torch.arange(0, d, 2).float() / d))
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_scores_and_kept_sets_equal_the_official_rank_and_drop(case):
    ref = REFERENCE[case]
    stage, ratios, heads = ref["stage"], tuple(ref["ratios"].tolist()), ref["num_heads"]
    for b in range(ref["features"].shape[0]):
        valid = ref["attention_mask"][b].bool()
        h = ref["features"][b, valid]
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + ref["rms_eps"]) * ref["norm_weight"]
        q = (x @ ref["q_weight"].T).view(len(h), heads, -1).transpose(0, 1)
        k = (x @ ref["k_weight"].T).view(len(h), heads, -1).transpose(0, 1)
        positions = ref["position_ids"][b, valid]
        q, k = rope(q, positions, ref["rope_theta"]), rope(k, positions, ref["rope_theta"])
        last = len(h) - 1  # the last valid token: prompt_len + current image tokens - 1
        row = attention_rows(q[None, :, last:], k[None], q.shape[-1] ** -0.5, query_positions=torch.tensor([[last]]))
        n0 = int(ref["n0"][b])
        current, keep = stage_counts(n0, (1.0, *ratios[1:]))[stage : stage + 2]
        start = int(ref["image_index"][b])
        scores = pdrop_scores(row[0, :, 0], torch.arange(start, start + current))
        torch.testing.assert_close(scores, ref["scores"][b], atol=1e-6, rtol=0)
        assert top_k(scores, keep).tolist() == ref["kept"][b].tolist()
        assert keep == stage_counts(n0, ratios[1:])[stage]


def test_budget_mapping_reproduces_the_authors_numbers():
    assert average_share((8, 16, 24), (0.5, 0.25, 0.125), 32) * 576 == 270  # the released setting
    assert round(solve_lambda(64 / 576, (2, 8, 16), 32), 2) == 0.19  # issue #29
    assert [round(solve_lambda(t / 576, (2, 8, 16), 32), 2) for t in (128, 192)] == [0.42, 0.56]
    assert stage_counts(576, (0.19, 0.19**2, 0.19**3)) == [109, 20, 3]  # spec's example
    info = ModelInfo(family="llava", llm_layers=32)
    assert vtprune.make("pyramiddrop").stage_ratios(info, 576) == (0.5, 0.25, 0.125)
    assert vtprune.make("pyramiddrop", preset="avg64").layers(info) == (2, 8, 16)
    ratios = vtprune.make("pyramiddrop", keep=64, layer_list=(2, 8, 16)).stage_ratios(info, 576)
    assert abs(average_share((2, 8, 16), ratios, 32) * 576 - 64) < 1e-6
    assert vtprune.make("pyramiddrop", keep=1.0).stage_ratios(info, 576) == (1.0, 1.0, 1.0)
    assert vtprune.make("pyramiddrop").layers(ModelInfo(family="qwen", llm_layers=28)) == (7, 14, 21)
    assert vtprune.make("pyramiddrop").layers(ModelInfo(family="llava", llm_layers=4)) == (1, 2, 3)


def test_bad_options_are_refused():
    with pytest.raises(vtprune.VTPruneError, match="one of keep, lam, ratios; got keep and lam"):
        vtprune.make("pyramiddrop", keep=64, lam=0.5)
    with pytest.raises(vtprune.VTPruneError, match="lam=1.5"):
        vtprune.make("pyramiddrop", lam=1.5)
    with pytest.raises(vtprune.VTPruneError, match="must not increase"):
        vtprune.make("pyramiddrop", ratios=(0.5, 0.6, 0.1))
    with pytest.raises(vtprune.VTPruneError, match="2 ratios but 3 layers"):
        vtprune.make("pyramiddrop", ratios=(0.5, 0.2), layer_list=(2, 8, 16))
    with pytest.raises(vtprune.VTPruneError, match="keep=0"):
        vtprune.make("pyramiddrop", keep=0)
    info = ModelInfo(family="llava", llm_layers=4)
    with pytest.raises(vtprune.VTPruneError, match=r"ascending in 1\.\.3"):
        vtprune.make("pyramiddrop", preset="avg64").layers(info)
    with pytest.raises(vtprune.VTPruneError, match="below 0.2500"):
        vtprune.make("pyramiddrop", keep=64).stage_ratios(ModelInfo(family="llava", llm_layers=32), 576)


def sample_inputs(batch, b):
    """Sample b of the padded batch alone: no padding, its own images."""
    real = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b, real][None]
    first = int((batch["input_ids"][:b] == IMAGE_TOKEN).sum()) // 16
    count = int((ids == IMAGE_TOKEN).sum()) // 16
    return ids, batch["pixel_values"][first : first + count]


def reference(model, ids, pixels, layers, ratios):
    """Batch-1 PyramidDrop written from the spec: manual layer loop; after 1-indexed layer l the next layer's norm and
    q/k (RoPE at the current, contiguous positions) give the last token's attention; each image keeps
    int(16 * ratio) of its tokens; every layer decodes at its own cache length."""
    inner, lm, head = model.model, model.model.language_model, model.lm_head
    modeling = sys.modules[type(lm.layers[0].self_attn).__module__]
    x = inner.get_input_embeddings()(ids)
    features = torch.cat(list(inner.get_image_features(pixel_values=pixels).pooler_output))
    x = x.masked_scatter((ids == IMAGE_TOKEN)[..., None], features)
    image_pos = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    images = [image_pos[i : i + 16] for i in range(0, len(image_pos), 16)]  # current positions per image
    originals = [torch.arange(i, i + 16) for i in range(0, len(image_pos), 16)]
    cache, kept_per_stage = DynamicCache(config=lm.config), []
    for index, layer in enumerate(lm.layers):
        n = x.shape[1]
        cos, sin = lm.rotary_emb(x, torch.arange(n)[None])
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        x = layer(x, attention_mask=causal, position_embeddings=(cos, sin), cache=cache)
        if index + 1 not in layers:
            continue
        stage, nxt = layers.index(index + 1), lm.layers[index + 1]
        h = nxt.input_layernorm(x)
        attn = nxt.self_attn
        q = attn.q_proj(h[:, -1:]).view(1, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(1, n, -1, attn.head_dim).transpose(1, 2)
        q, _ = modeling.apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        _, k = modeling.apply_rotary_pos_emb(k, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        weights = ((q @ k.transpose(-1, -2)) * attn.head_dim**-0.5).float().softmax(-1).mean(dim=1)[0, 0]  # [n]
        keep = torch.ones(n, dtype=torch.bool)
        new_originals = []
        for positions_i, originals_i in zip(images, originals):
            chosen = torch.topk(weights[positions_i], int(16 * ratios[stage])).indices.sort().values
            keep[positions_i] = False
            keep[positions_i[chosen]] = True
            new_originals.append(originals_i[chosen])
        kept_index = keep.nonzero().squeeze(1)
        new_position = torch.full((n,), -1)
        new_position[kept_index] = torch.arange(len(kept_index))
        images, originals = [new_position[p[keep[p]]] for p in images], new_originals
        kept_per_stage.append(torch.cat(originals))
        x = x[:, kept_index]
    step_logits = [head(lm.norm(x)[:, -1])[0]]
    for _ in range(STEPS - 1):
        x = inner.get_input_embeddings()(step_logits[-1].argmax()[None, None])
        for index, layer in enumerate(lm.layers):
            position = torch.tensor([[cache.get_seq_length(index)]])  # the layer's own (shortened) length
            x = layer(x, attention_mask=None, position_embeddings=lm.rotary_emb(x, position), cache=cache)
        step_logits.append(head(lm.norm(x)[:, -1])[0])
    return torch.stack(step_logits), kept_per_stage


@pytest.mark.parametrize("options, layers, ratios", [
    ({}, (1, 2, 3), (0.5, 0.25, 0.125)),  # the released schedule (8, 16, 24 of 32) scaled to 4 layers
    ({"ratios": (0.75, 0.25), "layer_list": (1, 3)}, (1, 3), (0.75, 0.25)),
])
def test_batched_generate_equals_the_per_sample_reference(tiny_llava, batch, options, layers, ratios):
    tokens, logits, trace = generate_with(tiny_llava, batch, vtprune.make("pyramiddrop", **options), STEPS)
    sites = trace.forwards[0].sites
    with torch.no_grad():
        for b in range(2):
            expected_logits, expected_kept = reference(tiny_llava, *sample_inputs(batch, b), layers, ratios)
            torch.testing.assert_close(logits[b], expected_logits, atol=1e-5, rtol=0)
            assert tokens[b].tolist() == expected_logits.argmax(-1).tolist()
            assert [s.kept.tolist() for s in sites if s.sample == b] == [k.tolist() for k in expected_kept]
    counts = [[s.visual_after for s in sites if s.sample == b] for b in range(2)]
    assert counts == [[int(16 * r) for r in ratios], [2 * int(16 * r) for r in ratios]]
    assert [s.layer for s in sites if s.sample == 0] == list(layers)


def test_keep_all_is_exact_at_prefill_and_every_decoding_step(tiny_llava, batch):
    trace = dense_equals_keep_all(tiny_llava, batch, vtprune.make("pyramiddrop", keep=1.0))
    assert trace.visual_tokens() == [(16, 16), (32, 32)]


def test_cache_lengths_follow_the_pyramid(tiny_llava, batch):
    with torch.no_grad(), vtprune.make("pyramiddrop")(tiny_llava):
        out = tiny_llava(**batch, use_cache=True)
    text = batch["attention_mask"].sum(1) - 16 * torch.tensor([1, 2])  # text (a cut keeps it, and only the padding needed)
    stage = [int((text + int(16 * r) * torch.tensor([1, 2])).max()) for r in (1.0, 0.5, 0.25, 0.125)]
    assert [out.cache.layers[i].keys.shape[-2] for i in range(4)] == stage  # layer i sees stage i's sequence


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_keep_all_is_exact_and_the_pyramid_holds(kind):
    model = build_tiny_qwen(kind)
    batch = two_screenshot_batch(build_qwen_processor(kind))
    dense_equals_keep_all(model, batch, vtprune.make("pyramiddrop", keep=1.0, layer_list=(1, 2)), steps=3)
    with torch.no_grad(), vtprune.make("pyramiddrop", ratios=(0.5, 0.25), layer_list=(1, 2))(model) as trace:
        out = model(**batch, use_cache=True)
    spans = trace.forwards[0].layout.spans
    for b in range(2):
        counts = [s.visual_after for s in trace.forwards[0].sites if s.sample == b]
        assert counts == [sum(int(s.length * r) for s in spans[b]) for r in (0.5, 0.25)]
    lengths = [out.cache.layers[i].keys.shape[-2] for i in range(3)]
    assert lengths[0] > lengths[1] > lengths[2]
