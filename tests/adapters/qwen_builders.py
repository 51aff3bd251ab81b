"""Builders for the Qwen2-VL / Qwen2.5-VL tests: tiny models from configs (random weights), an offline processor
(byte-level tokenizer with Qwen's special tokens, 4 px patches merged 2×2: one visual token per 8×8 pixels), batches."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from vtprune.agents import Screen, draw_screen

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
PAD, IM_START, IM_END, IMAGE, VIDEO, VISION_START, VISION_END = range(256, 263)
VOCAB = 272
KINDS = ("qwen2-vl", "qwen2.5-vl")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen(
    kind: str = "qwen2-vl", seed: int = 0, layers: int = 3, heads: int = 2, kv_heads: int = 1, head_dim: int = 64,
    attn: str = "sdpa", sliding: bool = False,
) -> nn.Module:
    """Qwen2-VL or Qwen2.5-VL in miniature: 2-block vision tower (4 px patches, 2×2 merge), GQA language model with
    M-RoPE (mrope_section sums to head_dim / 2), SDPA attention. `sliding`: every layer after the first is a
    sliding-window layer (a window longer than any test sequence), so generate() builds DynamicSlidingWindowLayers."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    quarter = head_dim // 8
    text = dict(
        vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [quarter, 3 * quarter // 2, 3 * quarter // 2]},
        pad_token_id=PAD, bos_token_id=None, eos_token_id=IM_END,
    )
    if sliding:
        text |= dict(use_sliding_window=True, sliding_window=4096, max_window_layers=1,
                     layer_types=["full_attention"] + ["sliding_attention"] * (layers - 1))
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    if kind == "qwen2-vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=heads * head_dim, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, attn_implementation=attn, **ids)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=heads * head_dim, num_heads=2,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, attn_implementation=attn, **ids)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # random weights: always decode the requested number of tokens
    return model


def build_qwen_processor(kind: str = "qwen2-vl"):
    """Offline processor: byte-level tokenizer (256 byte tokens + Qwen's special tokens at 256..262), left padding,
    images resized to multiples of 8 px (4 px patches, 2×2 merge) between 8×8 and 96×96 merged-token grids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    vocab = {byte: i for i, byte in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    patches = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    images = Qwen2VLImageProcessor(size={"shortest_edge": 64, "longest_edge": 96 * 96}, **patches)
    videos = Qwen2VLVideoProcessor(size={"shortest_edge": 64, "longest_edge": 16 * 64 * 64}, do_sample_frames=False,
                                   **patches)
    cls = Qwen2VLProcessor if kind == "qwen2-vl" else Qwen2_5_VLProcessor
    return cls(image_processor=images, tokenizer=tokenizer, video_processor=videos, chat_template=CHAT_TEMPLATE)


def screens() -> list[Image.Image]:
    """Four small synthetic screenshots: 64×40 px (5×8 tokens) and 48×32 px (4×6 tokens)."""
    return [
        draw_screen(Screen(size=(64, 40))),
        draw_screen(Screen(size=(48, 32), field_text="abc", selected=1)),
        draw_screen(Screen(size=(64, 40), dialog="Save?", cursor=(30, 20))),
        draw_screen(Screen(size=(64, 40), pressed="OK", title="Sound")),
    ]


def two_screenshot_batch(processor) -> dict[str, torch.Tensor]:
    """Batch of 2, left padded, two screenshots per prompt: sample 0 (shorter text) has a 64×40 and a 48×32
    screenshot, sample 1 two 64×40 ones with text between them."""
    shot = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [
        f"<|im_start|>user\n{shot}{shot}click ok<|im_end|>\n<|im_start|>assistant\n",
        f"<|im_start|>user\nthe task: {shot}then{shot}press the OK button<|im_end|>\n<|im_start|>assistant\n",
    ]
    images = screens()
    return dict(processor(images=[images[0], images[1], images[2], images[3]], text=texts, return_tensors="pt", padding=True))


def video_batch(processor) -> dict[str, torch.Tensor]:
    """Batch of 2, left padded, images and videos mixed: sample 0 a 4-frame 48×32 video at 2 fps (2 temporal groups of
    4×6 tokens, 1 s each) and a 48×32 screenshot; sample 1 a 6-frame 32×32 video at 0.25 fps (3 groups of 4×4 tokens,
    8 s each: under Qwen2.5-VL its last groups' t ids lie beyond the text after it)."""
    import numpy as np

    shot = "<|vision_start|><|image_pad|><|vision_end|>"
    clip = "<|vision_start|><|video_pad|><|vision_end|>"
    texts = [
        f"<|im_start|>user\n{clip}what happens? {shot}<|im_end|>\n<|im_start|>assistant\n",
        f"<|im_start|>user\nthe clip: {clip}describe it<|im_end|>\n<|im_start|>assistant\n",
    ]
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, size=(frames, h, w, 3), dtype=np.uint8) for frames, h, w in ((4, 32, 48), (6, 32, 32))]
    metadata = [{"fps": fps, "total_num_frames": len(v), "frames_indices": list(range(len(v)))}
                for fps, v in zip((2.0, 0.25), videos)]
    return dict(processor(images=[screens()[1]], videos=videos, video_metadata=metadata, text=texts,
                          return_tensors="pt", padding=True))
