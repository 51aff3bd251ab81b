"""The Triton kernels, run by the Triton interpreter on CPU tensors, against the torch path.

TRITON_INTERPRET=1 is set for this module only: `triton_ops` wraps its kernels with `triton.jit` at launch time, once
per TRITON_INTERPRET value, so the kernels run interpreted here whatever was imported before, and nothing changes for
other tests once the variable is restored. Shapes are tiny: the interpreter runs every program in Python.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from vtprune import kernels  # noqa: E402
from vtprune.kernels import torch_ops, triton_ops  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # spacing above 1.0


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.delenv("VTPRUNE_KERNELS", raising=False)
        yield


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape, dtype and bits (signed zeros included), NaN where expected has NaN.

    NaN payloads are not compared: torch's CPU `gather` rewrites bfloat16 NaNs (0x7fc0 -> 0xffff); the kernels copy
    bits unchanged.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype.is_floating_point:
        nan = expected.isnan()
        assert torch.equal(actual.isnan(), nan)
        actual, expected = actual.masked_fill(nan, 0), expected.masked_fill(nan, 0)
    if actual.dtype != torch.bool:
        integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
        actual, expected = actual.view(integer), expected.view(integer)
    assert torch.equal(actual, expected)


def with_specials(x: torch.Tensor) -> torch.Tensor:
    """x (contiguous) with a NaN, two infinities and a negative zero in its first four elements."""
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=x.dtype)
    return x


def random(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Floats with special values, or integers in 0..99."""
    if dtype.is_floating_point:
        return with_specials(torch.randn(shape).to(dtype))
    return torch.randint(0, 100, shape, dtype=dtype)


