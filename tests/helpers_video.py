"""Builders for the anyres / video tests: tiny LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video models from configs
with random weights, padded batches whose placeholder counts come from the models themselves, and test videos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.helpers import BOS, PAD

IMAGE, VIDEO = 99, 98


def _clip(image_size: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2,
    )


def _llama(layers: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=PAD, max_position_embeddings=1024,
    )


def _qwen2(layers: int = 4):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=PAD, max_position_embeddings=1024, tie_word_embeddings=False,
    )


def _finish(model: nn.Module) -> nn.Module:
    model.eval()
    model.generation_config.pad_token_id = PAD
    return model


def build_tiny_llava_next(seed: int = 0, attn: str = "sdpa") -> nn.Module:
    """CLIP tower (32 px inputs, 4×4 patches + [CLS]), tiles from the pinpoints below, Llama LM with GQA."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE, vision_feature_layer=-2,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [32, 96]], attn_implementation=attn,
    )
    return _finish(LlavaNextForConditionalGeneration(config))


def build_tiny_onevision(seed: int = 0, attn: str = "sdpa", tower: str = "siglip") -> nn.Module:
    """SigLIP tower (40 px inputs, 5×5 patches, no [CLS]; frames pooled to 3×3) or a CLIP one (LongVA-like), Qwen2 LM."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    if tower == "siglip":
        vision = SiglipVisionConfig(
            image_size=40, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2,
        )
        extra = dict(vision_feature_layer=-1, vision_feature_select_strategy="full")
        pins = [[40, 80], [80, 40], [80, 80]]
    else:
        vision = _clip()
        extra = dict(vision_feature_layer=-2, vision_feature_select_strategy="default")
        pins = [[32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=_qwen2(), image_token_index=IMAGE, video_token_index=VIDEO,
        image_grid_pinpoints=pins, attn_implementation=attn, **extra,
    )
    return _finish(LlavaOnevisionForConditionalGeneration(config))


def build_tiny_next_video(seed: int = 0, attn: str = "sdpa") -> nn.Module:
    """CLIP tower (32 px, 4×4 patches + [CLS]; frames average-pooled to 2×2), Llama LM."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaNextVideoConfig(
        vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE, video_token_index=VIDEO,
        vision_feature_layer=-2, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], attn_implementation=attn,
    )
    return _finish(LlavaNextVideoForConditionalGeneration(config))


def media_batch(
    model: nn.Module,
    images: list[list[tuple[int, int]]],
    videos: list[list[int]] | None = None,
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """A left-padded batch: sample b holds images of sizes images[b] (height, width), then videos of videos[b] frames,
    each between text tokens; the number of placeholder tokens of every image and video is what the model produces."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    side = config.vision_config.image_size
    sizes = [size for sample in images for size in sample]
    inputs: dict[str, torch.Tensor] = {}
    image_lengths: list[int] = []
    if sizes:
        inputs["image_sizes"] = torch.tensor(sizes)
        max_views = 1 + max(-(-h // side) * -(-w // side) for h, w in sizes) + 8
        inputs["pixel_values"] = torch.randn(len(sizes), max_views, 3, side, side, generator=generator)
        if "Onevision" in type(model).__name__:
            inputs["batch_num_images"] = torch.tensor([len(sample) for sample in images])
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                **({"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}),
            ).pooler_output
        image_lengths = [f.shape[0] for f in features]
    video_lengths: list[int] = []
    frames = [n for sample in (videos or []) for n in sample]
    if frames:
        if len(set(frames)) != 1:
            raise ValueError("all videos of a batch need the same number of frames")
        inputs["pixel_values_videos"] = torch.randn(len(frames), frames[0], 3, side, side, generator=generator)
        with torch.no_grad():
            pooled = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
        video_lengths = [p.shape[0] for p in pooled] if isinstance(pooled, (list, tuple)) else [pooled.shape[1]] * len(frames)
    rows, image, video = [], 0, 0
    for b, sample_images in enumerate(images):
        ids = [BOS] + [5 + b] * (1 + 2 * b)
        for _ in sample_images:
            ids += [IMAGE] * image_lengths[image] + [10]
            image += 1
        for _ in (videos[b] if videos else []):
            ids += [VIDEO] * video_lengths[video] + [11]
            video += 1
        rows.append(ids + [7, 8 + b])
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids) :] = torch.tensor(ids)
        mask[b, length - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask, **inputs}


def frame_colour(index: int) -> int:
    """Grey level written into frame `index` (< 33) of a test video, 7 apart so a lossy codec keeps frames apart."""
    return 16 + 7 * index


def write_video(path: Path, frames: int, fps: int, size: tuple[int, int] = (48, 64)) -> Path:
    """A video whose frame i is a flat grey of `frame_colour(i)`, written with PyAV (lossless FFV1; use a .mkv path)."""
    import av

    height, width = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            array = np.full((height, width, 3), frame_colour(index), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
