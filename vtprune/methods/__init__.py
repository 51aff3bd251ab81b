"""Pruning methods, one file each. Importing this package registers them with `vtprune.make`."""

from . import cdpruner, fastv, gui_kv, holov, pool, random_prune, scope, transprune, vflowopt, visionzip, vtc_cls, zipvl  # noqa: F401

__all__ = ["cdpruner", "fastv", "gui_kv", "holov", "pool", "random_prune", "scope", "transprune", "vflowopt", "visionzip", "vtc_cls", "zipvl"]
