"""A2SF: per-step kept sets equal the official real-drop cache (tests/data/reference/a2sf) over 40 decode steps; the
grouped-query and visual-only adaptations equal a step-by-step reference written from the spec."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.methods._kv import decode_attention
from vtprune.methods.a2sf import A2SF, A2SFLayer

DATA = Path(__file__).parents[1] / "data" / "reference" / "a2sf"
CASES = ["alpha02_prompt24", "alpha09_prompt24", "h2o_prompt24", "alpha05_prompt10"]


@pytest.mark.parametrize("case", CASES)
def test_kept_sets_of_a_40_step_decode_equal_the_official_cache(case):
    ref = torch.load(DATA / f"{case}.pt")
    q, k, n = ref["queries"], ref["keys"], ref["prompt_len"]
    heads, d = q.shape[0], q.shape[2]
    budget = ref["hh_size"] + ref["recent_size"]
    layer = A2SFLayer(heads, budget, ref["recent_size"], ref["alpha"])
    kept = layer.prefill(q[:, :n], k[:, :n], 1 / math.sqrt(d), torch.ones(n, dtype=torch.bool))
    expected = ref["kept"][0][:, : kept.shape[1]]
    assert torch.equal(kept, expected) and bool((ref["kept"][0][:, kept.shape[1] :] == -1).all())
    for s in range(ref["steps"]):
        t = n + s
        positions = layer.entries.positions
        keys = torch.stack([torch.cat([k[h, positions[h]], k[h, t : t + 1]]) for h in range(heads)])
        attention = decode_attention(q[:, t], keys, 1 / math.sqrt(d))
        official_rows = ref["rows"][s][:, : attention.shape[1]]
        torch.testing.assert_close(attention, official_rows, atol=1e-6, rtol=0)  # the same inputs as the official run
        before = torch.cat([positions, torch.full((heads, 1), t)], dim=1)
        evict = layer.step(attention)
        after = layer.entries.positions
        assert after.shape[1] <= budget
        expected = ref["kept"][s + 1]
        assert torch.equal(after, expected[:, : after.shape[1]]) and bool((expected[:, after.shape[1] :] == -1).all())
        for h in range(heads):  # the evicted slots name exactly the tokens that left
            assert set(before[h, evict[h]].tolist()) == set(before[h].tolist()) - set(after[h].tolist())


def reference(q, k, n, steps, budget, recent, alpha, eligible):
    """A2SF from the spec with plain loops: per cache head a list of positions and a dict of scores; the rows of a
    query-head group are averaged. Returns the kept positions of every head after the prefill and after each step."""
    heads, kv_heads, d = q.shape[0], k.shape[0], q.shape[2]
    group = heads // kv_heads
    scale = 1 / math.sqrt(d)
    history = []
    caches, scores = [], []
    for g in range(kv_heads):
        score = {j: 0.0 for j in range(n)}
        for h in range(g * group, (g + 1) * group):
            for i in range(n):
                logits = [float(q[h, i] @ k[g, j]) * scale for j in range(i + 1)]
                top = max(logits)
                exps = [math.exp(x - top) for x in logits]
                for j in range(i + 1):
                    score[j] += alpha ** (n - 1 - i) * exps[j] / sum(exps) / group
        caches.append(list(range(n)))
        scores.append(score)

    def evict(g, is_eligible):
        cache = caches[g]
        while sum(is_eligible(p) for p in cache) > budget:
            candidates = [p for p in cache[: len(cache) - recent] if is_eligible(p)]
            victim = min(candidates, key=lambda p: (scores[g][p], p))
            cache.remove(victim)

    decode_eligible = bool(eligible.all())  # evict="all": decode tokens compete too

    def is_eligible(p):
        return bool(eligible[p]) if p < n else decode_eligible

    for g in range(kv_heads):
        evict(g, is_eligible)
    history.append([list(c) for c in caches])
    for s in range(steps):
        t = n + s
        for g in range(kv_heads):
            cache = caches[g] + [t]
            mean_row = {p: 0.0 for p in cache}
            for h in range(g * group, (g + 1) * group):
                logits = [float(q[h, t] @ k[g, p]) * scale for p in cache]
                top = max(logits)
                exps = [math.exp(x - top) for x in logits]
                for p, e in zip(cache, exps):
                    mean_row[p] += e / sum(exps) / group
            for p in caches[g]:
                scores[g][p] = alpha * scores[g][p] + mean_row[p]
            scores[g][t] = mean_row[t]
            caches[g] = cache
            evict(g, is_eligible)
        history.append([list(c) for c in caches])
    return history


def drive(layer, q, k, n, steps, eligible):
    d = q.shape[2]
    kept = [layer.prefill(q[:, :n], k[:, :n], 1 / math.sqrt(d), eligible).tolist()]
    for s in range(steps):
        t = n + s
        positions = layer.entries.positions
        keys = torch.stack([torch.cat([k[g, positions[g]], k[g, t : t + 1]]) for g in range(k.shape[0])])
        layer.step(decode_attention(q[:, t], keys, 1 / math.sqrt(d)))
        kept.append(layer.entries.positions.tolist())
    return kept


@pytest.mark.parametrize("evict", ["all", "visual"])
def test_grouped_query_heads_and_visual_only_equal_the_step_by_step_reference(evict):
    torch.manual_seed(5)
    n, steps, heads, kv_heads, d = 30, 40, 4, 2, 8
    q, k = torch.randn(heads, n + steps, d), torch.randn(kv_heads, n + steps, d)
    visual = torch.zeros(n, dtype=torch.bool)
    visual[3:19] = True
    eligible = torch.ones(n, dtype=torch.bool) if evict == "all" else visual
    budget, recent = (14, 4) if evict == "all" else (6, 4)
    layer = A2SFLayer(kv_heads, budget, recent, alpha=0.6, evict=evict)
    kept = drive(layer, q, k, n, steps, eligible)
    expected = reference(q, k, n, steps, budget, recent, 0.6, eligible)
    assert kept == expected
    if evict == "visual":
        assert all(len([p for p in head if p < n and visual[p]]) == budget for head in kept[0])
        assert all(len(head) == n - 16 + budget + s for s, heads_ in enumerate(kept) for head in heads_)


def test_budget_at_least_the_sequence_evicts_nothing():
    torch.manual_seed(1)
    q, k = torch.randn(4, 64, 8), torch.randn(4, 64, 8)
    layer = A2SFLayer(4, budget=64, recent=4, alpha=0.2)
    for s, kept in enumerate(drive(layer, q, k, 24, 40, torch.ones(24, dtype=torch.bool))):
        assert kept == [list(range(24 + s))] * 4


def test_prompt_rows_drops_only_rows_below_the_tolerance():
    assert A2SF(alpha=0.2).prompt_rows(100) == 100
    rows = A2SF(alpha=0.2, row_tolerance=1e-12).prompt_rows(100)
    assert 0.2 ** (rows - 1) >= 1e-12 > 0.2**rows
    assert A2SF(alpha=0.0, row_tolerance=1e-12).prompt_rows(100) == 1
    torch.manual_seed(2)
    q, k = torch.randn(4, 60, 8), torch.randn(4, 60, 8)
    full = A2SFLayer(4, 20, 4, 0.2)
    cut = A2SFLayer(4, 20, 4, 0.2)
    full.prefill(q, k, 8**-0.5, torch.ones(60, dtype=torch.bool))
    cut.prefill(q[:, -rows:], k, 8**-0.5, torch.ones(60, dtype=torch.bool))
    # the rows left out weigh < 1e-12; the scores are fp32 (rtol: rounding of a sum in another order)
    torch.testing.assert_close(cut.scores, full.scores, atol=1e-11, rtol=1e-6)


def test_options():
    assert A2SF(keep=64).recent_for(64) == 16 and A2SF(keep=256).recent_for(256) == 32
    assert A2SF(keep=8).recent_for(8) == 7 and A2SF(recent=3).recent_for(8) == 3
    with pytest.raises(vtprune.VTPruneError, match="alpha"):
        A2SF(alpha=1.5)
    with pytest.raises(vtprune.VTPruneError, match="gqa_reduce"):
        A2SF(gqa_reduce="first")
    with pytest.raises(vtprune.VTPruneError, match="evict"):
        A2SF(evict="text")
    with pytest.raises(vtprune.VTPruneError, match="recent"):
        A2SF(recent=-2)
    with pytest.raises(vtprune.VTPruneError, match="row_tolerance"):
        A2SF(row_tolerance=1.0)
    with pytest.raises(vtprune.VTPruneError, match="must exceed the 8 recent"):
        A2SF(recent=8).layer_state(cache_heads=2, budget=8)
