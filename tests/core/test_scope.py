"""Budget scopes: which tokens share a budget (image, tile, video, sample); non-patch tokens always kept."""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.core import VisualLayout, VisualSpan, budget_groups, keep_top


def layout() -> VisualLayout:
    """One sample: an anyres image (base view 0: 4 patches; tiles 1, 2: 4 patches + 2 row ends), then a video of
    two frames (3 patches each, the last one ending with a newline)."""
    base = VisualSpan(image=0, start=0, patch_index=torch.arange(4), grid=(2, 2), kind="base",
                      view=torch.zeros(4, dtype=torch.long), view_patch=torch.arange(4))
    tiles = VisualSpan(image=0, start=4, patch_index=torch.tensor([0, 1, 2, 3, -1, 4, 5, 6, 7, -1]), grid=(2, 4),
                       kind="tiles", view=torch.tensor([1, 1, 2, 2, -1, 1, 1, 2, 2, -1]),
                       view_patch=torch.tensor([0, 1, 0, 1, -1, 2, 3, 2, 3, -1]))
    frame0 = VisualSpan(image=1, start=14, patch_index=torch.arange(3), grid=(1, 3), kind="frame", video=0)
    frame1 = VisualSpan(image=2, start=17, patch_index=torch.tensor([0, 1, 2, -1]), grid=(1, 3), kind="frame", video=0)
    return VisualLayout(spans=[[base, tiles, frame0, frame1]], seq_len=21)


@pytest.mark.parametrize(
    "scope, expected",
    [
        ("image", [(12, 1), (3, 1), (3, 1)]),
        ("tile", [(4, 1), (4, 1), (4, 1), (3, 1), (3, 1)]),
        ("video", [(12, 1), (6, 2)]),
        ("sample", [(18, 3)]),
    ],
)
def test_groups_and_units(scope, expected):
    groups = budget_groups(layout(), 0, scope)
    assert [(int(ordinals.numel()), units) for ordinals, units, _ in groups] == expected


def test_keep_top_counts_per_unit_and_keeps_non_patch_tokens():
    scores = [torch.arange(21, dtype=torch.float)]  # later tokens score higher
    row_ends = [8, 13, 20]
    plan = keep_top(layout(), scores, 1, "video")
    assert plan.keep[0].tolist() == sorted([12, 18, 19] + row_ends)  # image: 1 of 12; video: 2 frames x 1, jointly
    plan = keep_top(layout(), scores, 0.5, "tile")  # half of each view: base 0-3, tile 1 (4 5 9 10), tile 2 (6 7 11 12)
    assert plan.keep[0].tolist() == sorted([2, 3, 9, 10, 11, 12, 15, 16, 18, 19] + row_ends)


def test_a_budget_beyond_a_group_names_it():
    with pytest.raises(vtprune.VTPruneError, match="keep=4 is more than the 3 visual tokens of frame 1"):
        keep_top(layout(), [torch.zeros(21)], 4, "image")
    with pytest.raises(vtprune.VTPruneError, match="scope='frames'"):
        vtprune.make("random", scope="frames")
