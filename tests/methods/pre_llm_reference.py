"""Hand-made references for pre-LLM cuts on the tiny LLaVA: the language model run on a sequence compacted by hand.

`visual[b][i]` lists, for image i of sample b, the visual ordinals (of the sample) whose embeddings the language model
sees, in that order; -1 stands for a zero vector (HoloV's padding). Text tokens stay; padding is re-added on the left;
positions are contiguous over the real tokens (the renumbering of the official LLaVA code); greedy decoding.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tests.helpers import GRID, IMAGE_TOKEN

PER_IMAGE = GRID * GRID


def image_embeddings(model, batch):
    """[B, L, D] the language model's input embeddings with the projected image features in place (dense)."""
    inner = model.model
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    features = torch.cat(list(inner.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
    return embeds.masked_scatter((batch["input_ids"] == IMAGE_TOKEN)[..., None], features)


def compacted_sequences(batch, embeds, visual):
    """Per sample the [n, D] real-token embeddings after the hand compaction."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        ids, mask = batch["input_ids"][b], batch["attention_mask"][b].bool()
        image_positions = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
        rows, position, image = [], 0, 0
        while position < ids.shape[0]:
            if not mask[position]:
                position += 1
            elif ids[position] != IMAGE_TOKEN:
                rows.append(embeds[b, position])
                position += 1
            else:
                for ordinal in visual[b][image]:
                    rows.append(torch.zeros_like(embeds[b, 0]) if ordinal < 0 else embeds[b, image_positions[ordinal]])
                position, image = position + PER_IMAGE, image + 1
        out.append(torch.stack(rows))
    return out


def generate_compacted(model, batch, visual, steps, embeds=None):
    """Greedy decoding of the language model on the hand-compacted, left-padded batch: (tokens [B, steps], logits
    [B, steps, V]). `embeds`: the [B, L, D] input embeddings to compact (None: the dense ones, `image_embeddings`)."""
    with torch.no_grad():
        sequences = compacted_sequences(batch, image_embeddings(model, batch) if embeds is None else embeds, visual)
        batch_size, length = len(sequences), max(len(s) for s in sequences)
        x = torch.zeros(batch_size, length, sequences[0].shape[-1])
        mask = torch.zeros(batch_size, length, dtype=torch.long)
        positions = torch.zeros(batch_size, length, dtype=torch.long)
        for b, rows in enumerate(sequences):
            x[b, length - len(rows) :] = rows
            mask[b, length - len(rows) :] = 1
            positions[b, length - len(rows) :] = torch.arange(len(rows))
        lm, head = model.model.language_model, model.lm_head
        cache = DynamicCache(config=lm.config)
        out = lm(inputs_embeds=x, attention_mask=mask, position_ids=positions, cache=cache)
        logits = [head(out.last_hidden_state[:, -1])]
        next_position = positions[:, -1] + 1
        for _ in range(steps - 1):
            token = logits[-1].argmax(-1)
            mask = torch.cat([mask, torch.ones(batch_size, 1, dtype=torch.long)], dim=1)
            out = lm(inputs_embeds=model.model.get_input_embeddings()(token[:, None]), attention_mask=mask,
                     position_ids=next_position[:, None], cache=cache)
            logits.append(head(out.last_hidden_state[:, -1]))
            next_position = next_position + 1
        logits = torch.stack(logits, dim=1)
    return logits.argmax(-1), logits


def generate_with(model, batch, method, steps):
    """vtprune's generate(): (new tokens [B, steps], logits [B, steps, V], trace)."""
    with torch.no_grad(), method(model) as trace:
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, -steps:], torch.stack(out.logits, dim=1), trace


def dense_equals_keep_all(model, batch, method, steps=4):
    """Prefill logits (real tokens) and every decoding step of `method` equal the dense model's."""
    with torch.no_grad():
        dense_logits = model(**batch).logits
        dense = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        with method(model) as trace:
            logits = model(**batch).logits
            out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], dense_logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(dense.logits, 1), atol=1e-5, rtol=0)
    assert torch.equal(out.sequences, dense.sequences)
    return trace
