"""Stage 1 of the toy training: the CLIP vision tower pretrained contrastively on (image, caption) pairs with a small
caption encoder of our own, plus the auxiliary patch and object heads (see `vtprune.toy.train`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import CLIPVisionModel, LlavaProcessor

from vtprune.toy import world
from vtprune.toy.modeling import (
    NUM_IMAGE_TOKENS,
    PATCH_SIZE,
)
from vtprune.toy.recipe import Recipe, autocast, cosine_lr, pixel_values

# ---------------------------------------------------------------------------------------------
# The text side of CLIP, used for training only


class CaptionEncoder(nn.Module):
    """A small transformer over caption words, mean-pooled."""

    def __init__(self, vocab_size: int, dim: int, max_len: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.proj(pooled)


class ContrastiveHead(nn.Module):
    """Image projection of the tower's pooled [CLS], caption encoder and temperature of CLIP's loss."""

    def __init__(self, vision_hidden: int, vocab_size: int, dim: int):
        super().__init__()
        self.image_proj = nn.Linear(vision_hidden, dim)
        self.caption_encoder = CaptionEncoder(vocab_size, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def loss(self, pooled: torch.Tensor, captions: Captions) -> torch.Tensor:
        """CLIP's symmetric InfoNCE over the batch (what open_clip's ClipLoss computes on one device).

        Image-to-text also ranks each image's caption above the hard-negative captions of the batch
        (NegCLIP); text-to-image is the plain CLIP term.
        """
        image_emb = F.normalize(self.image_proj(pooled).float(), dim=-1)  # (images, dim)
        text_emb = F.normalize(self.caption_encoder(captions.ids, captions.mask).float(), dim=-1)
        negative_emb = F.normalize(self.caption_encoder(captions.negative_ids, captions.negative_mask).float(), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100)
        logits = scale * image_emb @ text_emb.T  # (images, captions)
        image_to_text = torch.cat([logits, scale * image_emb @ negative_emb.T], dim=1)
        target = torch.arange(len(logits))
        return (F.cross_entropy(image_to_text, target) + F.cross_entropy(logits.T, target)) / 2


@dataclass
class Captions:
    """Token ids of each scene's caption and of its hard-negative captions."""

    ids: torch.Tensor
    mask: torch.Tensor
    negative_ids: torch.Tensor
    negative_mask: torch.Tensor


