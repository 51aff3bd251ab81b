"""Adapters, one file per model family. Importing this package registers them."""

from . import idefics3, internvl, llava, llava_next, llava_next_video, llava_onevision, open_clip, qwen2_vl, qwen3_vl  # noqa: F401

__all__ = ["idefics3", "internvl", "llava", "llava_next", "llava_next_video", "llava_onevision", "open_clip", "qwen2_vl", "qwen3_vl"]
