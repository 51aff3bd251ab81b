"""open_clip adapter: [CLS] rows equal MHA weights, keep-all exactness, 1 + K tokens after the cut, errors restore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import vtprune
from tests.helpers import GRID, build_tiny_clip, clip_images, hooks_of
from vtprune.adapters.open_clip import cls_rows
from vtprune.core import ClsAttention, KeepPlan, Method, ModelInfo, keep_all
from vtprune.methods.vtc_cls import vtc_cls_scores

PATCHES = GRID * GRID  # the tiny tower: 4x4 patches + [CLS], 4 blocks

# Options that keep every patch, per method that runs inside an open_clip encoder; every method must be listed here or
# in NOT_ON_OPEN_CLIP.
KEEP_ALL = {
    "vtc-cls": dict(keep=1.0, start_layer=0),
    "random": dict(keep=1.0),
    "pool": dict(keep=PATCHES),
}
KEEP_FOUR = {
    "vtc-cls": dict(keep=4, start_layer=0),
    "random": dict(keep=4, seed=3),
    "pool": dict(keep=4),
}
NOT_ON_OPEN_CLIP = {
    "dart": "cuts between decoder layers; an open_clip tower has no language model",
    "divprune": "selects on the language model's input embeddings (projector outputs); no encoder-site variant",
    "fastv": "cuts between decoder layers; an open_clip tower has no language model",
    "gui-kv": "compresses a language model's KV cache",
    "transprune": "cuts between decoder layers; an open_clip tower has no language model",
    "vflowopt": "prunes at the language model's input and between its decoder layers",
    "visionzip": "merges before the projector into a language model's input (no encoder-site variant)",
    "vispruner": "selects for a language model's input from the projector's input features (no encoder-site variant)",
    "zipvl": "sparsifies a language model's attention and KV cache",
    "scope": "prunes at a language model's input (no encoder-site variant)",
    "holov": "prunes at a language model's input (no encoder-site variant)",
    "hiprune": "prunes at a language model's input (no encoder-site variant)",
    "cdpruner": "needs the language model's input embeddings and the instruction",
    "pyramiddrop": "cuts between decoder layers; an open_clip tower has no language model",
    "spatten": "cuts between decoder layers; an open_clip tower has no language model",
    "streamingllm": "keeps a language model's KV cache within a budget while decoding",
    "scissorhands": "keeps a language model's KV cache within a budget while decoding",
    "a2sf": "keeps a language model's KV cache within a budget while decoding",
    "ems": "keeps a language model's KV cache within a budget while decoding",
}


@pytest.fixture(scope="module")
def tiny_clip():
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def images():
    return clip_images()


@dataclass
class _Probe(Method):
    """Cuts after `blocks`, keeping `kept[stage]` (None: all), and remembers every context it saw."""

    name: ClassVar[str] = "test-probe"
    sites: ClassVar[tuple[str, ...]] = ("encoder",)
    blocks: tuple[int, ...] = (2,)
    layers: tuple[tuple[int, ...], ...] = ((0, 1, 2),)
    kept: tuple = (None,)
    seen: list = field(default_factory=list)

    def encoder_blocks(self, info):
        return list(self.blocks)

    def requests(self, info):
        return [ClsAttention(layers=layers) for layers in self.layers]

    def plan(self, ctx):
        self.seen.append(ctx)
        kept = self.kept[ctx.stage]
        return keep_all(ctx.layout) if kept is None else KeepPlan(keep=[torch.tensor(k) for k in kept])


def block_inputs(tower, run):
    """Run `run()` and return the input [N, T, D] (batch first) of every block of the tower."""
    seen = {}

    def capture(index):
        def hook(module, args):
            x = args[0]
            seen[index] = (x if tower.transformer.batch_first else x.transpose(0, 1)).detach().clone()

        return hook

    handles = [b.register_forward_pre_hook(capture(i)) for i, b in enumerate(tower.transformer.resblocks)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def mha_cls_rows(block, x):
    """[N, H, T-1] the [CLS] row from nn.MultiheadAttention itself, need_weights=True, per head. x: [N, T, D]."""
    with torch.no_grad():
        h = block.ln_1(x)
        if not block.attn.batch_first:
            h = h.transpose(0, 1)
        _, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
    return weights[:, :, 0, 1:]


def check_rows_for_every_block(model, pixels):
    tower = model.visual
    blocks = tower.transformer.resblocks
    inputs = block_inputs(tower, lambda: model.encode_image(pixels))
    for index, block in enumerate(blocks):  # the pure function, on every block (the last one included)
        expected = mha_cls_rows(block, inputs[index])
        torch.testing.assert_close(cls_rows(block.attn, block.ln_1(inputs[index])), expected, atol=1e-6, rtol=0)
    last_cut = len(blocks) - 2  # through the adapter: every block up to the last possible cut
    probe = _Probe(blocks=(last_cut,), layers=tuple((i,) for i in range(last_cut + 1)))
    with torch.no_grad(), probe(model):
        model.encode_image(pixels)
    (ctx,) = probe.seen
    for index in range(last_cut + 1):
        expected = mha_cls_rows(blocks[index], inputs[index])
        torch.testing.assert_close(ctx.signals[ClsAttention(layers=(index,))][:, 0], expected, atol=1e-6, rtol=0)


def to_sequence_first(model):
    """Older open_clip layout: the transformer runs [T, N, D] and nn.MultiheadAttention is not batch first."""
    model.visual.transformer.batch_first = False
    for block in model.visual.transformer.resblocks:
        block.attn.batch_first = False
    return model


def test_cls_rows_equal_need_weights_attention_for_every_block(tiny_clip, images):
    check_rows_for_every_block(tiny_clip, images)


def test_cls_rows_in_the_sequence_first_layout(images):
    check_rows_for_every_block(to_sequence_first(build_tiny_clip(seed=4)), images)


def test_vit_b_32_rows_keep_all_and_token_counts():
    """The real ViT-B/32 architecture, random weights (pretrained=None): 7x7 patches, 12 blocks of 12 heads."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    pixels = torch.randn(2, 3, 224, 224)
    check_rows_for_every_block(model, pixels)
    with torch.no_grad():
        dense = model.encode_image(pixels)
        with vtprune.make("vtc-cls", keep=1.0)(model):
            torch.testing.assert_close(model.encode_image(pixels), dense, atol=0, rtol=0)
        lengths = block_lengths(model, lambda: model.encode_image(pixels), vtprune.make("vtc-cls", keep=10))
    assert lengths == [50] * 6 + [11] * 6  # default cut: after block 12 // 2 - 1 = 5


