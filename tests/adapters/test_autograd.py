"""Gradients through a pruned forward (training, fine-tuning): `loss.backward()` inside a session gives the gradients
of the hand-compacted model (w.r.t. the pixels, the projector, vision and language-model weights), for a cut before
the LLM, a cut inside it and merges (merged tokens pass their gradient to every source with its weight); and a
forward with `labels=` computes the loss over the kept sequence with the labels compacted the same way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtprune
from tests.adapters.hand_reference import (
    dense_positions,
    input_embeddings,
    is_qwen,
    qwen_renumbered,
    run,
    sample,
    site_of,
    write_merges,
)
from tests.adapters.qwen_builders import (
    build_qwen_processor,
    build_tiny_qwen,
    two_screenshot_batch,
)
from tests.helpers import build_tiny_llava, padded_batch

CASES = {  # method -> (options, cut layer)
    "random": (dict(keep=3, seed=1), 0),
    "vtc-cls": (dict(keep=3, start_layer=0), 0),
    "fastv": (dict(keep=3, layer=1), 1),
    "pool": (dict(keep=4), 0),  # 2x2 cells: sequence-space merges of 4 tokens each
    "visionzip": (dict(keep=5, contextual=2), 0),  # encoder-space merges: [CLS] and contextual tokens
}
LLAVA_PARAMETERS = (
    "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
    "model.multi_modal_projector.linear_1.weight",
    "model.language_model.layers.0.self_attn.k_proj.weight",  # before FastV's cut
    "model.language_model.layers.2.mlp.down_proj.weight",
    "lm_head.weight",
)
QWEN_PARAMETERS = (
    "model.visual.blocks.0.attn.qkv.weight",
    "model.visual.merger.mlp.0.weight",
    "model.language_model.layers.0.self_attn.k_proj.weight",
    "model.language_model.layers.2.mlp.down_proj.weight",
    "lm_head.weight",
)


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava(seed=0), padded_batch()


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen("qwen2-vl"), two_screenshot_batch(build_qwen_processor("qwen2-vl"))


def with_pixels(batch):
    pixels = batch["pixel_values"].clone().requires_grad_()
    return {**batch, "pixel_values": pixels}, pixels


def references(model, batch, trace, cut):
    """Per sample the hand-made reference (differentiable w.r.t. batch's pixels and the parameters)."""
    embeds = input_embeddings(model, batch)
    positions = dense_positions(model, {k: v.detach() for k, v in batch.items()})
    renumbered = qwen_renumbered(batch, trace, 0, [0, 1]) if is_qwen(model) and cut == 0 else [None, None]
    features = None
    if any(m["space"] == "encoder" for b in range(2) for m in site_of(trace, 0, b).merged):
        tower = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
        features = tower.hidden_states[model.config.vision_feature_layer]  # the projector's input, [CLS] first
    out = []
    for b in range(2):
        site = site_of(trace, 0, b)
        if site.merged:
            embeds = write_merges(model, batch, b, embeds, site.merged, features)
        out.append(sample(model, batch, b, embeds, positions, site.kept, cut, renumbered[b]))
    return out


def gradients(model, names, *tensors):
    grads = [t.grad.clone() for t in tensors] + [dict(model.named_parameters())[n].grad.clone() for n in names]
    model.zero_grad(set_to_none=True)
    for t in tensors:
        t.grad = None
    return grads


def pruned_and_reference(model, batch, name, names):
    options, cut = CASES[name]
    model.zero_grad(set_to_none=True)
    inputs, pixels = with_pixels(batch)
    with vtprune.make(name, **options)(model) as trace:
        logits = model(**inputs).logits  # grad enabled, no torch.no_grad
    reference_inputs, reference_pixels = with_pixels(batch)
    samples = references(model, reference_inputs, trace, cut)
    reference_logits = [run(model, s, []) for s in samples]
    weights = [torch.randn(r.shape, generator=torch.Generator().manual_seed(b)) for b, r in enumerate(reference_logits)]
    pruned_rows = [logits[b, logits.shape[1] - r.shape[0] :] for b, r in enumerate(reference_logits)]  # left padding
    for got, want in zip(pruned_rows, reference_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    sum((w * r).sum() for w, r in zip(weights, pruned_rows)).backward()
    pruned = gradients(model, names, pixels)
    sum((w * r).sum() for w, r in zip(weights, reference_logits)).backward()
    return pruned, gradients(model, names, reference_pixels), trace


def assert_same_gradients(pruned, reference, names):
    for what, got, want in zip(("pixel_values", *names), pruned, reference, strict=True):
        assert bool(want.abs().sum() > 0), what
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=what)


@pytest.mark.parametrize("name", sorted(CASES))
def test_llava_gradients_equal_the_hand_compacted_model(llava, name):
    model, batch = llava
    pruned, reference, trace = pruned_and_reference(model, batch, name, LLAVA_PARAMETERS)
    assert_same_gradients(pruned, reference, LLAVA_PARAMETERS)
    assert all(after < before for before, after in trace.visual_tokens())  # a real budget
    if name in ("pool", "visionzip"):
        assert all(site.merged for site in trace.forwards[0].sites)
    if name == "pool":  # every pixel of every image reaches a kept (pooled) token: no pixel gradient is zero
        assert bool((pruned[0].abs().amax(dim=(1, 2, 3)) > 0).all())


@pytest.mark.parametrize("name", ["random", "fastv"])
def test_qwen2_vl_gradients_equal_the_hand_compacted_model(qwen, name):
    model, batch = qwen
    pruned, reference, trace = pruned_and_reference(model, batch, name, QWEN_PARAMETERS)
    assert_same_gradients(pruned, reference, QWEN_PARAMETERS)
    assert all(after < before for before, after in trace.visual_tokens())


def test_pruned_gradients_differ_from_dense(llava):
    """The comparison above can fail: dropping tokens changes the gradients."""
    model, batch = llava
    inputs, pixels = with_pixels(batch)
    model(**inputs).logits[:, -1].sum().backward()
    dense = pixels.grad.clone()
    model.zero_grad(set_to_none=True)
    inputs, pixels = with_pixels(batch)
    with vtprune.make("random", keep=3, seed=1)(model):
        model(**inputs).logits[:, -1].sum().backward()
    model.zero_grad(set_to_none=True)
    assert not torch.allclose(pixels.grad, dense, atol=1e-4)


# ------------------------------------------------------------------------------------------------------- labels
def training_labels(batch, image_token):
    """LLaVA practice: -100 at padding, the prompt's first token and every visual position; text tokens are targets."""
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == image_token)] = -100
    first = batch["attention_mask"].argmax(dim=1)
    labels[torch.arange(labels.shape[0]), first] = -100
    return labels


