"""`vtprune bench --profile`'s measurements: time in vtprune's stages and the calls that would wait on the host."""

from __future__ import annotations

import re

import pytest
import torch

import vtprune
from tests.helpers import build_tiny_llava, padded_batch
from vtprune.core.profile import STAGES, stage
from vtprune.eval.profile import host_syncs, stage_times


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava().eval()


def prefill(model, method=None):
    def run():
        with torch.no_grad(), method(model) if method else torch.no_grad():
            model(**padded_batch(), use_cache=True)

    return run


def test_dense_spends_nothing_in_vtprune_stages_and_makes_no_vtprune_syncs(model):
    times = stage_times(prefill(model))
    assert set(times) == {*STAGES, "total"} and times["total"] > 0
    assert all(times[s] == 0 for s in STAGES)
    assert host_syncs(prefill(model))["vtprune"] == 0


@pytest.mark.parametrize("name, stages", [("fastv", {"signals", "score", "compact"}), ("streamingllm", {"cache"})])
def test_a_method_is_seen_in_its_own_stages_only(model, name, stages):
    method = vtprune.make(name, layer=1, keep=4) if name == "fastv" else vtprune.make(name, keep=8)
    times = stage_times(prefill(model, method))
    assert {s for s in STAGES if times[s] > 0} == stages
    assert sum(times[s] for s in STAGES) < times["total"]


def test_syncs_are_split_between_vtprune_and_the_rest_with_vtprune_call_sites(model):
    syncs = host_syncs(prefill(model, vtprune.make("random", keep=4)))
    assert syncs["vtprune"] == sum(syncs["sites"].values()) > 0
    assert all(re.fullmatch(r"[\w/]+\.py:\d+", site) for site in syncs["sites"])  # e.g. core/cut.py:105
    outside = host_syncs(lambda: [torch.ones(3).sum().item(), torch.arange(4).tolist(), torch.tensor([0, 2]).nonzero()])
    assert outside == {"vtprune": 0, "other": 3, "sites": {}}


def test_an_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown stage 'scoring'"):
        stage("scoring")
