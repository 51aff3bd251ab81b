"""Pruning methods, one file each. Importing this package registers them with `vtprune.make`."""

from . import fastv, pool, random_prune, vtc_cls  # noqa: F401

__all__ = ["fastv", "pool", "random_prune", "vtc_cls"]
