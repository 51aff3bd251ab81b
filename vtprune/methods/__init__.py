"""Pruning methods, one file each. Importing this package registers them with `vtprune.make`."""

from . import (
    cdpruner,
    fastv,
    gui_kv,
    holov,
    pool,
    pyramiddrop,
    random_prune,
    scope,
    transprune,
    vflowopt,
    visionzip,
    vtc_cls,
    zipvl,
)

__all__ = [
    "cdpruner", "fastv", "gui_kv", "holov", "pool", "pyramiddrop", "random_prune", "scope", "transprune", "vflowopt",
    "visionzip", "vtc_cls", "zipvl",
]
