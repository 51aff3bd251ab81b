"""CDPruner: relevance and the greedy DPP equal the official function's outputs (stored), the LLM-space relevance and
the kept sets equal a hand computation, keep-all is exact, batch-2 generate() equals a hand-compacted reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import vtprune
from tests.adapters.qwen_builders import (
    IMAGE,
    build_qwen_processor,
    build_tiny_qwen,
    two_screenshot_batch,
)
from tests.methods.pre_llm_reference import (
    dense_equals_keep_all,
    generate_compacted,
    generate_with,
    image_embeddings,
)
from vtprune.methods.cdpruner import dpp_select, normalize_relevance, relevance_scores

REFERENCE = torch.load(Path(__file__).parents[1] / "data/reference/cdpruner/cdpruner_official.pt")
IMAGES_OF_SAMPLE = ((0,), (1, 2))  # the `batch` fixture: sample 0 holds image 0, sample 1 images 1 and 2


def official_relevance(ref):
    """CLIP-space relevance as the official code computes it: negated cosine, min-max over the whole call."""
    tiles, n, c = ref["image_embeds"].shape
    raw = relevance_scores(ref["image_embeds"].reshape(-1, c), ref["text_embeds"], negate=True)
    return normalize_relevance(raw).view(tiles, n)


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_dpp_equals_the_official_greedy(case):
    ref = REFERENCE[case]
    r = official_relevance(ref)
    unit = ref["features"] / ref["features"].norm(dim=-1, keepdim=True)
    diagonal = torch.diagonal(unit @ unit.transpose(1, 2), dim1=1, dim2=2) * r**2
    torch.testing.assert_close(diagonal, ref["kernel_diagonal"], atol=1e-6, rtol=0)  # kernel: r_i S_ii r_i
    picks = dpp_select(ref["features"], r, ref["count"])
    assert torch.equal(picks, ref["greedy"])  # same picks in the same greedy order
    assert [torch.sort(p).values.tolist() for p in picks] == [k.tolist() for k in ref["kept"]]


def test_normalisation_and_theta():
    raw = torch.tensor([0.2, -0.1, 0.5])
    r = normalize_relevance(raw)
    torch.testing.assert_close(r, (raw + 0.1 + 1e-6) / 0.6)
    assert bool((r > 0).all())  # the least relevant token keeps a small positive weight
    torch.testing.assert_close(normalize_relevance(raw, theta=0.5), torch.exp(0.5 * r))
    assert torch.equal(normalize_relevance(torch.full((4,), 0.3)), torch.ones(4))


def hand_relevance(batch, embeds, negate=False):
    """LLM-space relevance: per image, mean cosine of its tokens to the instruction tokens (after the last image)."""
    out = []
    for b, images in enumerate(IMAGES_OF_SAMPLE):
        ids, mask = batch["input_ids"][b], batch["attention_mask"][b].bool()
        positions = (ids == 99).nonzero().squeeze(1)
        text = embeds[b, (torch.arange(len(ids)) > positions.max()) & mask]
        for i in range(len(images)):
            raw = relevance_scores(embeds[b, positions[16 * i : 16 * (i + 1)]], text, negate)
            out.append(normalize_relevance(raw))
    return out


def hand_kept(tiny_llava, batch, keep, negate=False):
    with torch.no_grad():
        embeds = image_embeddings(tiny_llava, batch)
    relevance = hand_relevance(batch, embeds, negate)
    kept, image = [], 0
    for b, images in enumerate(IMAGES_OF_SAMPLE):
        positions = (batch["input_ids"][b] == 99).nonzero().squeeze(1)
        sample = []
        for i in range(len(images)):
            features = embeds[b, positions[16 * i : 16 * (i + 1)]]
            picks = dpp_select(features[None], relevance[image][None], keep)[0]
            sample.append(sorted((picks + 16 * i).tolist()))
            image += 1
        kept.append(sample)
    return kept, relevance


@pytest.mark.parametrize("negate", [False, True])
def test_llm_space_relevance_and_kept_sets_equal_a_hand_computation(tiny_llava, batch, negate):
    with torch.no_grad(), vtprune.make("cdpruner", keep=5, negate=negate)(tiny_llava) as trace:
        tiny_llava(**batch)
    kept, relevance = hand_kept(tiny_llava, batch, 5, negate)
    sites = trace.forwards[0].sites
    torch.testing.assert_close(sites[0].scores, relevance[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sites[1].scores, torch.cat(relevance[1:]), atol=1e-6, rtol=0)
    assert [s.kept.tolist() for s in sites] == [[o for image in k for o in image] for k in kept]


def test_keep_all_is_exact_at_prefill_and_every_decoding_step(tiny_llava, batch):
    trace = dense_equals_keep_all(tiny_llava, batch, vtprune.make("cdpruner", keep=1.0))
    assert trace.visual_tokens() == [(16, 16), (32, 32)]


def test_batched_generate_with_left_padding_equals_the_hand_compacted_reference(tiny_llava, batch):
    steps = 4
    tokens, logits, trace = generate_with(tiny_llava, batch, vtprune.make("cdpruner", keep=4), steps)
    kept, _ = hand_kept(tiny_llava, batch, 4)
    ref_tokens, ref_logits = generate_compacted(tiny_llava, batch, kept, steps)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    assert trace.visual_tokens(0) == [(16, 4), (32, 8)]


def test_diversity_only_and_theta_change_the_kernel(tiny_llava, batch):
    with torch.no_grad():
        embeds = image_embeddings(tiny_llava, batch)
        with vtprune.make("cdpruner", keep=5, relevance="none")(tiny_llava) as trace:
            tiny_llava(**batch)
    positions = (batch["input_ids"][0] == 99).nonzero().squeeze(1)
    picks = dpp_select(embeds[0, positions][None], torch.ones(1, 16), 5)[0]
    assert trace.forwards[0].sites[0].kept.tolist() == sorted(picks.tolist())
    with torch.no_grad(), vtprune.make("cdpruner", keep=5, theta=0.9)(tiny_llava) as trace:
        tiny_llava(**batch)
    relevance = hand_relevance(batch, embeds)[0]
    torch.testing.assert_close(trace.forwards[0].sites[0].scores, torch.exp(4.5 * relevance), atol=1e-5, rtol=1e-6)


def test_prompt_without_text_after_the_image_is_refused(tiny_llava):
    ids = torch.tensor([[1, 5] + [99] * 16])
    with (pytest.raises(vtprune.VTPruneError, match="needs instruction text after the last image"), torch.no_grad(),
          vtprune.make("cdpruner", keep=4)(tiny_llava)):
        tiny_llava(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))


def test_bad_options_are_refused():
    with pytest.raises(vtprune.VTPruneError, match="relevance='clip'"):
        vtprune.make("cdpruner", relevance="clip")
    with pytest.raises(vtprune.VTPruneError, match="theta=1.0"):
        vtprune.make("cdpruner", theta=1.0)
    with pytest.raises(vtprune.VTPruneError, match="keep=-2"):
        vtprune.make("cdpruner", keep=-2)
    with pytest.raises(vtprune.VTPruneError, match="scope"):
        vtprune.make("cdpruner", scope="layer")


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_kept_sets_and_generate_equal_hand_references(kind):
    """The language model's input embeddings, captured before vtprune's hook, give the kept sets by hand; generate()
    (left padding, two screenshots per prompt) equals the language model on the hand-compacted sequence at the
    adapter's documented M-RoPE positions (the reference of tests/adapters/test_qwen2_vl.py)."""
    from tests.adapters.test_qwen2_vl import hand_positions

    model = build_tiny_qwen(kind)
    batch = two_screenshot_batch(build_qwen_processor(kind))
    seen = {}

    def capture(module, args, kwargs):  # registered before vtprune's hook: sees the dense input of the prefill
        seen.setdefault("embeds", kwargs["inputs_embeds"].detach().clone())

    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        tokens, logits, trace = generate_with(model, batch, vtprune.make("cdpruner", keep=0.25), steps=3)
    finally:
        handle.remove()
    embeds, ids, mask = seen["embeds"], batch["input_ids"], batch["attention_mask"].bool()
    layout, kept_patches, grids = trace.forwards[0].layout, [], []
    for b, site in enumerate(trace.forwards[0].sites):
        positions = (ids[b] == IMAGE).nonzero().squeeze(1)
        text = embeds[b, (torch.arange(ids.shape[1]) > positions.max()) & mask[b]]
        expected, start = [], 0
        for span in layout.spans[b]:
            visual = embeds[b, span.start : span.end]
            r = normalize_relevance(relevance_scores(visual, text))
            picks = sorted(dpp_select(visual[None], r[None], round(0.25 * span.length))[0].tolist())
            kept_patches.append(picks)
            grids.append(span.grid)
            expected += [p + start for p in picks]
            start += span.length
        assert site.kept.tolist() == expected
    assert [after for _, after in trace.visual_tokens(0)] == [10 + 6, 10 + 10]  # 25 % of 40 + 24, 40 + 40 tokens
    with torch.no_grad():  # the reference: hand-compacted sequence, hand-made positions, greedy decoding
        lm = model.model.language_model
        rows = hand_positions(batch, kept_patches, grids)
        length = max(len(kept) for _, kept, _ in rows)
        x = torch.zeros(2, length, embeds.shape[-1])
        attention = torch.zeros(2, length, dtype=torch.long)
        positions = torch.zeros(3, 2, length, dtype=torch.long)
        for b, (position_rows, kept, _) in enumerate(rows):
            x[b, length - len(kept) :] = embeds[b][mask[b]][kept]
            attention[b, length - len(kept) :] = 1
            positions[:, b, length - len(kept) :] = position_rows
        cache = DynamicCache(config=lm.config)
        step_logits = [model.lm_head(lm(inputs_embeds=x, attention_mask=attention, position_ids=positions,
                                        cache=cache).last_hidden_state[:, -1])]
        cursor = torch.tensor([c for _, _, c in rows])
        for t in range(1, 3):
            attention = torch.cat([attention, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out = lm(inputs_embeds=model.model.get_input_embeddings()(step_logits[-1].argmax(-1)[:, None]),
                     attention_mask=attention, position_ids=(cursor + t - 1).view(1, 2, 1).expand(3, 2, 1), cache=cache)
            step_logits.append(model.lm_head(out.last_hidden_state[:, -1]))
    torch.testing.assert_close(logits, torch.stack(step_logits, dim=1), atol=1e-5, rtol=0)
    assert torch.equal(tokens, torch.stack(step_logits, dim=1).argmax(-1))
