"""Measuring one request: prefill time, peak memory, errors caught, hooks removed; token counts per layer."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules import module as torch_module

import vtprune
from tests.helpers import GRID, hooks_of
from vtprune.eval.measure import RequestMeter, cache_bytes
from vtprune.eval.memory import cpu_peak_supported, peak_memory_bytes


def test_meter_times_the_prefill_of_a_generate(tiny_llava, batch):
    with RequestMeter(tiny_llava) as meter:
        tiny_llava.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert meter.forwards == 3 and meter.error is None
    assert meter.prefill_seconds > 0
    assert hooks_of(tiny_llava) == 0 and not torch_module._global_forward_pre_hooks


def test_meter_catches_a_failed_forward_and_removes_its_hooks(tiny_llava, batch):
    method = vtprune.make("random", keep=GRID * GRID + 1)  # more than an image has: the cut raises inside forward
    with pytest.raises(vtprune.VTPruneError), method(tiny_llava), RequestMeter(tiny_llava) as meter:
        tiny_llava(**batch)
    assert meter.forwards == 0 and isinstance(meter.error, vtprune.VTPruneError)
    assert hooks_of(tiny_llava) == 0 and not torch_module._global_forward_pre_hooks


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs and glibc (Linux)")
def test_cpu_peak_memory_sees_a_freed_allocation():
    def allocate() -> None:
        block = torch.ones(16 * 2**20)  # 64 MiB, written, then freed
        del block

    assert 56 * 2**20 <= peak_memory_bytes(allocate, "cpu") < 96 * 2**20  # a few pages may have been resident


def test_cache_bytes_count_every_layer_at_its_own_length(tiny_llava, batch):
    layers = tiny_llava.config.text_config.num_hidden_layers
    length = batch["input_ids"].shape[1]
    heads, dim = tiny_llava.config.text_config.num_key_value_heads, 64 // 4
    for method, first in ((vtprune.make("random", keep=4), 0), (vtprune.make("fastv", keep=4, layer=2), 2)):
        with torch.no_grad(), method(tiny_llava):
            out = tiny_llava(**batch, use_cache=True)
        # only the padding the longest sample needs stays: sample 1 (two images, 24 tokens go, no padding) is longest
        kept = [length] * first + [length - 24] * (layers - first)
        assert cache_bytes(out.cache) == sum(2 * 2 * heads * n * dim * 4 for n in kept)  # k and v, batch 2, fp32
