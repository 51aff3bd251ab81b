"""compile_cut: the positions a cut keeps, and the padding a ragged batch still needs after it."""

from __future__ import annotations

import torch

from vtprune.core.cut import compile_cut
from vtprune.core.layout import VisualLayout, VisualSpan
from vtprune.core.plan import KeepPlan


def ragged_layout() -> tuple[VisualLayout, torch.Tensor]:
    """Length 12. Sample 0: 4 pads, BOS, 4 visual (5..8), 3 text. Sample 1: BOS, 8 visual (1..8), 3 text."""
    spans = [[VisualSpan(image=0, start=5, patch_index=torch.arange(4))],
             [VisualSpan(image=1, start=1, patch_index=torch.arange(8))]]
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[0, :4] = True
    return VisualLayout(spans=spans, seq_len=12), padding


def test_keep_all_leaves_a_padded_batch_unchanged():
    layout, padding = ragged_layout()
    cut = compile_cut(KeepPlan(keep=[torch.arange(4), torch.arange(8)]), layout, padding=padding)
    assert cut.length == 12
    assert torch.equal(cut.index, torch.arange(12).repeat(2, 1)) and bool(cut.valid.all())


def test_a_ragged_cut_drops_the_padding_no_sample_needs():
    layout, padding = ragged_layout()
    plan = KeepPlan(keep=[torch.tensor([0, 1, 2, 3]), torch.tensor([2, 5])])  # sample 0 keeps 8 real, sample 1 keeps 6
    cut = compile_cut(plan, layout, padding=padding)
    assert cut.length == 8  # the longest sample's real tokens; before, sample 0's 4 pads made it 12
    assert cut.keep[0].tolist() == list(range(4, 12))  # every pad dropped: sample 0 is the longest now
    assert cut.keep[1].tolist() == [0, 3, 6, 9, 10, 11]
    assert cut.valid[1].tolist() == [False] * 2 + [True] * 6  # sample 1 left-padded to it

    plan = KeepPlan(keep=[torch.tensor([0]), torch.tensor([2, 5])])  # now sample 1 (6 real) is the longest
    cut = compile_cut(plan, layout, padding=padding)
    assert cut.length == 6
    assert cut.keep[0].tolist() == [3, 4, 5, 9, 10, 11]  # the last of its pads fills it up to the new length
    assert bool(cut.valid.all())


def test_without_a_mask_padding_is_kept_like_text():
    layout, _ = ragged_layout()
    cut = compile_cut(KeepPlan(keep=[torch.tensor([0, 1, 2, 3]), torch.tensor([2, 5])]), layout)
    assert cut.length == 12 and cut.keep[0].tolist() == list(range(12))
