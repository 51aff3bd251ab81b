"""EMS (no official code): per step of a 40-step decode, the evicted set, the merges and the merged keys/values equal a
step-by-step reference written from the spec's interpretation I1-I12 (plain loops over heads and entries)."""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune.methods.ems import EMS, EMSLayer, merge_all, route

N, STEPS, HEADS, D = 30, 40, 4, 8


def softmax(logits):
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps]


class Reference:
    """One cache head of EMS from the spec: a list of entries {pos, K, V, A, C, eligible} in slot order."""

    def __init__(self, q, k, v, g, group, budget, recent, window, tau, eligible):
        self.q, self.group, self.g = q, group, g
        self.budget, self.recent, self.window, self.tau = budget, recent, window, tau
        self.scale = 1 / math.sqrt(q.shape[2])
        heads = range(g * group, (g + 1) * group)
        self.entries = [
            {"pos": j, "K": k[g, j].clone(), "V": v[g, j].clone(), "A": 0.0, "C": float(N - j),
             "eligible": bool(eligible[j])}
            for j in range(N)
        ]
        for h in heads:  # I1: A_j = attention from every prompt query, averaged over the group's heads
            for i in range(N):
                probs = softmax([float(q[h, i] @ self.entries[j]["K"]) * self.scale for j in range(i + 1)])
                for j in range(i + 1):
                    self.entries[j]["A"] += probs[j] / group
        self.window_queries = list(range(max(N - window, 0), N))  # token indices of the window queries

    def local(self):
        """I2: attention of the window queries on the current cache, causal by position, group mean."""
        out = [0.0] * len(self.entries)
        for t in self.window_queries:
            visible = [i for i, e in enumerate(self.entries) if e["pos"] <= t]
            for h in range(self.g * self.group, (self.g + 1) * self.group):
                probs = softmax([float(self.q[h, t] @ self.entries[i]["K"]) * self.scale for i in visible])
                for i, p in zip(visible, probs):
                    out[i] += p / self.group
        return out

    def compress(self):
        """Returns {centre position: [member positions]} and the leaving positions."""
        if sum(e["eligible"] for e in self.entries) <= self.budget:
            return {}, []
        local = self.local()
        global_ = [e["A"] / e["C"] for e in self.entries]
        s = [gl / sum(global_) + lo / sum(local) for gl, lo in zip(global_, local)]
        protected = set(range(len(self.entries) - self.recent, len(self.entries)))
        candidates = [i for i, e in enumerate(self.entries) if e["eligible"] and i not in protected]
        n_centres = self.budget - sum(self.entries[i]["eligible"] for i in protected)
        centres = sorted(candidates, key=lambda i: -s[i])[:n_centres]
        leavers = [i for i in candidates if i not in centres]
        members = {c: [] for c in centres}
        for i in leavers:
            ki = self.entries[i]["K"]
            cosines = [float(ki @ self.entries[c]["K"] / (ki.norm() * self.entries[c]["K"].norm())) for c in centres]
            best = max(range(len(centres)), key=lambda x: cosines[x])
            if cosines[best] >= self.tau:
                members[centres[best]].append(i)
        merged = {}
        for c, group in members.items():
            if not group:
                continue
            centre = self.entries[c]
            parts = [c] + group
            w = [s[i] for i in parts]
            centre_norm = centre["K"].norm()
            u = sum(wi * self.entries[i]["K"] / self.entries[i]["K"].norm() for wi, i in zip(w, parts))
            new_k = centre_norm * u / u.norm()
            new_v = sum(wi * self.entries[i]["V"] for wi, i in zip(w, parts)) / sum(w)
            centre["A"] += centre["C"] * sum(self.entries[i]["A"] / self.entries[i]["C"] for i in group)
            centre["K"], centre["V"] = new_k, new_v
            merged[centre["pos"]] = sorted(self.entries[i]["pos"] for i in group)
        leaving = sorted(self.entries[i]["pos"] for i in leavers)
        self.entries = [e for i, e in enumerate(self.entries) if i not in leavers]
        return merged, leaving

    def step(self, t, k_new, v_new, eligible):
        new = {"pos": t, "K": k_new.clone(), "V": v_new.clone(), "A": 0.0, "C": 0.0, "eligible": eligible}
        self.entries.append(new)
        for h in range(self.g * self.group, (self.g + 1) * self.group):
            probs = softmax([float(self.q[h, t] @ e["K"]) * self.scale for e in self.entries])
            for e, p in zip(self.entries, probs):
                e["A"] += p / self.group
        for e in self.entries:
            e["C"] += 1
        self.window_queries = (self.window_queries + [t])[-self.window :]
        return self.compress()


