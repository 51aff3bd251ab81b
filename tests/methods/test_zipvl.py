"""ZipVL: the important-token count is the smallest set holding τ of the attention mass, selection by normalised
score, attention among the important tokens only, KV cache memory under each kv_mode, decode-time compression."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

import vtprune
from tests.helpers import build_tiny_llava
from vtprune.adapters.decoder import CompressedLayer
from vtprune.eval.measure import cache_bytes
from vtprune.methods.zipvl import (
    important_count,
    pack_codes,
    probe_counts,
    probe_mass,
    probe_positions,
    quantise,
    quantise_kv,
    select_important,
    unpack_codes,
)


# ---------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("tau, expected", [(0.5, 1), (0.8, 2), (0.85, 3), (0.9, 3), (0.95, 4), (0.975, 5), (1.0, 5)])
def test_count_on_a_hand_made_mass(tau, expected):
    mass = torch.tensor([1.0, 10.0, 2.0, 6.0, 1.0])  # shares sorted: .5 .3 .1 .05 .05 -> cumulative .5 .8 .9 .95 1
    assert important_count(mass, tau) == expected


def smallest_subset_reaching(mass: list[float], tau: float) -> int:
    """Exhaustive: the size of the smallest subset of keys whose mass reaches tau of the total."""
    total = sum(mass)
    for size in range(1, len(mass) + 1):
        if any(sum(mass[i] for i in subset) >= tau * total - 1e-12 for subset in itertools.combinations(range(len(mass)), size)):
            return size
    return len(mass)


@pytest.mark.parametrize("seed", range(6))
def test_count_is_the_smallest_subset_on_crafted_attention(seed):
    """Crafted q/k (one head, d=1, scale 1): key j's logit is log w_j, so every probe attends ∝ w_j over what it sees."""
    generator = torch.Generator().manual_seed(seed)
    n = 9
    weights = torch.rand(n, generator=generator) ** 4 + 1e-3
    keys = weights.log().view(1, n, 1)
    queries = torch.ones(1, n, 1)
    mass = probe_mass(queries, keys, 1.0, torch.arange(n))
    expected = torch.zeros(n)
    for i in range(n):  # query i sees keys 0..i
        expected[: i + 1] += weights[: i + 1] / weights[: i + 1].sum()
    torch.testing.assert_close(mass, expected)
    for tau in (0.5, 0.9, 0.96, 0.975):
        assert important_count(mass, tau) == smallest_subset_reaching(mass.tolist(), tau)


def test_selection_uses_the_normalised_score_not_the_raw_mass():
    mass = torch.tensor([4.0, 1.0, 1.5, 0.9])  # key 0 is seen by 4 queries, key 3 by 1
    counts = probe_counts(torch.arange(4), 4, "probes")
    assert counts.tolist() == [4, 3, 2, 1]
    assert important_count(mass, 0.7) == 2  # raw: 4 + 1.5 >= 0.7 * 7.4
    assert select_important(mass, counts, 0.7).tolist() == [0, 3]  # normalised 1, .33, .75, .9 (raw top-2: 0, 2)
    low_last = torch.tensor([4.0, 1.0, 1.5, 0.2])
    assert select_important(low_last, counts, 0.7).tolist() == [0, 2]
    assert select_important(low_last, counts, 0.7, keep_last=True).tolist() == [0, 2, 3]


def test_probe_counts_with_probes_differ_from_all_queries():
    probes = torch.tensor([1, 1, 4, 5])  # duplicates count twice
    assert probe_counts(probes, 6, "probes").tolist() == [4, 4, 2, 2, 2, 1]
    assert probe_counts(probes, 6, "all_queries").tolist() == [6, 5, 4, 3, 2, 1]


