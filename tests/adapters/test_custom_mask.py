"""A caller's own 4-D attention mask (as transformers' `test_custom_4d_attention_mask` builds: three continuations of
one shared prefix packed in one row). With no visual tokens in the call nothing is pruned and the model runs as dense;
with visual tokens the call is refused in one line, and the model keeps its weights and its hooks."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.adapters.qwen_builders import build_tiny_qwen
from tests.helpers import build_tiny_llava, hooks_of, padded_batch

METHODS = {"fastv": dict(keep=1.0, layer=1), "pool": dict(keep=1.0), "gui-kv": dict(keep=1.0)}


@pytest.fixture(scope="module", params=["llava", "qwen2-vl"])
def model(request):
    return build_tiny_llava(seed=0) if request.param == "llava" else build_tiny_qwen("qwen2-vl")


def shared_prefix() -> dict[str, torch.Tensor]:
    """Prefix [11, 12, 13] followed by three one-token continuations [14], [15], [16], each seeing the prefix only."""
    allowed = torch.ones(6, 6).tril()
    allowed[4, 3] = allowed[5, 3] = allowed[5, 4] = 0
    mask = torch.zeros(1, 1, 6, 6).masked_fill(allowed == 0, torch.finfo(torch.float32).min)
    return {
        "input_ids": torch.tensor([[11, 12, 13, 14, 15, 16]]),
        "attention_mask": mask,
        "position_ids": torch.tensor([[0, 1, 2, 3, 3, 3]]),
    }


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_text_only_call_with_a_4d_mask_runs_as_dense(model, name):
    inputs = shared_prefix()
    with torch.no_grad():
        dense = model(**inputs).logits
        with vtprune.make(name, **METHODS[name])(model) as trace:
            pruned = model(**inputs).logits
        separate = model(input_ids=torch.tensor([[11, 12, 13, 16]])).logits[0, -1]
    assert torch.equal(pruned, dense)
    torch.testing.assert_close(dense[0, -1], separate, atol=1e-4, rtol=0)  # the mask is honoured (not ignored)
    assert trace.forwards == []  # nothing was pruned or recorded


def test_a_4d_mask_over_visual_tokens_is_refused():
    llava = build_tiny_llava(seed=0)
    batch = padded_batch()
    length = batch["input_ids"].shape[1]
    blocked = torch.zeros(2, 1, length, length).masked_fill(~torch.ones(length, length).tril().bool(), -1e9)
    weights, hooks = {k: v.clone() for k, v in llava.state_dict().items()}, hooks_of(llava)
    with torch.no_grad(), vtprune.make("fastv", keep=0.5, layer=1)(llava):
        with pytest.raises(vtprune.VTPruneError, match="4-D mask cannot follow its cuts: pass attention_mask as"):
            llava(**(batch | {"attention_mask": blocked}))
    assert hooks_of(llava) == hooks
    assert all(torch.equal(v, weights[k]) for k, v in llava.state_dict().items())