def apply(keys, values, update):
    """What a cache site does: write each merge's weighted sums into its centre, then drop the evicted slots."""
    keys, values = keys.clone(), values.clone()
    merged = [{} for _ in range(keys.shape[0])]
    for m in update.merges:
        new_k = (m.key_weights[:, None] * keys[m.head, m.sources]).sum(0)
        new_v = (m.value_weights[:, None] * values[m.head, m.sources]).sum(0)
        keys[m.head, m.centre], values[m.head, m.centre] = new_k, new_v
        merged[m.head][m.centre] = m.sources[1:]
    keep = torch.ones(keys.shape[:2], dtype=torch.bool).scatter(1, update.evict, False)
    heads = keys.shape[0]
    return keys[keep].view(heads, -1, keys.shape[2]), values[keep].view(heads, -1, values.shape[2]), merged


def positions_of(merged, positions):
    return [
        {int(positions[h, c]): sorted(positions[h, m].tolist()) for c, m in heads.items()}
        for h, heads in enumerate(merged)
    ]


@pytest.mark.parametrize("evict, budget, tau", [("all", 16, 0.5), ("all", 12, 0.3), ("visual", 6, 0.4)])
def test_every_step_equals_the_reference(evict, budget, tau):
    torch.manual_seed(7)
    kv_heads, recent, window = 2, 4, 6
    q = torch.randn(HEADS, N + STEPS, D)
    k, v = torch.randn(kv_heads, N + STEPS, D) + 0.3, torch.randn(kv_heads, N + STEPS, D)
    visual = torch.zeros(N, dtype=torch.bool)
    visual[4:20] = True
    eligible = visual if evict == "visual" else torch.ones(N, dtype=torch.bool)
    refs = [Reference(q, k, v, g, HEADS // kv_heads, budget, recent, window, tau, eligible) for g in range(kv_heads)]
    layer = EMSLayer(kv_heads, budget, recent, window, tau, evict)
    scale = 1 / math.sqrt(D)

    _, update = layer.prefill(q[:, :N], k[:, :N], scale, eligible)
    keys, values, merged = apply(k[:, :N], v[:, :N], update)
    prompt = torch.arange(N).expand(kv_heads, N)
    expected = [ref.compress() for ref in refs]
    assert positions_of(merged, prompt) == [e[0] for e in expected]
    assert [prompt[h, update.evict[h]].tolist() for h in range(kv_heads)] == [e[1] for e in expected]
    merges = discards = 0
    for s in range(STEPS + 1):
        for h, ref in enumerate(refs):
            assert layer.entries.positions[h].tolist() == [e["pos"] for e in ref.entries]
            torch.testing.assert_close(keys[h], torch.stack([e["K"] for e in ref.entries]), atol=1e-5, rtol=0)
            torch.testing.assert_close(values[h], torch.stack([e["V"] for e in ref.entries]), atol=1e-5, rtol=0)
            accumulated = torch.tensor([e["A"] for e in ref.entries])
            torch.testing.assert_close(layer.accumulated[h], accumulated, atol=1e-5, rtol=1e-5)
        eligible_kept = int(layer.entries.eligible[0].sum())
        assert eligible_kept <= budget
        if s == STEPS:
            break
        t = N + s
        before = torch.cat([layer.entries.positions, torch.full((kv_heads, 1), t)], dim=1)
        keys, values = torch.cat([keys, k[:, t : t + 1]], dim=1), torch.cat([values, v[:, t : t + 1]], dim=1)
        update = layer.step(q[:, t], keys, scale)
        keys, values, merged = apply(keys, values, update)
        expected = [ref.step(t, k[h, t], v[h, t], evict == "all") for h, ref in enumerate(refs)]
        assert positions_of(merged, before) == [e[0] for e in expected]
        assert [before[h, update.evict[h]].tolist() for h in range(kv_heads)] == [e[1] for e in expected]
        merges += sum(len(m) for e in expected for m in e[0].values())
        discards += sum(len(e[1]) for e in expected)
    if evict == "all":  # heads both merge and discard: the zero class is exercised
        assert 0 < merges < discards


def test_budget_at_least_the_sequence_evicts_nothing():
    torch.manual_seed(8)
    q, k = torch.randn(HEADS, N + STEPS, D), torch.randn(2, N + STEPS, D)
    layer = EMSLayer(2, budget=N + STEPS, recent=4, window=6, tau=0.5)
    kept, update = layer.prefill(q[:, :N], k[:, :N], 0.35, torch.ones(N, dtype=torch.bool))
    assert kept.tolist() == [list(range(N))] * 2 and update.evict.numel() == 0 and not update.merges
    keys = k[:, :N]
    for s in range(STEPS):
        keys = torch.cat([keys, k[:, N + s : N + s + 1]], dim=1)
        update = layer.step(q[:, N + s], keys, 0.35)
        assert update.evict.numel() == 0 and not update.merges
    assert layer.entries.positions.tolist() == [list(range(N + STEPS))] * 2


def test_options():
    assert EMS(keep=0.5).budget(prompt_len=41, visual=16, images=1) == 20
    with pytest.raises(vtprune.VTPruneError, match="tau"):
        EMS(tau=2.0)
    with pytest.raises(vtprune.VTPruneError, match="window"):
        EMS(window=0)
    with pytest.raises(vtprune.VTPruneError, match="evict"):
        EMS(evict="heads")
    with pytest.raises(vtprune.VTPruneError, match="must exceed the 8 recent"):
        EMS().layer_state(cache_heads=2, budget=8)
    layer = EMS().layer_state(cache_heads=2, budget=16)
    with pytest.raises(vtprune.VTPruneError, match="all 30 prompt tokens"):
        layer.prefill(torch.randn(4, 8, 8), torch.randn(2, 30, 8), 0.35, torch.ones(30, dtype=torch.bool))


def loop_merges(keys, scores, centres, leavers, tau):
    """The merges as a plain loop over heads, leavers and centres: {(head, centre slot): (sources, key weights,
    value weights)}, sources = the centre, then its members ascending (I7, I8)."""
    out = {}
    for h in range(keys.shape[0]):
        unit = [keys[h, j] / keys[h, j].norm() for j in range(keys.shape[1])]
        members = {int(c): [] for c in centres[h]}
        for i in leavers[h].tolist():
            cosines = [float(unit[i] @ unit[int(c)]) for c in centres[h]]
            best = max(range(len(cosines)), key=lambda x: cosines[x]) if cosines else None  # first of ties
            if best is not None and cosines[best] >= tau:
                members[int(centres[h, best])].append(i)
        for c, group in members.items():
            if not group:
                continue
            sources = [c] + group
            w = scores[h, sources]
            u = sum(wi * keys[h, j] / keys[h, j].norm() for wi, j in zip(w, sources))
            key_weights = torch.stack([keys[h, c].norm() * wi / (keys[h, j].norm() * u.norm()) for wi, j in zip(w, sources)])
            out[(h, c)] = (sources, key_weights, w / w.sum())
    return out


@pytest.mark.parametrize("tau, ties, centres_count", [
    (0.3, False, 9), (0.3, True, 9), (-1.0, True, 9), (1.5, False, 9), (0.0, False, 1), (0.3, False, 0),
])
def test_vectorised_merges_equal_a_loop_over_heads_and_centres(tau, ties, centres_count):
    """`route` + `merge_all` (every head at once) give the merges, weights and merged entries of a per-head loop,
    on random keys: ties between centres (duplicate keys: the first centre wins), everything or nothing joining,
    one centre, no centre."""
    torch.manual_seed(11)
    heads, length, dim = 3, 40, 6
    keys, values = torch.randn(heads, length, dim) + 0.4, torch.randn(heads, length, 5)
    scores = torch.rand(heads, length)
    order = torch.stack([torch.randperm(length - 4) for _ in range(heads)])  # the last 4 slots stay (recent)
    centres = order[:, :centres_count]  # score order, not slot order (as topk gives them)
    leavers = torch.sort(order[:, centres_count:], dim=1).values
    if ties and centres_count > 1:
        for h in range(heads):  # a duplicate centre key, and a leaver equal to the first of the two
            keys[h, centres[h, 1]] = keys[h, centres[h, 0]]
            keys[h, leavers[h, 0]] = keys[h, centres[h, 0]] * 2.0
            scores[h, leavers[h, 1]] = scores[h, leavers[h, 2]]
    index, joined = route(keys, centres, leavers, tau)
    combine = merge_all(keys, scores, centres, leavers, index, joined)
    expected = loop_merges(keys, scores, centres, leavers, tau)
    got = {(m.head, m.centre): m for m in combine.entries()}
    assert got.keys() == expected.keys()
    if tau <= -1.0 and centres_count:
        assert bool(joined.all())
    if tau > 1.0 or not centres_count:
        assert not got and not bool(joined.any())
    new_keys, new_values = combine.apply(keys, values)
    changed = torch.zeros(heads, length, dtype=torch.bool)
    for (h, c), (sources, key_weights, value_weights) in expected.items():
        assert got[(h, c)].sources.tolist() == sources
        torch.testing.assert_close(got[(h, c)].key_weights, key_weights, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got[(h, c)].value_weights, value_weights, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(new_keys[h, c], (key_weights[:, None] * keys[h, sources]).sum(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(new_values[h, c], (value_weights[:, None] * values[h, sources]).sum(0),
                                   atol=1e-5, rtol=0)
        changed[h, c] = True
    changed |= torch.zeros_like(changed).scatter(1, leavers, True)  # leavers leave: their slots may hold anything
    assert torch.equal(new_keys[~changed], keys[~changed]) and torch.equal(new_values[~changed], values[~changed])
