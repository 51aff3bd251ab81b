"""vtprune: drop the visual tokens a vision-language model does not need, without retraining.

    import vtprune
    method = vtprune.make("vtc-cls", keep=64)
    with method(model) as trace:
        out = model.generate(**inputs, max_new_tokens=32)
    trace.summary()

`import vtprune` is cheap: torch, transformers and the methods load on first use of a name below (PEP 562), so
`vtprune --help` answers at once. The built-in methods and adapters register on first use too (`register_builtins`,
which the core's registries call before a lookup).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "KeepPlan", "Merge", "Method", "SiteContext", "Trace", "UnsupportedModelError", "UnsupportedSignalError",
    "VTPruneError", "available", "make", "register",
]

SUBPACKAGES = (
    "adapters", "agents", "cli", "convert", "core", "demo", "eval", "example", "kernels", "loading", "methods", "toy",
    "tune", "video", "viz",
)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from . import adapters, core, methods, video  # noqa: F401
    from .core import (  # noqa: F401
        KeepPlan,
        Merge,
        Method,
        SiteContext,
        Trace,
        UnsupportedModelError,
        UnsupportedSignalError,
        VTPruneError,
        available,
        make,
        register,
    )

_registered = False


def register_builtins() -> None:
    """Register the built-in adapters and methods (once; the core's registries call this before any lookup)."""
    global _registered
    if not _registered:
        _registered = True  # set first: a module imported below may look a method up while it registers
        try:
            from . import adapters, methods  # noqa: F401
        except BaseException:
            _registered = False
            raise


def __getattr__(name: str) -> Any:
    if name in __all__:
        register_builtins()
        value = getattr(importlib.import_module(".core", __name__), name)
        globals()[name] = value
        return value
    if name in SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'vtprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *SUBPACKAGES})
