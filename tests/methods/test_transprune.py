"""TransPrune: prefill and decoding equal a step-by-step reference written from the spec; per-layer cache lengths."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from transformers import DynamicCache

import vtprune
from tests.helpers import IMAGE_TOKEN, build_tiny_llava, padded_batch
from vtprune.core import ModelInfo
from vtprune.methods.transprune import scaled_layers, ttv_scores

PRUNE = (7, 9, 12)  # 1-indexed: prune after these layers (the released LLaVA-1.5 schedule)
BAND = tuple(range(7, 13))  # 1-indexed TTV accumulation layers
RATIOS = (0.875, 0.625, 0.125)
STEPS = 4


def sample_inputs(batch, b):
    """Sample b of the padded batch alone: no padding, its own images."""
    real = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b, real][None]
    first = int((batch["input_ids"][:b] == IMAGE_TOKEN).sum()) // 16
    count = int((ids == IMAGE_TOKEN).sum()) // 16
    return ids, batch["pixel_values"][first : first + count]


def transition(x_in, x_out):
    """TTV of one module over the whole sequence: ||out||/||in|| * softmax(1 - cos)."""
    ratio = x_out.norm(dim=-1) / x_in.norm(dim=-1)
    u = 1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
    return ratio * u.exp() / u.exp().sum()


def reference(model, ids, pixels):
    """Batch-1 TransPrune from the spec: manual layer loop, TTV/IGA by hand, compaction, per-layer caches."""
    inner, lm, head = model.model, model.model.language_model, model.lm_head
    modeling = sys.modules[type(lm.layers[0].self_attn).__module__]
    x = inner.get_input_embeddings()(ids)
    features = torch.cat(list(inner.get_image_features(pixel_values=pixels).pooler_output))
    x = x.masked_scatter((ids == IMAGE_TOKEN)[..., None], features)
    image_pos = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    images = [image_pos[i : i + 16] for i in range(0, len(image_pos), 16)]  # current positions of each image's tokens
    originals = [torch.arange(i, i + 16) for i in range(0, len(image_pos), 16)]  # their original visual ordinals
    cache = DynamicCache(config=lm.config)
    history, kept_per_stage = [], []
    for index, layer in enumerate(lm.layers):
        n = x.shape[1]
        positions = torch.arange(n)[None]
        cos, sin = lm.rotary_emb(x, positions)
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        residual, h = x, layer.input_layernorm(x)
        attn_out, _ = layer.self_attn(hidden_states=h, attention_mask=causal, position_embeddings=(cos, sin), cache=cache)
        x = residual + attn_out
        h2 = layer.post_attention_layernorm(x)
        mlp_out = layer.mlp(h2)
        x = x + mlp_out
        if index + 1 in BAND:
            history.append((transition(h, attn_out) + transition(h2, mlp_out))[0])
        if index + 1 not in PRUNE:
            continue
        stage = PRUNE.index(index + 1)
        nxt = lm.layers[index + 1]  # IGA: layer p+1 (1-indexed) = lm.layers[p]
        attn = nxt.self_attn
        hn = nxt.input_layernorm(x)
        q = attn.q_proj(hn).view(1, n, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hn).view(1, n, -1, attn.head_dim).transpose(1, 2)
        q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        rows = torch.arange(int(images[-1][-1]) + 1, n)  # every token after the image block
        logits = (q[:, :, rows] @ k.transpose(-1, -2)) * attn.head_dim**-0.5
        logits = logits.masked_fill(torch.arange(n)[None, :] > rows[:, None], float("-inf"))
        attention = logits.softmax(dim=-1).mean(dim=1)[0]  # [rows, n]
        accumulated = torch.stack(history).sum(dim=0)
        keep = torch.ones(n, dtype=torch.bool)
        new_originals = []
        for positions_i, originals_i in zip(images, originals):
            ttv = accumulated[positions_i] / (accumulated[positions_i].sum() + 1e-8)
            iga = attention[:, positions_i].mean(dim=0)
            iga = iga / (iga.sum() + 1e-8)
            score = 0.5 * ttv + 0.5 * iga
            chosen = torch.topk(score, int(16 * RATIOS[stage])).indices.sort().values
            keep[positions_i] = False
            keep[positions_i[chosen]] = True
            new_originals.append(originals_i[chosen])
        kept_index = keep.nonzero().squeeze(1)
        new_position = torch.full((n,), -1)
        new_position[kept_index] = torch.arange(len(kept_index))
        images = [new_position[p[keep[p]]] for p in images]
        originals = new_originals
        kept_per_stage.append(torch.cat(originals))
        x = x[:, kept_index]  # positions are compacted to 0..N'-1 at the next layer
        history = [h[kept_index] for h in history]
    step_logits = [head(lm.norm(x)[:, -1])[0]]
    for _ in range(STEPS - 1):
        x = inner.get_input_embeddings()(step_logits[-1].argmax()[None, None])
        for index, layer in enumerate(lm.layers):
            position = torch.tensor([[cache.get_seq_length(index)]])  # the layer's own cache length
            x = layer(x, attention_mask=None, position_embeddings=lm.rotary_emb(x, position), cache=cache)
        step_logits.append(head(lm.norm(x)[:, -1])[0])
    return torch.stack(step_logits), kept_per_stage, [cache.get_seq_length(i) for i in range(len(lm.layers))]


@pytest.fixture(scope="module")
def llava16():
    return build_tiny_llava(seed=0, layers=16)


def test_prefill_and_decoding_equal_the_reference(llava16):
    batch = padded_batch()
    method = vtprune.make("transprune", keep_ratios=RATIOS, prune_layers=PRUNE, accumulate_layers=BAND)
    with torch.no_grad(), method(llava16) as trace:
        out = llava16.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    logits = torch.stack(out.logits, dim=1)  # [B, steps, V]
    sites = trace.forwards[0].sites
    with torch.no_grad():
        for b in range(2):
            expected_logits, expected_kept, _ = reference(llava16, *sample_inputs(batch, b))
            torch.testing.assert_close(logits[b], expected_logits, atol=1e-5, rtol=0)
            kept = [s.kept.tolist() for s in sites if s.sample == b]
            assert kept == [k.tolist() for k in expected_kept]
    assert [s.layer for s in sites if s.sample == 0] == list(PRUNE)


def test_per_layer_cache_lengths_follow_the_schedule(llava16):
    batch = padded_batch()
    method = vtprune.make("transprune", keep_ratios=RATIOS, prune_layers=PRUNE, accumulate_layers=BAND)
    with torch.no_grad(), method(llava16):
        out = llava16(**batch, use_cache=True)
    images = torch.tensor([1, 2])
    text = batch["attention_mask"].sum(1) - 16 * images  # text (a cut keeps it, and only the padding needed)
    per_sample = [text + math.floor(16 * r) * images for r in (1.0, *RATIOS)]  # stage -> [2] lengths
    stage = [sum(layer >= p for p in PRUNE) for layer in range(16)]
    expected = [int(per_sample[s].max()) for s in stage]  # ragged samples are left padded to the longest
    assert [out.cache.layers[i].keys.shape[-2] for i in range(16)] == expected  # physical lengths
    assert {out.cache.get_seq_length(i) for i in range(16)} == {batch["input_ids"].shape[1]}  # logical
    # sample 1 (two images, no padding) is the longest once cuts start; sample 0 drops the padding it no longer needs
    assert expected == [37] * 7 + [33] * 2 + [25] * 3 + [9] * 4
    with torch.no_grad():  # the reference's batch-1 caches for sample 1 (no padding) agree with its own lengths
        *_, lengths = reference(llava16, *sample_inputs(batch, 1))
    assert [length - (STEPS - 1) for length in lengths] == [int(per_sample[s][1]) for s in stage]


def test_ttv_is_ratio_times_softmax_over_real_tokens():
    ratio, cosine = torch.rand(2, 6) + 0.5, torch.rand(2, 6) * 2 - 1
    valid = torch.tensor([False, True, True, True, True, True])
    u = 1 - cosine[:, 1:]
    expected = (ratio[:, 1:] * u.exp() / u.exp().sum(dim=1, keepdim=True)).sum(dim=0)
    torch.testing.assert_close(ttv_scores(ratio, cosine, valid)[1:], expected)
    assert ttv_scores(ratio, cosine, valid)[0] == 0
    u_abs = 1 - cosine[:, 1:].abs()
    expected_abs = (ratio[:, 1:] * u_abs.exp() / u_abs.exp().sum(dim=1, keepdim=True)).sum(dim=0)
    torch.testing.assert_close(ttv_scores(ratio, cosine, valid, "one_minus_abs_cos")[1:], expected_abs)


@pytest.mark.parametrize(
    "depth, prune, band",
    [(32, (7, 9, 12), tuple(range(7, 13))), (16, (4, 5, 6), (4, 5, 6)), (4, (1, 2, 3), (1, 2, 3)),
     (28, (6, 8, 11), tuple(range(6, 12)))],
)
def test_layers_scale_with_depth(depth, prune, band):
    info = ModelInfo(family="llava", llm_layers=depth)
    assert vtprune.make("transprune").layers(info) == (prune, band)
    assert scaled_layers((7, 9, 12), depth) == prune


def test_presets_and_bad_options():
    assert vtprune.make("transprune", preset="low").keep_ratios == (0.625, 0.1875, 0.0625)
    assert vtprune.make("transprune", preset="high", alpha=0.4).alpha == 0.4
    with pytest.raises(vtprune.VTPruneError, match="must not increase"):
        vtprune.make("transprune", keep_ratios=(0.5, 0.7, 0.1))
    with pytest.raises(vtprune.VTPruneError, match="ttv_direction"):
        vtprune.make("transprune", ttv_direction="cos")
    with pytest.raises(vtprune.VTPruneError, match=r"ascending in 1\.\.3"):
        vtprune.make("transprune", prune_layers=(2, 3, 4)).layers(ModelInfo(family="llava", llm_layers=4))
    with pytest.raises(vtprune.VTPruneError, match="at least 4|1..2"):
        vtprune.make("transprune").layers(ModelInfo(family="llava", llm_layers=3))


def test_image_without_text_after_it_is_refused(tiny_llava):
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * 16])
    with pytest.raises(vtprune.VTPruneError, match="needs text after the last image"):
        with torch.no_grad(), vtprune.make("transprune")(tiny_llava):
            tiny_llava(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
