"""Adapters, one file per model family. Importing this package registers them."""

from . import llava  # noqa: F401

__all__ = ["llava"]
