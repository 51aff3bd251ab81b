"""Pruning methods, one file each. Importing this package registers them with `vtprune.make`."""

from . import (  # noqa: F401
    dart, divprune, fastv, gui_kv, pool, random_prune, transprune, vflowopt, vispruner, visionzip, vtc_cls, zipvl,
)

__all__ = [
    "dart", "divprune", "fastv", "gui_kv", "pool", "random_prune", "transprune", "vflowopt", "vispruner", "visionzip",
    "vtc_cls", "zipvl",
]
