"""A real budget against hand-made references, greedy and beam search (num_beams=2), on the tiny LLaVA and Qwen2-VL:
a cut before the LLM (random keep=3, renumbered positions) and one inside it (FastV keep=3 before layer 1, original
positions). The reference is the language model run by hand on the hand-compacted sequence of each sample
(`hand_reference.py`, no cache, every step re-run). EOS is suppressed on both sides so that no beam ends early.
Assisted decoding (batch 1) at a real budget equals greedy at that budget, for a cut whose choice does not depend on
the query (random), for FastV, whose query is the prompt's last token, and for gui-kv (kv_cache site: its window of
last prompt tokens): the assisted prefill also holds the assistant's first candidates, which the signals must not see,
and which must attend the compressed cache as greedy's decode steps do. The assistant is a copy of the model (most
candidates accepted) or another model (most rejected, so generate() crops the cache into the prefill's candidates)."""

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


ASSISTED = METHODS | {"gui-kv": (dict(keep=0.5, window=2), None)}  # gui-kv: the kv_cache site


def assistant_for(model, kind):
    """A copy of the pruned model (its candidates mostly accepted), or a differently seeded dense model of the same
    family (most candidates rejected: generate() crops them, also those the prefill call verified)."""
    if kind == "copy":
        return copy.deepcopy(model)
    return build_tiny_qwen("qwen2-vl", seed=7) if is_qwen(model) else build_tiny_llava(seed=7)


@pytest.mark.parametrize("assistant", ["copy", "other"])
@pytest.mark.parametrize("name", sorted(ASSISTED))
def test_assisted_decoding_at_a_real_budget_equals_greedy(family, name, assistant):
    model, batch = family
    options, _ = ASSISTED[name]
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
        helper = assistant_for(model, assistant)
        assisted = model.generate(**single, **options_generate, assistant_model=helper)
    assert torch.equal(assisted, greedy)
    if name == "gui-kv":  # every layer's cache of the greedy and the assisted prefill kept the same entries
        layers = [[site.kept.tolist() for site in forward.sites] for forward in trace.forwards]
        assert len(layers) >= 2 and layers[1] == layers[0] and len(layers[0]) == model.config.get_text_config().num_hidden_layers
    else:
        kept = [site.kept.tolist() for forward in trace.forwards for site in forward.sites]
        assert len(kept) >= 2 and all(k == kept[0] for k in kept)  # the assisted prefill cut the same tokens
    assert all(after < before for before, after in trace.visual_tokens(0))
