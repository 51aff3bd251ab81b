"""Hand-made references for one sample of a padded batch, on the tiny LLaVA and Qwen2-VL: the language model run layer
by layer on the sequence compacted by hand (kept ordinals read from the session's trace, merges written as weighted
sums), at the positions each kind of cut promises: "renumber" before the LLM (contiguous on LLaVA, the documented
M-RoPE rule of `test_qwen2_vl.hand_positions` on Qwen), "original" inside it (the dense model's own positions).

No cache: every step re-runs the whole sequence (prompt and the tokens generated so far), so decoding needs no cache
bookkeeping, and gradients flow to the pixels and every parameter. Greedy and beam search drivers on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tests.adapters.qwen_builders import IMAGE as QWEN_IMAGE
from tests.adapters.test_qwen2_vl import hand_positions
from tests.helpers import IMAGE_TOKEN
from tests.methods.pre_llm_reference import image_embeddings
from tests.methods.references import qwen_input_embeddings


def is_qwen(model) -> bool:
    return hasattr(model.model, "visual")


def image_id(model) -> int:
    return QWEN_IMAGE if is_qwen(model) else IMAGE_TOKEN


def input_embeddings(model, batch) -> Tensor:
    """[B, L, D] the dense model's language-model input (differentiable w.r.t. the pixels and the parameters)."""
    return qwen_input_embeddings(model, batch) if is_qwen(model) else image_embeddings(model, batch)


def dense_positions(model, batch) -> Tensor:
    """[P, B, L] the positions the dense model gives its prompt: LLaVA 1-D over the real tokens (P = 1), Qwen M-RoPE
    (P = 3, read from the dense model's own call of its language model)."""
    mask = batch["attention_mask"]
    if not is_qwen(model):
        return ((mask.cumsum(1) - 1).clamp(min=0) * mask)[None]
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    positions = seen[0]
    return positions[-3:]  # [3, B, L] (a leading text-position row, where present, is dropped)


def site_of(trace, forward: int, row: int):
    """The last cut of sample `row` in prefill `forward` (the methods here cut once)."""
    return [s for s in trace.forwards[forward].sites if s.sample == row][-1]


def qwen_renumbered(batch, trace, forward: int, rows: list[int]):
    """Per sample of `batch`: ([3, m] positions, kept real-token indices, next position) by the documented "renumber"
    rule; `rows[b]`: the row of the traced forward that holds sample b (generate() repeats rows for beams)."""
    record = trace.forwards[forward]
    kept, grids, image = {}, {}, 0
    for row in rows:
        site = site_of(trace, forward, row)
        for span, sl in record.layout.ordinal_slices(row):
            inside = site.kept[(site.kept >= sl.start) & (site.kept < sl.stop)] - sl.start
            kept[image], grids[image] = span.patch_index[inside].tolist(), span.grid
            image += 1
    return hand_positions(batch, kept, grids)


@dataclass
class Sample:
    """Sample b of a batch, its real tokens only: n tokens before the cut, the m rows kept."""

    embeds: Tensor  # [n, D] the language model's input (with merges written in for a pre-LLM cut)
    positions: Tensor  # [P, n] dense positions
    rows: Tensor  # [m] kept token indices (ascending but where the plan reorders visual tokens)
    short_positions: Tensor  # [P, m] positions after the cut
    next_full: Tensor  # [P] position of the first generated token before the cut
    next_short: Tensor  # [P] ... and after it
    cut: int  # decoder layer the cut sits before (0: the LLM input)


def sample(model, batch, b, embeds, positions, kept, cut, renumbered=None) -> Sample:
    """`kept`: the sample's kept visual ordinals in sequence order; `renumbered`: for a pre-LLM cut on Qwen, the entry of
    `qwen_renumbered` for this sample (LLaVA renumbers contiguously)."""
    real = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b][real]
    image = (ids == image_id(model)).nonzero().squeeze(1)
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[image] = False
    keep[image[torch.as_tensor(kept, dtype=torch.long)]] = True
    rows = keep.nonzero().squeeze(1)
    rows[torch.isin(rows, image)] = image[torch.as_tensor(kept, dtype=torch.long)]  # in the traced (sequence) order
    full = positions[:, b][:, real]
    next_full = full.max(dim=1).values + 1 if is_qwen(model) else torch.tensor([ids.shape[0]])
    if cut > 0:  # "original": the kept tokens keep their positions, decoding continues at the unpruned length
        short, next_short = full[:, rows], next_full
    elif renumbered is not None:
        short, kept_ids, cursor = renumbered
        assert kept_ids == rows.tolist()
        next_short = torch.tensor([cursor] * 3)
    else:
        short, next_short = torch.arange(rows.numel())[None], torch.tensor([rows.numel()])
    return Sample(embeds[b][real], full, rows, short, next_full, next_short, cut)


