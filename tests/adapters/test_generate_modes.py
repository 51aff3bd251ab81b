"""Every generation mode of the installed transformers inside a session: at keep=1.0 every method must reproduce the
dense model exactly (sequences equal, scores / logits to 1e-5), on LLaVA and Qwen2 / 2.5-VL (the NeXT family has its
own matrix in test_llava_next_generate.py). A method the family cannot run is refused at `with` entry, never later;
the one exception is a cache generate() builds inside the call: a StaticCache (cache_implementation="static") works
for every method but the llm_attention site's, refused at the first forward in one line. Under a StaticCache keep=1.0
equals the dense model's static-cache generate, and a real budget equals the same method's DynamicCache generate.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import vtprune
from tests.adapters.qwen_builders import build_qwen_processor, build_tiny_qwen, two_screenshot_batch
from tests.helpers import build_tiny_llava, padded_batch

GENERATE = dict(max_new_tokens=4, pad_token_id=0)
EXTRA = {"fastv": {"layer": 1}, "dart": {"layer": 1}, "hiprune": {"object_layer": 0}}
# one method per way of cutting: before the LLM (plain, [CLS]-scored, merging), inside it (one cut, a pyramid),
# the cache after prefill, the attention-site cache; every registered method runs the core modes
REPRESENTATIVE = ("random", "vtc-cls", "visionzip", "fastv", "pyramiddrop", "gui-kv", "zipvl")
CORE_MODES = ("greedy", "beam")


@pytest.fixture(scope="module", params=["llava", "qwen2-vl", "qwen2.5-vl"])
def family(request):
    if request.param == "llava":
        model, batch = build_tiny_llava(), padded_batch()
        single = {"input_ids": batch["input_ids"][1:], "attention_mask": batch["attention_mask"][1:],
                  "pixel_values": batch["pixel_values"][1:]}
    else:
        model = build_tiny_qwen(request.param)
        batch = two_screenshot_batch(build_qwen_processor(request.param))
        grids = batch["image_grid_thw"]
        first = int(grids[:2].prod(-1).sum())  # patches of sample 0's two screenshots
        single = {"input_ids": batch["input_ids"][1:], "attention_mask": batch["attention_mask"][1:],
                  "pixel_values": batch["pixel_values"][first:], "image_grid_thw": grids[2:]}
    return request.param, model.eval(), batch, single


class ForceToken(LogitsProcessor):
    """Makes the second generated token `token` (e.g. the image-token id: a decode step is not a prompt)."""

    def __init__(self, token: int) -> None:
        self.token, self.step = token, 0

    def __call__(self, ids, scores):
        self.step += 1
        if self.step == 2:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.token] = 0
        return scores


def seeded(fn):
    def run():
        torch.manual_seed(0)
        return fn()

    return run


def continued(model, batch):
    """Generate 2 tokens, then continue 3 more from the returned cache (no pixels: the cache holds the image)."""
    out = model.generate(**batch, max_new_tokens=2, pad_token_id=0, return_dict_in_generate=True)
    mask = torch.cat([batch["attention_mask"], torch.ones(out.sequences.shape[0], 2, dtype=torch.long)], 1)
    return model.generate(input_ids=out.sequences, attention_mask=mask, cache=out.past_key_values,
                          max_new_tokens=3, pad_token_id=0)


def as_embeds(model, batch):
    embeds = model.get_input_embeddings()(batch["input_ids"])
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    return model.generate(inputs_embeds=embeds, **rest, **GENERATE)


MODES = {
    "greedy": lambda m, b, s: m.generate(**b, **GENERATE),
    "sample": lambda m, b, s: seeded(lambda: m.generate(**b, **GENERATE, do_sample=True))(),
    "beam": lambda m, b, s: m.generate(**b, **GENERATE, num_beams=2),
    "beam-sample": lambda m, b, s: seeded(lambda: m.generate(**b, **GENERATE, num_beams=2, do_sample=True))(),
    "return-2": lambda m, b, s: seeded(lambda: m.generate(**b, **GENERATE, do_sample=True, num_return_sequences=2))(),
    "no-cache": lambda m, b, s: m.generate(**b, **GENERATE, use_cache=False),
    "dict": lambda m, b, s: m.generate(**b, **GENERATE, return_dict_in_generate=True, output_scores=True,
                                        output_logits=True),
    "prompt-lookup": lambda m, b, s: m.generate(**s, **GENERATE, prompt_lookup_num_tokens=2),
    "assisted": lambda m, b, s: m.generate(**s, **GENERATE, assistant_model=copy.deepcopy(m)),
    "image-token-decoded": lambda m, b, s: m.generate(
        **b, **GENERATE, logits_processor=LogitsProcessorList([ForceToken(m.config.image_token_id)])),
    "continue": lambda m, b, s: continued(m, b),
    "inputs-embeds": lambda m, b, s: as_embeds(m, b),
}


def assert_same(out, dense, method: str) -> None:
    if isinstance(dense, torch.Tensor):
        assert torch.equal(out, dense), method
        return
    assert torch.equal(out.sequences, dense.sequences), method
    for got, want in zip((*out.scores, *out.logits), (*dense.scores, *dense.logits), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=method)


@pytest.mark.parametrize("mode", list(MODES))
def test_keep_all_equals_dense_in_every_mode(family, mode):
    name, model, batch, single = family
    run = MODES[mode]
    with torch.no_grad():
        dense = run(model, batch, single)
    accepted = 0
    names = vtprune.available() if mode in CORE_MODES else REPRESENTATIVE
    for method_name in names:
        method = vtprune.make(method_name, keep=1.0, **EXTRA.get(method_name, {}))
        session = ExitStack()
        try:
            session.enter_context(method(model))
        except vtprune.VTPruneError:
            continue  # refused at `with` entry: the family lacks a signal or site (tested per adapter)
        accepted += 1
        with session, torch.no_grad():
            out = run(model, batch, single)
        assert_same(out, dense, method_name)
    assert accepted >= min(len(names) - 4, 12 if name == "llava" else 8)


STATIC = dict(cache_implementation="static")
STATIC_REFUSED = {"zipvl"}  # llm_attention: a StaticCache cannot hold its compressed blocks
BUDGETS = [  # a real budget per way of cutting: before the LLM, inside it, the cache after prefill, while decoding
    ("random", dict(keep=3)),
    ("fastv", dict(keep=3, layer=1)),
    ("vtc-cls", dict(keep=3)),
    ("gui-kv", dict(keep=0.5)),
    ("streamingllm", dict(keep=12, sinks=2, key_positions="original")),
    ("scissorhands", dict(keep=12, recent=2)),
]


def static_run(model, batch, method=None, **options):
    """greedy (or beam) generate with a StaticCache, scores and logits kept; inside `method`'s session if given."""
    session = method(model) if method is not None else ExitStack()
    with session, torch.no_grad():
        torch.manual_seed(0)
        return model.generate(**batch, **GENERATE, return_dict_in_generate=True, output_scores=True,
                              output_logits=True, **options)


