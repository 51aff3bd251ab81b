"""Sessions are context-scoped, one per model: threads sharing a model either get their own result or a clear refusal,
dense callers are never pruned, nesting is refused at `with` entry, and the model is dense again afterwards."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import vtprune
from tests.helpers import build_tiny_llava, hooks_of, padded_batch

METHODS = {"dense": None, "vtc-cls": dict(keep=4, start_layer=0), "fastv": dict(keep=4, layer=1)}
THREADS, CALLS = 4, 20
REFUSAL = "already has a vtprune session open"


def call(model, batch, name):
    """(logits, kept visual tokens per sample or None)"""
    with torch.no_grad():
        if name == "dense":
            return model(**batch).logits, None
        with vtprune.make(name, **METHODS[name])(model) as trace:
            logits = model(**batch).logits
        return logits, trace.visual_tokens()


def test_threads_get_their_sequential_result_or_a_clear_refusal():
    model, batch = build_tiny_llava(seed=0), padded_batch()
    hooks = hooks_of(model)
    expected = {name: call(model, batch, name) for name in METHODS}
    assert expected["vtc-cls"][1] == expected["fastv"][1] == [(16, 4), (32, 8)]
    results, errors, sessions, dense_calls = [], [], [], []
    lock, start = threading.Lock(), threading.Barrier(THREADS)

    def worker(index):
        start.wait()
        names = list(METHODS)
        for step in range(CALLS):
            name = names[(index + step) % len(names)]
            began = time.perf_counter()
            try:
                logits, kept = call(model, batch, name)
            except vtprune.VTPruneError as error:
                with lock:
                    errors.append((name, str(error)))
                continue
            except BaseException as error:  # anything else fails the test below
                with lock:
                    errors.append((name, repr(error)))
                continue
            with lock:
                results.append((name, logits, kept))
                (dense_calls if name == "dense" else sessions).append((began, time.perf_counter()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(name != "dense" and REFUSAL in message and "\n" not in message for name, message in errors), errors
    assert len(results) + len(errors) == THREADS * CALLS
    real = batch["attention_mask"].bool()
    for name, logits, kept in results:
        want_logits, want_kept = expected[name]
        assert kept == want_kept, name  # dense calls never see a cut, pruned ones cut as they do alone
        assert logits.shape == want_logits.shape, name
        rows = real if name == "dense" else slice(None)
        torch.testing.assert_close(logits[rows], want_logits[rows], atol=1e-5, rtol=0, msg=name)
    assert {name for name, *_ in results} == set(METHODS)  # every kind ran at least once
    overlapping = sum(any(a < d and c < b for a, b in sessions) for c, d in dense_calls)
    assert overlapping > 0  # some dense calls ran while another thread's session was open
    assert hooks_of(model) == hooks
    fresh = build_tiny_llava(seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, fresh(**batch).logits, atol=0, rtol=0)


def test_a_nested_session_is_refused_at_entry_and_the_outer_one_keeps_working(tiny_llava, batch):
    hooks = hooks_of(tiny_llava)
    with torch.no_grad():
        alone = call(tiny_llava, batch, "fastv")
        with vtprune.make("fastv", **METHODS["fastv"])(tiny_llava) as trace:
            with pytest.raises(vtprune.VTPruneError, match=f"{REFUSAL} \\(FastV.*close it before") as refusal:
                with vtprune.make("random", keep=2)(tiny_llava):
                    pytest.fail("the nested session was entered")
            logits = tiny_llava(**batch).logits
        assert "\n" not in str(refusal.value)
        assert trace.visual_tokens() == alone[1]
        torch.testing.assert_close(logits, alone[0], atol=0, rtol=0)
        assert hooks_of(tiny_llava) == hooks
        with vtprune.make("random", keep=2)(tiny_llava) as trace:  # the model is free again
            tiny_llava(**batch)
        assert trace.visual_tokens() == [(16, 2), (32, 4)]
