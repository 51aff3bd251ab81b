"""Search spaces: the ranges a method declares for its tunable options (`vtprune tune`).

A tunable method defines a classmethod

    search_space(cls, info: ModelInfo, budget) -> tuple[dict[str, Uniform | IntRange | Choice], dict[str, Any]]

returning the ranges of its tuned options and the options the budget fixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Uniform:
    """A float option in [low, high]."""

    low: float
    high: float


@dataclass(frozen=True)
class IntRange:
    """An int option in low..high (inclusive)."""

    low: int
    high: int


@dataclass(frozen=True)
class Choice:
    """One of a few values."""

    values: tuple[Any, ...]


Param = Uniform | IntRange | Choice
