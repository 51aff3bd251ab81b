"""Cuts inside a transformers decoder language model, shared by the family adapters (see `cutter.py`)."""

from .cache import PrunedLayer, Segment
from .compressed import CompressedLayer
from .cutter import DecoderCutter

__all__ = ["CompressedLayer", "DecoderCutter", "PrunedLayer", "Segment"]