def tokenize_captions(processor: LlavaProcessor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = processor.tokenizer(captions, padding="longest", return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"].bool()


def scene_captions(processor: LlavaProcessor, scenes: list[world.Scene], rng: np.random.Generator, k: int) -> Captions:
    ids, mask = tokenize_captions(processor, [world.caption(s) for s in scenes])
    negatives = [c for s in scenes for _, c in world.negative_captions(s, rng, k)]
    return Captions(ids, mask, *tokenize_captions(processor, negatives))


# ---------------------------------------------------------------------------------------------
# Stage 1: contrastive pretraining of the vision tower


def contrastive_batch(recipe: Recipe, split: str, index: int) -> list[world.Scene]:
    """Groups of a scene and its near-duplicates; deterministic in (split, index)."""
    rng = world.scene_rng(split, recipe.seed, index, stream=2)
    scenes = []
    for _ in range(recipe.tower_groups):
        base = world.random_scene(rng)
        scenes.append(base)
        scenes.extend(world.vary_scene(base, rng) for _ in range(recipe.tower_group_size - 1))
    return scenes


def object_patch_masks(scene: world.Scene) -> dict[world.SceneObject, torch.Tensor]:
    """For each object, which of the 24x24 patches its bounding box touches (flattened, row-major)."""
    grid, patch = world.GRID, PATCH_SIZE
    masks = {}
    for obj in scene.objects:
        m = torch.zeros(grid, grid, dtype=torch.bool)
        rows = slice(obj.y // patch, (obj.y + obj.width - 1) // patch + 1)
        cols = slice(obj.x // patch, (obj.x + obj.width - 1) // patch + 1)
        m[rows, cols] = True
        masks[obj] = m.flatten()
    return masks


@torch.no_grad()
def evaluate_tower(
    tower: CLIPVisionModel,
    head: ContrastiveHead,
    object_head: ObjectHead,
    processor: LlavaProcessor,
    recipe: Recipe,
    n_images: int = 128,
) -> dict[str, float]:
    """How often a held-out image prefers its caption to a hard negative, where [CLS] looks, and how well
    ObjectHead reads each object's attributes from the features LLaVA uses."""
    was_training = tower.training
    tower.eval().set_attn_implementation("eager")  # attention maps for the check below
    scenes = world.make_scenes("val", n_images, recipe.seed)
    negative_rng = world.scene_rng("val", recipe.seed, 0, stream=4)
    wins: dict[str, list[bool]] = {}
    on_objects = object_area = small_found = small_total = 0.0
    readout: dict[str, list[bool]] = {}
    for start in range(0, n_images, 32):
        batch = scenes[start : start + 32]
        out = tower(
            pixel_values(processor, [world.render(s) for s in batch]), output_attentions=True, output_hidden_states=True
        )
        image_emb = F.normalize(head.image_proj(out.pooler_output), dim=-1)
        # [CLS] attention of the penultimate layer (the one LLaVA reads features from), mean over heads.
        cls_attention = out.attentions[-2][:, :, 0, 1:].mean(1)  # (images, 576)
        targets = object_targets(batch)
        for attribute, logits in object_head.logits(out.hidden_states[-2][:, 1:], targets.coverage).items():
            labels = targets.labels[attribute]
            readout.setdefault(attribute, []).extend((logits.argmax(-1) == labels)[labels >= 0].tolist())
        for scene, emb, attention in zip(batch, image_emb, cls_attention):
            negatives = world.negative_captions(scene, negative_rng, recipe.tower_negatives)
            ids, mask = tokenize_captions(processor, [world.caption(scene)] + [c for _, c in negatives])
            sims = F.normalize(head.caption_encoder(ids, mask), dim=-1) @ emb
            for (attribute, _), sim in zip(negatives, sims[1:]):
                wins.setdefault(attribute, []).append(bool(sims[0] > sim))
            masks = object_patch_masks(scene)
            any_object = torch.stack(list(masks.values())).any(0)
            on_objects += attention[any_object].sum().item() / attention.sum().item()
            object_area += any_object.float().mean().item()
            top = torch.zeros(NUM_IMAGE_TOKENS, dtype=torch.bool)
            top[attention.topk(NUM_IMAGE_TOKENS // 8).indices] = True
            for obj, m in masks.items():
                if obj.size == "small":
                    small_total += 1
                    small_found += bool((top & m).any())
    tower.train(was_training).set_attn_implementation("sdpa")
    metrics = {f"caption_beats_{a}_negative": float(np.mean(v)) for a, v in sorted(wins.items())}
    metrics.update({f"object_{a}_readout": float(np.mean(v)) for a, v in sorted(readout.items())})
    metrics.update(
        cls_attention_on_objects=on_objects / n_images,
        object_area=object_area / n_images,
        small_objects_in_cls_top_12pct=small_found / small_total,
    )
    return metrics


PATCH_ATTRIBUTES = {"color": tuple(world.COLORS), "shape": world.SHAPES, "size": world.SIZES}


class PatchHead(nn.Module):
    """Per patch of the penultimate layer (the features LLaVA reads): colour, shape and size of the object under it.

    Targets are 0 for the background and 1 + the attribute's index where an object covers >= 15 % of the patch; the
    few object patches weigh as much as the many background ones.
    """

    def __init__(self, vision_hidden: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(vision_hidden, 1 + len(v)) for k, v in PATCH_ATTRIBUTES.items()})

    def loss(self, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy averaged over object patches and over background patches separately, then summed."""
        # features: [images, 576, hidden]; targets: [images, 576] each
        on_object = targets["color"].flatten() > 0
        total = features.new_zeros((), dtype=torch.float32)
        for attribute, head in self.heads.items():
            losses = F.cross_entropy(head(features).flatten(0, 1).float(), targets[attribute].flatten(), reduction="none")
            total = total + losses[on_object].mean() + losses[~on_object].mean()
        return total / len(self.heads)


def patch_coverage(scene: world.Scene) -> np.ndarray:
    """[576, objects]: how many of each patch's pixels each object covers."""
    grid, patch = world.GRID, PATCH_SIZE
    patches = world.object_map(scene).reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    return np.stack([(patches == 1 + i).sum(1) for i in range(len(scene.objects))], axis=1)


def patch_targets(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """PatchHead's targets for a batch of scenes: {attribute: [images, 576]}."""
    targets = {k: torch.zeros(len(scenes), NUM_IMAGE_TOKENS, dtype=torch.long) for k in PATCH_ATTRIBUTES}
    for row, scene in enumerate(scenes):
        counts = patch_coverage(scene)
        covered = counts.max(1) >= 0.15 * PATCH_SIZE**2
        for patch in np.nonzero(covered)[0]:
            obj = scene.objects[int(counts[patch].argmax())]
            for attribute, values in PATCH_ATTRIBUTES.items():
                targets[attribute][row, patch] = 1 + values.index(getattr(obj, attribute))
    return targets


@dataclass
class ObjectTargets:
    """Each object's share of every patch (rows sum to 1; absent objects are all zero) and its attributes."""

    coverage: torch.Tensor  # [images, MAX_OBJECTS, 576]
    labels: dict[str, torch.Tensor]  # {attribute: [images, MAX_OBJECTS]}, -100 for absent objects


def object_targets(scenes: list[world.Scene]) -> ObjectTargets:
    """ObjectHead's targets for a batch of scenes."""
    coverage = torch.zeros(len(scenes), world.MAX_OBJECTS, NUM_IMAGE_TOKENS)
    labels = {k: torch.full((len(scenes), world.MAX_OBJECTS), -100) for k in PATCH_ATTRIBUTES}
    for row, scene in enumerate(scenes):
        counts = torch.from_numpy(patch_coverage(scene)).float().T  # [objects, 576]
        coverage[row, : len(counts)] = counts / counts.sum(1, keepdim=True)
        for i, obj in enumerate(scene.objects):
            for attribute, values in PATCH_ATTRIBUTES.items():
                labels[attribute][row, i] = values.index(getattr(obj, attribute))
    return ObjectTargets(coverage, labels)


class ObjectHead(nn.Module):
    """Per object: colour, shape and size from the mean of the penultimate-layer features over its patches.

    That mean is what a language-model token receives when it attends to one object, so this is the readout the
    question answering needs.
    """

    def __init__(self, vision_hidden: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(vision_hidden, len(v)) for k, v in PATCH_ATTRIBUTES.items()})

    def logits(self, features: torch.Tensor, coverage: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = coverage.to(features.dtype) @ features  # [images, MAX_OBJECTS, hidden]
        return {attribute: head(pooled) for attribute, head in self.heads.items()}

    def loss(self, features: torch.Tensor, targets: ObjectTargets) -> torch.Tensor:
        logits = self.logits(features, targets.coverage)
        losses = [F.cross_entropy(logits[k].flatten(0, 1).float(), targets.labels[k].flatten()) for k in self.heads]
        return sum(losses) / len(losses)


def train_tower(
    recipe: Recipe,
    processor: LlavaProcessor,
    tower: CLIPVisionModel,
    head: ContrastiveHead,
    patch_head: PatchHead,
    object_head: ObjectHead,
) -> None:
    torch.manual_seed(recipe.seed)
    params = (list(tower.parameters()) + list(patch_head.parameters()) + list(object_head.parameters())
              + [p for n, p in head.named_parameters() if n != "logit_scale"])
    optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.05}, {"params": [head.logit_scale], "weight_decay": 0.0}],
        lr=recipe.tower_lr, betas=(0.9, 0.98),
    )
    tower.train()
    progress = tqdm(range(recipe.tower_steps), desc="stage 1: vision tower (contrastive)", unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, recipe.tower_steps, recipe.tower_lr, warmup=max(1, recipe.tower_steps // 10))
        scenes = contrastive_batch(recipe, "train", step)
        pixels = pixel_values(processor, [world.render(s) for s in scenes])
        captions = scene_captions(processor, scenes, world.scene_rng("train", recipe.seed, step, stream=4),
                                  recipe.tower_negatives)
        with autocast(recipe):
            out = tower(pixels, output_hidden_states=True)
            contrastive = head.loss(out.pooler_output, captions)
            features = out.hidden_states[-2][:, 1:]
            dense = patch_head.loss(features, patch_targets(scenes))
            objects = object_head.loss(features, object_targets(scenes))
        loss = contrastive + recipe.tower_patch_weight * dense + recipe.tower_object_weight * objects
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        progress.set_postfix(
            contrastive=f"{contrastive.item():.3f}", patches=f"{dense.item():.3f}", objects=f"{objects.item():.3f}"
        )


# ---------------------------------------------------------------------------------------------
# Stage 2: the whole model on question answering (the tower at a lower learning rate)
