"""ToMe: the matching equals the official code's, the open_clip tower equals a hand-run ToMe tower (proportional
attention included), LLaVA's language model receives the hand-merged tokens, keep-all is dense."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vtprune
from tests.helpers import GRID, IMAGE_TOKEN, build_tiny_clip, build_tiny_llava, capture_llm_input, clip_images, hooks_of
from tests.methods.pre_llm_reference import (
    compacted_sequences, dense_equals_keep_all, generate_compacted, generate_with, image_embeddings,
)
from vtprune.core import ModelInfo
from vtprune.methods.tome import bipartite_soft_matching, even_schedule, merge_step, tower_output_groups

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "tome"  # see its README.md
PATCHES = GRID * GRID


# ------------------------------------------------------------------------------------- the official matching
def run_stages(x, projections, rs, class_token):
    """Our functions chained over stages on one image x [T, C]: (tokens [T', C], sizes [T'], source [T', T])."""
    sizes, source = torch.ones(x.shape[0]), torch.eye(x.shape[0])
    for w, r in zip(projections, rs.tolist()):
        order, src, dst = bipartite_soft_matching(x @ w, r, class_token)
        groups, new_sizes = merge_step(sizes, order, src, dst)
        x, source = x.clone(), source.clone()
        for target, members, weights in groups:
            x[target] = (weights[:, None] * x[members]).sum(0)
            source[target] = source[members].amax(0)
        x, source, sizes = x[order], source[order], new_sizes
    return x, sizes, source


@pytest.mark.parametrize("case", ["cls_one_stage", "cls_three_stages", "no_cls_two_stages", "cls_r_clamped"])
def test_merges_equal_the_official_code(case):
    ref = torch.load(REFERENCE / "reference.pt", weights_only=True)[case]
    for b in range(ref["x"].shape[0]):
        x, sizes, source = run_stages(ref["x"][b], ref["projections"], ref["rs"], ref["class_token"])
        assert torch.equal(source, ref["source"][b])  # the same groups, in the same output order
        assert torch.equal(sizes, ref["size"][b, :, 0])
        torch.testing.assert_close(x, ref["out"][b], atol=1e-5, rtol=0)


def test_matching_protects_cls_and_caps_r_at_half():
    metric = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    order, src, dst = bipartite_soft_matching(metric, 10, class_token=True)
    assert src.numel() == 4 and 0 not in src.tolist() and order[0] == 0
    assert sorted(order.tolist() + src.tolist()) == list(range(9))
    assert bool((dst % 2 == 1).all()) and bool((src % 2 == 0).all())  # A (even) merges into B (odd)
    order, src, _ = bipartite_soft_matching(metric, 0)
    assert order.tolist() == list(range(9)) and src.numel() == 0


def test_even_schedule_and_its_limit():
    assert even_schedule(16, 6, 3) == [4, 3, 3]
    assert even_schedule(196, 196, 11) == [0] * 11
    with pytest.raises(vtprune.VTPruneError, match="reach no fewer than 5 of 16 patches"):
        even_schedule(16, 2, 2)


def test_blocks_default_to_every_block_but_the_last():
    clip_b = ModelInfo(family="open_clip", llm_layers=0, vision_layers=12, vision_feature_layer=11, vision_has_cls=True)
    assert vtprune.make("tome").encoder_blocks(clip_b) == list(range(11))
    assert vtprune.make("tome", blocks=(2, -2)).encoder_blocks(clip_b) == [2, 10]
    for blocks in [(11,), (3, 3), (4, 2), (), (12,)]:
        with pytest.raises(vtprune.VTPruneError, match="ascending, distinct encoder blocks in 0..10"):
            vtprune.make("tome", blocks=blocks).encoder_blocks(clip_b)


# --------------------------------------------------------------------------------- open_clip: a hand-run tower
def block_forward(block, x, sizes):
    """One open_clip block on x [N, T, D], its attention written out (log(size) added to the logits when sizes is
    given); also returns the head-mean keys [N, T, d]."""
    attn = block.attn
    n, t, width = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.view(n, t, heads, -1).transpose(1, 2) for z in (q, k, v))  # [N, H, T, d]
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if sizes is not None:
        logits = logits + sizes.log()[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, t, width)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x))), k.mean(dim=1)


def hand_tome_tower(tower, pixels, schedule, prop_attn=True):
    """ToMe after each block with r = schedule[i], merged by size-weighted average (official merge_wavg semantics);
    returns the pooled, projected embedding, the token count entering each block and the output tokens."""
    with torch.no_grad():
        x = tower._embeds(pixels)
        sizes = torch.ones(x.shape[:2])
        lengths = []
        for index, block in enumerate(tower.transformer.resblocks):
            lengths.append(x.shape[1])
            x, keys = block_forward(block, x, sizes if prop_attn and bool((sizes > 1).any()) else None)
            if index < len(schedule):
                merged, new_sizes = [], []
                for b in range(x.shape[0]):
                    order, src, dst = bipartite_soft_matching(keys[b], schedule[index], class_token=True)
                    weighted = x[b] * sizes[b, :, None]
                    total = sizes[b].clone().index_add_(0, dst, sizes[b, src])
                    merged.append((weighted.index_add(0, dst, weighted[src]) / total[:, None])[order])
                    new_sizes.append(total[order])
                x, sizes = torch.stack(merged), torch.stack(new_sizes)
        pooled, tokens = tower._pool(x)
    return pooled @ tower.proj, lengths, tokens


