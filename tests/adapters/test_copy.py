"""`copy.deepcopy` and pickling (`torch.save`) of a model while a session is open: the copy is the dense model, with
no session, of the model's own classes (the session's hooks come along as inert no-ops); the session on the original
keeps working and closes cleanly.

Pickling happens before the session's first forward: after any forward (with or without vtprune) transformers itself
leaves a local output-capturing hook on the model that pickle cannot store.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import vtprune
from tests.helpers import hooks_of
from tests.helpers_video import build_tiny_llava_next, build_tiny_onevision, media_batch
from vtprune.core.adapter import _inert

CASES = {  # model -> (builder, images per sample, videos per sample)
    "next": (build_tiny_llava_next, [[(32, 48)], [(60, 40), (64, 64)]], None),
    "onevision": (build_tiny_onevision, [[(40, 70)], []], [[], [2]]),
}
METHODS = {  # one per site: before the LLM, between layers, the kv cache, the attention site (class swaps, proxies)
    "random": dict(keep=3),
    "fastv": dict(keep=3, layer=1),
    "gui-kv": dict(keep=0.5),
    "zipvl": dict(keep=0.5),
}


def inert_hooks(model):
    """Forward (pre-)hooks of `model` that are vtprune's inert stand-in for a session hook (they return None)."""
    tables = [t for m in model.modules() for t in (m._forward_pre_hooks, m._forward_hooks)]
    return sum(fn is _inert for table in tables for fn in table.values())


def pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request):
    build, images, videos = CASES[request.param]
    model = build()
    batch = media_batch(model, images, videos)
    return build, model, batch


@pytest.mark.parametrize("name", sorted(METHODS))
def test_copies_made_inside_a_session_are_dense_models(family, name):
    build, _, batch = family
    model = build()  # never run: see the module docstring
    dense_class, hooks = type(model), hooks_of(model)
    with vtprune.make(name, **METHODS[name])(model) as trace:
        copies = {"deepcopy": copy.deepcopy(model), "pickle": pickled(model)}
        with torch.no_grad():
            pruned = model(**batch).logits
            for kind, twin in copies.items():
                assert type(twin) is dense_class, kind
                assert all(type(m).__name__ == type(m).__mro__[0].__name__ for m in twin.modules())
                assert inert_hooks(twin) == hooks_of(twin) - hooks, kind  # the session's hooks were copied inert
                assert twin.config._attn_implementation == model.config._attn_implementation, kind
                # the copy runs dense even while the original's session is open in this very thread
                torch.testing.assert_close(twin(**batch).logits, build()(**batch).logits, atol=0, rtol=0, msg=kind)
        assert len(trace.forwards) == 1  # the copies' forwards were not recorded
    with torch.no_grad():
        dense = build()(**batch).logits
        for kind, twin in copies.items():
            torch.testing.assert_close(twin(**batch).logits, dense, atol=0, rtol=0, msg=kind)
    assert hooks_of(model) == hooks and type(model) is dense_class
    if name in ("random", "fastv"):
        assert pruned.shape[1] < dense.shape[1]
