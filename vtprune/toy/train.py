"""Train the embedded toy LLaVA-1.5 model from scratch, as LLaVA is trained.

Stage 1 pretrains the CLIP vision tower contrastively on (image, caption) pairs, CLIP style, with
a small caption encoder of our own. Each batch is made of groups of near-duplicate scenes that
differ in one object (usually a small one), so the tower has to see every object, and its [CLS]
token learns to attend to the objects. Two auxiliary losses on the penultimate-layer features (the ones LLaVA feeds
its projector) teach the tower what the questions ask about: each patch's object (`PatchHead`) and each object's
colour, shape and size read from the mean of its patches (`ObjectHead`, kept at a low weight in stage 2).

Stage 2 trains the whole model on visual question answering, LLaVA's projector and the Llama language model at the
full learning rate and the tower at a fifth of it (as LLaVA-OneVision does), with the contrastive loss kept as an
auxiliary term so that [CLS] stays tied to the image. Each image comes with 16 questions packed as independent single
turns (see `QABuilder`); the loss is on the answer tokens only.

    python -m vtprune.toy.train            # about 80 minutes on 2 CPU cores; writes out/toy-model/ (--out, --force)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import CLIPVisionModel, LlavaForConditionalGeneration, LlavaProcessor

from vtprune.toy import world
from vtprune.toy.evaluate import score
from vtprune.toy.modeling import (
    IMAGE,
    MODEL_DIR,
    NUM_IMAGE_TOKENS,
    PATCH_SIZE,
    ModelSize,
    answer,
    build_config,
    build_processor,
    is_correct,
    prompt,
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


STARTED = time.time()


def autocast(recipe: Recipe):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pixel_values(processor: LlavaProcessor, images: list) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


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


class QABuilder:
    """Many single-turn LLaVA-1.5 questions about one image, packed into one sequence.

    The image prefix ("USER: <image>x576") comes once; each question-answer turn after it attends to the prefix and to
    itself only, with the positions it would have as the only turn, so every turn is exactly the single-turn prompt
    `prompt(question)` + " answer</s>" that the model answers at inference. (A plain multi-turn conversation would let
    later questions read earlier ones, which name the objects: "what shape is the red object?" after "is the red
    circle on the left?".) Loss on the answers (and </s>) only.
    """

    def __init__(self, processor: LlavaProcessor):
        self.tokenizer = processor.tokenizer
        self.cache: dict[str, list[int]] = {}
        question_part = prompt("{question}")
        prefix, suffix = question_part.split("{question}")
        self.prefix = self.ids(prefix.replace(IMAGE, IMAGE * NUM_IMAGE_TOKENS))
        self.question_suffix = suffix

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]

    def build(self, qas: list[world.QA]) -> tuple[list[int], list[int], list[int], list[int]]:
        """(token ids, labels, position ids, segment: 0 for the prefix, t + 1 for turn t)."""
        input_ids, labels = list(self.prefix), [-100] * len(self.prefix)
        positions, segments = list(range(len(self.prefix))), [0] * len(self.prefix)
        for turn, qa in enumerate(qas):
            question_ids = self.ids(qa.question + self.question_suffix)
            answer_ids = self.ids(f" {qa.answer}{self.tokenizer.eos_token}")
            input_ids += question_ids + answer_ids
            labels += [-100] * len(question_ids) + answer_ids
            positions += range(len(self.prefix), len(self.prefix) + len(question_ids) + len(answer_ids))
            segments += [turn + 1] * (len(question_ids) + len(answer_ids))
        return input_ids, labels, positions, segments


def qa_batch(builder: QABuilder, conversations: list[list[world.QA]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels and positions, and the boolean attention mask [batch, 1, length, length]."""
    rows = [builder.build(c) for c in conversations]
    length = max(len(ids) for ids, *_ in rows)
    input_ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), -100)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    segments = torch.full((len(rows), length), -1)  # padding: a segment of its own
    for row, (ids, lab, pos, seg) in enumerate(rows):
        for tensor, values in ((input_ids, ids), (labels, lab), (positions, pos), (segments, seg)):
            tensor[row, : len(values)] = torch.tensor(values)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_turn = segments[:, :, None] == segments[:, None, :]  # [batch, query, key]
    mask = causal & (same_turn | (segments[:, None, :] == 0))
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}


def evaluate_qa(model, processor, items: list[world.VQAItem], batch: int = 32) -> dict[str, float]:
    """Greedy answers in eval mode, scored per group (`vtprune.toy.evaluate.score`), rounded to 3 digits."""
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        predictions += answer(model, processor, [i.image for i in chunk], [i.question for i in chunk])
    model.train(was_training)
    return {group: round(share, 3) for group, share in score(items, predictions).items()}