def test_probes_are_recent_plus_seeded_random():
    first = probe_positions(200, "recent+random", 0.10, torch.Generator().manual_seed(3))
    again = probe_positions(200, "recent+random", 0.10, torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and first.numel() == 20
    assert first[-10:].tolist() == list(range(190, 200)) and bool((first[:10] < 190).all())
    assert probe_positions(5, "recent+random", 0.10).tolist() == [4]  # at least the last token
    assert probe_positions(7, "all", 0.10).tolist() == list(range(7))


# ------------------------------------------------------------------------------- in the model, per layer
def layer_masses(model, batch, captured):
    """Per layer and sample: the exact attention mass a_j of all queries (probe="all"), computed from scratch."""
    lm = model.model.language_model
    modeling = sys.modules[type(lm.layers[0].self_attn).__module__]
    out = {}
    for index, layer in enumerate(lm.layers):
        hidden, (cos, sin) = captured[index]
        attn = layer.self_attn
        for b in range(hidden.shape[0]):
            real = batch["attention_mask"][b].bool()
            x = layer.input_layernorm(hidden[b : b + 1, real])
            n = x.shape[1]
            q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
            q, k = modeling.apply_rotary_pos_emb(q, k, cos[b : b + 1, real], sin[b : b + 1, real])
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = (q.double() @ k.double().transpose(-1, -2)) * attn.scaling
            logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            out[index, b] = torch.softmax(logits, -1)[0].sum(1).mean(0)  # [n]
    return out


@pytest.mark.parametrize("tau", [0.9, 0.96])
def test_each_layer_keeps_the_smallest_set_holding_tau_of_the_mass(tiny_llava, batch, tau):
    captured = {}

    def capture(index):
        def hook(module, args, kwargs):
            captured[index] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], kwargs["position_embeddings"])

        return hook

    layers = tiny_llava.model.language_model.layers
    with torch.no_grad(), vtprune.make("zipvl", keep=tau, probe="all")(tiny_llava) as trace:
        handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
        tiny_llava(**batch)
        for handle in handles:
            handle.remove()
        masses = layer_masses(tiny_llava, batch, captured)
    records = {(r.layer, r.sample): r for r in trace.forwards[0].sites}
    assert len(records) == len(layers) * 2
    for (index, b), mass in masses.items():
        values = sorted(mass.tolist(), reverse=True)
        p = next(i + 1 for i in range(len(values)) if sum(values[: i + 1]) >= tau * sum(values) - 1e-9)
        record = records[index, b]
        assert record.notes == {"important": p, "tokens": mass.numel()}
        n = mass.numel()
        normalised = mass / torch.arange(n, 0, -1, dtype=torch.float64)  # probe="all": n - j queries see key j
        chosen = set(torch.topk(normalised, p).indices.tolist())
        visual = (batch["input_ids"][b][batch["attention_mask"][b].bool()] == 99).nonzero().squeeze(1).tolist()
        assert record.kept.tolist() == [rank for rank, position in enumerate(visual) if position in chosen]


def test_unimportant_rows_get_no_attention_output_even_with_an_output_bias(batch):
    from transformers import LlavaForConditionalGeneration

    model = build_tiny_llava(seed=0)
    config = model.config
    config.text_config.attention_bias = True
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    outputs = []
    with torch.no_grad(), vtprune.make("zipvl", keep=0.8, probe="all")(model) as trace:
        handle = model.model.language_model.layers[1].self_attn.register_forward_hook(
            lambda module, args, output: outputs.append(output[0])
        )
        model(**batch)
        handle.remove()
    records = [r for r in trace.forwards[0].sites if r.layer == 1]
    for b, record in enumerate(records):
        rows = outputs[0][b][batch["attention_mask"][b].bool()]
        zero = (rows.abs().sum(-1) == 0).sum()
        assert int(zero) == record.notes["tokens"] - record.notes["important"] > 0


def test_sparse_attention_is_the_same_on_sdpa_and_eager(tiny_llava, batch):
    eager = build_tiny_llava(seed=0, attn="eager")
    method = vtprune.make("zipvl", keep=0.9)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        with method(tiny_llava):
            sdpa_logits = tiny_llava(**batch).logits
        with method(eager):
            eager_logits = eager(**batch).logits
    torch.testing.assert_close(sdpa_logits[real], eager_logits[real], atol=1e-5, rtol=0)


def test_model_runs_its_own_attention_again_after_the_block(tiny_llava, batch):
    attn = tiny_llava.model.language_model.layers[0].self_attn
    config = attn.config
    with vtprune.make("zipvl", keep=0.9)(tiny_llava):
        assert attn.config._attn_implementation == "vtprune_sparse"
        assert tiny_llava.config.text_config._attn_implementation == "sdpa"
    assert attn.config is config and config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------- KV caches
