from __future__ import annotations

import pytest

from vtprune.core import VTPruneError, keep_count


def test_counts_and_ratios():
    assert keep_count(64, 576) == 64
    assert keep_count(576, 576) == 576
    assert keep_count(0.125, 576) == 72
    assert keep_count(1.0, 576) == 576
    assert keep_count(0.001, 576) == 1  # at least one token
    assert keep_count(0.875, 7, rounding="floor") == 6


def test_count_above_the_available_tokens_is_an_error_naming_both():
    with pytest.raises(VTPruneError, match="keep=600 is more than the 576 visual tokens of image 3"):
        keep_count(600, 576, what="image 3")
