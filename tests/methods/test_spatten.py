"""SpAtten: keep=1.0 is the dense model; a real cascade equals a hand-made batch-1 reference (eager attention, manual
layer loop, original positions, per-layer caches) in generate() with a padded batch of 2; first-cut scores are the
eager attention's column sums."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from transformers import DynamicCache

import vtprune
from tests.helpers import IMAGE_TOKEN, build_tiny_llava
from vtprune.core import ModelInfo
from vtprune.methods.spatten import cascade_counts, default_layers

CUTS = (1, 2, 3)
STEPS = 4


def sample_inputs(batch, b):
    """Sample b of the padded batch alone: no padding, its own images."""
    real = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b, real][None]
    first = int((batch["input_ids"][:b] == IMAGE_TOKEN).sum()) // 16
    count = int((ids == IMAGE_TOKEN).sum()) // 16
    return ids, batch["pixel_values"][first : first + count]


def reference(model, ids, pixels, keep_per_image, queries):
    """Batch-1 SpAtten from the paper rule: per layer, eager softmax from its own q/k, column sums over heads and rows
    added to every live visual token's score; before each cut layer every image keeps its top
    round(16 − (16 − keep)·(k + 1)/3) tokens; original positions; decoding at the original next position."""
    inner, lm, head = model.model, model.model.language_model, model.lm_head
    modeling = sys.modules[type(lm.layers[0].self_attn).__module__]
    x = inner.get_input_embeddings()(ids)
    features = torch.cat(list(inner.get_image_features(pixel_values=pixels).pooler_output))
    x = x.masked_scatter((ids == IMAGE_TOKEN)[..., None], features)
    n = ids.shape[1]
    live = torch.arange(n)  # original positions of the live tokens
    image_positions = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    ordinal_of = {int(p): i for i, p in enumerate(image_positions)}
    scores = torch.zeros(len(image_positions))
    cache = DynamicCache(config=lm.config)
    kept_per_cut = []
    for index, layer in enumerate(lm.layers):
        if index in CUTS:
            k_stage = CUTS.index(index)
            count = math.floor(16 - (16 - keep_per_image) * (k_stage + 1) / len(CUTS) + 0.5)
            keep = torch.ones(live.numel(), dtype=torch.bool)
            for image in range(len(image_positions) // 16):
                mine = [i for i, p in enumerate(live.tolist()) if p in ordinal_of and ordinal_of[p] // 16 == image]
                ranked = sorted(mine, key=lambda i: (-float(scores[ordinal_of[int(live[i])]]), i))
                for i in ranked[count:]:
                    keep[i] = False
            live, x = live[keep], x[:, keep]
            kept_per_cut.append(sorted(ordinal_of[int(p)] for p in live if int(p) in ordinal_of))
        m = live.numel()
        cos, sin = lm.rotary_emb(x, live[None])
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(1, m, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(1, m, -1, attn.head_dim).transpose(1, 2)
        q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5
        probs = logits.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), float("-inf")).softmax(dim=-1)[0]
        rows = [i for i, p in enumerate(live.tolist()) if queries == "all" or p not in ordinal_of]
        received = probs[:, rows].sum(dim=(0, 1))
        for i, p in enumerate(live.tolist()):
            if p in ordinal_of:
                scores[ordinal_of[p]] += received[i]
        causal = torch.ones(m, m, dtype=torch.bool).tril()[None, None]
        x = layer(x, attention_mask=causal, position_embeddings=(cos, sin), cache=cache)
    step_logits = [head(lm.norm(x)[:, -1])[0]]
    for s in range(STEPS - 1):
        x = inner.get_input_embeddings()(step_logits[-1].argmax()[None, None])
        position = torch.tensor([[n + s]])  # original positions continue
        for layer in lm.layers:
            x = layer(x, attention_mask=None, position_embeddings=lm.rotary_emb(x, position), cache=cache)
        step_logits.append(head(lm.norm(x)[:, -1])[0])
    return torch.stack(step_logits), kept_per_cut


@pytest.mark.parametrize("queries", ["all", "text"])
def test_generate_equals_the_reference(tiny_llava, batch, queries):
    method = vtprune.make("spatten", keep=4, layers=CUTS, queries=queries)
    with torch.no_grad(), method(tiny_llava) as trace:
        out = tiny_llava.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    logits = torch.stack(out.logits, dim=1)
    sites = trace.forwards[0].sites
    with torch.no_grad():
        for b in range(2):
            expected_logits, expected_kept = reference(tiny_llava, *sample_inputs(batch, b), 4, queries)
            torch.testing.assert_close(logits[b], expected_logits, atol=1e-5, rtol=0)
            assert [s.kept.tolist() for s in sites if s.sample == b] == expected_kept
    assert [len(s.kept) for s in sites if s.sample == 1] == [24, 16, 8]  # two images: 12, 8, 4 each


def test_keep_all_is_the_dense_model(tiny_llava, batch):
    with torch.no_grad():
        dense = tiny_llava.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        with vtprune.make("spatten", keep=1.0, layers=CUTS)(tiny_llava) as trace:
            pruned = tiny_llava.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                         return_dict_in_generate=True)
    assert torch.equal(dense.sequences, pruned.sequences)
    torch.testing.assert_close(torch.stack(pruned.logits), torch.stack(dense.logits), atol=1e-5, rtol=0)
    assert all(len(s.kept) == len(s.before) for s in trace.forwards[0].sites)


def test_first_cut_scores_are_the_eager_attention_column_sums(batch):
    """ReceivedAttention before any cut: Σ over heads and real query rows of the eager attention of layers 0..c-1."""
    model = build_tiny_llava(seed=0, attn="eager")
    with torch.no_grad():
        eager = model(**batch, output_attentions=True).attentions
        with vtprune.make("spatten", keep=8, layers=(2, 3))(model) as trace:
            model(**batch)
    first = [s for s in trace.forwards[0].sites if s.layer == 2]
    for b, site in enumerate(first):
        real = batch["attention_mask"][b].bool()
        visual = (batch["input_ids"][b] == IMAGE_TOKEN).nonzero().squeeze(1)
        expected = sum(eager[layer][b][:, real].sum(dim=(0, 1)) for layer in range(2))[visual]
        torch.testing.assert_close(site.scores, expected, atol=1e-5, rtol=1e-5)


def test_schedule_and_counts():
    assert cascade_counts(16, 4, 3) == [12, 8, 4]
    assert cascade_counts(576, 144, 4) == [468, 360, 252, 144]
    assert cascade_counts(16, 16, 3) == [16, 16, 16]
    assert default_layers(32) == tuple(range(5, 32)) and default_layers(6) == (3, 4, 5)
    assert cascade_counts(40, 10, len(default_layers(6))) == [30, 20, 10]  # LTP's [.75, .5, .25] of 40 tokens
    info = ModelInfo(family="llava", llm_layers=4)
    assert vtprune.make("spatten").cut_layers(info) == [3]
    assert [r.layer for r in vtprune.make("spatten", layers=(1, 3)).requests(info)] == [0, 1, 2]


def test_bad_options_are_refused(tiny_llava, batch):
    with pytest.raises(vtprune.VTPruneError, match="queries"):
        vtprune.make("spatten", queries="last")
    with pytest.raises(vtprune.VTPruneError, match="ascending"):
        vtprune.make("spatten", layers=(3, 2))
    with pytest.raises(vtprune.VTPruneError, match="ascending"):
        vtprune.make("spatten", layers=(0, 2))
    with pytest.raises(vtprune.VTPruneError, match="scope"):
        vtprune.make("spatten", scope="batch")
    with pytest.raises(vtprune.VTPruneError, match=r"layers 0\.\.3"):
        vtprune.make("spatten", layers=(2, 4)).cut_layers(ModelInfo(family="llava", llm_layers=4))
    too_many = vtprune.make("spatten", keep=20, layers=CUTS)
    with pytest.raises(vtprune.VTPruneError, match="more than the 16"), torch.no_grad(), too_many(tiny_llava):
        tiny_llava(**batch)
