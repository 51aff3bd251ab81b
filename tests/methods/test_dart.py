"""DART: the pure selection equals the official code's on stored inputs; the signals equal the dense model's keys and
final-normed hidden states; keep-all exactness; generate() with a real budget equals a hand-made reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import vtprune
from tests.adapters.qwen_builders import KINDS, build_qwen_processor, build_tiny_qwen, two_screenshot_batch
from tests.helpers import hooks_of
from tests.methods.references import llava_layer_cut_reference
from vtprune.core import FinalNormHidden, KeepPlan, LayerKeys, Method, keep_all
from vtprune.methods.dart import dart_select

REFERENCE = torch.load(Path(__file__).parents[1] / "data/reference/dart/reference.pt", weights_only=True)["cases"]


def official_inputs(case):
    hidden, keys = case["hidden"], case["keys"][0]  # [L, D], [H, L, d]
    length = hidden.shape[0]
    start, n = case["start"], case["length"]
    flat = keys.transpose(0, 1).reshape(length, -1)  # head-major per token, as the official reshape
    return hidden, flat, torch.arange(start, start + n), torch.arange(start + n, length)


# ------------------------------------------------------------------------------------------ official outputs
@pytest.mark.parametrize("case", REFERENCE, ids=[c["name"] for c in REFERENCE])
def test_kept_sets_equal_the_official_code(case):
    hidden, keys, image, text = official_inputs(case)
    for run in case["runs"]:
        kept, visiting = dart_select(hidden, keys, image, text, count=run["kept"].numel())
        assert torch.equal(kept, run["kept"]), (case["name"], run["budget"])
        assert len(visiting) == 8 and set(run["kept"].tolist()) >= (set(visiting) & set(image.tolist()))
    pivots, _ = dart_select(hidden, keys, image, text, count=4)  # no picks: the image pivots alone
    assert pivots.tolist() == sorted(case["image_pivots"].tolist())


def test_official_budgets_keep_t_plus_four():
    """LLaVA's T (64/128/192) keeps 4 + 8 * (T // 8) tokens; Qwen's ratio r keeps 4 + 8 * int(n (1 - r) / 8)."""
    counts = {c["name"]: [r["kept"].numel() for r in c["runs"]] for c in REFERENCE}
    assert counts["llava_576"] == [68, 132, 196]
    assert counts["qwen_gqa"] == [4 + 8 * int(100 * (1 - 0.778) / 8), 4 + 8 * int(100 * 0.5 / 8)]


def test_selection_edge_cases():
    generator = torch.Generator().manual_seed(0)
    hidden, keys = torch.randn(20, 8, generator=generator), torch.randn(20, 6, generator=generator)
    image = torch.arange(2, 14)
    everything, _ = dart_select(hidden, keys, image, torch.arange(14, 20), count=12)
    assert everything.tolist() == image.tolist()
    no_text, visiting = dart_select(hidden, keys, image, torch.arange(0), count=9)  # prompt ends with the image
    assert no_text.numel() == 9 and len(visiting) == 4
    few, visiting = dart_select(hidden, keys, image, torch.arange(14, 16), count=2)  # fewer than 4 pivots
    norms = keys.abs().sum(-1)
    assert few.tolist() == sorted((norms[image].topk(2).indices + 2).tolist()) and len(visiting) == 4
    uneven, _ = dart_select(hidden, keys, image, torch.arange(14, 20), count=7)  # 3 picks over 8 pivots
    assert uneven.numel() == 7


# ------------------------------------------------------------------------------------------- model signals
@dataclass
class SignalProbe(Method):
    """Records what DART's requests deliver at its cut and keeps everything (not registered)."""

    name: ClassVar[str] = "dart-signal-probe"
    sites: ClassVar[tuple[str, ...]] = ("llm_layer",)
    positions: ClassVar[str] = "original"
    layer: int = 2
    seen: dict[Any, Any] = field(default_factory=dict)

    def cut_layers(self, info):
        return [self.layer]

    def requests(self, info):
        return [LayerKeys(layer=self.layer - 1), FinalNormHidden(layer=self.layer)]

    def plan(self, ctx) -> KeepPlan:
        self.seen.update(ctx.signals)
        return keep_all(ctx.layout)


