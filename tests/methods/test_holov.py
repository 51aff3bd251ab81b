"""HoloV: the selection equals the official function's output (stored), signals equal eager CLIP attention, keep-all
is exact, batch-2 generate() (official order, zero tokens for the lost excess) equals a hand-compacted reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from tests.adapters.qwen_builders import build_tiny_qwen
from tests.helpers import build_tiny_llava
from tests.methods.pre_llm_reference import (
    dense_equals_keep_all,
    generate_compacted,
    generate_with,
    image_embeddings,
)
from vtprune.methods.holov import holov_partitions, holov_select

REFERENCE = torch.load(Path(__file__).parents[1] / "data/reference/holov/holov_official.pt")
IMAGES_OF_SAMPLE = ((0,), (1, 2))  # the `batch` fixture: sample 0 holds image 0, sample 1 images 1 and 2


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_selection_equals_the_official_output(case):
    ref = REFERENCE[case]
    for b in range(ref["features"].shape[0]):
        picks = holov_select(ref["features"][b], ref["attention"][b], ref["partitions"], ref["count"])
        assert picks.tolist() == ref["kept"][b].tolist()  # same tokens, same order, same zero tokens (-1)


def test_partition_rule():
    assert [holov_partitions(576, t) for t in (64, 128, 192)] == [16, 8, 5]
    assert holov_partitions(16, 16) == 1


def eager_inputs(batch):
    """Official inputs from an eager run: [CLS] row of layer -2 (head mean), and per image the projector output."""
    eager = build_tiny_llava(seed=0, attn="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(batch["pixel_values"], output_attentions=True)
        embeds = image_embeddings(eager, batch)
    ids, features = batch["input_ids"], []
    for b, images in enumerate(IMAGES_OF_SAMPLE):
        positions = (ids[b] == 99).nonzero().squeeze(1)
        features += [embeds[b, positions[16 * i : 16 * (i + 1)]] for i in range(len(images))]
    return out.attentions[-2][:, :, 0, 1:].mean(dim=1), features


def official_sequences(batch, keep, partitions):
    """Per sample, per image: what the official code feeds the LLM (ordinals of the sample, -1 = zero token)."""
    attention, features = eager_inputs(batch)
    out = []
    for images in IMAGES_OF_SAMPLE:
        picks = [holov_select(features[image], attention[image], partitions, keep).tolist() for image in images]
        out.append([[o + 16 * i if o >= 0 else -1 for o in image] for i, image in enumerate(picks)])
    return out


@pytest.mark.parametrize("keep, partitions, zeros", [(5, None, 0), (10, 12, 2)])
def test_batched_generate_equals_the_hand_compacted_reference(tiny_llava, batch, keep, partitions, zeros):
    """keep=5: P=5 by the official rule, tokens by attention within chunks; keep=10 on 12 chunks: the four 2-token
    chunks get 3 each and 2 of the budget are lost: zero tokens at the end of the image."""
    steps = 4
    method = vtprune.make("holov", keep=keep, partitions=partitions)
    tokens, logits, trace = generate_with(tiny_llava, batch, method, steps)
    visual = official_sequences(batch, keep, partitions or holov_partitions(16, keep))
    assert sum(o < 0 for sample in visual for image in sample for o in image) == zeros * 3
    assert any(image != sorted(image) for sample in visual for image in sample)  # the order is not raster order
    ref_tokens, ref_logits = generate_compacted(tiny_llava, batch, visual, steps)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    assert trace.visual_tokens(0) == [(16, keep), (32, 2 * keep)]  # zero tokens count: the official code feeds T
    for b, site in enumerate(trace.forwards[0].sites):  # the trace lists contents in sequence order
        expected, carriers = [], []
        for i, image in enumerate(visual[b]):
            chosen = [o for o in image if o >= 0]
            free = [o for o in range(16 * i, 16 * (i + 1)) if o not in chosen][: len(image) - len(chosen)]
            expected += chosen + free  # zero tokens sit in the lowest free slots, moved to the image's end
            carriers += free
        assert site.kept.tolist() == expected
        assert sorted(m["slot"] for m in site.merged if not m["sources"]) == carriers
        assert len(carriers) == zeros * len(IMAGES_OF_SAMPLE[b])


def test_trace_follows_the_official_order(tiny_llava, batch):
    with torch.no_grad(), vtprune.make("holov", keep=5)(tiny_llava) as trace:
        tiny_llava(**batch)
    visual = official_sequences(batch, 5, 5)
    assert [s.kept.tolist() for s in trace.forwards[0].sites] == [[o for image in v for o in image] for v in visual]
    attention, _ = eager_inputs(batch)
    torch.testing.assert_close(trace.forwards[0].sites[1].scores, attention[1:].flatten(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("excess", ["redistribute", "drop"])
def test_excess_options(tiny_llava, batch, excess):
    visual = official_sequences(batch, 10, 12)
    method = vtprune.make("holov", keep=10, partitions=12, excess=excess, order="ascending")
    with torch.no_grad(), method(tiny_llava) as trace:
        tiny_llava(**batch)
    attention, _ = eager_inputs(batch)
    for b, site in enumerate(trace.forwards[0].sites):
        expected = []
        for i, image in enumerate(IMAGES_OF_SAMPLE[b]):
            chosen = [o for o in visual[b][i] if o >= 0]
            if excess == "redistribute":  # the best-attended tokens left over fill the lost share
                rest = [o for o in range(16 * i, 16 * i + 16) if o not in chosen]
                rest.sort(key=lambda o: -float(attention[image][o - 16 * i]))
                chosen += rest[: 10 - len(chosen)]
            expected += sorted(chosen)
        assert site.kept.tolist() == sorted(expected)
        assert not site.merged
    assert trace.visual_tokens() == ([(16, 10), (32, 20)] if excess == "redistribute" else [(16, 8), (32, 16)])


def test_keep_all_is_exact_at_prefill_and_every_decoding_step(tiny_llava, batch):
    trace = dense_equals_keep_all(tiny_llava, batch, vtprune.make("holov", keep=1.0))
    assert trace.visual_tokens() == [(16, 16), (32, 32)]


def test_bad_options_are_refused():
    with pytest.raises(vtprune.VTPruneError, match="partitions=0"):
        vtprune.make("holov", partitions=0)
    with pytest.raises(vtprune.VTPruneError, match="excess='spread'"):
        vtprune.make("holov", excess="spread")
    with pytest.raises(vtprune.VTPruneError, match="order='random'"):
        vtprune.make("holov", order="random", excess="drop")
    with pytest.raises(vtprune.VTPruneError, match="excess='pad' puts zero tokens"):
        vtprune.make("holov", order="ascending")
    with pytest.raises(vtprune.VTPruneError, match="keep=1.5"):
        vtprune.make("holov", keep=1.5)


def test_qwen_is_refused_without_cls():
    with pytest.raises(vtprune.VTPruneError, match=r"holov needs a vision encoder with a \[CLS\] token"):
        vtprune.make("holov", keep=4)(build_tiny_qwen("qwen2-vl"))


def test_llava_next_runs_in_raster_order_and_refuses_the_official_order():
    from tests.helpers_video import build_tiny_llava_next, media_batch

    model = build_tiny_llava_next()
    batch = media_batch(model, [[(32, 48)], [(60, 40)]])
    with (pytest.raises(vtprune.VTPruneError, match="use order='ascending'"), torch.no_grad(),
          vtprune.make("holov", keep=6)(model)):
        model(**batch)
    with torch.no_grad(), vtprune.make("holov", keep=6, order="ascending", excess="redistribute")(model) as trace:
        model(**batch)
    for b, (before, after) in enumerate(trace.visual_tokens()):
        extra = sum(int((s.patch_index < 0).sum()) for s in trace.forwards[0].layout.spans[b])  # row ends
        assert after == 6 + extra < before  # one budget per image: base view and tiles together