def strided(shape: tuple[int, ...], layout: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random tensor of `shape`: contiguous, every other element of a wider last dim, or with dims 1 and 2 swapped."""
    if layout == "contiguous":
        return random(shape, dtype)
    if layout == "sliced":
        return random((*shape[:-1], 2 * shape[-1]), dtype)[..., ::2]
    return random((shape[0], shape[2], shape[1], *shape[3:]), dtype).transpose(1, 2)


def keep_lists(kind: str, length: int) -> list[torch.Tensor]:
    """Ragged keep lists: with an empty and a full one, partial only, all empty, or a single full one."""
    generator = torch.Generator().manual_seed(0)

    def subset(n: int) -> torch.Tensor:
        return torch.randperm(length, generator=generator)[:n].sort().values

    empty = torch.zeros(0, dtype=torch.long)
    return {
        "ragged": [subset(length // 3), empty, torch.arange(length), torch.tensor([length - 1])],
        "partial": [subset(length // 2), subset(3), subset(length // 4)],
        "all_empty": [empty, empty],
        "full": [torch.arange(length)],
    }[kind]


# ------------------------------------------------------------------------------------------ compact_sequence
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position_dims", [2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "swapped"])
def test_compact_sequence(dtype: torch.dtype, position_dims: int, layout: str) -> None:
    length, width = 13, 40
    keep = keep_lists("ragged", length)
    batch = len(keep)
    hidden = strided((batch, length, width), layout, dtype)
    if position_dims == 3:
        positions = strided((3, batch, length), layout, torch.long)  # [P, B, L], like multimodal RoPE
    elif layout == "contiguous":
        positions = strided((batch, length), layout, torch.long)
    else:
        positions = torch.arange(length).expand(batch, length)  # what the adapter passes: stride 0 over the batch
    mask = strided((batch, length), "contiguous" if layout == "contiguous" else "sliced", torch.long)
    index, valid = kernels.left_padded_index(keep)
    if layout == "swapped":
        index = index.t().contiguous().t()
    expected = torch_ops.compact_sequence(hidden, positions, mask, index, valid)
    actual = kernels.compact_sequence(hidden, positions, mask, index, valid, backend="triton")
    for a, e in zip(actual, expected):
        assert_bitwise(a, e)


@pytest.mark.parametrize("kind", ["partial", "all_empty", "full"])
def test_compact_sequence_keep_lists(kind: str) -> None:
    length = 9
    keep = keep_lists(kind, length)
    hidden = strided((len(keep), length, 1100), "contiguous", torch.bfloat16)  # several tiles along L and D
    positions = torch.arange(length).expand(len(keep), length)
    mask = torch.ones(len(keep), length, dtype=torch.bool)
    index, valid = kernels.left_padded_index(keep)
    expected = torch_ops.compact_sequence(hidden, positions, mask, index, valid)
    actual = kernels.compact_sequence(hidden, positions, mask, index, valid, backend="triton")
    for a, e in zip(actual, expected):
        assert_bitwise(a, e)


# --------------------------------------------------------------------------------------------- compact_cache
def count_launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    launch = triton_ops._launch_cache

    def counted(tensors, index, valid):
        calls.append(len(tensors))
        return launch(tensors, index, valid)

    monkeypatch.setattr(triton_ops, "_launch_cache", counted)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "swapped", "mixed"])
def test_compact_cache(dtype: torch.dtype, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    keep = keep_lists("ragged", 11)
    shape = (len(keep), 2, 11, 24)  # [B, H, L, d]: d is no power of two
    layers = []
    for layer in range(3):  # "mixed": layer 1 is a [B, L, H, d] buffer seen as [B, H, L, d]
        this = "swapped" if layout == "swapped" or (layout == "mixed" and layer == 1) else "contiguous"
        layers.append((strided(shape, this, dtype), strided(shape, this, dtype)))
    index, valid = kernels.left_padded_index(keep)
    launches = count_launches(monkeypatch)
    actual = kernels.compact_cache(layers, index, valid, backend="triton")
    expected = torch_ops.compact_cache(layers, index, valid)
    assert launches == ([4, 2] if layout == "mixed" else [6])  # one launch per layout, all of its K and V
    for (k, v), (k2, v2) in zip(actual, expected):
        assert_bitwise(k, k2)
        assert_bitwise(v, v2)


@pytest.mark.parametrize("kind", ["partial", "all_empty", "full"])
def test_compact_cache_keep_lists(kind: str) -> None:
    keep = keep_lists(kind, 10)
    layers = [(strided((len(keep), 3, 10, 16), "contiguous"), strided((len(keep), 3, 10, 16), "contiguous"))] * 2
    index, valid = kernels.left_padded_index(keep)
    actual = kernels.compact_cache(layers, index, valid, backend="triton")
    for (k, v), (k2, v2) in zip(actual, torch_ops.compact_cache(layers, index, valid)):
        assert_bitwise(k, k2)
        assert_bitwise(v, v2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_cache_per_head(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index [B, H, C] (the kv_cache site: every head keeps its own positions) in one launch, bitwise."""
    g = torch.Generator().manual_seed(3)
    heads, length = 3, 12
    keep = [torch.sort(torch.stack([torch.randperm(length, generator=g)[:c] for _ in range(heads)]), dim=1).values
            for c in (5, 3)]  # ragged across the batch, the same count in every head of a sample
    layers = [(strided((2, heads, length, 20), "contiguous", dtype), strided((2, heads, length, 20), "swapped", dtype))]
    index, valid = kernels.left_padded_heads(keep)
    launches = count_launches(monkeypatch)
    ((k, v),) = kernels.compact_cache(layers, index, valid, backend="triton")
    ((k2, v2),) = torch_ops.compact_cache(layers, index, valid)
    assert len(launches) == 2  # K and V differ in layout here: one launch each
    assert_bitwise(k, k2)
    assert_bitwise(v, v2)


def test_compact_sequence_of_hidden_states_alone() -> None:
    """The encoder site gathers hidden states only (no positions, no mask)."""
    keep = keep_lists("ragged", 9)
    hidden = strided((len(keep), 9, 40), "contiguous", torch.float16)
    index, valid = kernels.left_padded_index(keep)
    actual = kernels.compact_sequence(hidden, None, None, index, valid, backend="triton")
    expected = torch_ops.compact_sequence(hidden, None, None, index, valid)
    assert actual[1] is None and actual[2] is None
    assert_bitwise(actual[0], expected[0])


# ---------------------------------------------------------------------------------------------- merge_tokens
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "swapped"])
@pytest.mark.parametrize("width", [40, 1100])
def test_merge_tokens(dtype: torch.dtype, layout: str, width: int) -> None:
    x = strided((2, 12, width), layout, dtype)  # special values in tokens 0..3 of sample 0, which are not merged
    before = x.clone()
    batch, slot = torch.tensor([0, 0, 1, 1]), torch.tensor([5, 10, 0, 6])
    offsets = torch.tensor([0, 3, 3, 7, 8])  # segment 1 is empty (slot becomes 0), segment 3 has one entry
    sources = torch.tensor([4, 5, 8, 0, 5, 9, 11, 6])
    weights = torch.cat([torch.full((3,), 1 / 3), torch.rand(4), torch.ones(1)]).to(dtype)
    actual = kernels.merge_tokens(x, batch, slot, offsets, sources, weights, backend="triton")
    expected = torch_ops.merge_tokens(x, batch, slot, offsets, sources, weights)
    assert_bitwise(x, before)
    untouched = torch.ones(2, 12, dtype=torch.bool)
    untouched[batch, slot] = False
    assert_bitwise(actual[untouched], expected[untouched])
    assert_bitwise(actual[1, 6], expected[1, 6])  # one entry of weight 1: a copy
    # float32 sums in another order, then one rounding to the dtype: within one unit in the last place
    torch.testing.assert_close(actual[batch, slot], expected[batch, slot], rtol=ULP[dtype], atol=1e-5)


