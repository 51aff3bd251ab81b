"""`peak_tensor_bytes` on the CPU: the peak of live tensor bytes a call adds, whatever the process holds already."""

from __future__ import annotations

import torch

from vtprune.eval.memory import peak_tensor_bytes

MB = 1_000_000


def two_at_a_time() -> torch.Tensor:
    """Never more than two 4 MB tensors alive: a and b, then b and c."""
    a = torch.ones(1000, 1000)
    b = a * 2
    del a
    c = b + 1
    return c


def test_peak_counts_the_tensors_alive_together():
    assert 8 * MB <= peak_tensor_bytes(two_at_a_time) < 8 * MB + 1024
    assert 12 * MB <= peak_tensor_bytes(lambda: [torch.ones(MB // 4) for _ in range(12)]) < 12 * MB + 1024


def test_peak_does_not_depend_on_what_is_already_allocated():
    before = peak_tensor_bytes(two_at_a_time)
    held = torch.zeros(50 * MB // 4)  # 50 MB alive before the call
    assert peak_tensor_bytes(two_at_a_time) == before
    del held
