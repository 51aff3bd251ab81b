"""Build, load and query the embedded toy LLaVA-1.5 model.

The model is a real `transformers.LlavaForConditionalGeneration`: a CLIP vision tower (336 px,
14-px patches, 576 patches plus [CLS]), LLaVA's 2-layer GELU projector fed from the tower's
penultimate layer with [CLS] dropped, and a small Llama language model. The tokenizer is a
word-level `tokenizers` model built offline from the toy world's vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vtprune.toy import world

MODEL_DIR = Path(__file__).resolve().parent / "model"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
PATCH_SIZE = world.PATCH_PX  # the grid the world places its objects on
NUM_IMAGE_TOKENS = world.GRID**2  # 576
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LLaVA-1.5 conversation format: "USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ..."
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt(question: str) -> str:
    """The single-turn LLaVA-1.5 prompt for one image and one question."""
    return f"USER: {IMAGE}\n{question} ASSISTANT:"


@dataclass(frozen=True)
class ModelSize:
    """Widths and depths of the vision tower and the language model."""

    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 8
    text_intermediate: int = 768


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the toy world's vocabulary; no BOS is added automatically."""
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + world.vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def clip_image_processor() -> type:
    """transformers' CLIP image processor: the torchvision backend when torchvision is installed, else the PIL one,
    named explicitly (transformers makes the same choice but warns on every run of a plain pip install)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil


def build_processor() -> LlavaProcessor:
    """LlavaProcessor: CLIP image preprocessing at 336 px and the word-level tokenizer."""
    image_processor = clip_image_processor()(
        size={"shortest_edge": world.IMAGE_SIZE},
        crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the tower's [CLS]; dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, size: ModelSize = ModelSize()) -> LlavaConfig:
    """The LLaVA-1.5 layout at toy scale."""
    vision_config = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=world.IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=size.vision_hidden,
        hidden_act="quick_gelu",
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def load(
    dtype: torch.dtype = torch.float32, path: Path = MODEL_DIR
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The packaged model (or one trained into `path`) and its processor, offline, in eval mode with SDPA."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no toy model in {path}; train it with `python -m vtprune.toy.train`")
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


@torch.inference_mode()
def answer(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    max_new_tokens: int = 3,
) -> list[str]:
    """Greedy answers to one question per image, generated as one left-padded batch."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        images=list(images), text=[prompt(q) for q in questions], return_tensors="pt", padding=True
    ).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output_ids[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no leading article, number words as digits."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    if words and words[0] in {"a", "an", "the"}:
        words = words[1:]
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words)


def is_correct(prediction: str, answer: str) -> bool:
    """Normalised exact match."""
    return normalize_answer(prediction) == normalize_answer(answer)
