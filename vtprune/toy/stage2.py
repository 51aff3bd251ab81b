"""Stage 2 of the toy training: the whole model on visual question answering, 16 questions per image packed as
independent single turns (see `vtprune.toy.train`)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vtprune.toy import world
from vtprune.toy.evaluate import score
from vtprune.toy.modeling import (
    IMAGE,
    NUM_IMAGE_TOKENS,
    answer,
    prompt,
)
from vtprune.toy.recipe import Recipe, autocast, cosine_lr, minutes, pixel_values
from vtprune.toy.stage1 import (
    ContrastiveHead,
    ObjectHead,
    object_targets,
    scene_captions,
)


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
            tqdm.write(f"step {step + 1} ({minutes():.1f} min): val accuracy {accuracy}")
    model.eval()
    return evaluate_qa(model, processor, val_items)


# ---------------------------------------------------------------------------------------------
