from __future__ import annotations

import torch

from vtprune.core import KeepPlan, VisualLayout, VisualSpan, top_k


def test_top_k_is_stable_and_ascending():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.1])
    assert top_k(scores, 3).tolist() == [0, 1, 2]  # ties go to the lower index


def layout():
    span = lambda image, start: VisualSpan(image=image, start=start, patch_index=torch.arange(4), grid=(2, 2))
    return VisualLayout(spans=[[span(0, 1)], [span(1, 0), span(2, 5)]], seq_len=10)


def test_keep_positions_keep_text_and_kept_visual_tokens():
    plan = KeepPlan(keep=[torch.tensor([0, 3]), torch.tensor([1, 6])])
    positions = plan.keep_positions(layout())
    assert positions[0].tolist() == [0, 1, 4, 5, 6, 7, 8, 9]
    assert positions[1].tolist() == [1, 4, 7, 9]


def test_layout_after_keep_moves_spans_and_remembers_original_ordinals():
    lay = layout()
    kept = [torch.tensor([0, 3]), torch.tensor([1, 6])]
    new_position = []
    for b, positions in enumerate(KeepPlan(keep=kept).keep_positions(lay)):
        lookup = torch.zeros(10, dtype=torch.long)
        lookup[positions] = torch.arange(len(positions)) + (8 - len(positions))
        new_position.append(lookup)
    after = lay.after_keep(kept, new_position, new_seq_len=8)
    assert [s.start for s in after.spans[1]] == [4, 6]
    assert after.spans[1][1].patch_index.tolist() == [2]
    assert after.original_ordinal[1].tolist() == [1, 6]
    assert after.visual_positions(0).tolist() == [1, 2]
