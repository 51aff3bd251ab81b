"""The decode-time kv_cache site (vtprune/adapters/decoder/evicting.py) with StreamingLLM, Scissorhands, A2SF and EMS.

The hand-made reference runs the model step by step outside any session with a plain DynamicCache: the post-RoPE
queries and keys come from the model's own attention call (a recording attention function, not vtprune's q/k
recomputation), the policy says what each layer/head keeps, the test gathers (and, for EMS, merges) the cache
entries itself and feeds every token at an explicit position (StreamingLLM: its cache slot, keys re-rotated).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

import vtprune
from tests.adapters.qwen_builders import (
    build_qwen_processor,
    build_tiny_qwen,
    screens,
    two_screenshot_batch,
)
from tests.helpers import PAD, build_tiny_llava, padded_batch
from vtprune.core import VTPruneError
from vtprune.methods.streamingllm import rotate_keys

RECORDS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
MERGES: list[int] = []  # EMS merges the reference applied


def recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if getattr(module, "layer_idx", None) is not None:  # decoder layers (the CLIP tower's have none)
        RECORDS[module.layer_idx] = (query.detach(), key.detach())
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register("test_recording", recording_attention)

CASES = [
    ("streamingllm", {"keep": 12, "sinks": 2}),  # key_positions="cache": slot positions, re-rotated keys
    ("streamingllm", {"keep": 12, "sinks": 2, "key_positions": "original"}),
    ("scissorhands", {"keep": 12, "recent": 2, "window": 6}),
    ("a2sf", {"keep": 12, "recent": 2, "alpha": 0.5}),
    ("ems", {"keep": 12, "recent": 2, "window": 3, "tau": 0.0}),
    ("a2sf", {"keep": 5, "recent": 0, "evict": "visual"}),  # text never leaves; 5 visual entries per image
    ("scissorhands", {"keep": 0.25, "evict": "visual", "window": 6}),
]


def sample(batch: dict, b: int) -> dict:
    """One sample of a padded LLaVA batch, padding removed."""
    real = batch["attention_mask"][b].bool()
    images = [0] if b == 0 else [1, 2]
    return {
        "input_ids": batch["input_ids"][b : b + 1, real],
        "attention_mask": batch["attention_mask"][b : b + 1, real],
        "pixel_values": batch["pixel_values"][images],
    }


def reference(model, inputs: dict, method, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy decoding of one unpadded sample with the cache evicted by hand. Returns the logits of every step and the
    largest per-layer cache length seen after each forward."""
    model.set_attn_implementation("test_recording")
    try:
        return _reference(model, inputs, method, steps)
    finally:
        model.set_attn_implementation("sdpa")


def _reference(model, inputs, method, steps):
    n = inputs["input_ids"].shape[1]
    is_visual = (inputs["input_ids"][0] == model.config.image_token_id)
    visual = int(is_visual.sum())
    eligible = is_visual if method.evict == "visual" else torch.ones(n, dtype=torch.bool)
    budget = method.cache_budget(n, visual, inputs["pixel_values"].shape[0])
    slots = bool(getattr(method, "cache_positions", False))
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(**inputs, past_key_values=cache, use_cache=True)
    states, logits, lengths = {}, [out.logits[:, -1]], []
    position = n
    for step in range(steps):
        for layer_idx, layer in enumerate(cache.layers):
            query, key = RECORDS[layer_idx]
            scaling = model.model.language_model.layers[layer_idx].self_attn.scaling
            if step == 0:
                states[layer_idx] = method.layer_state(key.shape[1], budget)
                rows = method.prompt_rows(n)
                update = method.prefill_update(
                    states[layer_idx], query[0, :, n - rows :], key[0], scaling, eligible
                )
            else:
                update = method.step_update(states[layer_idx], query[0, :, -1], key[0], scaling)
            keys, values = layer.keys[0].clone(), layer.values[0].clone()
            MERGES.append(len(update.merges))
            for merge in update.merges:  # EMS: the centre becomes the weighted sum of its sources
                keys[merge.head, merge.centre] = (merge.key_weights[:, None] * keys[merge.head, merge.sources]).sum(0)
                values[merge.head, merge.centre] = (merge.value_weights[:, None] * values[merge.head, merge.sources]).sum(0)
            kept = update.kept
            keys = torch.stack([keys[h, kept[h]] for h in range(kept.shape[0])])
            values = torch.stack([values[h, kept[h]] for h in range(kept.shape[0])])
            if slots:
                keys = rotate_keys(keys, torch.arange(kept.shape[1]) - kept, inv_freq)
            layer.keys, layer.values = keys[None], values[None]
        lengths.append(max(layer.keys.shape[2] for layer in cache.layers))
        if slots:  # the paper's pos-shift: a token enters at its slot, the cache length
            position = cache.layers[0].keys.shape[2]
        token = logits[-1].argmax(-1, keepdim=True)
        length = cache.layers[0].keys.shape[2]
        with torch.no_grad():
            out = model(
                input_ids=token,
                attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                position_ids=torch.tensor([[position]]),
                past_key_values=cache,
                use_cache=True,
            )
        logits.append(out.logits[:, -1])
        position += 1
    return logits, lengths


