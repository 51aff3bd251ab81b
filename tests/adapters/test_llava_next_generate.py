"""Every generate() mode on the LLaVA-NeXT family (NeXT, OneVision, NeXT-Video) inside a session: at keep=1.0 the
outputs equal dense (sequences exactly, scores and logits to 1e-5), batch of 2 with left padding; at a real budget,
beam search equals transformers' own beam search on the hand-compacted sequence."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.helpers_video import (
    IMAGE,
    VIDEO,
    build_tiny_llava_next,
    build_tiny_next_video,
    build_tiny_onevision,
    media_batch,
)

CASES = {  # model -> (builder, images per sample (height, width), frames of the videos per sample)
    "next": (build_tiny_llava_next, [[(32, 48)], [(60, 40), (64, 64)]], None),
    "onevision": (build_tiny_onevision, [[(40, 70)], []], [[], [2]]),
    "next_video": (build_tiny_next_video, [[(32, 48)], []], [[2], [2]]),
}
KEEP_ALL = {
    "random": dict(keep=1.0),
    "fastv": dict(keep=1.0, layer=1),
    "vtc-cls": dict(keep=1.0, start_layer=0),
    "gui-kv": dict(keep=1.0),
    "zipvl": dict(keep=1.0),
    "vflowopt": dict(keep=1.0),
    "visionzip": dict(keep=1.0),
}
NEEDS_CLS = {"vtc-cls", "visionzip"}  # OneVision's SigLIP tower has no [CLS]
MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=0),
    "beam": dict(do_sample=False, num_beams=2),
    "beam-sample": dict(do_sample=True, num_beams=2, top_k=0),
    "return-2": dict(do_sample=True, num_return_sequences=2, top_k=0),
    # without a cache every step re-runs the whole prompt with its pixels: a generated placeholder id would be one
    # image token too many for the model itself, so those ids are suppressed (dense and pruned alike)
    "no-cache": dict(do_sample=False, use_cache=False, suppress_tokens=[IMAGE, VIDEO]),
}


@pytest.fixture(scope="module")
def models():
    return {name: (build(), build_batch) for name, (build, *build_batch) in CASES.items()}


def run(model, batch, mode, **options):
    torch.manual_seed(0)
    out = model.generate(
        **batch, max_new_tokens=3, return_dict_in_generate=True, output_scores=True, output_logits=True, **MODES[mode],
        **options,
    )
    return out.sequences, torch.stack(out.scores, 1), torch.stack(out.logits, 1)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_every_mode_at_keep_all_equals_dense(models, kind, mode):
    model, (images, videos) = models[kind]
    batch = media_batch(model, images, videos)
    has_cls = vtprune.core.adapter_for(model)(model).info.vision_has_cls
    with torch.no_grad():
        sequences, scores, logits = run(model, batch, mode)
        checked = []
        for name, options in sorted(KEEP_ALL.items()):
            if name in NEEDS_CLS and not has_cls:
                continue
            with vtprune.make(name, **options)(model) as trace:
                got_sequences, got_scores, got_logits = run(model, batch, mode)
            assert torch.equal(got_sequences, sequences), name
            torch.testing.assert_close(got_scores, scores, atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=0, msg=name)
            assert trace.forwards and all(before == after for before, after in trace.visual_tokens()), name
            checked.append(name)
    assert len(checked) >= 5


def packed_embeddings(model, batch):
    """[B, L, D]: the language model's input as the model builds it (placeholders replaced by packed features)."""
    inner = model.model
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    features = inner.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).pooler_output
    return embeds.masked_scatter((batch["input_ids"] == IMAGE)[..., None], torch.cat(list(features)))


def test_beam_search_at_a_real_budget_equals_the_hand_compacted_reference(models):
    """vtc-cls keeps 3 patches per image on NeXT (base and tiles share it): beam search inside the session equals
    transformers' beam search on the language model fed the kept tokens by hand (left-padded, renumbered)."""
    model, (images, _) = models["next"]
    batch = media_batch(model, images)
    steps, beams = 4, 2
    with torch.no_grad():
        with vtprune.make("vtc-cls", keep=3, start_layer=0)(model) as trace:
            pruned = model.generate(**batch, max_new_tokens=steps, do_sample=False, num_beams=beams)[:, -steps:]
        rows = [row for row in trace.summary() if row["forward"] == 0]
        assert len(rows) == 2 * beams  # generate() repeated every sample for its beams
        kept = [row["kept_indices"] for row in rows]
        assert kept[0] == kept[1] and kept[2] == kept[3] and kept[0] != kept[2]
        embeds = packed_embeddings(model, batch)
        sequences = []
        for b in range(2):
            image_positions = (batch["input_ids"][b] == IMAGE).nonzero().squeeze(1)
            keep = batch["attention_mask"][b].bool().clone()
            keep[image_positions] = False
            keep[image_positions[torch.tensor(kept[beams * b])]] = True
            assert int((batch["input_ids"][b][keep] == IMAGE).sum()) < image_positions.numel()
            sequences.append(embeds[b, keep])
        length = max(s.shape[0] for s in sequences)
        x = torch.zeros(2, length, embeds.shape[-1])
        mask = torch.zeros(2, length, dtype=torch.long)
        for b, s in enumerate(sequences):
            x[b, length - s.shape[0] :], mask[b, length - s.shape[0] :] = s, 1
        reference = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=steps, num_beams=beams)
    assert torch.equal(pruned, reference[:, -steps:])


