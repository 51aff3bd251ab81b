"""Builders for the Qwen3-VL tests: a tiny model from a config (random weights, DeepStack injecting into the first two
decoder layers), an offline processor (byte-level tokenizer with Qwen's special tokens, 4 px patches merged 2×2: one
visual token per 8×8 pixels, video frames with timestamps), batches of images and videos."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests.adapters.qwen_builders import (
    CHAT_TEMPLATE,
    IM_END,
    IMAGE,
    PAD,
    SPECIALS,
    VIDEO,
    VISION_END,
    VISION_START,
    VOCAB,
    screens,
)

__all__ = ["IMAGE", "VIDEO", "VISION_END", "VISION_START", "build_qwen3_processor", "build_tiny_qwen3", "image_batch",
           "video_batch"]


def build_tiny_qwen3(seed: int = 0, layers: int = 4, heads: int = 2, kv_heads: int = 1, head_dim: int = 32,
                     deepstack: tuple[int, ...] = (0, 1), attn: str = "sdpa", moe: bool = False) -> nn.Module:
    """Qwen3-VL in miniature: 2-block vision tower (4 px patches, 2×2 merge, learned 8×8 position grid) whose blocks
    `deepstack` feed DeepStack mergers (injected after decoder layers 0..len-1), a GQA language model with interleaved
    M-RoPE (mrope_section sums to head_dim / 2), SDPA attention. `moe`: Qwen3-VL-MoE, every decoder MLP a sparse
    mixture of 4 experts (2 per token)."""
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    torch.manual_seed(seed)
    quarter = head_dim // 8
    text = {
        "vocab_size": VOCAB, "hidden_size": heads * head_dim, "intermediate_size": 2 * heads * head_dim,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                            "mrope_section": [2 * quarter, quarter, quarter]},
        "pad_token_id": PAD, "bos_token_id": None, "eos_token_id": IM_END,
    }
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": heads * head_dim, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "num_position_embeddings": 64, "deepstack_visual_indexes": list(deepstack)}
    ids = {"image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": VISION_START,
           "vision_end_token_id": VISION_END}
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, attn_implementation=attn, **ids)
        model = Qwen3VLMoeForConditionalGeneration(config)
    else:
        config = Qwen3VLConfig(text_config=text, vision_config=vision, attn_implementation=attn, **ids)
        model = Qwen3VLForConditionalGeneration(config)
    with torch.no_grad():  # random DeepStack mergers of this size would drown the tokens: keep them visible but small
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.mul_(0.5)
    model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # random weights: always decode the requested number of tokens
    return model


def build_qwen3_processor():
    """Offline Qwen3-VL processor: byte-level tokenizer, left padding, images resized to multiples of 8 px between
    8×8 and 96×96 merged-token grids; videos as frames with `<t seconds>` timestamps before each frame."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    vocab = {byte: i for i, byte in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    patches = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
    images = Qwen2VLImageProcessor(size={"shortest_edge": 64, "longest_edge": 96 * 96}, **patches)
    videos = Qwen3VLVideoProcessor(size={"shortest_edge": 64, "longest_edge": 16 * 64 * 64}, do_sample_frames=False,
                                   **patches)
    return Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                            chat_template=CHAT_TEMPLATE)


SHOT = "<|vision_start|><|image_pad|><|vision_end|>"
CLIP = "<|vision_start|><|video_pad|><|vision_end|>"


def image_batch(processor) -> dict[str, torch.Tensor]:
    """Batch of 2, left padded: sample 0 (shorter text) has a 64×40 and a 48×32 image, sample 1 one 64×40 image."""
    texts = [
        f"<|im_start|>user\n{SHOT}{SHOT}click ok<|im_end|>\n<|im_start|>assistant\n",
        f"<|im_start|>user\nthe task: {SHOT}press the OK button<|im_end|>\n<|im_start|>assistant\n",
    ]
    images = screens()
    return dict(processor(images=[images[0], images[1], images[2]], text=texts, return_tensors="pt", padding=True))


def clip(frames: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """[frames, H, W, 3] uint8: a random video."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(frames, size[1], size[0], 3), dtype=np.uint8)


def video_batch(processor) -> dict[str, torch.Tensor]:
    """Batch of 2, left padded: sample 0 a 4-frame 48×32 video (2 temporal patches: 2 frames of 4×6 tokens) and an
    image; sample 1 a 6-frame 32×32 video (3 frames of 4×4 tokens)."""
    texts = [
        f"<|im_start|>user\n{CLIP}what happens? {SHOT}<|im_end|>\n<|im_start|>assistant\n",
        f"<|im_start|>user\nthe clip: {CLIP}describe it<|im_end|>\n<|im_start|>assistant\n",
    ]
    videos = [clip(4, (48, 32), 0), clip(6, (32, 32), 1)]
    metadata = [{"fps": 2.0, "total_num_frames": len(v), "frames_indices": list(range(len(v)))} for v in videos]
    return dict(processor(images=[screens()[1]], videos=videos, video_metadata=metadata, text=texts,
                          return_tensors="pt", padding=True))