def write_merges(model, batch, b, embeds, merged, features=None) -> Tensor:
    """embeds [B, L, D] with sample b's merged tokens written into their slots: sum(weights * embeds[sources]) for
    sequence-space merges; for encoder-space merges projector(sum(weights * features[image, encoder_tokens])), with
    features [images, T, D_vision] the projector's input (its [CLS] at 0)."""
    image = (batch["input_ids"][b] == image_id(model)).nonzero().squeeze(1)
    first_image = int((batch["input_ids"][:b] == image_id(model)).sum()) // 16
    out = embeds.clone()
    for merge in merged:
        slot = int(image[merge["slot"]])
        weights = torch.tensor(merge["weights"], dtype=torch.float32)
        if merge["space"] == "encoder":
            which = first_image + merge["slot"] // 16
            rows = features[which, torch.tensor(merge["encoder_tokens"])]
            out[b, slot] = model.model.multi_modal_projector((weights[:, None] * rows).sum(0))
        else:
            out[b, slot] = (weights[:, None] * embeds[b, image[torch.tensor(merge["sources"])]]).sum(0)
    return out


def run(model, s: Sample, new_tokens: list[int]) -> Tensor:
    """[m + t, V] logits of the kept prompt tokens and the t tokens given after it (causal, batch 1, no cache)."""
    lm = model.get_decoder()  # the language model (Idefics3 names it text_model)
    t, n = len(new_tokens), s.embeds.shape[0]
    steps = torch.arange(t)
    new = model.model.get_input_embeddings()(torch.tensor(new_tokens, dtype=torch.long)).reshape(t, s.embeds.shape[-1])
    x = torch.cat([s.embeds, new])[None]
    full_positions = torch.cat([s.positions, s.next_full[:, None] + steps], dim=1)
    short_positions = torch.cat([s.short_positions, s.next_short[:, None] + steps], dim=1)
    short_rows = torch.cat([s.rows, n + steps])
    if s.cut == 0:
        x = x[:, short_rows]
    for index, layer in enumerate(lm.layers):
        if index == s.cut and s.cut > 0:
            x = x[:, short_rows]
        positions = (full_positions if index < s.cut else short_positions)[:, None]  # [P, 1, L]
        positions = positions[0] if positions.shape[0] == 1 else positions
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()[None, None]
        x = layer(x, attention_mask=causal, position_embeddings=lm.rotary_emb(x, positions))
    return model.lm_head(lm.norm(x))[0]


def greedy(model, s: Sample, steps: int) -> list[int]:
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(run(model, s, tokens)[-1].argmax()))
    return tokens


def beam_search(model, s: Sample, steps: int, beams: int, suppress: tuple[int, ...] = ()) -> list[int]:
    """Beam search as transformers runs it when no beam finishes early (the `suppress`ed ids, e.g. EOS, never come):
    per step the `beams` best continuations by summed log-probability; the best beam at the end."""
    hypotheses: list[tuple[float, list[int]]] = [(0.0, [])]
    with torch.no_grad():
        for _ in range(steps):
            candidates = []
            for score, tokens in hypotheses:
                logprobs = torch.log_softmax(run(model, s, tokens)[-1].float(), dim=-1)
                logprobs[list(suppress)] = -float("inf")
                top = logprobs.topk(beams)
                candidates += [(score + float(v), tokens + [int(i)]) for v, i in zip(top.values, top.indices)]
            hypotheses = sorted(candidates, key=lambda c: -c[0])[:beams]
    return hypotheses[0][1]
