"""Builders for the InternVL tests: a tiny `InternVLForConditionalGeneration` from a config (random weights), an offline
`InternVLProcessor` (byte-level tokenizer with InternVL's special tokens, 32 px tiles, 4 px patches shuffled 2×2: 16
tokens per tile), and a batch of tiled images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
PAD, IM_START, IM_END, IMG_START, IMG_END, IMAGE, VIDEO = range(256, 263)
VOCAB = 272
TILE = 32  # pixels per tile side
SIDE = 4  # tokens per tile side: 32 px / 4 px patches = 8 patches, halved by pixel shuffle
PER_TILE = SIDE * SIDE


def build_tiny_internvl(seed: int = 0, layers: int = 4, attn: str = "sdpa", qk_norm: bool = False) -> nn.Module:
    """InternVL in miniature: a 2-layer InternViT (32 px tiles, 4 px patches, [CLS] token, optional q/k norms), pixel
    shuffle 0.5, the MLP projector, a GQA Qwen2 language model; SDPA attention."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": TILE, "patch_size": 4, "use_qk_norm": qk_norm}
    text = {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "pad_token_id": PAD, "bos_token_id": None, "eos_token_id": IM_END}
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=PER_TILE,
                            downsample_ratio=0.5, attn_implementation=attn)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():  # zero [CLS] / position embeddings and small q/k weights would make [CLS] rows uniform
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_(std=1.0)
        embeddings.position_embeddings.normal_(std=0.5)
        for layer in model.model.vision_tower.encoder.layer:
            layer.attention.q_proj.weight.normal_(std=0.5)
            layer.attention.k_proj.weight.normal_(std=0.5)
    model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # random weights: always decode the requested number of tokens
    return model


# InternVL's chat layout, short: the processor expands each `<IMG_CONTEXT>` into <img>, the tiles' context tokens, </img>
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_internvl_processor(max_patches: int = 4):
    """Offline InternVL processor: byte-level tokenizer (256 byte tokens + the special tokens at 256..262), left
    padding, images cut into at most `max_patches` 32 px tiles plus a thumbnail when there are several."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLProcessor,
        InternVLVideoProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {byte: i for i, byte in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", padding_side="left",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    images = GotOcr2ImageProcessor(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                   max_patches=max_patches)
    videos = InternVLVideoProcessor(size={"height": TILE, "width": TILE}, do_sample_frames=False)
    return InternVLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                             image_seq_length=PER_TILE, chat_template=CHAT_TEMPLATE)


def pictures(seed: int = 0) -> list[Image.Image]:
    """Random RGB images (height, width): 32×64 (2 tiles + thumbnail), 30×30 (one tile), 64×64 (2×2 tiles +
    thumbnail)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 64), (30, 30), (64, 64))]


# tiles per image of `image_batch`, in prompt order: sample 0 holds images 0 and 1, sample 1 image 2
TILES = [3, 1, 5]


def image_batch(processor) -> dict[str, torch.Tensor]:
    """Batch of 2, left padded: sample 0 a 3-tile and a 1-tile image (64 visual tokens), sample 1 (longer) a 5-tile
    image (80 visual tokens)."""
    texts = [
        "<|im_start|>user\n<IMG_CONTEXT><IMG_CONTEXT>what?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nthe picture: <IMG_CONTEXT> describe it<|im_end|>\n<|im_start|>assistant\n",
    ]
    return dict(processor(images=pictures(), text=texts, return_tensors="pt", padding=True))
