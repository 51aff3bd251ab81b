"""A tiny Gemma 3 (`Gemma3ForConditionalGeneration`) built from a config, and an offline processor with pan-and-scan.

The SigLIP tower sees 32 px images in 4 px patches (8 × 8 patches); the projector average-pools them 2 × 2, so every
image (and every pan-and-scan crop) is 16 tokens (4 × 4) between <start_of_image> and <end_of_image>. The language
model alternates sliding-window (window 12) and global layers, with Gemma 3's two RoPE bases."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
PAD, EOS, BOS, BOI, EOI, IMAGE = range(256, 262)
VOCAB = 272
SIZE = 32  # pixels per image side
SIDE = 4  # tokens per image side
PER_IMAGE = SIDE * SIDE
WINDOW = 12  # the sliding window: shorter than an image's run of tokens, so it bites inside images too
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def build_tiny_gemma3(seed: int = 0, attn: str = "sdpa") -> nn.Module:
    """Gemma 3 in miniature: a 2-layer SigLIP, the avg-pool projector, a 4-layer GQA language model with q/k norms,
    sliding and global layers (RoPE bases 10k and 1M); SDPA attention."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "intermediate_size": 64, "image_size": SIZE, "patch_size": 4}
    text = {"model_type": "gemma3_text", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": len(LAYER_TYPES), "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "query_pre_attn_scalar": 16, "sliding_window": WINDOW, "layer_types": LAYER_TYPES,
            "max_position_embeddings": 512, "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=PER_IMAGE,
                          boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE,
                          attn_implementation=attn)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # the projector starts at zero and the norms at identity: give the images some content
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
        for name, parameter in model.model.language_model.named_parameters():
            if "norm" in name:
                parameter.normal_(std=0.2)
    model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # random weights: always decode the requested number of tokens
    return model


def build_gemma3_processor():
    """Offline Gemma 3 processor: byte-level tokenizer (256 byte tokens + the special tokens at 256..261), left
    padding, 32 px images (pan-and-scan is an option of the call: `PAN_AND_SCAN`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    vocab = {byte: i for i, byte in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    images = Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE})
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=PER_IMAGE)


PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8, "pan_and_scan_max_num_crops": 2,
                "pan_and_scan_min_ratio_to_activate": 1.2}  # the processor's own defaults turn it off


def pictures(seed: int = 0) -> list[Image.Image]:
    """Random RGB images (height, width): 32×64 (wide: the original + 2 crops), 30×30, 40×40 (one view each)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 64), (30, 30), (40, 40))]


# views (the original, then its crops) per image of `image_batch`, in prompt order: sample 0 images 0, 1; sample 1: 2
VIEWS = [3, 1, 1]


def image_batch(processor) -> dict[str, torch.Tensor]:
    """Batch of 2, left padded: sample 0 a wide image (original + 2 crops) and a square one (64 visual tokens),
    sample 1 one square image (16 visual tokens) in a longer text. Holds `token_type_ids` (1 at image tokens). Pan and
    scan crops the wide image into 2 crops of 32 × 32 px: 1 ≤ width / height / 1.2, crops ≥ 8 px."""
    texts = [
        "<bos>user: <start_of_image> and <start_of_image> what?\nmodel:",
        "<bos>user: look at the picture here <start_of_image> and describe it in detail please\nmodel:",
    ]
    images = pictures()
    return dict(processor(images=[images[:2], images[2:]], text=texts, return_tensors="pt", padding=True,
                          **PAN_AND_SCAN))
