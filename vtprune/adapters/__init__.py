"""Adapters, one file per model family. Importing this package registers them."""

from . import llava, qwen2_vl  # noqa: F401

__all__ = ["llava", "qwen2_vl"]
