"""VisionZip on the LLaVA-NeXT family: anyres images (every view on its own, the official LLaVA-NeXT order, no row
ends, no unpadding) and LLaVA-NeXT-Video frames (one view each, on the pooled grid), through the adapters, against a
hand-made reference built from an eager copy of the tower and the pure rules that tests/methods/test_visionzip.py
checks against the official code's outputs; a real budget in generate(); refusals."""

from __future__ import annotations

import sys

import pytest
import torch

import vtprune
from tests.helpers import capture_llm_input
from tests.helpers_video import IMAGE, VIDEO, build_tiny_llava_next, build_tiny_next_video, build_tiny_onevision, media_batch
from vtprune.adapters.vision import encoder_layers
from vtprune.methods.visionzip import anyres_sequence, select_view

LAYER = 1  # vision_feature_layer=-2 of the tiny 3-layer CLIP tower: the output of layer 1 feeds the projector
CASES = {  # name -> (builder, images per sample (height, width), frames of the videos per sample)
    "next": (build_tiny_llava_next, [[(32, 48)], [(60, 40), (64, 64)]], None),  # 32 x 48: unpadded columns
    "next_video": (build_tiny_next_video, [[(32, 48)], []], [[3], [3]]),
}


def eager_encoder(build, model, pixels):
    """Per encoder input: [CLS] attention to the patches summed over heads [N, H, P], head-mean keys [N, 1 + P, d]
    and the features feeding the projector [N, 1 + P, D] ([CLS] first), from an eager copy of the tower."""
    eager = build(attn="eager")
    eager.load_state_dict(model.state_dict())
    tower = eager.model.vision_tower
    with torch.no_grad():
        out = tower(pixels, output_attentions=True, output_hidden_states=True)
        attention = out.attentions[LAYER][:, :, 0, 1:]  # [N, H, P]
        block = encoder_layers(tower)[LAYER]
        keys = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[LAYER]))
        heads = block.self_attn.num_heads
        keys = keys.view(*keys.shape[:2], heads, -1).mean(dim=2)
    return attention, keys, out.hidden_states[LAYER + 1]


def official_images(build, model, batch, dominant, contextual):
    """Per image: its LLM tokens [K, D_llm] by the official LLaVA-NeXT rule (`anyres_sequence`), then projected."""
    modeling = sys.modules[type(model.model).__module__]
    config = model.config
    size = config.vision_config.image_size
    side = size // config.vision_config.patch_size
    views = [int(modeling.image_size_to_num_patches(s, config.image_grid_pinpoints, size)) for s in batch["image_sizes"]]
    pixels = torch.cat([pv[:n] for pv, n in zip(batch["pixel_values"], views)])
    attention, keys, features = eager_encoder(build, model, pixels)
    out, first = [], 0
    for image_size, n in zip(batch["image_sizes"].tolist(), views):
        tiles = tuple(modeling.get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, size))
        selections = [select_view(attention[v].sum(dim=0), keys[v], dominant, contextual) for v in range(first, first + n)]
        tokens = anyres_sequence(selections, tiles, side)
        rows = torch.stack([(w[:, None] * features[first + view, sources]).sum(dim=0) for view, sources, w in tokens])
        with torch.no_grad():
            out.append(model.model.multi_modal_projector(rows))
        first += n
    return out


def official_videos(build, model, batch, dominant, contextual):
    """Per video: its frames' LLM tokens, each frame one view on the pooled grid ([CLS] attention, keys and features
    pooled by the model's resampler, [CLS] unpooled in front), [CLS], dominant, contextual, projected."""
    videos, frames = batch["pixel_values_videos"].shape[:2]
    attention, keys, features = eager_encoder(build, model, batch["pixel_values_videos"].flatten(0, 1))
    pool = model.model.vision_resampler
    with torch.no_grad():
        dominance = pool(attention.transpose(1, 2)).sum(dim=-1)  # [F, P'] pooled like the features, heads summed
        keys = torch.cat([keys[:, :1], pool(keys[:, 1:])], dim=1)
        features = torch.cat([features[:, :1], pool(features[:, 1:])], dim=1)
        out = []
        for video in range(videos):
            parts = []
            for f in range(video * frames, (video + 1) * frames):
                top, targets, members = select_view(dominance[f], keys[f], dominant, contextual)
                merged = [features[f, t + 1] + features[f, m + 1].mean(dim=0) if m.numel() else features[f, t + 1]
                          for t, m in zip(targets, members)]  # target + mean(members)
                rows = torch.cat([features[f, :1], features[f, top + 1], torch.stack(merged)])  # [CLS], D, C
                parts.append(model.model.multi_modal_projector(rows))
            out.append(torch.cat(parts))
    return out


