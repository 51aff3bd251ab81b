"""Pruning methods, one file each. Importing this package registers them with `vtprune.make`."""

from . import dart, divprune, fastv, gui_kv, pool, random_prune, transprune, vflowopt, visionzip, vtc_cls, zipvl  # noqa: F401

__all__ = ["dart", "divprune", "fastv", "gui_kv", "pool", "random_prune", "transprune", "vflowopt", "visionzip", "vtc_cls", "zipvl"]