@pytest.mark.parametrize("beams", [1, 2])
def test_static_cache_keep_all_equals_dense_static_cache(family, beams):
    name, model, batch, single = family
    dense = static_run(model, batch, num_beams=beams, **STATIC)
    accepted = []
    for method_name in vtprune.available():
        method = vtprune.make(method_name, keep=1.0, **EXTRA.get(method_name, {}))
        session = ExitStack()
        try:
            trace = session.enter_context(method(model))
        except vtprune.VTPruneError:
            continue  # refused at `with` entry on this family
        if method_name in STATIC_REFUSED:
            with pytest.raises(vtprune.VTPruneError, match="StaticCache") as refusal, session, torch.no_grad():
                model.generate(**batch, **GENERATE, num_beams=beams, **STATIC)
            assert "\n" not in str(refusal.value) and method_name in str(refusal.value)
            continue
        with session, torch.no_grad():
            torch.manual_seed(0)
            out = model.generate(**batch, **GENERATE, return_dict_in_generate=True, output_scores=True,
                                 output_logits=True, num_beams=beams, **STATIC)
        assert trace.forwards, method_name
        assert_same(out, dense, method_name)
        accepted.append(method_name)
    assert len(accepted) >= (17 if name == "llava" else 8), accepted
    assert torch.equal(static_run(model, batch, num_beams=beams, **STATIC).sequences, dense.sequences)  # left dense


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("method_name, options", BUDGETS, ids=[n for n, _ in BUDGETS])
def test_static_cache_at_a_budget_equals_the_dynamic_cache(family, method_name, options, beams):
    name, model, batch, single = family
    try:
        with vtprune.make(method_name, **options)(model):
            pass
    except vtprune.VTPruneError:
        pytest.skip(f"{method_name} is refused on {name} at `with` entry")
    dynamic = static_run(model, batch, vtprune.make(method_name, **options), num_beams=beams)
    static = static_run(model, batch, vtprune.make(method_name, **options), num_beams=beams, **STATIC)
    assert_same(static, dynamic, method_name)
    dense = static_run(model, batch, num_beams=beams, **STATIC)
    assert not torch.allclose(torch.stack(static.logits), torch.stack(dense.logits), atol=1e-3)  # the budget bites
    cache = static.past_key_values
    assert any(layer.stored < layer.get_seq_length() for layer in cache.layers)  # fewer physical than logical
    assert cache.get_seq_length() == dynamic.past_key_values.get_seq_length()  # the logical length generate saw


