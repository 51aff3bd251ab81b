"""A real budget against hand-made references, greedy and beam search (num_beams=2), on the tiny LLaVA and Qwen2-VL:
a cut before the LLM (random keep=3, renumbered positions) and one inside it (FastV keep=3 before layer 1, original
positions). The reference is the language model run by hand on the hand-compacted sequence of each sample
(`hand_reference.py`, no cache, every step re-run). EOS is suppressed on both sides so that no beam ends early.
Assisted decoding (a dense copy of the model as assistant, batch 1) at a real budget equals greedy at that budget, for
a cut whose choice does not depend on the query (random) and for FastV, whose query is the prompt's last token: the
assisted prefill also holds the assistant's first candidates, which the cut's signals must not see."""

from __future__ import annotations

import copy

import pytest
import torch

import vtprune
from tests.adapters.hand_reference import (
    beam_search,
    dense_positions,
    input_embeddings,
    is_qwen,
    qwen_renumbered,
    sample,
    site_of,
)
from tests.adapters.qwen_builders import (
    build_qwen_processor,
    build_tiny_qwen,
    two_screenshot_batch,
)
from tests.helpers import build_tiny_llava, padded_batch

METHODS = {"random": (dict(keep=3, seed=4), 0), "fastv": (dict(keep=3, layer=1), 1)}  # options, cut layer
STEPS = 4


@pytest.fixture(scope="module", params=["llava", "qwen2-vl"])
def family(request):
    if request.param == "llava":
        return build_tiny_llava(seed=0), padded_batch()
    return build_tiny_qwen("qwen2-vl"), two_screenshot_batch(build_qwen_processor("qwen2-vl"))


def eos_of(model):
    eos = model.generation_config.eos_token_id
    return tuple(e for e in (eos if isinstance(eos, (list, tuple)) else (eos,)) if e is not None)


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beam"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_generate_at_a_real_budget_equals_the_hand_made_reference(family, name, beams):
    model, batch = family
    options, cut = METHODS[name]
    eos = eos_of(model)
    with torch.no_grad():
        with vtprune.make(name, **options)(model) as trace:
            pruned = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, num_beams=beams,
                                    suppress_tokens=list(eos) or None, pad_token_id=0)[:, -STEPS:]
        rows = [beams * b for b in range(2)]  # generate() repeats each sample for its beams
        for b in range(2):  # every beam of a sample sees the same kept tokens
            kept = [site_of(trace, 0, beams * b + k).kept.tolist() for k in range(beams)]
            assert all(k == kept[0] for k in kept)
        assert all(after < before for before, after in trace.visual_tokens(0))  # a real budget
        embeds = input_embeddings(model, batch)
        positions = dense_positions(model, batch)
        renumbered = qwen_renumbered(batch, trace, 0, rows) if is_qwen(model) and cut == 0 else [None, None]
        expected = []
        for b in range(2):
            s = sample(model, batch, b, embeds, positions, site_of(trace, 0, rows[b]).kept, cut, renumbered[b])
            expected.append(beam_search(model, s, STEPS, beams, suppress=eos))
        dense = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, num_beams=beams,
                               suppress_tokens=list(eos) or None, pad_token_id=0)[:, -STEPS:]
    assert pruned.tolist() == expected
    assert pruned.tolist() != dense.tolist() or name == "fastv"  # the budget matters (FastV may agree with dense)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_assisted_decoding_at_a_real_budget_equals_greedy(family, name):
    model, batch = family
    options, _ = METHODS[name]
    single = {"input_ids": batch["input_ids"][1:], "attention_mask": batch["attention_mask"][1:]}
    if is_qwen(model):
        grids = batch["image_grid_thw"]
        first = int(grids[:2].prod(-1).sum())  # patches of sample 0's two screenshots
        single |= {"pixel_values": batch["pixel_values"][first:], "image_grid_thw": grids[2:]}
    else:
        single["pixel_values"] = batch["pixel_values"][1:]
    options_generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), vtprune.make(name, **options)(model) as trace:
        greedy = model.generate(**single, **options_generate)
        assisted = model.generate(**single, **options_generate, assistant_model=copy.deepcopy(model))
    assert torch.equal(assisted, greedy)
    kept = [site.kept.tolist() for forward in trace.forwards for site in forward.sites]
    assert len(kept) >= 2 and all(k == kept[0] for k in kept)  # the assisted prefill cut the same tokens
    assert all(after < before for before, after in trace.visual_tokens(0))