def generate(model, inputs: dict, method, steps: int):
    with torch.no_grad(), method(model):
        return model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava()


def padded_everywhere(extra: int = 3) -> dict:
    """`padded_batch` with `extra` more padding columns: no row is free of padding (as in transformers' own tests,
    whose masks pad every row), so a cache that drops padding is shorter than dense's."""
    batch = padded_batch()
    batch["input_ids"] = torch.cat([torch.full((2, extra), PAD), batch["input_ids"]], dim=1)
    batch["attention_mask"] = torch.cat([torch.zeros(2, extra, dtype=torch.long), batch["attention_mask"]], dim=1)
    return batch


def assert_same_cache(got, want):
    assert got.get_seq_length() == want.get_seq_length()
    for a, b in zip(got.layers, want.layers, strict=True):
        assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape
        torch.testing.assert_close(a.keys, b.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["streamingllm", "scissorhands", "a2sf", "ems"])
def test_keep_all_and_a_budget_over_the_sequence_are_the_dense_model(llava, name):
    """Outputs and the returned cache (shapes and padding included) equal dense's, after a forward and a generate."""
    batch = padded_everywhere()
    with torch.no_grad():
        dense = llava.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        dense_forward = llava(**batch).past_key_values
    for keep in (1.0, 64):  # 64 entries hold the 37-token prompt and the 6 new tokens
        method = vtprune.make(name, keep=keep, **({"recent": 2} if name != "streamingllm" else {}))
        out = generate(llava, batch, method, 6)
        assert torch.equal(out.sequences, dense.sequences)
        for got, want in zip(out.logits, dense.logits):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert_same_cache(out.past_key_values, dense.past_key_values)
        with torch.no_grad(), method(llava):
            assert_same_cache(llava(**batch).past_key_values, dense_forward)


@pytest.mark.parametrize(("name", "options"), [
    ("streamingllm", {"keep": 39, "sinks": 2}),
    ("scissorhands", {"keep": 39, "recent": 2, "window": 6}),
    ("ems", {"keep": 39, "recent": 2, "window": 3, "tau": 0.0}),
], ids=["streamingllm", "scissorhands", "ems"])
def test_a_budget_first_reached_while_decoding_equals_each_sample_alone(llava, name, options):
    """Both prompts fit the budget (22 and 37 tokens of 39): the cache keeps dense's padded layout after the prefill,
    then sample 1 starts evicting at its third new token; each row still equals its sample decoded alone."""
    batch = padded_everywhere()
    steps = 6
    out = generate(llava, batch, vtprune.make(name, **options), steps)
    assert max(int(layer.segment.mask2d.sum(1).max()) for layer in out.past_key_values.layers) <= options["keep"]
    for b in range(2):
        inputs = sample(batch, b)
        want, lengths = reference(llava, inputs, vtprune.make(name, **options), steps)
        n = inputs["input_ids"].shape[1]
        evicted = any(length < n + step for step, length in enumerate(lengths))
        assert lengths[0] == n and evicted == (b == 1)  # the prefill kept all; only the longer sample evicts later
        for got, expected in zip(out.logits, want):
            torch.testing.assert_close(got[b : b + 1], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "options"), CASES, ids=lambda c: c if isinstance(c, str) else "-".join(map(str, c.values())))