def official_inputs(build, model, batch, keep, contextual):
    """Per sample, the language model's input [L_b, D] (padding removed) with the official tokens in place."""
    dominant = keep - contextual - 1
    images = official_images(build, model, batch, dominant, contextual) if "pixel_values" in batch else []
    videos = official_videos(build, model, batch, dominant, contextual) if "pixel_values_videos" in batch else []
    embed = model.model.get_input_embeddings()
    out = []
    with torch.no_grad():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            ids = ids[mask.bool()]
            parts, i = [], 0
            while i < ids.numel():
                token = int(ids[i])
                j = i
                while j < ids.numel() and int(ids[j]) == token:
                    j += 1
                if token == IMAGE:
                    parts.append(images.pop(0))
                elif token == VIDEO:
                    parts.append(videos.pop(0))
                else:
                    parts.append(embed(ids[i:j]))
                i = j
            out.append(torch.cat(parts))
    assert not images and not videos
    return out


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, (build, _, _) in CASES.items()}


# views of 16 patches, pooled frames of 4 tokens; frames at (3, 2) have no dominant token (keys decide the groups),
# at (3, 1) one (the [CLS] attention decides)
BUDGETS = [("next", 6, 2), ("next", 9, 0), ("next_video", 3, 1), ("next_video", 3, 2)]


@pytest.mark.parametrize("name, keep, contextual", BUDGETS)
def test_language_model_receives_the_official_sequence(models, name, keep, contextual):
    build, images, videos = CASES[name]
    model = models[name]
    batch = media_batch(model, images, videos)
    seen, trace = capture_llm_input(model, batch, vtprune.make("visionzip", keep=keep, contextual=contextual))
    expected = official_inputs(build, model, batch, keep, contextual)
    for b, sequence in enumerate(expected):
        got = seen["embeds"][b, seen["mask"][b].bool()]
        assert got.shape == sequence.shape
        torch.testing.assert_close(got, sequence, atol=1e-5, rtol=0)
    site = trace.forwards[0].sites[0]
    assert all(m["space"] == "encoder" and "view" in m for m in site.merged)


def test_unpadded_dominant_patches_come_back_as_merges(models):
    """The 32 x 48 image's mosaic loses a column of patches on each side to unpadding: its dominant patches there
    have no slot, yet they reach the language model (official: no unpadding)."""
    model = models["next"]
    batch = media_batch(model, [[(32, 48)], [(32, 48)]], seed=3)
    _, trace = capture_llm_input(model, batch, vtprune.make("visionzip", keep=12, contextual=1))
    lone = [m for m in trace.forwards[0].sites[0].merged if len(m["encoder_tokens"]) == 1 and m["encoder_tokens"] != [0]]
    assert lone and all(m["sources"] == [-1] for m in lone)  # a patch the layout does not show


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_generate_at_a_real_budget_equals_the_hand_made_reference(models, name):
    """Batch of 2, left padding: generate() in the session decodes what the language model decodes from the
    official tokens fed by hand (positions renumbered, as LLaVA numbers the shorter sequence)."""
    build, images, videos = CASES[name]
    model = models[name]
    batch = media_batch(model, images, videos)
    keep, contextual = (6, 2) if name == "next" else (3, 1)
    steps = 4
    with torch.no_grad():
        with vtprune.make("visionzip", keep=keep, contextual=contextual)(model) as trace:
            pruned = model.generate(**batch, max_new_tokens=steps, do_sample=False)[:, -steps:]
        sequences = official_inputs(build, model, batch, keep, contextual)
        length = max(s.shape[0] for s in sequences)
        x = torch.zeros(2, length, sequences[0].shape[-1])
        mask = torch.zeros(2, length, dtype=torch.long)
        for b, s in enumerate(sequences):
            x[b, length - s.shape[0] :], mask[b, length - s.shape[0] :] = s, 1
        reference = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    assert torch.equal(pruned, reference[:, -steps:])
    assert all(after < before for before, after in trace.visual_tokens())


def test_keep_all_is_exact_on_next_video(models):
    """Every view keeps all its patches (keep=1.0): the image, with its row ends, and the frames stay as they are."""
    model = models["next_video"]
    batch = media_batch(model, [[(32, 48)], []], [[2], [2]])
    with torch.no_grad():
        dense = model(**batch).logits
        with vtprune.make("visionzip", keep=1.0)(model) as trace:
            logits = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], dense[real], atol=1e-5, rtol=0)
    assert all(before == after for before, after in trace.visual_tokens())


def test_refused_on_a_tower_without_cls():
    """OneVision's SigLIP tower has no [CLS]: the refusal says so (the official code covers [CLS] towers only)."""
    model = build_tiny_onevision()
    with pytest.raises(vtprune.VTPruneError, match=r"visionzip needs a vision encoder with a \[CLS\] token; "
                                                   r"the llava_onevision tower has none"):
        with vtprune.make("visionzip", keep=4)(model):
            pass


def test_a_budget_over_a_view_is_refused(models):
    model = models["next"]
    batch = media_batch(model, [[(32, 48)], [(64, 64)]])
    with pytest.raises(vtprune.VTPruneError, match="keep=17 is more than the 16 visual tokens of encoder input"):
        capture_llm_input(model, batch, vtprune.make("visionzip", keep=17))