@pytest.mark.parametrize("family, name", [("llava", "random"), ("llava", "fastv"), ("llava", "pool"),
                                          ("qwen", "random"), ("qwen", "fastv")])
def test_labels_give_the_loss_over_the_kept_sequence(llava, qwen, family, name):
    model, batch = llava if family == "llava" else qwen
    image_token = model.config.image_token_id
    labels = training_labels(batch, image_token)
    options, cut = CASES[name]
    model.zero_grad(set_to_none=True)
    with vtprune.make(name, **options)(model) as trace:
        out = model(**batch, labels=labels)
    out.loss.backward()
    pruned_grad = gradients(model, ["lm_head.weight"])[0]
    samples = references(model, batch, trace, cut)
    logits, targets = [], []
    for b, s in enumerate(samples):  # the real tokens' labels, compacted by hand, shifted by one
        kept_labels = labels[b][batch["attention_mask"][b].bool()][s.rows]
        logits.append(run(model, s, [])[:-1])
        targets.append(kept_labels[1:])
    expected = F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    expected.backward()
    torch.testing.assert_close(pruned_grad, gradients(model, ["lm_head.weight"])[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the loss of the dense model differs: the comparison can fail
        assert not torch.allclose(model(**batch, labels=labels).loss, out.loss)
    assert out.logits.shape[1] < labels.shape[1]


def test_labels_with_keep_all_give_the_dense_loss(llava):
    model, batch = llava
    labels = training_labels(batch, model.config.image_token_id)
    with torch.no_grad():
        dense = model(**batch, labels=labels)
        for name, options in (("random", dict(keep=1.0)), ("fastv", dict(keep=1.0, layer=1))):
            with vtprune.make(name, **options)(model):
                out = model(**batch, labels=labels)
                as_tuple = model(**batch, labels=labels, return_dict=False)
            torch.testing.assert_close(out.loss, dense.loss, atol=1e-6, rtol=0)
            torch.testing.assert_close(as_tuple[0], dense.loss, atol=1e-6, rtol=0)  # the loss first, as transformers
            assert list(out.keys())[0] == "loss"


def test_shift_labels_are_honoured_and_follow_their_positions(llava):
    """Pre-shifted targets (`shift_labels`, sequence-parallel training) give the dense loss at keep-all, and at a real
    budget each kept position keeps its own target (gathered with the sequence, not re-shifted)."""
    model, batch = llava
    labels = training_labels(batch, model.config.image_token_id)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    other = shifted.roll(1, dims=1)  # different targets: the loss must change with them
    with torch.no_grad():
        dense = model(**batch, labels=labels, shift_labels=shifted).loss
        with vtprune.make("random", keep=1.0)(model):
            kept_all = model(**batch, labels=labels, shift_labels=shifted).loss
            assert not torch.allclose(model(**batch, labels=labels, shift_labels=other).loss, kept_all)
        torch.testing.assert_close(kept_all, dense, atol=1e-6, rtol=0)
        with vtprune.make("fastv", keep=4, layer=1)(model) as trace:
            out = model(**batch, labels=labels, shift_labels=shifted)
    samples = references(model, batch, trace, 1)
    logits, targets = [], []
    for b, s in enumerate(samples):
        logits.append(run(model, s, []))
        targets.append(shifted[b][batch["attention_mask"][b].bool()][s.rows])
    expected = F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
