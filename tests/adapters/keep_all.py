"""Checks every adapter's tests share: a keep-all session equals dense, and a refusal leaves the model untouched."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import vtprune
from tests.helpers import hooks_of


def assert_keep_all_matches_dense(model, batch: dict, dense: tuple, method: Any, generate: Callable) -> Any:
    """Under `method` (keeping every token): the prefill's logits on real tokens, every decoding step's logits and the
    sequences of `generate(model, batch) -> (sequences, steps)` equal `dense` = (logits, sequences, steps). Returns
    the session's trace."""
    dense_logits, dense_sequences, dense_steps = dense
    with torch.no_grad(), method(model) as trace:
        logits = model(**batch).logits
        sequences, steps = generate(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], dense_logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(steps, dense_steps, atol=1e-5, rtol=0)  # prefill and every decoding step
    assert torch.equal(sequences, dense_sequences)
    return trace


def assert_refused_untouched(model, name: str, options: dict, message: str) -> None:
    """Attaching `name` raises a VTPruneError matching `message`, and the model keeps exactly its hooks."""
    hooks = hooks_of(model)
    with pytest.raises(vtprune.VTPruneError, match=message):
        vtprune.make(name, **options)(model)
    assert hooks_of(model) == hooks