def test_a_reused_static_cache_is_plain_again_after_reset(family):
    """A StaticCache the caller passes in, pruned inside a session, then reset and reused outside it: dense again."""
    from transformers import StaticCache

    name, model, batch, single = family
    length = batch["input_ids"].shape[1] + GENERATE["max_new_tokens"]
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=length)
    dense = static_run(model, batch, **STATIC)
    pruned = static_run(model, batch, vtprune.make("random", keep=3), cache=cache)
    assert type(cache.layers[0]).__name__ == "PrunedStaticLayer"
    assert not torch.equal(pruned.sequences, dense.sequences) or pruned.logits[0].ne(dense.logits[0]).any()
    cache.reset()
    again = static_run(model, batch, cache=cache)
    assert_same(again, dense, "reused cache")


def test_a_compiled_language_model_with_a_static_cache_equals_the_uncompiled_one():
    """torch.compile of the language model (dynamo; the session's hooks run inside it, with graph breaks): static-cache
    generate under an in-LLM budget equals the uncompiled run. backend="eager" keeps the test fast; the inductor
    backend (and a pre-LLM random cut) was checked by hand on the same model."""
    from torch._dynamo.utils import counters

    model, batch = build_tiny_llava().eval(), padded_batch()
    before = static_run(model, batch, vtprune.make("fastv", keep=3, layer=1), **STATIC)
    torch._dynamo.reset()
    counters.clear()
    model.model.language_model.compile(backend="eager")
    try:
        after = static_run(model, batch, vtprune.make("fastv", keep=3, layer=1), **STATIC)
        assert counters["frames"]["ok"] > 0  # dynamo did compile frames of the language model
    finally:
        torch._dynamo.reset()
    assert_same(after, before, "fastv compiled")


def test_fullgraph_compile_of_a_model_in_a_session_stops_with_the_reason_and_plain_compile_runs():
    """torch.compile(fullgraph=True) cannot hold a session's hooks (data-dependent cuts): it stops at the first hook
    with vtprune's reason. Without fullgraph the hooks run eagerly between compiled graphs and the forward equals the
    uncompiled pruned one."""
    model, batch = build_tiny_llava().eval(), padded_batch()
    method = vtprune.make("fastv", keep=3, layer=1)
    torch._dynamo.reset()
    try:
        with torch.no_grad(), method(model):
            eager = model(**batch).logits
            reason = r"vtprune: a session's hooks .* torch\.compile\(fullgraph=True\) of a model inside a session is refused"
            with pytest.raises(Exception, match=reason):  # torch's own Unsupported error, carrying vtprune's reason
                torch.compile(model.forward, fullgraph=True, backend="eager")(**batch)
            torch._dynamo.reset()
            compiled = torch.compile(model.forward, backend="eager")(**batch).logits
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits[:, -1], eager[:, -1], atol=1e-3)  # the session did cut