def entering_lengths(tower, run):
    lengths = []
    handles = [b.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
               for b in tower.transformer.resblocks]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return lengths


@pytest.mark.parametrize("prop_attn", [True, False])
def test_open_clip_tower_equals_a_hand_run_tome_tower(prop_attn):
    model, images = build_tiny_clip(seed=3), clip_images(count=2)
    expected, expected_lengths, _ = hand_tome_tower(model.visual, images, [4, 3, 3], prop_attn)
    with torch.no_grad(), vtprune.make("tome", keep=6, prop_attn=prop_attn)(model) as trace:
        lengths = entering_lengths(model.visual, lambda: model.encode_image(images))
        embedding = model.encode_image(images)
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=0)
    assert lengths == expected_lengths == [17, 13, 10, 7]
    assert trace.visual_tokens() == [(PATCHES, 6)] * 2
    assert [row["layer"] for row in trace.summary() if row["forward"] == 0] == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        dense = model.encode_image(images)
    assert not torch.allclose(embedding, dense, atol=1e-3)  # something was merged


def test_proportional_attention_changes_the_result():
    model, images = build_tiny_clip(seed=3), clip_images(count=2)
    with torch.no_grad():
        with vtprune.make("tome", keep=6)(model):
            proportional = model.encode_image(images)
        with vtprune.make("tome", keep=6, prop_attn=False)(model):
            plain = model.encode_image(images)
    assert not torch.allclose(proportional, plain, atol=1e-4)


@pytest.mark.parametrize("keep", [1.0, PATCHES])
@pytest.mark.parametrize("layout", ["batch_first", "sequence_first"])
def test_keep_all_reproduces_the_dense_open_clip_embedding(keep, layout):
    model = build_tiny_clip(seed=1)
    if layout == "sequence_first":  # the older open_clip layout: [T, N, D], nn.MultiheadAttention not batch first
        model.visual.transformer.batch_first = False
        for block in model.visual.transformer.resblocks:
            block.attn.batch_first = False
    images = clip_images()
    with torch.no_grad():
        dense, dense_tower = model.encode_image(images), model.visual(images)
        with vtprune.make("tome", keep=keep)(model) as trace:
            pruned = model.encode_image(images)
        with vtprune.make("tome", keep=keep, blocks=(1,))(model.visual):
            pruned_tower = model.visual(images)
    torch.testing.assert_close(pruned, dense, atol=0, rtol=0)
    torch.testing.assert_close(pruned_tower, dense_tower, atol=0, rtol=0)
    assert trace.visual_tokens() == [(PATCHES, PATCHES)] * 3


def test_sequence_first_tower_merges_like_the_batch_first_one():
    images = clip_images(count=2)
    model = build_tiny_clip(seed=3)
    with torch.no_grad(), vtprune.make("tome", keep=6)(model):
        expected = model.encode_image(images)
    model.visual.transformer.batch_first = False
    for block in model.visual.transformer.resblocks:
        block.attn.batch_first = False
    with torch.no_grad(), vtprune.make("tome", keep=6)(model):
        torch.testing.assert_close(model.encode_image(images), expected, atol=1e-5, rtol=0)


def test_merged_tokens_come_out_in_tome_order_with_output_tokens():
    model = build_tiny_clip(seed=2, output_tokens=True)
    images = clip_images(count=2)
    _, _, expected = hand_tome_tower(model.visual, images, [3, 3, 2])  # A's unmerged tokens, then B, at every step
    with torch.no_grad(), vtprune.make("tome", keep=8)(model) as trace:
        _, tokens = model.visual(images)
    assert tokens.shape == (2, 8, 32)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=0)
    first = trace.forwards[0].sites[0]
    assert len(first.merged) >= 1 and all(m["slot"] == m["sources"][0] for m in first.merged)


def test_the_model_is_restored_after_an_error():
    model, images = build_tiny_clip(seed=1), clip_images()
    hooks = hooks_of(model)
    with torch.no_grad():
        dense = model.encode_image(images)
    with pytest.raises(vtprune.VTPruneError, match="reach no fewer than"):
        with torch.no_grad(), vtprune.make("tome", keep=1)(model):
            model.encode_image(images)
    assert hooks_of(model) == hooks
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), dense, atol=0, rtol=0)


