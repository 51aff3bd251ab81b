"""Scissorhands (no official code): the evicted set of every step of a 40-step decode equals a step-by-step reference
written from the paper's Algorithms 1-2 as the spec fixes them (plain loops over heads, entries and history records)."""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune.methods._kv import decode_attention
from vtprune.methods.scissorhands import Scissorhands, ScissorhandsLayer

N, STEPS, HEADS, D = 30, 40, 4, 8


def probabilities(q, k, h, t, positions):
    """Softmax of query head h at token t over the keys at `positions` (cache head h // group)."""
    g = h * k.shape[0] // q.shape[0]
    logits = [float(q[h, t] @ k[g, p]) / math.sqrt(q.shape[2]) for p in positions]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps]


def reference(q, k, budget, drop, recent, window, eligible, gqa_reduce):
    """Per cache head: the cache (positions in order), and per position its (step, unimportant) records.
    Returns, per call (prefill, then each step), the evicted positions of every head and the cache lengths attended."""
    kv_heads = k.shape[0]
    group = q.shape[0] // kv_heads
    decode_eligible = bool(eligible.all())
    caches = [list(range(N)) for _ in range(kv_heads)]
    records = [{p: [] for p in range(N + STEPS)} for _ in range(kv_heads)]

    def record(g, step, t, cache):
        per_head = [probabilities(q, k, h, t, cache) for h in range(g * group, (g + 1) * group)]
        for i, p in enumerate(cache):
            values = [row[i] for row in per_head]
            if gqa_reduce == "mean":
                low = sum(values) / group < 1 / len(cache)
            else:
                low = all(v < 1 / len(cache) for v in values)
            records[g][p].append((step, low))

    def compress(g, count, now):
        cache = caches[g]
        def unimportant(p):
            return sum(low for step, low in records[g][p] if step > now - window)
        def is_eligible(p):
            return bool(eligible[p]) if p < N else decode_eligible
        candidates = [p for p in cache[: len(cache) - recent] if is_eligible(p)]
        leaving = sorted(candidates, key=lambda p: (-unimportant(p), p))[:count]
        for p in leaving:
            cache.remove(p)
        return sorted(leaving)

    rows = min(window, N)
    evicted, attended = [], []
    for step, t in enumerate(range(N - rows, N)):
        for g in range(kv_heads):
            record(g, step, t, list(range(t + 1)))
    n_eligible = int(eligible.sum())
    if decode_eligible and n_eligible >= budget:
        evicted.append([compress(g, n_eligible - (budget - drop), rows - 1) for g in range(kv_heads)])
    elif not decode_eligible and n_eligible > budget:
        evicted.append([compress(g, n_eligible - budget, rows - 1) for g in range(kv_heads)])
    else:
        evicted.append([[] for _ in range(kv_heads)])
    for s in range(STEPS):
        t, step = N + s, rows + s
        out = []
        for g in range(kv_heads):
            caches[g].append(t)
            attended.append(len(caches[g]))
            record(g, step, t, caches[g])
            full = decode_eligible and len(caches[g]) >= budget
            out.append(compress(g, drop, step) if full else [])
        evicted.append(out)
    return evicted, attended


def drive(layer, q, k, eligible):
    rows = min(layer.window, N)
    before = [list(range(N))] * k.shape[0]
    kept = layer.prefill(q[:, N - rows : N], k[:, :N], 1 / math.sqrt(D), eligible)
    evicted = [[sorted(set(before[g]) - set(kept[g].tolist())) for g in range(k.shape[0])]]
    for s in range(STEPS):
        t = N + s
        positions = layer.entries.positions
        keys = torch.stack([torch.cat([k[g, positions[g]], k[g, t : t + 1]]) for g in range(k.shape[0])])
        # the budget holds: no query attends more than B entries (visual only: at most B visual entries)
        assert (keys.shape[1] if layer.evict == "all" else int(layer.entries.eligible[0].sum())) <= layer.budget
        evict = layer.step(decode_attention(q[:, t], keys, 1 / math.sqrt(D)))
        full = torch.cat([positions, torch.full((k.shape[0], 1), t)], dim=1)
        evicted.append([sorted(full[g, evict[g]].tolist()) for g in range(k.shape[0])])
    return evicted


