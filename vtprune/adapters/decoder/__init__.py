"""Cuts inside a transformers decoder language model, shared by the family adapters (see `cutter.py`)."""

from .cache import PrunedLayer, Segment
from .compressed import CompressedLayer
from .cutter import DecoderCutter
from .layer_signals import LLM_SIGNALS

__all__ = ["CompressedLayer", "DecoderCutter", "LLM_SIGNALS", "PrunedLayer", "Segment"]