def train_qa(
    recipe: Recipe,
    processor: LlavaProcessor,
    model: LlavaForConditionalGeneration,
    head: ContrastiveHead,
    object_head: ObjectHead,
) -> dict[str, float]:
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng([recipe.seed, 7])
    scenes = world.make_scenes("train", recipe.qa_scenes, recipe.seed)
    # Curriculum: the first steps see only easy scenes (1-2 objects), where even evenly spread
    # attention carries the answer, so the model learns to read visual features before it must
    # pick one object among 576 tokens. Later steps draw from all scenes.
    easy_rng = world.scene_rng("train", recipe.seed, 0, stream=3)
    scenes += [world.random_scene(easy_rng, 1, 2, require_small=False) for _ in range(recipe.qa_easy_scenes)]
    questions = [world.all_questions(s, world.scene_rng("train", recipe.seed, i, stream=1)) for i, s in enumerate(scenes)]
    easy = np.arange(recipe.qa_scenes, len(scenes))
    val_items = world.make_dataset("val", recipe.val_items, recipe.seed)

    tower = model.model.vision_tower
    tower_params = (list(tower.parameters()) + list(object_head.parameters())
                    + [p for n, p in head.named_parameters() if n != "logit_scale"])
    tower_ids = {id(p) for p in tower_params}
    language = [p for p in model.parameters() if id(p) not in tower_ids]
    tower_lr = recipe.qa_lr * recipe.qa_tower_lr_scale
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in language if p.ndim >= 2], "weight_decay": 0.01, "peak": recipe.qa_lr},
            {"params": [p for p in language if p.ndim < 2], "weight_decay": 0.0, "peak": recipe.qa_lr},
            {"params": tower_params, "weight_decay": 0.05, "peak": tower_lr},
            {"params": [head.logit_scale], "weight_decay": 0.0, "peak": tower_lr},
        ],
        lr=recipe.qa_lr, betas=(0.9, 0.98),
    )
    builder = QABuilder(processor)
    image_token_id = model.config.image_token_id
    pad_id = processor.tokenizer.pad_token_id
    feature_layer = model.config.vision_feature_layer
    order = np.array([], dtype=int)
    model.train()
    progress = tqdm(range(recipe.qa_steps), desc="stage 2: whole model (question answering)", unit="step")
    running = None
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, recipe.qa_steps, group["peak"], warmup=max(1, recipe.qa_steps // 20))
        if step < recipe.qa_easy_steps:
            picked = rng.choice(easy, recipe.qa_batch, replace=False)
        else:
            if len(order) < recipe.qa_batch:
                order = np.concatenate([order, rng.permutation(len(scenes))])
            picked, order = order[: recipe.qa_batch], order[recipe.qa_batch :]
        conversations = []
        for i in picked:
            turns = rng.permutation(len(questions[i]))[: recipe.qa_turns]
            conversations.append([questions[i][t] for t in turns])
        batch = qa_batch(builder, conversations, pad_id)
        input_ids = batch.pop("input_ids")
        batch_scenes = [scenes[i] for i in picked]
        pixels = pixel_values(processor, [world.render(s) for s in batch_scenes])
        captions = scene_captions(processor, batch_scenes, rng, recipe.tower_negatives)
        with autocast(recipe):
            tower_out = tower(pixels, output_hidden_states=True)
            # LLaVA's feature selection: penultimate layer, [CLS] dropped.
            features = tower_out.hidden_states[feature_layer][:, 1:]
            image_embeds = model.model.multi_modal_projector(features)
            embeds = model.get_input_embeddings()(input_ids)
            image_mask = (input_ids == image_token_id)[..., None]
            embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
            qa_loss = model(inputs_embeds=embeds, **batch).loss
            # Keeps [CLS] (unused by the language model) tied to the image content, as stage 1 trained it.
            contrastive = head.loss(tower_out.pooler_output, captions)
            objects = object_head.loss(features, object_targets(batch_scenes))
        loss = qa_loss + recipe.qa_contrastive_weight * contrastive + recipe.qa_object_weight * objects
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(language, 1.0)
        torch.nn.utils.clip_grad_norm_(tower_params, 1.0)
        optimizer.step()
        running = qa_loss.item() if running is None else 0.98 * running + 0.02 * qa_loss.item()
        progress.set_postfix(qa_loss=f"{running:.3f}", clip=f"{contrastive.item():.2f}")
        if (step + 1) % recipe.eval_every == 0 and step + 1 < recipe.qa_steps:
            accuracy = evaluate_qa(model, processor, val_items[:100])
            tqdm.write(f"step {step + 1} ({(time.time() - STARTED) / 60:.1f} min): val accuracy {accuracy}")
    model.eval()
    return evaluate_qa(model, processor, val_items)


# ---------------------------------------------------------------------------------------------


def save_example(model, processor, out_dir: Path, seed: int, accuracy: dict[str, float]) -> dict:
    """Ship the first small-object test question (beyond the benchmark's seed) that the model gets right, of the
    single-object question type it answers best on validation (`accuracy`), so that the right answer is no luck."""
    qtype = max(("color", "shape", "position"), key=lambda t: accuracy.get(t, 0.0))
    items = world.make_dataset("test", 64, seed=seed)
    candidates = [i for i in items if i.target_size == "small" and i.qtype == qtype]
    predictions = answer(model, processor, [i.image for i in candidates], [i.question for i in candidates])
    for item, prediction in zip(candidates, predictions):
        if is_correct(prediction, item.answer):
            out_dir.mkdir(parents=True, exist_ok=True)
            item.image.save(out_dir / "small_object.png")
            record = {
                "image": "small_object.png",
                "question": item.question,
                "answer": item.answer,
                "qtype": item.qtype,
                "target_size": item.target_size,
                "source": f"vtprune.toy.make_dataset('test', 64, seed={seed}) item {item.index}",
            }
            (out_dir / "small_object.json").write_text(json.dumps(record, indent=2) + "\n")
            return record
    raise RuntimeError("the model answered none of the small-object candidates correctly")


def directory_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


@torch.no_grad()
def reinitialize(modules: list[nn.Module], std: float) -> None:
    """Normal(0, std) linear and embedding weights, zero biases (transformers' init with another scale)."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Embedding)):
                layer.weight.normal_(0.0, std)
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                layer.bias.zero_()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/toy-model"),
                        help=f"new folder for the model and processor (default: %(default)s; the shipped model is {MODEL_DIR})")
    parser.add_argument("--examples", type=Path, help="where to save the example (default: OUT/examples)")
    parser.add_argument("--force", action="store_true", help="replace --out / --examples if they exist and are not empty")
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--save-stage1", type=Path, help="also save the stage-1 tower and head here")
    parser.add_argument("--load-stage1", type=Path, help="skip stage 1 and start from a saved one")
    args = parser.parse_args(argv)
    args.examples = args.examples or args.out / "examples"
    for folder in (args.out, args.examples):  # before hours of training, not after
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not args.force:
            parser.exit(2, f"{parser.prog}: {folder} exists and is not empty; choose another --out / --examples, "
                           "or add --force to replace it\n")
    recipe = Recipe(**{k: v for k, v in vars(args).items() if hasattr(defaults, k)})

    global STARTED
    STARTED = time.time()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    processor = build_processor()
    model = LlavaForConditionalGeneration(build_config(processor.tokenizer, recipe.size))
    model.set_attn_implementation("sdpa")
    reinitialize([model.model.language_model, model.lm_head, model.model.multi_modal_projector], recipe.init_std)
    tower = model.model.vision_tower
    head = ContrastiveHead(tower.config.hidden_size, len(processor.tokenizer), recipe.caption_dim)
    object_head = ObjectHead(tower.config.hidden_size)
    report: dict = {"recipe": asdict(recipe)}

    if args.load_stage1:
        stage1 = torch.load(args.load_stage1 / "stage1.pt")
        tower.load_state_dict(stage1["tower"])
        head.load_state_dict(stage1["head"])
        object_head.load_state_dict(stage1["object_head"])
        report["stage1_loaded_from"] = str(args.load_stage1)
    else:
        train_tower(recipe, processor, tower, head, PatchHead(tower.config.hidden_size), object_head)
        if args.save_stage1:
            args.save_stage1.mkdir(parents=True, exist_ok=True)
            stage1 = {"tower": tower.state_dict(), "head": head.state_dict(), "object_head": object_head.state_dict()}
            torch.save(stage1, args.save_stage1 / "stage1.pt")
    report["tower_after_stage1"] = evaluate_tower(tower, head, object_head, processor, recipe)
    print(f"stage 1 done in {(time.time() - STARTED) / 60:.1f} min: {report['tower_after_stage1']}", flush=True)

    report["val_accuracy"] = train_qa(recipe, processor, model, head, object_head)
    report["tower_after_stage2"] = evaluate_tower(tower, head, object_head, processor, recipe)
    print(f"stage 2 done in {(time.time() - STARTED) / 60:.1f} min; val accuracy {report['val_accuracy']}", flush=True)

    if args.out.exists() and args.force:  # checked at the start: without --force it is new or empty
        shutil.rmtree(args.out)
    model.to(torch.float16).save_pretrained(args.out)
    processor.save_pretrained(args.out)
    # From here on, use the model as users get it: float16 weights loaded back as float32.
    model = LlavaForConditionalGeneration.from_pretrained(
        args.out, dtype=torch.float32, local_files_only=True, attn_implementation="sdpa"
    ).eval()
    val_items = world.make_dataset("val", recipe.val_items, recipe.seed)
    report["val_accuracy_after_reload"] = evaluate_qa(model, processor, val_items)
    report["example"] = save_example(
        model, processor, args.examples, seed=recipe.seed + 1, accuracy=report["val_accuracy_after_reload"]
    )
    report["train_minutes"] = round((time.time() - STARTED) / 60, 1)
    report["model_mb"] = round(directory_size_mb(args.out), 1)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "recipe"}, indent=2))


if __name__ == "__main__":
    main()
