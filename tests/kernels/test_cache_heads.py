"""Per-head cache compaction: ragged keep lists become a right-aligned gather; every head gathers its own positions."""

from __future__ import annotations

import torch

from vtprune import kernels


def test_per_head_gather_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    keep = [torch.tensor([[0, 4, 8], [1, 2, 8], [5, 6, 7]]), torch.tensor([[3, 8], [0, 8], [2, 4]])]
    index, valid = kernels.left_padded_heads(keep)
    assert valid.tolist() == [[True, True, True], [False, True, True]]  # right-aligned, left padding
    ((k, v),) = kernels.compact_cache([(keys, values)], index, valid)  # index [B, H, C]: one selection per head
    for b, kept in enumerate(keep):
        c = kept.shape[1]
        for h in range(3):
            assert torch.equal(k[b, h, 3 - c :], keys[b, h, kept[h]])
            assert torch.equal(v[b, h, 3 - c :], values[b, h, kept[h]])
    assert bool((k[1, :, 0] == 0).all()) and bool((v[1, :, 0] == 0).all())  # padding slots are zero
