"""Pruning methods, one file each. Importing this package registers them with `vtprune.make`."""

from . import (  # noqa: F401
    cdpruner, dart, divprune, fastv, gui_kv, holov, pool, pyramiddrop, random_prune, scope, spatten, transprune,
    vflowopt, vispruner, visionzip, vtc_cls, zipvl,
)

__all__ = [
    "cdpruner", "dart", "divprune", "fastv", "gui_kv", "holov", "pool", "pyramiddrop", "random_prune", "scope",
    "spatten", "transprune", "vflowopt", "vispruner", "visionzip", "vtc_cls", "zipvl",
]
