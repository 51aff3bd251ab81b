"""FLOPs accounting reproduces the published TransPrune / FastV figures from shapes alone."""

from __future__ import annotations

import torch

import vtprune
from tests.helpers import build_tiny_llava, padded_batch
from vtprune.eval.flops import layer_flops, llm_flops, schedule, visual_tokens_per_layer

D, M = 4096, 11008  # LLaVA-1.5-7B / NeXT-7B (Vicuna-7B)


def transprune_tflops(tokens: int, ratios: tuple[float, ...], layers=(7, 9, 12)) -> float:
    """Image tokens only, as the papers count; pruning after 1-indexed layer p = a cut before 0-based layer p."""
    cuts = [(p, int(tokens * r)) for p, r in zip(layers, ratios)]
    return llm_flops(schedule(tokens, 32, cuts), D, M) / 1e12


def test_published_tflops():
    high, low = (0.875, 0.625, 0.125), (0.625, 0.1875, 0.0625)
    assert round(llm_flops([576] * 32, D, M) / 1e12, 2) == 3.82  # LLaVA-1.5-7B dense
    assert round(transprune_tflops(576, high), 2) == 1.56  # TransPrune-High (Table 1)
    assert round(transprune_tflops(576, low), 2) == 1.19  # TransPrune-Low
    assert round(llm_flops([2880] * 32, D, M) / 1e12, 2) == 20.83  # LLaVA-NeXT-7B dense
    assert round(transprune_tflops(2880, high), 2) == 8.33  # TransPrune-High (Table 2)
    assert round(transprune_tflops(2880, low), 2) == 6.41
    table9 = {(5, 7, 10): 1.35, (6, 8, 11): 1.45, (8, 10, 13): 1.66, (9, 11, 14): 1.77}
    assert {k: round(transprune_tflops(576, high, k), 2) for k in table9} == table9
    assert round(llm_flops(schedule(576, 32, [(2, 288)]), D, M) / 1e12, 2) == 2.01  # FastV K=2 R=50%


def test_layer_formula():
    assert layer_flops(3, 5, 7) == 4 * 3 * 25 + 2 * 9 * 5 + 3 * 3 * 5 * 7
    assert schedule(10, 5, [(1, 8), (3, 2)]) == [10, 8, 8, 2, 2]


def test_per_layer_counts_from_a_trace():
    model = build_tiny_llava(seed=0, layers=16)
    method = vtprune.make("transprune", prune_layers=(7, 9, 12))
    with torch.no_grad(), method(model) as trace:
        model(**padded_batch())
    expected = [16] * 7 + [14] * 2 + [10] * 3 + [2] * 4  # floor(16 * 0.875), floor(16 * 0.625), floor(16 * 0.125)
    assert visual_tokens_per_layer(trace, 16, sample=0) == expected
    assert visual_tokens_per_layer(trace, 16, sample=1) == [2 * n for n in expected]