@pytest.fixture(scope="module", params=KINDS)
def qwen(request):
    """(model, batch) for Qwen2-VL and Qwen2.5-VL in miniature (3 decoder layers, GQA with one KV head)."""
    return build_tiny_qwen(request.param), two_screenshot_batch(build_qwen_processor(request.param))


def test_signals_are_the_layers_cached_keys_and_final_norm(tiny_llava, batch):
    """LayerKeys(K-1) equals what layer K-1 writes to its cache; FinalNormHidden(K) is norm(hidden_states[K])."""
    probe = SignalProbe(layer=2)
    with torch.no_grad():
        dense = tiny_llava(**batch, use_cache=True, output_hidden_states=True)
        with probe(tiny_llava):
            tiny_llava(**batch)
    states = probe.seen[LayerKeys(layer=1)]
    torch.testing.assert_close(states.keys, dense.cache.layers[1].keys, atol=1e-6, rtol=0)
    assert torch.equal(states.mask, batch["attention_mask"].bool())
    norm = tiny_llava.model.language_model.norm
    torch.testing.assert_close(probe.seen[FinalNormHidden(layer=2)], norm(dense.hidden_states[2]), atol=1e-6, rtol=0)


def expected_kept(model, batch, trace, keep, cut=2):
    """Per sample, the kept ordinals computed with `dart_select` from the dense model's own cache and hidden states."""
    with torch.no_grad():
        dense = model(**batch, use_cache=True, output_hidden_states=True)
        normed = model.model.language_model.norm(dense.hidden_states[cut])
    keys = dense.cache.layers[cut - 1].keys  # [B, H_kv, L, d]
    layout = trace.forwards[0].layout
    out = []
    for b in range(len(layout.spans)):
        real = batch["attention_mask"][b].bool()
        pad = int((~real).sum())  # left padding
        hidden = normed[b, real]
        flat = keys[b][:, real].transpose(0, 1).reshape(int(real.sum()), -1)
        last = max(span.end for span in layout.spans[b]) - pad
        text = torch.arange(last, int(real.sum()))
        kept, offset = [], 0
        for span in layout.spans[b]:
            image = torch.arange(span.start, span.end) - pad
            count = keep if isinstance(keep, int) else round(keep * span.length)
            chosen, _ = dart_select(hidden, flat, image, text, count)
            kept += (chosen - image[0] + offset).tolist()
            offset += span.length
        out.append(kept)
    return out


@pytest.mark.parametrize("keep", [6, 0.5])
def test_kept_sets_on_llava_follow_the_dense_tensors(tiny_llava, batch, keep):
    with torch.no_grad(), vtprune.make("dart", keep=keep, layer=2)(tiny_llava) as trace:
        tiny_llava(**batch)
    kept = [site.kept.tolist() for site in trace.forwards[0].sites]
    assert kept == expected_kept(tiny_llava, batch, trace, keep)
    per_image = keep if isinstance(keep, int) else 8
    assert trace.visual_tokens() == [(16, per_image), (32, 2 * per_image)]


def test_kept_sets_on_qwen_follow_the_dense_tensors(qwen):
    model, batch = qwen
    with torch.no_grad(), vtprune.make("dart", keep=13, layer=2)(model) as trace:
        model(**batch)
    kept = [site.kept.tolist() for site in trace.forwards[0].sites]
    assert kept == expected_kept(model, batch, trace, 13)
    assert trace.visual_tokens() == [(64, 26), (80, 26)]


