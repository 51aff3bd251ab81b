"""Adapters, one file per model family. Importing this package registers them."""

from . import llava, open_clip, qwen2_vl  # noqa: F401

__all__ = ["llava", "open_clip", "qwen2_vl"]
