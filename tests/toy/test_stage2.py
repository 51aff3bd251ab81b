"""Training packs many single-turn questions after one image prefix; each turn must see exactly its own prompt."""

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from vtprune import toy
from vtprune.toy import world
from vtprune.toy.modeling import ModelSize, build_config, build_processor
from vtprune.toy.stage2 import QABuilder, qa_batch


def test_each_packed_turn_gets_the_logits_of_its_single_turn_prompt():
    torch.manual_seed(0)
    processor = build_processor()
    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=64, text_layers=2, text_heads=2,
                     text_intermediate=128)
    model = LlavaForConditionalGeneration(build_config(processor.tokenizer, size)).eval()
    scene = world.make_scenes("val", 1, seed=0)[0]
    qas = world.all_questions(scene, np.random.default_rng(0))[:3]
    image = world.render(scene)

    batch = qa_batch(QABuilder(processor), [qas], processor.tokenizer.pad_token_id)
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        packed = model(pixel_values=pixels, **{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        answer_rows = (batch["labels"][0] != -100).nonzero().flatten() - 1  # the rows that predict answer tokens
        for turn, qa in enumerate(qas):
            inputs = processor(images=[image], text=[f"{toy.prompt(qa.question)} {qa.answer}</s>"], return_tensors="pt")
            alone = model(**inputs).logits[0]
            rows = answer_rows[2 * turn : 2 * turn + 2]  # the answer word and </s>
            torch.testing.assert_close(packed[rows], alone[-3:-1], atol=1e-4, rtol=1e-4)
    assert processor.tokenizer.decode(batch["input_ids"][0, answer_rows + 1]).split() == [
        w for qa in qas for w in (qa.answer, "</s>")
    ]

