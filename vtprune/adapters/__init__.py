"""Adapters, one file per model family. Importing this package registers them."""

from . import (  # noqa: F401
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_next_video,
    llava_onevision,
    open_clip,
    qwen2_vl,
    qwen3_vl,
)

__all__ = ["gemma3", "idefics3", "internvl", "llava", "llava_next", "llava_next_video", "llava_onevision", "open_clip",
           "qwen2_vl", "qwen3_vl"]