@pytest.mark.parametrize(
    "kv_heads, budget, drop, recent, window, gqa_reduce",
    [
        (4, 16, 8, 4, 8, "mean"),  # MHA, m = B / 2, short history
        (4, 16, 1, 4, 400, "mean"),  # m = 1 (a per-step count-based H2O), history longer than the run
        (2, 12, 5, 3, 6, "mean"),  # grouped-query heads, mean rule
        (2, 12, 5, 3, 6, "any"),  # grouped-query heads, "unimportant for every head" rule
        (4, 40, 10, 4, 8, "mean"),  # prompt shorter than the budget: the first compression comes while decoding
    ],
)
def test_evicted_set_of_every_step_equals_the_reference(kv_heads, budget, drop, recent, window, gqa_reduce):
    torch.manual_seed(3)
    q, k = torch.randn(HEADS, N + STEPS, D) * 1.5, torch.randn(kv_heads, N + STEPS, D)
    eligible = torch.ones(N, dtype=torch.bool)
    layer = ScissorhandsLayer(kv_heads, budget, drop, recent, window, gqa_reduce=gqa_reduce)
    got = drive(layer, q, k, eligible)
    expected, attended = reference(q, k, budget, drop, recent, window, eligible, gqa_reduce)
    assert got == expected
    assert max(attended) <= budget
    assert sum(len(e[0]) for e in got) > drop  # the run compresses more than once


def test_visual_only_compresses_the_visual_tokens_once():
    torch.manual_seed(4)
    q, k = torch.randn(HEADS, N + STEPS, D), torch.randn(2, N + STEPS, D)
    visual = torch.zeros(N, dtype=torch.bool)
    visual[4:20] = True
    layer = ScissorhandsLayer(2, budget=6, drop=3, recent=4, window=8, evict="visual")
    got = drive(layer, q, k, visual)
    expected, _ = reference(q, k, 6, 3, 4, 8, visual, "mean")
    assert got == expected
    assert all(len(head) == 10 and all(visual[p] for p in head) for head in got[0])
    assert all(head == [] for step in got[1:] for head in step)


def test_budget_at_least_the_sequence_evicts_nothing():
    torch.manual_seed(5)
    q, k = torch.randn(HEADS, N + STEPS, D), torch.randn(4, N + STEPS, D)
    layer = ScissorhandsLayer(4, budget=N + STEPS + 1, drop=4, recent=4, window=8)
    assert drive(layer, q, k, torch.ones(N, dtype=torch.bool)) == [[[]] * 4] * (STEPS + 1)


def test_options():
    method = Scissorhands(keep=20)
    assert method.drop_for(20) == 10 and method.prompt_rows(30) == 30 and method.prompt_rows(1000) == 400
    assert Scissorhands(keep=0.5).budget(prompt_len=41, visual=16, images=1) == 20
    with pytest.raises(vtprune.VTPruneError, match="gqa_reduce"):
        Scissorhands(gqa_reduce="max")
    with pytest.raises(vtprune.VTPruneError, match="drop_fraction"):
        Scissorhands(drop_fraction=1.0)
    with pytest.raises(vtprune.VTPruneError, match="window"):
        Scissorhands(window=0)
    with pytest.raises(vtprune.VTPruneError, match="evict"):
        Scissorhands(evict="text")
    with pytest.raises(vtprune.VTPruneError, match="only 2 outside the 10 recent"):
        Scissorhands(keep=12).layer_state(cache_heads=2, budget=12)
    layer = Scissorhands(window=4).layer_state(cache_heads=4, budget=20)
    with pytest.raises(vtprune.VTPruneError, match="last min"):
        layer.prefill(torch.randn(4, 3, 8), torch.randn(4, 30, 8), 0.35, torch.ones(30, dtype=torch.bool))
