"""The budget: one value, `keep`, whose meaning every method declares by its `budget_kind`, and one parser for it.

- `VISUAL_TOKENS` (most methods): an int counts the visual tokens each image keeps after the method's (last) cut; a
  float in (0, 1] is a ratio of the image's tokens. Progressive methods map `keep` onto their stage schedule
  (`scaled_schedule`).
- `CACHE_ENTRIES` (KV-cache methods): an int counts the cache entries kept per head and layer; a float is a ratio
  of the prompt's entries.
- `ATTENTION_MASS` (ZipVL): a float in (0, 1], the share of the attention mass the kept tokens must hold.
For every kind `keep=1.0` keeps everything, so every method then reproduces the dense model exactly.
Budgets on the command line, in the demo and in the eval / bench grids are parsed by `parse_budget`: "64" (count),
"0.25" or "25%" (ratio), or a preset name ("high").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import VTPruneError

Keep = int | float


@dataclass(frozen=True)
class BudgetKind:
    """What a method's `keep` counts."""

    name: str
    noun: str  # one of what keep counts
    unit: str  # what keep counts, in a few words
    meaning: str  # one line for help texts and errors
    counts: bool  # whether an int (a count) is allowed besides a ratio

    def check(self, keep: object, method: str) -> Keep:
        """`keep` if it is a valid budget of this kind; otherwise one clear error naming the method and the fix."""
        what = f"{method} keep={keep!r}"
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise VTPruneError(f"{what}: give {self.meaning}")
        if isinstance(keep, int) and not self.counts:
            raise VTPruneError(f"{what}: give {self.meaning} (a float such as {min(1.0, keep):.1f})")
        if isinstance(keep, int) and keep <= 0:
            raise VTPruneError(f"{what}: keep at least one {self.noun} (keep >= 1), or give a ratio in (0, 1]")
        if isinstance(keep, float) and not (math.isfinite(keep) and 0.0 < keep <= 1.0):
            raise VTPruneError(f"{what}: a ratio must lie in (0, 1]; {self.meaning}")
        return keep


VISUAL_TOKENS = BudgetKind(
    "visual_tokens",
    "visual token",
    "visual tokens per image",
    "visual tokens kept per image (an int) or a ratio of them in (0, 1] (a float)",
    counts=True,
)
CACHE_ENTRIES = BudgetKind(
    "cache_entries",
    "cache entry",
    "KV-cache entries per head",
    "KV-cache entries kept per head and layer (an int) or a ratio of the prompt in (0, 1]",
    counts=True,
)
ATTENTION_MASS = BudgetKind(
    "attention_mass", "", "a share of attention mass", "the share of attention mass to keep, a float in (0, 1]", counts=False
)
BUDGET_KINDS = (VISUAL_TOKENS, CACHE_ENTRIES, ATTENTION_MASS)


def check_keep(keep: object, name: str = "keep") -> Keep:
    """Validate a visual-token budget: a positive int (tokens) or a float ratio in (0, 1]."""
    return VISUAL_TOKENS.check(keep, name)


def keep_count(keep: Keep, available: int, *, what: str = "the image", rounding: str = "round") -> int:
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


def parse_budget(text: str) -> Keep | str:
    """One budget as typed by a user: "64" -> 64, "0.25" or "25%" -> 0.25, "1.0" -> 1.0, a name -> the name (a preset).

    Numbers are range-checked here (a count >= 1, a ratio in (0, 1]); which kind of budget a method takes is checked
    when the method is made.
    """
    value = text.strip()
    if not value:
        raise VTPruneError("empty budget: give a token count (64), a ratio in (0, 1] (0.25 or 25%) or a preset name")
    try:
        if value.endswith("%"):
            keep: Keep = float(value[:-1]) / 100
        elif value.lstrip("+-").isdigit():
            keep = int(value)
        else:
            keep = float(value)
    except ValueError:
        if value.replace("_", "").replace("-", "").isalnum() and not value[0].isdigit():
            return value  # a preset name, checked against the method's presets when it is made
        raise VTPruneError(
            f"budget {text!r}: give a token count (64), a ratio in (0, 1] (0.25 or 25%) or a preset name"
        ) from None
    if isinstance(keep, int) and keep <= 0:
        raise VTPruneError(f"budget {text!r}: keep at least one visual token (>= 1), or give a ratio in (0, 1]")
    if isinstance(keep, float) and not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise VTPruneError(f"budget {text!r}: a ratio must lie in (0, 1] (e.g. 0.25 or 25%); a count is an int")
    return keep


def scaled_schedule(ratios: tuple[float, ...], target: float) -> tuple[float, ...]:
    """A progressive method's stage ratios scaled geometrically so that the last one equals `target`.

    ratios: kept shares of the original count after each stage (non-increasing, in (0, 1]). Each r becomes r**alpha
    with alpha = log(target) / log(ratios[-1]): target 1 keeps everything (alpha = 0), the schedule's own last ratio
    gives it back unchanged (alpha = 1), and the stages keep their relative profile in between.
    """
    last = ratios[-1]
    if not 0.0 < target <= 1.0:
        raise VTPruneError(f"a kept share must lie in (0, 1], got {target}")
    if target >= 1.0:
        return tuple(1.0 for _ in ratios)
    if last >= 1.0:  # a schedule that keeps everything has no profile to scale: prune at the last stage only
        return (*ratios[:-1], target)
    alpha = math.log(target) / math.log(last)
    return tuple(min(1.0, r**alpha) for r in ratios)


def budget_argument(text: str) -> Keep | str:
    """`parse_budget` for argparse: a bad budget is reported as a usage error, with the same one line."""
    import argparse

    try:
        return parse_budget(text)
    except VTPruneError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