# ------------------------------------------------------------------------------------------------- exactness
MULTI_CUT = {"tome": "merges after several blocks; tests/methods/test_tome.py checks it inside open_clip"}


def test_every_method_runs_inside_open_clip_or_says_why_not():
    assert set(vtprune.available()) - set(NOT_ON_OPEN_CLIP) - set(MULTI_CUT) == set(KEEP_ALL) == set(KEEP_FOUR)


@pytest.mark.parametrize("layout", ["batch_first", "sequence_first"])
@pytest.mark.parametrize("block", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keep_all_reproduces_the_dense_embedding(images, name, block, layout):
    model = build_tiny_clip(seed=1)
    if layout == "sequence_first":
        model = to_sequence_first(model)
    with torch.no_grad():
        dense = model.encode_image(images)
        dense_tower = model.visual(images)
        with vtprune.make(name, encoder_block=block, **KEEP_ALL[name])(model) as trace:
            pruned = model.encode_image(images)
        with vtprune.make(name, encoder_block=block, **KEEP_ALL[name])(model.visual):  # the bare tower
            pruned_tower = model.visual(images)
    torch.testing.assert_close(pruned, dense, atol=0, rtol=0)
    torch.testing.assert_close(pruned_tower, dense_tower, atol=0, rtol=0)
    assert trace.visual_tokens() == [(PATCHES, PATCHES)] * 3
    assert {row["layer"] for row in trace.summary()} == {block}


def test_other_open_clip_outputs_follow_the_kept_tokens(images):
    """avg pooling averages the kept tokens; output_tokens returns them."""
    model = build_tiny_clip(seed=2, pool_type="avg", output_tokens=True)
    with torch.no_grad():
        dense_pooled, dense_tokens = model.visual(images)
        with vtprune.make("random", keep=1.0)(model):
            pooled, tokens = model.visual(images)
        torch.testing.assert_close(pooled, dense_pooled, atol=0, rtol=0)
        torch.testing.assert_close(tokens, dense_tokens, atol=0, rtol=0)
        with vtprune.make("random", keep=5)(model):
            pooled, tokens = model.visual(images)
    assert tokens.shape == (3, 5, 32)  # [CLS] is not among the tokens
    torch.testing.assert_close(pooled, tokens.mean(1) @ model.visual.proj, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- 1 + K tokens
def block_lengths(model, run, method):
    """Tokens per image entering each block of the tower while `run()` runs with `method` attached."""
    tower = model.visual if hasattr(model, "visual") else model
    lengths = {}

    def capture(index):
        def hook(module, args):
            lengths[index] = args[0].shape[1 if tower.transformer.batch_first else 0]

        return hook

    blocks = tower.transformer.resblocks
    with method(model):
        handles = [b.register_forward_pre_hook(capture(i)) for i, b in enumerate(blocks)]
        try:
            run()
        finally:
            for h in handles:
                h.remove()
    return [lengths[i] for i in range(len(blocks))]


@pytest.mark.parametrize("block", [0, 2])
@pytest.mark.parametrize("name", sorted(KEEP_FOUR))
def test_keep_k_runs_the_later_blocks_on_one_plus_k_tokens(tiny_clip, images, name, block):
    method = vtprune.make(name, encoder_block=block, **KEEP_FOUR[name])
    with torch.no_grad():
        lengths = block_lengths(tiny_clip, lambda: tiny_clip.encode_image(images), method)
        with method(tiny_clip) as trace:
            embedding = tiny_clip.encode_image(images)
    assert lengths == [1 + PATCHES] * (block + 1) + [1 + 4] * (3 - block)
    assert embedding.shape == (3, 16)
    assert trace.visual_tokens() == [(PATCHES, 4)] * 3
    scores, kept = trace.image_map(2)
    assert kept.shape == (GRID, GRID) and int(kept.sum()) == 4


def test_default_cut_sits_after_the_middle_block(tiny_clip, images):
    with torch.no_grad():
        lengths = block_lengths(tiny_clip, lambda: tiny_clip.encode_image(images), vtprune.make("random", keep=3))
    assert lengths == [17, 17, 4, 4]


def test_sequence_first_layout_cuts_too(images):
    model = to_sequence_first(build_tiny_clip(seed=4))
    with torch.no_grad():
        lengths = block_lengths(model, lambda: model.encode_image(images), vtprune.make("pool", keep=4, encoder_block=0))
    assert lengths == [17, 5, 5, 5]


# ------------------------------------------------------------------------------------------- what is kept
def test_vtc_cls_keeps_the_top_k_of_the_ensemble_ending_at_the_cut(tiny_clip, images):
    blocks = tiny_clip.visual.transformer.resblocks
    inputs = block_inputs(tiny_clip.visual, lambda: tiny_clip.encode_image(images))
    rows = torch.stack([mha_cls_rows(blocks[i], inputs[i]) for i in (1, 2)], dim=1)  # blocks start_layer=1 .. cut=2
    expected = vtc_cls_scores(rows)  # [images, patches]
    with torch.no_grad(), vtprune.make("vtc-cls", keep=5, start_layer=1, encoder_block=2)(tiny_clip) as trace:
        tiny_clip.encode_image(images)
    for image, row in enumerate(trace.summary()):
        assert row["kept_indices"] == vtprune.core.top_k(expected[image], 5).tolist()
        scores, kept = trace.image_map(image)
        torch.testing.assert_close(scores.flatten(), expected[image], atol=1e-5, rtol=0)
        assert kept.flatten().nonzero().squeeze(1).tolist() == row["kept_indices"]


def test_vtc_cls_ensemble_at_the_encoder_site():
    clip_b = ModelInfo(family="open_clip", llm_layers=0, vision_layers=12, vision_feature_layer=11, vision_has_cls=True)
    assert vtprune.make("vtc-cls").layers(clip_b) == [5]  # default: cut after block 5, start min(8, 5)
    assert vtprune.make("vtc-cls", encoder_block=9).layers(clip_b) == [8, 9]
    assert vtprune.make("vtc-cls", start_layer=2, encoder_block=-4).layers(clip_b) == list(range(2, 9))
    with pytest.raises(vtprune.VTPruneError, match="selects no encoder layer.*0..5"):
        vtprune.make("vtc-cls", start_layer=7).layers(clip_b)


def test_pool_inside_the_encoder_averages_hidden_states(tiny_clip, images):
    inputs = block_inputs(tiny_clip.visual, lambda: tiny_clip.encode_image(images))
    with torch.no_grad():
        after_block_1 = tiny_clip.visual.transformer.resblocks[1](inputs[1])
    grid = after_block_1[:, 1:].transpose(1, 2).reshape(3, -1, GRID, GRID)
    pooled = F.adaptive_avg_pool2d(grid, (2, 2)).flatten(2).transpose(1, 2)  # [images, 4, D]
    seen = block_inputs(tiny_clip.visual, lambda: _run_with(tiny_clip, images, vtprune.make("pool", keep=4, encoder_block=1)))
    torch.testing.assert_close(seen[2][:, 1:], pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen[2][:, 0], after_block_1[:, 0], atol=0, rtol=0)  # [CLS] untouched


def _run_with(model, images, method):
    with method(model):
        return model.encode_image(images)


def test_cls_attention_after_a_cut_covers_the_kept_patches(tiny_clip, images):
    """Two cuts: the second sees block 2's [CLS] row over the tokens kept at the first, 0 at dropped patches."""
    kept = [0, 3, 5, 6, 10, 15]
    probe = _Probe(blocks=(0, 2), layers=((0,), (2,)), kept=([kept] * 3, None))
    inputs = block_inputs(tiny_clip.visual, lambda: _run_with(tiny_clip, images, probe))
    first, second = probe.seen
    assert ClsAttention(layers=(2,)) not in first.signals and ClsAttention(layers=(0,)) in first.signals
    rows = second.signals[ClsAttention(layers=(2,))][:, 0]  # [images, heads, patches]
    expected = torch.zeros_like(rows)
    expected[:, :, kept] = mha_cls_rows(tiny_clip.visual.transformer.resblocks[2], inputs[2])
    torch.testing.assert_close(rows, expected, atol=1e-6, rtol=0)
    assert [s.patch_index.tolist() for s in (spans[0] for spans in second.layout.spans)] == [kept] * 3


# ------------------------------------------------------------------------------------------ errors, restore
def test_error_inside_with_restores_the_model(tiny_clip, images):
    hooks_before = hooks_of(tiny_clip)
    with torch.no_grad():
        expected = tiny_clip.encode_image(images)
    with pytest.raises(vtprune.VTPruneError, match="more than the 16 visual tokens"):
        with vtprune.make("vtc-cls", keep=17)(tiny_clip):
            tiny_clip.encode_image(images)
    assert hooks_of(tiny_clip) == hooks_before
    with torch.no_grad():
        torch.testing.assert_close(tiny_clip.encode_image(images), expected, atol=0, rtol=0)
        torch.testing.assert_close(build_tiny_clip(seed=0).encode_image(images), expected, atol=0, rtol=0)


def test_ragged_keep_counts_are_refused_and_the_model_restored(tiny_clip, images):
    hooks_before = hooks_of(tiny_clip)
    probe = _Probe(blocks=(1,), layers=(), kept=([[0, 1], [2], [3, 4]],))
    with pytest.raises(vtprune.VTPruneError, match="same count for every image"):
        with probe(tiny_clip):
            tiny_clip.encode_image(images)
    assert hooks_of(tiny_clip) == hooks_before


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("vtc-cls", dict(encoder_block=3), "between two of the vision encoder's 4 blocks"),
        ("random", dict(encoder_block=3), "between two of the vision encoder's 4 blocks"),
        ("pool", dict(encoder_block=-1), "between two"),
        ("random", dict(encoder_block=-5), "between two"),
        ("vtc-cls", dict(start_layer=3, encoder_block=1), "selects no encoder layer"),
    ],
)
def test_bad_encoder_options_are_refused_before_running(tiny_clip, name, options, message):
    hooks_before = hooks_of(tiny_clip)
    with pytest.raises(vtprune.VTPruneError, match=message):
        with vtprune.make(name, keep=4, **options)(tiny_clip):
            pass
    assert hooks_of(tiny_clip) == hooks_before


