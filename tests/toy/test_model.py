"""The packaged toy LLaVA: loads offline, has the LLaVA-1.5 layout, answers the bundled example."""

import json

import pytest
import torch
from transformers import (
    CLIPVisionModel,
    LlamaModel,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vtprune import toy


@pytest.fixture(scope="module")
def model_and_processor():
    torch.set_num_threads(2)
    return toy.load()


def test_loads_offline_in_eval_mode_with_sdpa(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(processor, LlavaProcessor)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"


def test_config_is_the_llava_1_5_layout(model_and_processor):
    model, _ = model_and_processor
    config = model.config
    vision = config.vision_config
    assert isinstance(model.model.vision_tower, CLIPVisionModel)
    assert isinstance(model.model.language_model, LlamaModel)
    assert (vision.image_size, vision.patch_size) == (336, 14)
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == 576
    assert config.projector_hidden_act == "gelu"
    assert config.text_config.num_hidden_layers >= 4
    assert config.text_config.head_dim >= 32
    # The tower emits [CLS] + 576 patches; LLaVA's "default" strategy drops [CLS].
    pixels = torch.zeros(1, 3, 336, 336)
    with torch.no_grad():
        tower_out = model.model.vision_tower(pixels, output_hidden_states=True)
        features = model.get_image_features(pixels).pooler_output
    assert tower_out.last_hidden_state.shape[1] == 577
    assert len(tower_out.hidden_states) == vision.num_hidden_layers + 1
    assert features[0].shape == (576, config.text_config.hidden_size)


def test_processor_expands_image_token_to_576(model_and_processor):
    _, processor = model_and_processor
    items = toy.make_dataset("val", 2, seed=0)
    inputs = processor(images=[i.image for i in items], text=[toy.prompt(i.question) for i in items],
                       return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, 336, 336)
    image_tokens = (inputs["input_ids"] == processor.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [576, 576]
    assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")


def test_chat_template_gives_the_llava_prompt(model_and_processor):
    _, processor = model_and_processor
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is it?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == toy.prompt("what shape is it?") == "USER: <image>\nwhat shape is it? ASSISTANT:"


def test_tokenizer_knows_every_word_of_the_world(model_and_processor):
    _, processor = model_and_processor
    tokenizer = processor.tokenizer
    for item in toy.make_dataset("val", 8, seed=1):
        ids = tokenizer(f"{item.question} {item.answer} {item.caption}", add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids


def test_answers_the_bundled_small_object_example(model_and_processor):
    model, processor = model_and_processor
    example = toy.load_example()
    assert example["target_size"] == "small"
    prediction = toy.answer(model, processor, [example["image"]], [example["question"]])[0]
    assert toy.is_correct(prediction, example["answer"]), (prediction, example["answer"])


def test_batched_answers_do_not_depend_on_padding(model_and_processor):
    model, processor = model_and_processor
    items = toy.make_dataset("test", 6, seed=11)
    batched = toy.answer(model, processor, [i.image for i in items], [i.question for i in items])
    alone = [toy.answer(model, processor, [i.image], [i.question])[0] for i in items[:2]]
    assert batched[:2] == alone
    assert sum(toy.is_correct(p, i.answer) for p, i in zip(batched, items)) >= 3  # far above chance


def test_is_correct_normalises():
    assert toy.is_correct(" Red.", "red")
    assert toy.is_correct("three", "3")
    assert toy.is_correct("the circle", "circle")
    assert not toy.is_correct("red circle", "red")
    assert not toy.is_correct("", "red")


def test_model_folder_is_small_and_complete():
    files = {p.name for p in toy.MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files or \
        {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= files
    size = sum(p.stat().st_size for p in toy.MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 2**20
    assert json.loads((toy.MODEL_DIR / "config.json").read_text())["model_type"] == "llava"