def test_generate_equals_the_hand_evicted_reference(llava, name, options):
    inputs = sample(padded_batch(), 1)
    steps = 10
    want, lengths = reference(llava, inputs, vtprune.make(name, **options), steps)
    n = inputs["input_ids"].shape[1]
    if name == "ems":
        assert sum(MERGES[-steps * len(llava.model.language_model.layers) :]) > 0  # the site's merges are checked
    if options.get("evict") == "visual":  # the text stays, the 32 visual tokens of two images shrink to the budget
        budget = options["keep"] * 2 if isinstance(options["keep"], int) else int(options["keep"] * 32)
        assert lengths == [n - 32 + budget + step for step in range(steps)]
    else:
        assert max(lengths) <= options["keep"] and min(lengths) < n  # it did evict
    out = generate(llava, inputs, vtprune.make(name, **options), steps)
    for got, expected in zip(out.logits, want):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "options"), [CASES[0], CASES[2], CASES[4]], ids=["streamingllm", "scissorhands", "ems"])
def test_left_padded_batch_equals_each_sample_alone(llava, name, options):
    batch = padded_batch()
    steps = 8
    out = generate(llava, batch, vtprune.make(name, **options), steps)
    for b in range(2):
        want, _ = reference(llava, sample(batch, b), vtprune.make(name, **options), steps)
        for got, expected in zip(out.logits, want):
            torch.testing.assert_close(got[b : b + 1], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["streamingllm", "scissorhands", "a2sf", "ems"])