def test_methods_that_cannot_cut_there_are_refused(tiny_clip, tiny_llava):
    with pytest.raises(vtprune.UnsupportedSignalError, match="site 'llm_layer'.*open_clip.*encoder"):
        vtprune.make("fastv", keep=4)(tiny_clip)
    with pytest.raises(vtprune.UnsupportedSignalError, match="site 'encoder'.*llava"):
        vtprune.make("vtc-cls", keep=4, encoder_block=1)(tiny_llava)


@pytest.mark.parametrize(
    "vision, message",
    [
        (dict(layers=(1, 1, 1, 1), width=16, head_width=16), "ModifiedResNet.*VisionTransformer"),
        (dict(qk_norm=True), "CustomResidualAttentionBlock"),
    ],
)
def test_unsupported_towers_are_refused(vision, message):
    with pytest.raises(vtprune.UnsupportedModelError, match=message):
        vtprune.make("random", keep=4)(build_tiny_clip(**vision))


def test_patch_dropout_in_training_mode_is_refused(images):
    model = build_tiny_clip(patch_dropout=0.5).train()
    with pytest.raises(vtprune.VTPruneError, match="patch dropout"):
        with vtprune.make("random", keep=4)(model):
            model.encode_image(images)
    with torch.no_grad(), vtprune.make("random", keep=4)(model.eval()) as trace:  # eval mode: no dropout
        model.encode_image(images)
    assert trace.visual_tokens() == [(PATCHES, 4)] * 3


def test_blocks_run_without_the_tower_are_refused(tiny_clip, images):
    x = torch.randn(3, 1 + PATCHES, 32)
    with pytest.raises(vtprune.VTPruneError, match="run the whole tower"):
        with vtprune.make("vtc-cls", keep=4)(tiny_clip):
            tiny_clip.visual.transformer(x)


@pytest.mark.parametrize("name", sorted(NOT_ON_OPEN_CLIP))
def test_language_model_methods_are_refused_with_the_reason(name):
    with pytest.raises(vtprune.UnsupportedSignalError, match="open_clip"):
        vtprune.make(name)(build_tiny_clip(seed=1))
