"""Model shapes with random weights for `vtprune bench` (and the benchmarks): the real models' proportions, scaled down
by `--llm-layers`, `--llm-hidden`, `--vision-layers`, `--vision-hidden`, with prompts built without a processor (random
pixels: the weights are random too, so only the lengths matter).

- `llava-1.5-7b`: CLIP-L/336 tower (576 visual tokens per image), Llama LM.
- `qwen3-vl-image`: Qwen3-VL-8B's proportions (SigLIP-2-style tower with 16 px patches merged 2×2 and DeepStack
  mergers, GQA LM with interleaved M-RoPE, head_dim 128), one 1472×1408 image: 46×44 = 2,024 visual tokens.
- `qwen3-vl-video`: the same model, a 32-frame 448×448 video: 16 temporal patches of 14×14 tokens (3,136 visual
  tokens), each after its `<t seconds>` timestamp, as Qwen3-VL's processor lays videos out.
"""

from __future__ import annotations

import torch

LLAVA_15_7B = "llava-1.5-7b"
QWEN3_VL_IMAGE = "qwen3-vl-image"
QWEN3_VL_VIDEO = "qwen3-vl-video"
QWEN3_IDS = {"image_token_id": 31000, "video_token_id": 31001, "vision_start_token_id": 31002,
             "vision_end_token_id": 31003}
QWEN3_PATCH = 3 * 2 * 16 * 16  # one flattened patch: channels x temporal patch x 16 x 16 px


def llava15_shaped(
    llm_hidden: int = 4096, llm_layers: int = 32, vision_hidden: int = 1024, vision_layers: int = 24
) -> torch.nn.Module:
    """LLaVA-1.5-7B's shape with random weights: CLIP-L/336 tower (24 x 1024, 14 px patches: 576 visual tokens) and a
    Llama LM (32 x 4096, heads of 128); the widths and depths scale down, the 576 visual tokens stay."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=vision_hidden // 64, image_size=336, patch_size=14, projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32064, hidden_size=llm_hidden, intermediate_size=int(llm_hidden * 2.6875) // 64 * 64,
        num_hidden_layers=llm_layers, num_attention_heads=llm_hidden // 128, num_key_value_heads=llm_hidden // 128,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # random weights: always decode the requested number of tokens
    model.generation_config.pad_token_id = 0
    return model


def llava15_inputs(text_tokens: int, batch: int = 1) -> dict[str, torch.Tensor]:
    """`batch` prompts, each its images (576 tokens each, random pixels) inside `text_tokens` text tokens. Sample b
    holds 1 + b % 2 images, so a batch is ragged: different visual counts, left padding, different kept counts."""
    before = text_tokens // 2
    rows = [[1] + [500] * (before - 1) + [32000] * 576 * (1 + b % 2) + [600] * (text_tokens - before)
            for b in range(batch)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    images = sum(1 + b % 2 for b in range(batch))
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "pixel_values": torch.randn(images, 3, 336, 336)}


def qwen3_vl_shaped(
    llm_hidden: int = 4096, llm_layers: int = 36, vision_hidden: int = 1152, vision_layers: int = 27
) -> torch.nn.Module:
    """Qwen3-VL-8B's shape with random weights: tower of `vision_layers` x `vision_hidden` (16 px patches, 2×2 merge,
    DeepStack from three blocks spread over the tower as 8/16/24 of 27), LM of `llm_layers` x `llm_hidden` (heads of
    128, 4 query heads per K/V head, MLP 3x wide, interleaved M-RoPE sections 24/20/20)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    heads = llm_hidden // 128
    text = {
        "vocab_size": 32064, "hidden_size": llm_hidden, "intermediate_size": 3 * llm_hidden,
        "num_hidden_layers": llm_layers, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4),
        "head_dim": 128, "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                            "mrope_section": [24, 20, 20]},
    }
    deepstack = sorted({max(1, round(vision_layers * f)) - 1 for f in (8 / 27, 16 / 27, 24 / 27)})
    vision = {"depth": vision_layers, "hidden_size": vision_hidden, "intermediate_size": 4 * vision_hidden,
              "num_heads": max(1, vision_hidden // 72), "out_hidden_size": llm_hidden, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
              "deepstack_visual_indexes": deepstack}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, attn_implementation="sdpa", **QWEN3_IDS)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # random weights: always decode the requested number of tokens
    model.generation_config.pad_token_id = 0
    return model


def qwen3_vl_inputs(media: str, text_tokens: int) -> dict[str, torch.Tensor]:
    """One prompt: `text_tokens` text tokens around the image ("image": a 92×88 patch grid, 2,024 tokens) or the
    video ("video": 16 temporal patches of 28×28 patches, 196 tokens each, each after a 4-token timestamp)."""
    g = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(100, 30000, (n,), generator=g).tolist()  # noqa: E731
    start, end = QWEN3_IDS["vision_start_token_id"], QWEN3_IDS["vision_end_token_id"]
    before = text_tokens // 2
    if media == "image":
        grid = torch.tensor([[1, 92, 88]])
        body = [start] + [QWEN3_IDS["image_token_id"]] * (92 * 88 // 4) + [end]
        pixels = {"pixel_values": torch.randn(92 * 88, QWEN3_PATCH, generator=g), "image_grid_thw": grid}
    else:
        grid = torch.tensor([[16, 28, 28]])
        body = [i for _ in range(16) for i in words(4) + [start] + [QWEN3_IDS["video_token_id"]] * 196 + [end]]
        pixels = {"pixel_values_videos": torch.randn(16 * 28 * 28, QWEN3_PATCH, generator=g), "video_grid_thw": grid}
    ids = torch.tensor([words(before) + body + words(text_tokens - before)])
    kinds = (ids == QWEN3_IDS["image_token_id"]).long() + 2 * (ids == QWEN3_IDS["video_token_id"]).long()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": kinds, **pixels}


SHAPES = (LLAVA_15_7B, QWEN3_VL_IMAGE, QWEN3_VL_VIDEO)


def shaped(name: str, llm_hidden: int, llm_layers: int, vision_hidden: int, vision_layers: int, text_tokens: int,
           batch: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(model, inputs) of shape `name` (one of SHAPES); batches of a Qwen3-VL shape repeat its prompt."""
    sizes = (llm_hidden, llm_layers, vision_hidden, vision_layers)
    if name == LLAVA_15_7B:
        return llava15_shaped(*sizes), llava15_inputs(text_tokens, batch)
    inputs = qwen3_vl_inputs("image" if name == QWEN3_VL_IMAGE else "video", text_tokens)
    return qwen3_vl_shaped(*sizes), {k: v.repeat(batch, *[1] * (v.dim() - 1)) for k, v in inputs.items()}
