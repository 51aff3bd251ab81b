"""Pruning methods, one file each. Importing this package registers them with `vtprune.make`."""

from . import (  # noqa: F401
    a2sf, cdpruner, dart, divprune, ems, fastv, gui_kv, hiprune, holov, pool, pyramiddrop, random_prune, scissorhands,
    scope, spatten, streamingllm, tome, transprune, vflowopt, vispruner, visionzip, vtc_cls, zipvl,
)

__all__ = [
    "a2sf", "cdpruner", "dart", "divprune", "ems", "fastv", "gui_kv", "hiprune", "holov", "pool", "pyramiddrop",
    "random_prune", "scissorhands", "scope", "spatten", "streamingllm", "tome", "transprune", "vflowopt", "vispruner",
    "visionzip", "vtc_cls", "zipvl",
]
