"""Pruning methods, one file each. Importing this package registers them with `vtprune.make`."""

from . import fastv, gui_kv, pool, random_prune, spatten, transprune, vflowopt, visionzip, vtc_cls, zipvl  # noqa: F401

__all__ = [
    "fastv", "gui_kv", "pool", "random_prune", "spatten", "transprune", "vflowopt", "visionzip", "vtc_cls", "zipvl",
]
