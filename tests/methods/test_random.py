"""Random pruning is seeded: the same seed keeps the same tokens, another seed others."""

from __future__ import annotations

import torch

import vtprune


def kept(model, batch, **options):
    with torch.no_grad(), vtprune.make("random", **options)(model) as trace:
        model(**batch)
    return [row["kept_indices"] for row in trace.summary()]


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_llava, batch):
    first = kept(tiny_llava, batch, keep=4, seed=7)
    assert first == kept(tiny_llava, batch, keep=4, seed=7)
    assert first != kept(tiny_llava, batch, keep=4, seed=8)
    assert [len(k) for k in first] == [4, 8]
    assert all(k == sorted(k) for k in first)
