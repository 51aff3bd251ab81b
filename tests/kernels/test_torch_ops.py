"""The plain torch compaction ops against loop references, and the backend dispatch."""

import pytest
import torch

from vtprune import kernels


def loop_gather(x: torch.Tensor, keep: list[torch.Tensor], dim: int) -> torch.Tensor:
    """x: batch at 0, sequence at `dim`. Kept tokens right-aligned in a zero tensor of the longest keep length."""
    length = max((int(k.numel()) for k in keep), default=0)
    shape = list(x.shape)
    shape[dim] = length
    out = torch.zeros(shape, dtype=x.dtype)
    for b, kept in enumerate(keep):
        n = int(kept.numel())
        out[b].narrow(dim - 1, length - n, n).copy_(x[b].index_select(dim - 1, kept))
    return out


KEEP = [torch.tensor([1, 4, 5, 9]), torch.zeros(0, dtype=torch.long), torch.arange(10), torch.tensor([9])]


def test_left_padded_index_is_right_aligned() -> None:
    index, valid = kernels.left_padded_index([torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long), torch.arange(3)])
    assert index.tolist() == [[0, 1, 3], [0, 0, 0], [0, 1, 2]]
    assert valid.tolist() == [[False, True, True], [False, False, False], [True, True, True]]


def test_left_padded_index_all_empty() -> None:
    index, valid = kernels.left_padded_index([torch.zeros(0, dtype=torch.long)] * 2)
    assert index.shape == valid.shape == (2, 0)


@pytest.mark.parametrize("position_dims", [2, 3])
def test_compact_sequence_matches_loop(position_dims: int) -> None:
    hidden = torch.randn(4, 10, 6)
    positions = torch.randint(0, 100, (3, 4, 10) if position_dims == 3 else (4, 10))
    mask = torch.randint(0, 2, (4, 10)).bool()
    index, valid = kernels.left_padded_index(KEEP)
    out_hidden, out_positions, out_mask = kernels.compact_sequence(hidden, positions, mask, index, valid)
    assert torch.equal(out_hidden, loop_gather(hidden, KEEP, 1))
    if position_dims == 3:
        assert torch.equal(out_positions, loop_gather(positions.transpose(0, 1), KEEP, 2).transpose(0, 1))
    else:
        assert torch.equal(out_positions, loop_gather(positions, KEEP, 1))
    assert torch.equal(out_mask, loop_gather(mask, KEEP, 1))


def test_compact_cache_matches_loop() -> None:
    layers = [(torch.randn(4, 2, 10, 3), torch.randn(4, 2, 10, 3)) for _ in range(3)]
    index, valid = kernels.left_padded_index(KEEP)
    for (k, v), (k2, v2) in zip(layers, kernels.compact_cache(layers, index, valid)):
        assert torch.equal(k2, loop_gather(k, KEEP, 2))
        assert torch.equal(v2, loop_gather(v, KEEP, 2))


def test_merge_tokens_matches_loop() -> None:
    x = torch.randn(2, 8, 5)
    before = x.clone()
    batch, slot = torch.tensor([0, 0, 1]), torch.tensor([2, 6, 0])
    offsets = torch.tensor([0, 3, 3, 5])  # segment 1 is empty: its slot becomes 0
    sources, weights = torch.tensor([1, 2, 3, 0, 7]), torch.rand(5)
    out = kernels.merge_tokens(x, batch, slot, offsets, sources, weights)
    expected = x.clone()
    for s in range(3):
        rows = range(int(offsets[s]), int(offsets[s + 1]))
        total = sum((weights[e].double() * x[batch[s], sources[e]].double() for e in rows), torch.zeros(5).double())
        expected[batch[s], slot[s]] = total.float()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, before)


def test_auto_backend_runs_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("the Triton op ran on CPU tensors")

    monkeypatch.delenv("VTPRUNE_KERNELS", raising=False)
    monkeypatch.setitem(kernels.ops._TRITON_OPS, "compact_sequence", fail)
    index, valid = kernels.left_padded_index(KEEP)
    hidden, positions, mask = torch.randn(4, 10, 2), torch.arange(10).expand(4, 10), torch.ones(4, 10)
    kernels.compact_sequence(hidden, positions, mask, index, valid)
    kernels.compact_sequence(hidden, positions, mask, index, valid, backend="torch")


def test_unknown_backend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    x, empty = torch.zeros(1, 2, 3), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="kernel backend 'cuda'"):
        kernels.merge_tokens(x, empty, empty, torch.zeros(1, dtype=torch.long), empty, torch.zeros(0), backend="cuda")
    monkeypatch.setenv("VTPRUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match="kernel backend 'fast'"):
        kernels.merge_tokens(x, empty, empty, torch.zeros(1, dtype=torch.long), empty, torch.zeros(0))


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("VTPRUNE_KERNELS", "triton")
    index, valid = kernels.left_padded_index(KEEP)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|triton is not installed"):
        kernels.compact_cache([(torch.randn(4, 2, 10, 3), torch.randn(4, 2, 10, 3))], index, valid)
