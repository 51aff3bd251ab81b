"""Hand-made references for the method tests: the language model run by hand on the hand-compacted sequence of a
padded batch of 2, then decoded greedily, with the positions each kind of cut promises."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tests.adapters.test_llava import compact, greedy, image_embeddings
from tests.adapters.test_qwen2_vl import hand_positions, kept_patches_of
from tests.adapters.qwen_builders import IMAGE


def layer_mask(pad_mask, query_len):
    """Boolean [B, 1, q, kv] mask: causal (lower right) and padding."""
    kv = pad_mask.shape[1]
    causal = torch.ones(query_len, kv, dtype=torch.bool).tril(kv - query_len)
    return causal[None, None] & pad_mask.bool()[:, None, None, :]


def llava_pre_llm_reference(model, batch, kept, steps):
    """Greedy tokens [2, steps] of the tiny LLaVA when the kept image tokens (per sample, visual ordinals) go to the
    language model with contiguous positions (a pre_llm cut, "renumber")."""
    embeds = image_embeddings(model, batch)
    rows, length = compact(batch, embeds, kept)
    x = torch.zeros(2, length, embeds.shape[-1])
    mask = torch.zeros(2, length, dtype=torch.long)
    positions = torch.zeros(2, length, dtype=torch.long)
    for b, keep in enumerate(rows):
        x[b, length - len(keep) :] = embeds[b, keep]
        valid = batch["attention_mask"][b, keep]
        mask[b, length - len(keep) :] = valid
        positions[b, length - len(keep) :] = (valid.cumsum(0) - 1).clamp(min=0) * valid
    lm, head = model.model.language_model, model.lm_head
    cache = DynamicCache(config=lm.config)
    first = head(lm(inputs_embeds=x, attention_mask=mask, position_ids=positions, cache=cache).last_hidden_state[:, -1])
    last_position = positions[:, -1]

    def step(token, t):
        nonlocal mask
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        out = lm(
            inputs_embeds=model.model.get_input_embeddings()(token[:, None]),
            attention_mask=mask,
            position_ids=(last_position + t)[:, None],
            cache=cache,
        )
        return head(out.last_hidden_state[:, -1])

    return greedy(step, first, steps)


def llava_layer_cut_reference(model, batch, kept, cut, steps):
    """Greedy tokens [2, steps] of the tiny LLaVA when layers < cut see every token and layers >= cut only the kept
    ones, at their original positions (an llm_layer cut, "original"); decoding continues at the unpruned length."""
    embeds = image_embeddings(model, batch)
    lm, head = model.model.language_model, model.lm_head
    full_mask = batch["attention_mask"].clone()
    full_positions = (full_mask.cumsum(1) - 1).clamp(min=0) * full_mask
    rows, length = compact(batch, embeds, kept)
    short_mask = torch.zeros(2, length, dtype=torch.long)
    short_positions = torch.zeros(2, length, dtype=torch.long)
    for b, keep in enumerate(rows):
        short_mask[b, length - len(keep) :] = full_mask[b, keep]
        short_positions[b, length - len(keep) :] = full_positions[b, keep]
    cache = DynamicCache(config=lm.config)

    def run(x, masks, positions, layers):
        for index in layers:
            which = 0 if index < cut else 1
            x = lm.layers[index](
                x,
                attention_mask=layer_mask(masks[which], x.shape[1]),
                position_embeddings=lm.rotary_emb(x, positions[which]),
                cache=cache,
            )
        return x

    x = run(embeds, [full_mask], [full_positions], range(cut))
    short = torch.zeros(2, length, x.shape[-1])
    for b, keep in enumerate(rows):
        short[b, length - len(keep) :] = x[b, keep]
    x = run(short, [full_mask, short_mask], [full_positions, short_positions], range(cut, len(lm.layers)))
    first = head(lm.norm(x)[:, -1])
    masks = [full_mask, short_mask]
    next_position = full_positions[:, -1]

    def step(token, t):
        for i in range(2):
            masks[i] = torch.cat([masks[i], torch.ones(2, 1, dtype=torch.long)], dim=1)
        position = (next_position + t)[:, None]
        x = model.model.get_input_embeddings()(token[:, None])
        return head(lm.norm(run(x, masks, [position, position], range(len(lm.layers))))[:, -1])

    return greedy(step, first, steps)


def qwen_input_embeddings(model, batch):
    """[B, L, D] the language model's input: token embeddings with the merger's outputs at the image tokens."""
    inner = model.model
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    features = torch.cat(inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
    return embeds.masked_scatter((batch["input_ids"] == IMAGE)[..., None], features)


def qwen_pre_llm_reference(model, batch, trace, steps):
    """Greedy tokens [2, steps] of a tiny Qwen2(.5)-VL when the trace's kept image tokens go to the language model at
    the documented "renumber" M-RoPE positions (built token by token by `hand_positions`)."""
    kept, grids = kept_patches_of(trace)
    inner, lm = model.model, model.model.language_model
    embeds = qwen_input_embeddings(model, batch)
    expected = hand_positions(batch, kept, grids)
    length = max(len(ids) for _, ids, _ in expected)
    x = torch.zeros(2, length, embeds.shape[-1])
    mask = torch.zeros(2, length, dtype=torch.long)
    positions = torch.zeros(3, 2, length, dtype=torch.long)
    for b, (rows, ids, _) in enumerate(expected):
        real = embeds[b][batch["attention_mask"][b].bool()]
        x[b, length - len(ids) :] = real[ids]
        mask[b, length - len(ids) :] = 1
        positions[:, b, length - len(ids) :] = rows
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=x, attention_mask=mask, position_ids=positions, cache=cache)
    tokens = [model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)]
    cursor = torch.tensor([c for _, _, c in expected])
    for t in range(1, steps):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step_positions = (cursor + t - 1).view(1, 2, 1).expand(3, 2, 1)
        out = lm(inputs_embeds=inner.get_input_embeddings()(tokens[-1][:, None]), attention_mask=mask,
                 position_ids=step_positions, cache=cache)
        tokens.append(model.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
    return torch.stack(tokens, dim=1)
