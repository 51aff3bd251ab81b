"""Merges before the projector, reordered slots, and presets: the additive parts of the core."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from tests.helpers import capture_llm_input, hooks_of
from vtprune.core import KeepPlan, Merge, Method, ProjectorInput, VisualLayout, VisualSpan, keep_all


@dataclass
class _EncoderIdentity(Method):
    """Every patch replaced by the projection of its own encoder token (weight 1): must change nothing."""

    name: ClassVar[str] = "test-encoder-identity"
    request: bool = True

    def requests(self, info):
        return [ProjectorInput()] if self.request else []

    def plan(self, ctx):
        plan = keep_all(ctx.layout)
        plan.merges = [
            [Merge(slot=o, sources=torch.tensor([1 + o % 16]), weights=torch.ones(1), space="encoder")
             for o in range(ctx.layout.num_visual(b))]
            for b in range(ctx.layout.batch_size)
        ]
        return plan


@dataclass
class _Reverse(Method):
    """Keeps every token but reverses each image's tokens in the sequence."""

    name: ClassVar[str] = "test-reverse"

    def plan(self, ctx):
        plan = keep_all(ctx.layout)
        plan.order = [
            torch.cat([torch.arange(sl.start, sl.stop).flip(0) for _, sl in ctx.layout.ordinal_slices(b)])
            for b in range(ctx.layout.batch_size)
        ]
        return plan


def test_encoder_merge_of_a_token_with_itself_changes_nothing(tiny_llava, batch):
    with torch.no_grad():
        dense = tiny_llava(**batch).logits
        with _EncoderIdentity()(tiny_llava) as trace:
            logits = tiny_llava(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], dense[real], atol=1e-5, rtol=0)
    merged = trace.forwards[0].sites[1].merged
    assert len(merged) == 32 and merged[20] == {"slot": 20, "weights": [1.0], "space": "encoder", "sources": [20],
                                                "encoder_tokens": [5]}


def test_encoder_merge_without_the_projector_input_is_refused(tiny_llava, batch):
    hooks = hooks_of(tiny_llava)
    with pytest.raises(vtprune.VTPruneError, match="ProjectorInput"):
        with torch.no_grad(), _EncoderIdentity(request=False)(tiny_llava):
            tiny_llava(**batch)
    assert hooks_of(tiny_llava) == hooks


def test_order_permutes_contents_within_each_image(tiny_llava, batch):
    with torch.no_grad():
        dense = tiny_llava.model.get_input_embeddings()(batch["input_ids"])
        features = torch.stack(list(tiny_llava.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
    seen, trace = capture_llm_input(tiny_llava, batch, _Reverse())
    sample1 = seen["embeds"][1]  # [BOS, 5, image 1, 10, image 2, 7, 11]: no padding
    torch.testing.assert_close(sample1[2:18], features[1].flip(0))
    torch.testing.assert_close(sample1[19:35], features[2].flip(0))
    torch.testing.assert_close(sample1[18], dense[1, 18])
    assert trace.forwards[0].sites[1].kept.tolist() == list(range(15, -1, -1)) + list(range(31, 15, -1))


def test_order_must_permute_the_kept_tokens_within_their_images():
    span = lambda image, start: VisualSpan(image=image, start=start, patch_index=torch.arange(2), grid=(1, 2))
    layout = VisualLayout(spans=[[span(0, 0), span(1, 3)]], seq_len=6)
    keep = [torch.tensor([0, 1, 2, 3])]
    KeepPlan(keep=keep, order=[torch.tensor([1, 0, 3, 2])]).validate(layout)
    with pytest.raises(vtprune.VTPruneError, match="not a permutation"):
        KeepPlan(keep=keep, order=[torch.tensor([1, 0, 3, 3])]).validate(layout)
    with pytest.raises(vtprune.VTPruneError, match="moves tokens between images"):
        KeepPlan(keep=keep, order=[torch.tensor([2, 1, 0, 3])]).validate(layout)


def test_make_loads_a_json_preset_and_explicit_options_win(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"method": "transprune", "options": {"keep_ratios": [0.5, 0.25, 0.1], "alpha": 0.3}}))
    method = vtprune.make("transprune", preset=path, alpha=0.7)
    assert (method.keep_ratios, method.alpha) == ((0.5, 0.25, 0.1), 0.7)
    with pytest.raises(vtprune.VTPruneError, match="is for method 'transprune', not 'vflowopt'"):
        vtprune.make("vflowopt", preset=str(path))
