"""Public API: the registry, options, and clear errors for bad input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from tests.helpers import hooks_of
from vtprune.core import KeepPlan, Method, PrefillKV, QueryAttention, keep_all, keep_heads


def test_available_lists_the_registered_methods():
    assert {"vtc-cls", "fastv", "random", "pool", "gui-kv"} <= set(vtprune.available())


def test_make_passes_options_and_repr_shows_them():
    method = vtprune.make("vtc-cls", keep=32, start_layer=20)
    assert (method.keep, method.start_layer) == (32, 20)
    assert "keep=32" in repr(method)


@pytest.mark.parametrize("keep, message", [(0, "at least one"), (-3, "at least one"), (1.5, r"\(0, 1\]"), ("64", "int")])
def test_bad_budgets_are_refused(keep, message):
    with pytest.raises(vtprune.VTPruneError, match=message):
        vtprune.make("random", keep=keep)


def test_unknown_method_and_option_are_named():
    with pytest.raises(vtprune.VTPruneError, match="unknown method 'fastvv'.*fastv"):
        vtprune.make("fastvv")
    with pytest.raises(vtprune.VTPruneError, match="no option kep.*keep"):
        vtprune.make("random", kep=3)


@dataclass
class _EncoderMethod(Method):
    name: ClassVar[str] = "test-encoder-site"
    sites: ClassVar[tuple[str, ...]] = ("encoder",)

    def plan(self, ctx):
        return keep_all(ctx.layout)


@dataclass
class _UnknownSignal(Method):
    name: ClassVar[str] = "test-unknown-signal"

    def requests(self, info):
        return [object()]

    def plan(self, ctx):
        return keep_all(ctx.layout)


def test_site_or_signal_the_adapter_lacks_is_refused_before_attaching(tiny_llava):
    hooks = hooks_of(tiny_llava)
    with pytest.raises(vtprune.UnsupportedSignalError, match="site 'encoder'.*llava"):
        _EncoderMethod()(tiny_llava)
    with pytest.raises(vtprune.UnsupportedSignalError, match="signal object"):
        _UnknownSignal()(tiny_llava)
    assert hooks_of(tiny_llava) == hooks


@dataclass
class _BadPlan(Method):
    name: ClassVar[str] = "test-bad-plan"
    sites: ClassVar[tuple[str, ...]] = ("llm_layer",)

    def cut_layers(self, info):
        return [1]

    def requests(self, info):
        return [QueryAttention(layer=0)]

    def plan(self, ctx):
        return KeepPlan(keep=[torch.tensor([3, 1])] * ctx.layout.batch_size)


def test_a_plan_that_breaks_the_contract_is_refused_and_model_restored(tiny_llava, batch):
    hooks = hooks_of(tiny_llava)
    with pytest.raises(vtprune.VTPruneError, match="not strictly ascending"):
        with _BadPlan()(tiny_llava):
            tiny_llava(**batch)
    assert hooks_of(tiny_llava) == hooks


@dataclass
class _PaddingCachePlan(Method):
    name: ClassVar[str] = "test-padding-cache-plan"
    sites: ClassVar[tuple[str, ...]] = ("kv_cache",)

    def requests(self, info):
        return [PrefillKV()]

    def plan(self, ctx):
        heads = [torch.zeros(2, 3, dtype=torch.long) + torch.arange(3) for _ in range(ctx.layout.batch_size)]
        return keep_heads(ctx.layout, heads)  # positions 0..2: left padding in sample 0


@dataclass
class _CacheWithoutRequest(Method):
    name: ClassVar[str] = "test-cache-without-request"
    sites: ClassVar[tuple[str, ...]] = ("kv_cache",)

    def plan(self, ctx):
        return keep_all(ctx.layout)


def test_a_cache_plan_that_keeps_padding_is_refused_and_model_restored(tiny_llava, batch):
    hooks = hooks_of(tiny_llava)
    with pytest.raises(vtprune.VTPruneError, match="keeps padding"):
        with _PaddingCachePlan()(tiny_llava):
            tiny_llava(**batch, use_cache=True)
    with pytest.raises(vtprune.VTPruneError, match="must request one PrefillKV"):
        with _CacheWithoutRequest()(tiny_llava):
            pass
    assert hooks_of(tiny_llava) == hooks
