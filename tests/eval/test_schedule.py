"""The schedule bound runs the decoder layers at the lengths a method left, and nothing else changes the model."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.helpers import build_tiny_llava, padded_batch
from vtprune.eval.flops import visual_tokens_per_layer
from vtprune.eval.schedule import layer_lengths, schedule_forward


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava().eval()


def vision_inputs(batch):
    return {"pixel_values": batch["pixel_values"][:1]}


@pytest.mark.parametrize("batch", [1, 3])
def test_at_the_prompt_length_it_is_the_dense_language_model(model, batch):
    run = schedule_forward(model, vision_inputs(padded_batch()), [9] * model.config.text_config.num_hidden_layers,
                           batch)
    logits, cache = run()
    assert run.hidden.shape[0] == batch and logits.shape[:2] == (batch, 1)
    with torch.no_grad():
        dense = model.model.language_model(inputs_embeds=run.hidden).last_hidden_state[:, -1:]
        torch.testing.assert_close(logits, model.lm_head(dense), atol=1e-5, rtol=1e-5)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [9] * 4


def test_each_layer_runs_at_the_length_the_method_left_there(model):
    batch = padded_batch()
    single = {k: v[1:] for k, v in batch.items()}
    with torch.no_grad(), vtprune.make("fastv", keep=3, layer=2)(model) as trace:
        model(**single)
    before, after = trace.visual_tokens(0)[0]
    lengths = layer_lengths(single["input_ids"].shape[1], before, visual_tokens_per_layer(trace, 4, forward=0))
    prompt = single["input_ids"].shape[1]
    assert after < before and lengths == [prompt] * 2 + [prompt - before + after] * 2
    _, cache = schedule_forward(model, vision_inputs(single), lengths)()
    assert [layer.keys.shape[-2] for layer in cache.layers] == lengths


def test_lengths_that_grow_are_refused(model):
    with pytest.raises(ValueError, match="must not grow"):
        schedule_forward(model, {}, [4, 5, 5, 5])