def test_the_cache_stays_within_32_entries_for_64_tokens(llava, name):
    options = {"recent": 4} if name != "streamingllm" else {}
    lengths: list[int] = []

    def watch(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length():
            lengths.append(max(int(layer.segment.mask2d.sum(1).max()) for layer in cache.layers))

    handle = llava.model.language_model.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        out = generate(llava, padded_batch(), vtprune.make(name, keep=32, **options), 64)
    finally:
        handle.remove()
    assert out.sequences.shape[1] == padded_batch()["input_ids"].shape[1] + 64
    assert len(lengths) == 63 and max(lengths) <= 32
    assert out.past_key_values.get_seq_length() == padded_batch()["input_ids"].shape[1] + 63  # logical length


@pytest.mark.parametrize("assist", [{"prompt_lookup_num_tokens": 2}, {"assistant_model": "copy"}])
def test_candidate_decoding_under_a_budget_is_refused_before_any_forward(llava, assist):
    if "assistant_model" in assist:
        assist = {"assistant_model": build_tiny_llava(seed=7)}
    forwards = []
    handle = llava.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(VTPruneError, match="a2sf keeps a cache budget while decoding .* or use keep=1.0"):
            with torch.no_grad(), vtprune.make("a2sf", keep=12, recent=2)(llava):
                llava.generate(**sample(padded_batch(), 0), max_new_tokens=3, do_sample=False, **assist)
    finally:
        handle.remove()
    assert forwards == []  # refused when generate() enters assisted decoding, not mid-generation


@pytest.mark.parametrize("name", ["scissorhands", "a2sf", "ems"])
def test_a_sliding_window_cache_runs_dense_at_keep_all_and_is_refused_under_a_budget(name):
    model = build_tiny_qwen("qwen2-vl", sliding=True)
    batch = two_screenshot_batch(build_qwen_processor("qwen2-vl"))
    options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        dense = model.generate(**batch, **options)
        assert "DynamicSlidingWindowLayer" in {type(layer).__name__ for layer in dense.past_key_values.layers}
        with vtprune.make(name, keep=1.0)(model):
            kept = model.generate(**batch, **options)
        assert torch.equal(kept.sequences, dense.sequences)
        for got, want in zip(kept.logits, dense.logits):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        with pytest.raises(VTPruneError, match="layer 1 is a sliding-window layer: use keep=1.0"):
            with vtprune.make(name, keep=12, recent=2)(model):
                model.generate(**batch, max_new_tokens=2, do_sample=False)


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen("qwen2-vl"), two_screenshot_batch(build_qwen_processor("qwen2-vl"))


def test_qwen2_vl_keep_all_is_dense_and_a_budget_holds(qwen):
    model, batch = qwen
    with torch.no_grad():
        dense = model.generate(**batch, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = generate(model, batch, vtprune.make("a2sf", keep=1.0), 5)
    assert torch.equal(out.sequences, dense.sequences)
    for got, want in zip(out.logits, dense.logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    out = generate(model, batch, vtprune.make("ems", keep=16, recent=2), 5)
    assert max(int(layer.segment.mask2d.sum(1).max()) for layer in out.past_key_values.layers) <= 16
    with pytest.raises(VTPruneError, match="key_positions='original'"):
        generate(model, batch, vtprune.make("streamingllm", keep=16), 2)


def test_beam_search_carries_the_policy_state_with_each_beam(llava):
    batch = padded_batch()
    with torch.no_grad():
        dense = llava.generate(**batch, max_new_tokens=5, do_sample=False, num_beams=2)
    with torch.no_grad(), vtprune.make("a2sf", keep=1.0)(llava):
        assert torch.equal(llava.generate(**batch, max_new_tokens=5, do_sample=False, num_beams=2), dense)
    with torch.no_grad(), vtprune.make("scissorhands", keep=12, recent=2)(llava):
        out = llava.generate(
            **batch, max_new_tokens=5, do_sample=False, num_beams=2, return_dict_in_generate=True
        )
    layers = out.past_key_values.layers
    assert all(len(layer.states) == layer.keys.shape[0] == 4 for layer in layers)  # a policy state per beam
    assert max(int(layer.segment.mask2d.sum(1).max()) for layer in layers) <= 12


def qwen_reference(model, inputs: dict, method, steps: int) -> list[torch.Tensor]:
    """The hand-evicted reference on Qwen2-VL: the prefill as the model runs it, then every token fed with the M-RoPE
    positions the dense model gives it (captured from a dense run: original positions) and a mask as long as the
    hand-kept cache."""
    positions: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        positions.append(kwargs["position_ids"])

    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=steps + 1, do_sample=False)
    finally:
        handle.remove()
    n = inputs["input_ids"].shape[1]
    budget = method.cache_budget(n, int((inputs["input_ids"] == model.config.image_token_id).sum()), 2)
    model.set_attn_implementation("test_recording")
    try:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(**inputs, past_key_values=cache, use_cache=True)
        states, logits = {}, [out.logits[:, -1]]
        for step in range(steps):
            for layer_idx, layer in enumerate(cache.layers):
                query, key = RECORDS[layer_idx]
                scaling = model.model.language_model.layers[layer_idx].self_attn.scaling
                if step == 0:
                    states[layer_idx] = method.layer_state(key.shape[1], budget)
                    update = method.prefill_update(states[layer_idx], query[0], key[0], scaling, torch.ones(n, dtype=torch.bool))
                else:
                    update = method.step_update(states[layer_idx], query[0, :, -1], key[0], scaling)
                kept = update.kept
                layer.keys = torch.stack([layer.keys[0, h, kept[h]] for h in range(kept.shape[0])])[None]
                layer.values = torch.stack([layer.values[0, h, kept[h]] for h in range(kept.shape[0])])[None]
            token = logits[-1].argmax(-1, keepdim=True)
            length = cache.layers[0].keys.shape[2]
            with torch.no_grad():
                out = model(
                    input_ids=token,
                    attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                    position_ids=positions[step + 1],
                    past_key_values=cache,
                    use_cache=True,
                )
            logits.append(out.logits[:, -1])
        return logits
    finally:
        model.set_attn_implementation("sdpa")


def test_qwen2_vl_generate_equals_the_hand_evicted_reference(qwen):
    model, _ = qwen
    processor = build_qwen_processor("qwen2-vl")
    shot = "<|vision_start|><|image_pad|><|vision_end|>"
    text = f"<|im_start|>user\n{shot}{shot}click ok<|im_end|>\n<|im_start|>assistant\n"
    images = screens()
    inputs = dict(processor(images=[images[0], images[1]], text=[text], return_tensors="pt"))
    method = {"keep": 16, "recent": 2, "alpha": 0.5}
    want = qwen_reference(model, inputs, vtprune.make("a2sf", **method), 6)
    assert inputs["input_ids"].shape[1] > 16
    out = generate(model, inputs, vtprune.make("a2sf", **method), 6)
    for got, expected in zip(out.logits, want):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
