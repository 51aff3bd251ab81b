"""The recipe of a toy training run (every setting, with its seed) and the helpers both stages share."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers import LlavaProcessor

from vtprune.toy.modeling import (
    ModelSize,
)


@dataclass
class Recipe:
    """Everything that defines a training run."""

    seed: int = 0
    size: ModelSize = field(default_factory=ModelSize)
    # Stage 1: contrastive pretraining of the vision tower.
    tower_steps: int = 250
    tower_groups: int = 8  # groups per batch
    tower_group_size: int = 4  # a scene and its near-duplicates
    tower_negatives: int = 8  # hard-negative captions per image
    tower_lr: float = 1e-3
    # Contrastive captions alone do not teach a 4-layer tower shapes in a few thousand images; auxiliary losses on
    # the object under each patch and on each object's pooled patches do (see PatchHead and ObjectHead).
    tower_patch_weight: float = 1.0
    tower_object_weight: float = 1.0
    caption_dim: int = 128
    # Stage 2: the whole model on question answering, the tower at a fraction of the learning rate
    # (as LLaVA-OneVision trains its tower), with the contrastive loss kept as an auxiliary term.
    qa_scenes: int = 12000
    qa_easy_scenes: int = 1000  # scenes of 1-2 objects, the only ones seen in the first qa_easy_steps
    qa_easy_steps: int = 100
    qa_steps: int = 2400
    qa_batch: int = 8  # images (conversations) per step
    qa_turns: int = 16  # questions per image, packed as independent single turns after one image prefix
    qa_lr: float = 1e-3
    # Initial weight scale of the language model and projector (transformers' default is 0.02). At 0.02 a 256-wide
    # model learns for hundreds of steps to attend to the few patches an answer is in; at 0.08 it does so early.
    init_std: float = 0.08
    qa_tower_lr_scale: float = 0.2
    qa_contrastive_weight: float = 0.1
    qa_object_weight: float = 0.1  # ObjectHead's loss, kept in stage 2 like the contrastive one
    eval_every: int = 300
    val_items: int = 300
    threads: int = 2
    bf16: bool = True  # bf16 autocast for training; the model is saved in float16 and runs in float32


_STARTED = [time.time()]


def start_clock() -> None:
    _STARTED[0] = time.time()


def minutes() -> float:
    """Minutes since the run started (for progress lines)."""
    return (time.time() - _STARTED[0]) / 60


def autocast(recipe: Recipe):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pixel_values(processor: LlavaProcessor, images: list) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]
