"""The random-weight model shapes of `vtprune bench` build, run and give the visual-token counts they promise."""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.eval.schedule import encode_media, media_inputs, schedule_forward
from vtprune.eval.shapes import QWEN3_VL_IMAGE, QWEN3_VL_VIDEO, shaped


@pytest.mark.parametrize(("name", "visual", "kept"), [(QWEN3_VL_IMAGE, 2024, 506), (QWEN3_VL_VIDEO, 3136, 784)])
def test_qwen3_vl_shapes_hold_their_visual_tokens_and_prune(name, visual, kept):
    model, inputs = shaped(name, llm_hidden=128, llm_layers=2, vision_hidden=32, vision_layers=1, text_tokens=10,
                           batch=1)
    assert inputs["input_ids"].shape[1] == 10 + visual + (2 if name == QWEN3_VL_IMAGE else 16 * (4 + 2))
    with torch.no_grad():
        with vtprune.make("pool", keep=0.25)(model) as trace:
            model(**inputs)
        encode_media(model, media_inputs(inputs))  # the bound's and the schedule's vision encoder run on it too
        logits, _ = schedule_forward(model, media_inputs(inputs), [40, 20])()
    assert trace.visual_tokens(0) == [(visual, kept)]
    assert logits.shape == (1, 1, model.config.get_text_config().vocab_size)
