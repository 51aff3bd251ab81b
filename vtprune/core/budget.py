"""Budgets: how many visual tokens to keep, given as a count or a ratio."""

from __future__ import annotations

import math

from .errors import VTPruneError


def check_keep(keep: int | float, name: str = "keep") -> int | float:
    """Validate a budget: a positive int (tokens) or a float ratio in (0, 1]."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise VTPruneError(f"{name} must be an int (tokens) or a float ratio in (0, 1], got {keep!r}")
    if isinstance(keep, int) and keep <= 0:
        raise VTPruneError(f"{name}={keep}: keep at least one visual token ({name} >= 1), or give a ratio in (0, 1]")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise VTPruneError(f"{name}={keep}: a ratio must lie in (0, 1]; give an int to keep a number of tokens")
    return keep


def keep_count(keep: int | float, available: int, *, what: str = "the image", rounding: str = "round") -> int:
    """Number of tokens to keep out of `available`.

    A count larger than `available` is an error (not a silent clamp): it names the image and how many tokens it has.
    A ratio keeps `round(ratio * available)` tokens (or `floor` with rounding="floor"), at least one.
    """
    if isinstance(keep, float):
        raw = keep * available
        count = math.floor(raw + 1e-9) if rounding == "floor" else int(round(raw))
        return max(1, min(available, count)) if available else 0
    if keep > available:
        raise VTPruneError(
            f"keep={keep} is more than the {available} visual tokens of {what}; "
            f"use keep<={available} or a ratio such as keep=1.0"
        )
    return keep