def kv_bytes_formula(records, channels, bits, width=4):
    """Bytes of the mixed-precision cache: codes at their bit-width, fp32 parameters (key min/step per channel and
    set, value scale per channel, value min/step per token)."""
    total = 0
    for record in records:
        important, n = record.notes["important"], record.notes["tokens"]
        total += channels * width  # value scale
        for m, b in ((important, bits[0]), (n - important, bits[1])):
            if m:
                total += 2 * m * (channels * b // 8) + 2 * channels * width + 2 * m * width
    return total


def test_kv_cache_memory_under_each_kv_mode(tiny_llava, batch):
    text = tiny_llava.config.text_config
    channels = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    with torch.no_grad():
        dense = cache_bytes(tiny_llava(**batch).cache)
        ratios, kept = {}, {}
        for mode in ("full", "drop", "quant"):
            with vtprune.make("zipvl", keep=0.9, kv_mode=mode)(tiny_llava) as trace:
                cache = tiny_llava(**batch).cache
            ratios[mode] = cache_bytes(cache) / dense
            kept[mode] = trace.forwards[0].sites
    layers, length = text.num_hidden_layers, batch["input_ids"].shape[1]
    assert ratios["full"] == 1.0
    longest = [max(r.notes["important"] for r in kept["drop"] if r.layer == layer) for layer in range(layers)]
    assert ratios["drop"] == pytest.approx(sum(longest) / (layers * length))  # left-padded to the longest sample
    assert cache_bytes(cache) == kv_bytes_formula(kept["quant"], channels, (4, 2))
    assert ratios["quant"] < ratios["drop"] < 1.0
    print(f"KV cache / dense: full {ratios['full']:.3f}, drop {ratios['drop']:.3f}, quant {ratios['quant']:.3f}")


def test_decoding_compresses_every_period_new_tokens(tiny_llava, batch):
    with torch.no_grad(), vtprune.make("zipvl", keep=0.5, decode_period=2)(tiny_llava):
        out = tiny_llava.generate(**batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    for layer in out.cache.layers:
        assert isinstance(layer, CompressedLayer)
        assert len(layer.blocks) == 3  # the prompt, then two blocks of 2 decoded tokens; 1 token still in the tail
        assert layer.tail.keys.shape[2] == 1
        assert all(int(block.valid.sum(1).max()) <= 2 for block in layer.blocks[1:])
        assert layer.get_seq_length() == batch["input_ids"].shape[1] + 5


def test_quantisation_error_is_at_most_half_a_step():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=generator)
    x[:, 3] = 2.5  # a constant channel: no division by zero
    for bits in (2, 4, 8):
        codes, low, step = quantise(x, bits, dim=0)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 12), codes.int())
        assert pack_codes(codes, bits).shape == (7, 12 * bits // 8)
        assert bool(((codes * step + low - x).abs() <= step / 2 + 1e-6).all())
    keys, values = torch.randn(2, 9, 4, generator=generator), torch.randn(2, 9, 4, generator=generator)
    important = torch.tensor([True, False] * 4 + [True])
    restored_keys, restored_values = quantise_kv(keys, values, important, (8, 8)).dequantize()
    torch.testing.assert_close(restored_keys, keys, atol=0.02, rtol=0)
    torch.testing.assert_close(restored_values, values, atol=0.02, rtol=0)


def test_bad_options_are_refused():
    for options, match in [
        (dict(keep=0.0), "keep"), (dict(probe="first"), "probe"), (dict(kv_mode="evict"), "kv_mode"),
        (dict(bits=(3, 2)), "bits"), (dict(normaliser="n"), "normaliser"), (dict(decode_period=0), "decode_period"),
    ]:
        with pytest.raises(vtprune.VTPruneError, match=match):
            vtprune.make("zipvl", **options)


def test_zipvl_runs_on_a_onevision_video(tiny_llava):
    from tests.helpers_video import build_tiny_onevision, media_batch

    model = build_tiny_onevision()
    batch = media_batch(model, [[], []], [[3], [3]])
    with torch.no_grad(), vtprune.make("zipvl", keep=0.9, kv_mode="quant")(model) as trace:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + 3
    counts = [r.notes for r in trace.forwards[0].sites]
    assert len(counts) == 2 * model.config.text_config.num_hidden_layers
    assert all(0 < c["important"] < c["tokens"] for c in counts)