def test_merge_tokens_without_segments() -> None:
    x = torch.randn(2, 5, 8)
    empty = torch.zeros(0, dtype=torch.long)
    out = kernels.merge_tokens(x, empty, empty, torch.zeros(1, dtype=torch.long), empty, torch.zeros(0), backend="triton")
    assert_bitwise(out, x)


# ----------------------------------------------------------------------------------------------------- dispatch
def test_environment_forces_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_launches(monkeypatch)
    layers = [(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))]
    index, valid = kernels.left_padded_index([torch.tensor([0, 2])])
    kernels.compact_cache(layers, index, valid)  # auto: CPU tensors take the torch path
    assert calls == []
    monkeypatch.setenv("VTPRUNE_KERNELS", "triton")
    kernels.compact_cache(layers, index, valid)
    assert calls == [2]


def test_interpreter_is_scoped(monkeypatch: pytest.MonkeyPatch) -> None:
    assert triton_ops.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_ops.interpreting()
    index, valid = kernels.left_padded_index([torch.tensor([0])])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.compact_sequence(torch.randn(1, 2, 4), torch.arange(2)[None], torch.ones(1, 2), index, valid,
                                 backend="triton")


# --------------------------------------------------------------------------------------- through the adapter
@pytest.mark.parametrize("method", ["fastv", "pool"])  # fastv: a cut between layers; pool: merges, then a pre-LLM cut
def test_pruned_llava_matches_torch_kernels(method: str, tiny_llava, batch, monkeypatch: pytest.MonkeyPatch) -> None:
    import vtprune

    calls: list[str] = []

    def counted(name: str, op):
        def run(*args):
            calls.append(name)
            return op(*args)

        return run

    for name, op in list(kernels.ops._TRITON_OPS.items()):
        monkeypatch.setitem(kernels.ops._TRITON_OPS, name, counted(name, op))
    logits = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("VTPRUNE_KERNELS", backend)
        with torch.no_grad(), vtprune.make(method, keep=4)(tiny_llava) as trace:
            logits[backend] = tiny_llava(**batch).logits
        assert trace.visual_tokens() == [(16, 4), (32, 8)]  # left-padded batch: one image, then two
    assert calls == (["compact_sequence"] if method == "fastv" else ["merge_tokens", "compact_sequence"])
    if method == "fastv":
        assert torch.equal(logits["triton"], logits["torch"])
    else:
        torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, options", [("gui-kv", dict(keep=0.5)), ("zipvl", dict(keep=0.8, probe="all"))])
def test_cache_sites_compact_through_the_kernels(method, options, tiny_llava, batch, monkeypatch):
    """The kv_cache site (per-head selection) and the llm_attention site (important tokens) compact caches with
    `compact_cache`: the Triton path gives the torch path's logits and caches."""
    import vtprune

    calls: list[str] = []
    op = kernels.ops._TRITON_OPS["compact_cache"]
    monkeypatch.setitem(kernels.ops._TRITON_OPS, "compact_cache", lambda *a: calls.append("compact_cache") or op(*a))
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("VTPRUNE_KERNELS", backend)
        with torch.no_grad(), vtprune.make(method, **options)(tiny_llava):
            out[backend] = tiny_llava(**batch, use_cache=True)
    assert calls.count("compact_cache") == len(tiny_llava.model.language_model.layers)  # one per layer
    assert torch.equal(out["triton"].logits, out["torch"].logits)
    for a, b in zip(out["triton"].cache.layers, out["torch"].cache.layers):
        assert torch.equal(a.valid if method == "zipvl" else a.keys, b.valid if method == "zipvl" else b.keys)
