"""StreamingLLM: kept sets and pos-shift attention equal the official code's outputs (tests/data/reference/...)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

import vtprune
from vtprune.methods.streamingllm import StreamingLLM, StreamingLLMLayer, make_space, rotate_keys, slot_shift

DATA = Path(__file__).parents[1] / "data" / "reference" / "streamingllm"


def load(name):
    return torch.load(DATA / f"{name}.pt")


def drive(layer, prompt_len, steps, eligible=None):
    """Prefill then `steps` decode steps; yields (kept positions of head 0, evicted slots) after each call."""
    eligible = torch.ones(prompt_len, dtype=torch.bool) if eligible is None else eligible
    kept = layer.prefill(eligible)
    yield kept, None
    for _ in range(steps):
        evict = layer.step()
        yield layer.entries.positions.clone(), evict


@pytest.mark.parametrize("case", ["prompt24_s4_r12", "prompt10_s4_r12", "prompt30_s1_r7"])
def test_kept_set_of_every_step_equals_the_official_cache(case):
    ref = load(case)
    budget = ref["start_size"] + ref["recent_size"]
    layer = StreamingLLMLayer(cache_heads=2, budget=budget, sinks=ref["start_size"])
    before = None
    for step, (kept, evict) in enumerate(drive(layer, ref["prompt_len"], ref["steps"])):
        expected = ref["kept"][step]
        expected = expected[expected >= 0]
        assert kept.shape[1] <= budget
        assert torch.equal(kept[0], expected) and torch.equal(kept[1], expected)
        if evict is not None:  # the evicted slots name exactly the tokens that left
            appended = torch.cat([before, torch.tensor([ref["prompt_len"] + step - 1])])
            assert set(appended[evict[0]].tolist()) == set(appended.tolist()) - set(expected.tolist())
        before = kept[0]


def test_make_space_equals_the_official_evict_for_space():
    ref = load("evict_for_space")
    for length, coming, expected in zip(ref["length"], ref["coming"], ref["kept"]):
        kept = make_space(int(length), int(coming), ref["start_size"], ref["recent_size"])
        assert kept.tolist() == expected[expected >= 0].tolist(), (int(length), int(coming))


def rope(x, positions, inv_freq):
    """Llama RoPE of x [H, n, d] at positions [n], written out (cos/sin of positions · inv_freq, half split)."""
    angle = positions.float()[:, None] * inv_freq
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    return x * cos + rotate_half(x) * sin


def test_pos_shift_attention_with_rerotated_post_rope_keys_equals_the_official_forward():
    """Keys cached after RoPE (as transformers does), re-rotated by their slot shift after every eviction, and the
    query at its slot give the official pos-shift attention output at every one of 40 decode steps."""
    ref = load("pos_shift")
    heads, kv_heads, d, n = ref["heads"], ref["kv_heads"], ref["head_dim"], ref["prompt_len"]
    hidden = ref["hidden"]
    q = (hidden @ ref["q_proj"].T).view(-1, heads, d).transpose(0, 1)  # [H, T, d]
    k = (hidden @ ref["k_proj"].T).view(-1, kv_heads, d).transpose(0, 1)  # [H_kv, T, d]
    v = (hidden @ ref["v_proj"].T).view(-1, kv_heads, d).transpose(0, 1)
    inv_freq = 1.0 / (ref["rope_base"] ** (torch.arange(0, d, 2).float() / d))

    def attend(query, keys, values, causal):
        keys, values = keys.repeat_interleave(heads // kv_heads, 0), values.repeat_interleave(heads // kv_heads, 0)
        out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, is_causal=causal)
        return out.transpose(0, 1).reshape(query.shape[1], -1) @ ref["o_proj"].T

    prompt_positions = torch.arange(n)
    keys, values = rope(k[:, :n], prompt_positions, inv_freq), v[:, :n]
    prefill = attend(rope(q[:, :n], prompt_positions, inv_freq), keys, values, causal=True)
    torch.testing.assert_close(prefill, ref["prefill_output"], atol=1e-5, rtol=0)

    layer = StreamingLLMLayer(kv_heads, ref["start_size"] + ref["recent_size"], ref["start_size"])
    kept = layer.prefill(torch.ones(n, dtype=torch.bool))  # the prompt's slots are its positions 0..n-1
    keys = rotate_keys(keys.gather(1, kept[..., None].expand(-1, -1, d)), torch.arange(kept.shape[1]) - kept, inv_freq)
    values = values.gather(1, kept[..., None].expand(-1, -1, d))
    assert torch.equal(kept[0], ref["kept"][0])
    for s in range(ref["steps"]):
        t, slot = n + s, keys.shape[1]  # the new token's slot = the cache length before it is appended
        position = torch.tensor([slot])
        keys = torch.cat([keys, rope(k[:, t : t + 1], position, inv_freq)], dim=1)
        values = torch.cat([values, v[:, t : t + 1]], dim=1)
        out = attend(rope(q[:, t : t + 1], position, inv_freq), keys, values, causal=False)
        torch.testing.assert_close(out[0], ref["outputs"][s], atol=1e-5, rtol=0)
        evict = layer.step()
        survivors = torch.ones(kv_heads, keys.shape[1], dtype=torch.bool).scatter(1, evict, False)
        keys = keys[survivors].view(kv_heads, -1, d)
        values = values[survivors].view(kv_heads, -1, d)
        keys = rotate_keys(keys, slot_shift(survivors.shape[1], evict), inv_freq)
        assert torch.equal(layer.entries.positions[0], ref["kept"][s + 1])


def test_rotate_keys_composes_to_rope_at_the_new_position():
    x, inv_freq = torch.randn(2, 5, 8), 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    old, new = torch.tensor([3, 9, 17, 40, 41]), torch.tensor([0, 1, 2, 3, 4])
    moved = rotate_keys(rope(x, old, inv_freq), (new - old).expand(2, 5), inv_freq)
    torch.testing.assert_close(moved, rope(x, new, inv_freq), atol=1e-5, rtol=0)


def test_budget_at_least_the_sequence_evicts_nothing():
    layer = StreamingLLMLayer(cache_heads=2, budget=64, sinks=4)
    for step, (kept, evict) in enumerate(drive(layer, 24, 40)):
        assert kept[0].tolist() == list(range(24 + step))
        assert evict is None or evict.numel() == 0


def test_visual_only_keeps_text_and_the_first_and_last_visual_tokens():
    """Reference from the spec: text stays; of the visual tokens (in order) the first S and the last B - S stay;
    decoding (text only) evicts nothing."""
    visual = torch.zeros(30, dtype=torch.bool)
    visual[3:19] = True
    visual[21:27] = True  # two images: 16 + 6 visual tokens
    layer = StreamingLLMLayer(cache_heads=2, budget=9, sinks=4, evict="visual")
    visual_positions = visual.nonzero().squeeze(1).tolist()
    kept_visual = visual_positions[:4] + visual_positions[-5:]
    expected = sorted([p for p in range(30) if not visual[p]] + kept_visual)
    for step, (kept, evict) in enumerate(drive(layer, 30, 40, eligible=visual)):
        assert kept[0].tolist() == expected + list(range(30, 30 + step))
        assert evict is None or evict.numel() == 0


def test_options_and_budget():
    method = StreamingLLM(keep=0.5)
    assert method.budget(prompt_len=31, visual=16, images=1) == 15
    assert StreamingLLM(keep=6, evict="visual").budget(prompt_len=40, visual=32, images=2) == 12
    with pytest.raises(vtprune.VTPruneError, match="evict='text'"):
        StreamingLLM(evict="text")
    with pytest.raises(vtprune.VTPruneError, match="key_positions"):
        StreamingLLM(key_positions="slot")
    with pytest.raises(vtprune.VTPruneError, match="sinks"):
        StreamingLLM(sinks=-1)
    with pytest.raises(vtprune.VTPruneError, match="keep"):
        StreamingLLM(keep=0)
    with pytest.raises(vtprune.VTPruneError, match="must exceed the 4 sinks"):
        StreamingLLM().layer_state(cache_heads=2, budget=4)
    assert StreamingLLM(keep=50).budget(prompt_len=40, visual=16, images=1) == 50  # the cache may grow to it
