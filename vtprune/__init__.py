"""vtprune: drop the visual tokens a vision-language model does not need, without retraining.

    import vtprune
    method = vtprune.make("vtc-cls", keep=64)
    with method(model) as trace:
        out = model.generate(**inputs, max_new_tokens=32)
    trace.summary()
"""

from . import adapters, methods, video  # noqa: F401  (registers adapters and methods; vtprune.video.load)
from .core import (
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

__version__ = "0.1.0"

__all__ = [
    "KeepPlan", "Merge", "Method", "SiteContext", "Trace", "UnsupportedModelError", "UnsupportedSignalError",
    "VTPruneError", "available", "make", "register",
]