# ------------------------------------------------------------------------------------------ exactness
def generate(model, batch, steps=3):
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def assert_keep_all_is_dense(model, batch, **options):
    with torch.no_grad():
        dense_logits = model(**batch).logits
        dense_sequences, dense_steps = generate(model, batch)
        with vtprune.make("dart", keep=1.0, **options)(model) as trace:
            logits = model(**batch).logits
            sequences, steps = generate(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], dense_logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(steps, dense_steps, atol=1e-5, rtol=0)  # prefill and every decoding step
    assert torch.equal(sequences, dense_sequences)
    assert all(before == after for before, after in trace.visual_tokens())


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_keep_all_reproduces_dense_logits_on_llava(tiny_llava, batch, layer):
    assert_keep_all_is_dense(tiny_llava, batch, layer=layer)


def test_keep_all_reproduces_dense_logits_on_qwen(qwen):
    assert_keep_all_is_dense(*qwen, layer=2)


def test_generate_with_left_padding_equals_reference(tiny_llava, batch):
    """Layers < K on the full sequence, layers >= K on the kept tokens at their original positions, decoded greedily
    by hand with the language model's own layers."""
    steps, cut = 5, 2
    with torch.no_grad():
        with vtprune.make("dart", keep=5, layer=cut)(tiny_llava) as trace:
            pruned = tiny_llava.generate(**batch, max_new_tokens=steps, do_sample=False)[:, -steps:]
        kept = [row["kept_indices"] for row in trace.summary()]
        reference = llava_layer_cut_reference(tiny_llava, batch, kept, cut, steps)
    assert [len(k) for k in kept] == [5, 10]
    assert torch.equal(pruned, reference)


def assert_batch_equals_singles(model, batch, singles_inputs, keep):
    """Positions count from each sample's first real token, so padding changes neither the selection nor the output."""
    with torch.no_grad(), vtprune.make("dart", keep=keep)(model) as trace:
        sequences, steps = generate(model, batch)
        singles = [generate(model, single) for single in singles_inputs]
    for b, (single_sequences, single_steps) in enumerate(singles):
        torch.testing.assert_close(steps[b], single_steps[0], atol=1e-5, rtol=0)
        assert sequences[b, -3:].tolist() == single_sequences[0, -3:].tolist()
        batched = [s.kept.tolist() for s in trace.forwards[0].sites if s.sample == b]
        assert batched == [s.kept.tolist() for s in trace.forwards[1 + b].sites]


def test_batched_generate_equals_each_sample_alone_on_llava(tiny_llava, batch):
    singles = [
        {"input_ids": batch["input_ids"][b : b + 1, batch["attention_mask"][b].bool()], "pixel_values": images}
        for b, images in ((0, batch["pixel_values"][:1]), (1, batch["pixel_values"][1:]))
    ]
    assert_batch_equals_singles(tiny_llava, batch, singles, keep=5)
    # (not on the tiny Qwen models: their dense outputs already differ by ~1e-2 between a padded batch and each sample
    # alone, which moves DART's near-tied cosines)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("options, message", [
    (dict(layer=0), "K must be an int >= 1"),
    (dict(pivot_image=0), "pivot_image=0"),
    (dict(pivot_text=-1), "pivot_text=-1"),
    (dict(keep=0), "keep at least one"),
    (dict(keep=1.5), "ratio must lie in"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(vtprune.VTPruneError, match=message):
        vtprune.make("dart", **options)


def test_budget_and_layer_beyond_the_model_are_refused(tiny_llava, batch):
    hooks = hooks_of(tiny_llava)
    with pytest.raises(vtprune.VTPruneError, match="more than the 16 visual tokens"):
        with torch.no_grad(), vtprune.make("dart", keep=17)(tiny_llava):
            tiny_llava(**batch)
    with pytest.raises(vtprune.VTPruneError, match="layers 0..3"):
        with vtprune.make("dart", keep=4, layer=4)(tiny_llava):
            pass
    assert hooks_of(tiny_llava) == hooks