# ------------------------------------------------------------------------- LLaVA: merged before the projector
def hand_merged_embeddings(model, batch, keep):
    """The dense input embeddings with each image's kept slots holding the projected mean of their ToMe group (keys
    and features of the feature layer, computed here from the tower), and per sample and image the kept ordinals."""
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(batch["pixel_values"], output_hidden_states=True)
        layer = 1  # vision_feature_layer=-2 of the 3-layer tower
        block = tower.encoder.layers[layer]
        hidden = block.layer_norm1(out.hidden_states[layer])
        keys = block.self_attn.k_proj(hidden).view(*hidden.shape[:2], 2, -1).mean(dim=2)  # [images, 17, d]
        features = out.hidden_states[layer + 1]  # [images, 17, D], [CLS] first
        embeds = image_embeddings(model, batch)
        visual, image = [], 0
        for b in range(batch["input_ids"].shape[0]):
            positions = (batch["input_ids"][b] == IMAGE_TOKEN).nonzero().squeeze(1)
            per_image = []
            for first in range(0, positions.numel(), PATCHES):
                groups = tower_output_groups(keys[image], PATCHES - keep, class_token=True)
                slots = []
                for members in groups:  # encoder tokens; patch p is token p + 1
                    slot = first + int(members[0]) - 1
                    embeds[b, positions[slot]] = model.model.multi_modal_projector(features[image, members].mean(0))
                    slots.append(slot)
                per_image.append(sorted(slots))
                image += 1
            visual.append(per_image)
    return embeds, visual


@pytest.mark.parametrize("keep", [8, 5])
def test_language_model_receives_the_hand_merged_tokens(tiny_llava, batch, keep):
    embeds, visual = hand_merged_embeddings(tiny_llava, batch, keep)
    seen, trace = capture_llm_input(tiny_llava, batch, vtprune.make("tome", keep=keep))
    assert trace.visual_tokens() == [(PATCHES, keep), (2 * PATCHES, 2 * keep)]
    for b, expected in enumerate(compacted_sequences(batch, embeds, visual)):
        torch.testing.assert_close(seen["embeds"][b, seen["mask"][b].bool()], expected, atol=1e-5, rtol=0)
    tokens, logits = generate_compacted(tiny_llava, batch, visual, steps=4, embeds=embeds)
    new, got, _ = generate_with(tiny_llava, batch, vtprune.make("tome", keep=keep), steps=4)
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=0)  # batch 2, left padding, every decoding step
    assert torch.equal(new, tokens)


def test_keep_all_on_llava_is_dense(tiny_llava, batch):
    trace = dense_equals_keep_all(tiny_llava, batch, vtprune.make("tome", keep=1.0))
    assert all(not site.merged for site in trace.forwards[0].sites)


def test_keep_below_half_takes_several_steps_on_llava(tiny_llava, batch):
    with torch.no_grad(), vtprune.make("tome", keep=3)(tiny_llava) as trace:
        tiny_llava(**batch)
    site = trace.forwards[0].sites[0]
    assert site.visual_after == 3
    assert sorted(s for m in site.merged for s in m["sources"]) == sorted(set(range(16)) - set(site.kept.tolist())
                                                                          | {m["slot"] for m in site.merged})


def test_llava_refusals_leave_the_model_untouched(tiny_llava, batch):
    hooks = hooks_of(tiny_llava)
    with pytest.raises(vtprune.UnsupportedSignalError, match="site 'encoder'.*llava"):
        vtprune.make("tome", keep=4, blocks=(0,))(tiny_llava)
    with pytest.raises(vtprune.VTPruneError, match="more than the 16 visual tokens"):
        with torch.no_grad(), vtprune.make("tome", keep=17)(tiny_llava):
            tiny_llava(**batch)
    assert hooks_of(tiny_llava) == hooks


def test_sizes_are_refused_outside_the_encoder(tiny_llava, batch):
    from dataclasses import dataclass
    from typing import ClassVar

    from vtprune.core import KeepPlan, Method

    @dataclass
    class Sized(Method):
        name: ClassVar[str] = "test-sized"
        keep: int = 1

        def plan(self, ctx):
            keep = [torch.arange(ctx.layout.num_visual(b)) for b in range(ctx.layout.batch_size)]
            return KeepPlan(keep=keep, sizes=[torch.ones(k.numel()) for k in keep])

    with pytest.raises(vtprune.VTPruneError, match="proportional attention.*only the vision-encoder site"):
        with torch.no_grad(), Sized()(tiny_llava):
            tiny_llava(**batch)


def test_cls_in_the_llava_layout_stays_unmerged():
    """vision_feature_select_strategy="full": [CLS] is a visual token of the layout, kept outside the budget."""
    from tests.helpers import BOS

    model = build_tiny_llava(seed=0)
    model.config.vision_feature_select_strategy = "full"
    ids = torch.tensor([[BOS, 5] + [IMAGE_TOKEN] * (1 + PATCHES) + [7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": clip_images(count=1)}
    with torch.no_grad():
        dense = model(**batch).logits
        with vtprune.make("tome", keep=1.0)(model):
            torch.testing.assert_close(model(**batch).logits, dense, atol=0, rtol=0)
        with vtprune.make("tome", keep=PATCHES // 2)(model) as trace:
            model(**batch)
    # half the patches: every A token (odd patch, even encoder token) merges into a B token (even patch)
    assert trace.summary()[0]["kept_indices"] == [0] + [1 + p for p in range(0, PATCHES, 2)]