def sample_alone(batch, images, videos, b):
    """Sample b of a media_batch as a batch of its own (its images and videos, its padding removed)."""
    real = batch["attention_mask"][b].bool()
    out = {"input_ids": batch["input_ids"][b : b + 1, real], "attention_mask": batch["attention_mask"][b : b + 1, real]}
    first = sum(len(s) for s in images[:b])
    if images[b]:
        out["pixel_values"] = batch["pixel_values"][first : first + len(images[b])]
        out["image_sizes"] = batch["image_sizes"][first : first + len(images[b])]
        if "batch_num_images" in batch:
            out["batch_num_images"] = batch["batch_num_images"][b : b + 1]
    if videos and videos[b]:
        first = sum(len(s) for s in videos[:b])
        out["pixel_values_videos"] = batch["pixel_values_videos"][first : first + len(videos[b])]
    return out


@pytest.mark.parametrize("kind", sorted(CASES))
def test_vflowopt_batched_generate_equals_each_sample_alone(models, kind):
    """A real budget (stage V with recycling, both LLM stages), greedy and beam search: the left-padded batch of 2
    decodes what each sample decodes alone."""
    model, (images, videos) = models[kind]
    batch = media_batch(model, images, videos)
    method = vtprune.make("vflowopt", vit_keep=0.5, llm_keep1=0.8, llm_keep2=0.5, cell=2.0, threshold=1.0)
    for mode in ("greedy", "beam"):
        with torch.no_grad(), method(model) as trace:
            together = run(model, batch, mode)[0][:, -3:]
            alone = [run(model, sample_alone(batch, images, videos, b), mode)[0][:, -3:] for b in range(2)]
        assert torch.equal(together, torch.cat(alone)), mode
        assert all(after < before for before, after in trace.visual_tokens(0)), mode


@pytest.mark.parametrize("kind", sorted(CASES))
def test_static_cache_keep_all_equals_dense_and_a_budget_equals_the_dynamic_cache(models, kind):
    """generate(cache_implementation="static"), greedy and beam search: keep=1.0 equals the dense model's static-cache
    generate; a real budget (before the LLM, inside it, on the cache) equals the same method with the DynamicCache;
    the llm_attention site (zipvl) is refused in one line."""
    model, (images, videos) = models[kind]
    batch = media_batch(model, images, videos)
    has_cls = vtprune.core.adapter_for(model)(model).info.vision_has_cls
    static = dict(cache_implementation="static")
    budgets = [("random", dict(keep=3)), ("fastv", dict(keep=3, layer=1)), ("gui-kv", dict(keep=0.5))]
    with torch.no_grad():
        for mode in ("greedy", "beam"):
            dense = run(model, batch, mode, **static)
            for name, options in sorted(KEEP_ALL.items()):
                if name in NEEDS_CLS and not has_cls:
                    continue
                if name == "zipvl":
                    with pytest.raises(vtprune.VTPruneError, match="StaticCache") as refusal:
                        with vtprune.make(name, **options)(model):
                            run(model, batch, mode, **static)
                    assert "\n" not in str(refusal.value)
                    continue
                with vtprune.make(name, **options)(model):
                    got = run(model, batch, mode, **static)
                assert torch.equal(got[0], dense[0]), (name, mode)
                for got_part, dense_part in zip(got[1:], dense[1:]):
                    torch.testing.assert_close(got_part, dense_part, atol=1e-5, rtol=0, msg=f"{name} {mode}")
            for name, options in budgets:
                with vtprune.make(name, **options)(model):
                    dynamic = run(model, batch, mode)
                with vtprune.make(name, **options)(model):
                    pruned = run(model, batch, mode, **static)
                assert torch.equal(pruned[0], dynamic[0]), (name, mode)
                torch.testing.assert_close(pruned[2], dynamic[2], atol=1e-5, rtol=0, msg=f"{name} {mode}")
                assert not torch.allclose(pruned[2], dense[2], atol=1e-3), (name, mode)  # the budget bites
